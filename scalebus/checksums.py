"""MD5 as the stores use it: Content-MD5 is an integrity check against corrupt bytes, not a security measure.

At the bottom layer (no scalebus imports) so the staging engine, ingest and the store adapters share one
definition without importing each other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def new_md5() -> Any:
    """An empty MD5 hasher (``update`` / ``digest``), marked as not used for security (FIPS builds allow it)."""
    return hashlib.md5(usedforsecurity=False)


def bytes_md5(data: bytes) -> bytes:
    """The MD5 digest of ``data``."""
    return hashlib.md5(data, usedforsecurity=False).digest()


def file_md5(path: Path) -> bytes:
    """The MD5 digest of the file at ``path``, read in blocks (``OSError`` passes through to the caller)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, new_md5).digest()
