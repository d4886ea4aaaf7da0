"""Shared test infrastructure: broker, local federations, clean-up checks."""
