"""Read one stored backup end to end against its manifest (run), each archive as a stream (scan)."""
