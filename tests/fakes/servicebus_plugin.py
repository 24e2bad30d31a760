"""pytest fixtures for the servicebus test peer (filled in by its backend work)."""
