"""Container health check: ``/healthz`` of the scalebus process when its metrics are on, else a look at /proc.

With ``SCALEBUS_METRICS__PORT`` (controller) or ``SCALEBUS_METRICS__WORKER_PORT`` (worker) set in the container's
environment, the loop itself says whether it is alive: 200 is healthy, 503 (the loop stalled) is not. When no port
is set, or nothing listens on it (metrics off, or another worker holds the port), it falls back to /proc: the
image's entrypoint is tini, which stays alive even when its child hangs in a stopped state or is gone while
orphans linger, and Docker then reports the container running; healthy only while a live ``scalebus`` process
(neither stopped nor a zombie) is found. Standard library only: no tools needed in the image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

ALIVE_STATES = {"R", "S", "D"}  # running, sleeping, waiting on I/O; not T (stopped), t, Z (zombie), X
PORT_VARIABLES = ("SCALEBUS_METRICS__PORT", "SCALEBUS_METRICS__WORKER_PORT")


def is_scalebus(pid_dir: Path) -> bool:
    try:
        argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
        state = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ALIVE_STATES and any(part.endswith(b"/scalebus") for part in argv[:2])


def healthz(port: int, host: str = "127.0.0.1") -> bool | None:
    """``True``/``False`` as ``/healthz`` answers; ``None`` when nothing answers on the port."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=3) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return False  # 503: the loop stalled
    except (OSError, ValueError):
        return None


def configured_ports(environ: dict[str, str]) -> list[int]:
    ports = []
    for name in PORT_VARIABLES:
        raw = environ.get(name, "").strip()
        if raw.isdigit() and 0 < int(raw) < 65536:
            ports.append(int(raw))
    return ports


def main() -> int:
    for port in configured_ports(dict(os.environ)):
        verdict = healthz(port)
        if verdict is not None:
            return 0 if verdict else 1
    found = any(is_scalebus(p) for p in Path("/proc").iterdir() if p.name.isdigit())
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
