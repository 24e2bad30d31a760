"""The staging engine: listing, planning and verified parallel transfer between stores and local disk.

Used by the worker, ``scalebus stage`` and ingest alike, so it depends on none of them. ``stage`` (stage_in) and
``publish`` are the entry points; ``plan`` and ``paths`` are pure; ``listing``, ``download``, ``manifest`` and
``helpers`` do the work; ``kit`` holds the throttle, progress and thread pool every transfer shares.
"""
