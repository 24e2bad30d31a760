"""pytest fixtures for the azurite test peer (filled in by its backend work)."""
