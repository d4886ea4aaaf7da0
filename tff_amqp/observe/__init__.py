"""Watching a federation at work: invocation events, progress display, metrics."""
