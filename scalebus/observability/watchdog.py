"""The systemd notify protocol for the controller unit (``Type=notify``, ``WatchdogSec=``).

``READY=1`` once the first round has succeeded (backends opened and read), ``WATCHDOG=1`` every round, a failed
one too (the loop is alive and backing off; it gives up by itself after enough of them), ``STOPPING=1`` on the way
out. Until ready, systemd's start timeout applies instead of the watchdog. Without ``NOTIFY_SOCKET`` (not under
systemd, or a ``Type=simple`` unit) nothing is opened and every call does nothing. See sd_notify(3):
https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html
"""

from __future__ import annotations

import os

import sdnotify


class Watchdog:
    def __init__(self) -> None:
        # sdnotify reads NOTIFY_SOCKET itself, and opens (and leaks) a socket even when it is unset: only with one
        self._notifier = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None
        self._ready = False

    @property
    def active(self) -> bool:
        return self._notifier is not None

    def ping(self, *, ready: bool) -> None:
        """One round is over (``ready``: it succeeded): feed the watchdog, and say ready the first time."""
        if self._notifier is None:
            return
        if ready and not self._ready:
            self._ready = True
            self._notifier.notify("READY=1")
        self._notifier.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._notifier is None:
            return
        notifier, self._notifier = self._notifier, None
        notifier.notify("STOPPING=1")
        if notifier.socket is not None:
            notifier.socket.close()
