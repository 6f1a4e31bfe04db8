"""The way out: the backup run (pipeline), parts staged by dump tasks (staging), the bundle
assembled from them (bundle), and the off-site copy (offsite)."""
