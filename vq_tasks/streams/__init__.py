"""Bytes in motion, memory bounded: writers and stages (stages), compression (compress), readers
(readers)."""
