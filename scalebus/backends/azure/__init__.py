"""Azure adapters. The only package in scalebus that imports ``azure.*`` (and, via ``_retry``, tenacity)."""
