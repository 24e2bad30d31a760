"""pytest fixtures for the compute test peer (filled in by its backend work)."""
