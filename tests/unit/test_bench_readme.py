"""Benchmarks rewrite only their own section of bench/README.md."""

from __future__ import annotations

from pathlib import Path

from bench import _readme


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## Staging\n\nold staging\n\n## Scaling policy\n\nold policy\n")
    _readme.write_section("## Staging", "## Staging\n\nnew staging\n", readme=readme)
    _readme.write_section("## Live reaction", "## Live reaction\n\nappended\n", readme=readme)
    assert readme.read_text() == (
        "# Benchmarks\n\n## Staging\n\nnew staging\n\n## Scaling policy\n\nold policy\n\n"
        "## Live reaction\n\nappended\n"
    )
