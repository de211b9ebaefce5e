"""Checkpoint formats: readers and writers owned by the core."""
