"""The silo side: an agent that serves executor requests next to local data."""
