"""Each benchmark owns one ``## `` section of bench/README.md and rewrites only that section."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).with_name("README.md")


def write_section(heading: str, section: str, *, readme: Path = README) -> None:
    """Replace the section under ``heading`` (up to the next ``## `` heading) or append it."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text.rstrip("\n") + "\n")
