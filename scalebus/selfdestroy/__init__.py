"""Self-destroy: an idle worker deletes its own instance from the scale set (see ``routine``)."""
