"""Container health check: healthy while a scalebus process runs and is neither stopped nor a zombie.

The image's entrypoint is tini, which stays alive even when its child hangs in a stopped state or is gone
while orphans linger; Docker then reports the container running. This reads /proc (no tools needed in the
image) and exits 0 only when a live ``scalebus`` process is found.
"""

from __future__ import annotations

import sys
from pathlib import Path

ALIVE_STATES = {"R", "S", "D"}  # running, sleeping, waiting on I/O; not T (stopped), t, Z (zombie), X


def is_scalebus(pid_dir: Path) -> bool:
    try:
        argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
        state = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ALIVE_STATES and any(part.endswith(b"/scalebus") for part in argv[:2])


def main() -> int:
    found = any(is_scalebus(p) for p in Path("/proc").iterdir() if p.name.isdigit())
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
