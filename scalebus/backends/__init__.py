"""Adapters behind the ports in :mod:`scalebus.backends.base`: ``local`` (embedded default) and ``azure``."""
