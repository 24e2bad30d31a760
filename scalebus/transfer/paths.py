"""Path safety: whether a remote name can land on local disk as the same, single, contained file.

Pure. Staging, publishing and ingest all apply these rules, so a name is judged the same way whichever way the
data moves. A remote name is rejected (``UnsafePathError`` naming the path and the reason), never rewritten,
when it:

- is empty, absolute (leading ``/``), or has an empty, ``.`` or ``..`` segment;
- contains a backslash (a separator on other systems, an escape risk when data moves on);
- contains NUL, control characters (Unicode Cc), format characters (Cf: bidi overrides, zero-width joiners that
  make two names look alike), line/paragraph separators or lone surrogates;
- is not in Unicode NFC. Normalising silently could merge two remote names into one local file; rejecting keeps
  the mapping one-to-one and the data lake remains the place to fix the name;
- has a segment longer than 255 UTF-8 bytes or a total length above 4,095 bytes (Linux ``NAME_MAX``/``PATH_MAX``).

Names that differ only in case are *allowed*: ADLS Gen2 and the staging disk (ext4/xfs) are both case-sensitive,
so ``A.txt`` and ``a.txt`` stay two files. Staging onto a case-insensitive file system is not supported.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
import urllib.parse

from scalebus import errors

NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4095
_REJECTED_CATEGORIES = {"Cc": "a control character", "Cf": "a format character", "Cs": "a lone surrogate"}
_REJECTED_CATEGORIES |= {"Zl": "a line separator", "Zp": "a paragraph separator"}
_ASCII_CONTROL_OR_BACKSLASH = re.compile(r"[\x00-\x1f\x7f\\]")


def check_rel_path(rel_path: str) -> None:
    """Raise ``UnsafePathError`` unless ``rel_path`` is a safe, '/'-separated relative path (module docstring)."""
    reason = unsafe_reason(rel_path)
    if reason is not None:
        raise errors.UnsafePathError(f"{rel_path!r}: {reason}")


def unsafe_reason(rel_path: str) -> str | None:
    """Why ``rel_path`` cannot land safely (module docstring), or ``None`` when it can.

    Staging judges every listed name, so the common case (ASCII) takes a fast path; names outside ASCII, or
    ones it cannot clear, take the per-character Unicode check, which also names the reason.
    """
    if plainly_safe_ascii(rel_path):
        return None
    return _full_check(rel_path)


def plainly_safe_ascii(rel_path: str) -> bool:
    """True only for an ASCII name every rule accepts: ASCII's only rejected characters are the controls (Cc)
    and the backslash (it has no Cf, Zl, Zp or surrogates, and is always NFC); a ``.`` or ``..`` segment needs a
    ``.`` at a segment start, an empty one ``//`` or a ``/`` at either end."""
    return (
        rel_path.isascii()
        and rel_path != ""
        and _ASCII_CONTROL_OR_BACKSLASH.search(rel_path) is None
        and rel_path[0] not in "/."
        and rel_path[-1] != "/"
        and "//" not in rel_path
        and "/." not in rel_path
        and (len(rel_path) <= NAME_MAX_BYTES or max(map(len, rel_path.split("/"))) <= NAME_MAX_BYTES)
    )


def _full_check(rel_path: str) -> str | None:
    if not rel_path:
        return "empty path"
    if rel_path.startswith("/"):
        return "absolute path"
    if "\\" in rel_path:
        return "contains a backslash"
    for char in rel_path:
        if char == "\x00":
            return "contains NUL"
        category = unicodedata.category(char)
        if category in _REJECTED_CATEGORIES:
            return f"contains {_REJECTED_CATEGORIES[category]} (U+{ord(char):04X})"
    if unicodedata.normalize("NFC", rel_path) != rel_path:
        return "not in Unicode NFC (normalising could merge it with another name)"
    for segment in rel_path.split("/"):
        if segment in ("", ".", ".."):
            return f"has a {segment!r} segment" if segment else "has an empty segment"
        if len(segment.encode("utf-8")) > NAME_MAX_BYTES:
            return f"a segment is longer than {NAME_MAX_BYTES} bytes"
    return None


def source_base_name(uri: str) -> str:
    """The last segment of a source URI (the folder name a folder source lands under)."""
    parts = urllib.parse.urlsplit(uri)
    name = posixpath.basename(urllib.parse.unquote(parts.path).rstrip("/"))
    if not name and parts.scheme == "abfss" and "@" in parts.netloc:
        name = parts.netloc.split("@", 1)[0]  # the root of a file system lands under the file system's name
    if not name:
        raise errors.UnsafePathError(f"{uri!r}: has no folder name to stage under; name a folder below the root")
    check_rel_path(name)
    return name
