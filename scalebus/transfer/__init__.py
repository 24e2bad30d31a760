"""The staging engine: listing, planning and verified parallel transfer between stores and local disk.

Used by the worker, ``scalebus stage`` and ingest alike, so it depends on none of them.
"""
