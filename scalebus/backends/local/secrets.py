"""Secrets on the embedded default: a folder holding one file per secret, like Docker's ``/run/secrets``.

``secrets.url = "local://.scalebus/secrets"`` (relative to the working directory) or ``local:///etc/scalebus/secrets``
(absolute). The file named ``genomics-api-token`` holds that secret's value; one trailing newline is dropped, so
``echo "$TOKEN" > file`` works. Names follow Key Vault's rule (``settings.SECRET_NAME_PATTERN``), so a
configuration moves to Key Vault unchanged and a name can never walk out of the folder.

A secret file that its group or others may access is refused, as ssh refuses such a private key and libpq such a
``.pgpass``: the fix is ``chmod 600``. Each ``get`` reads the file again, so a rotated value is picked up at once.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from scalebus import errors, settings

SCHEME = "local://"
_NAME = re.compile(settings.SECRET_NAME_PATTERN)


class FolderSecretSource:
    """``base.SecretSource`` over a folder: the file ``<folder>/<name>`` holds secret ``name``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def from_url(cls, url: str) -> FolderSecretSource:
        """``local://<folder>``; raises ``ConfigError`` for anything else."""
        if not url.startswith(SCHEME) or not url[len(SCHEME) :]:
            raise errors.ConfigError(
                "secrets.url",
                f"{url!r} names no folder",
                "use local://<folder> (e.g. local://.scalebus/secrets) or https://<vault>.vault.azure.net",
            )
        return cls(Path(url[len(SCHEME) :]))

    def get(self, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise errors.SecretNotFoundError(f"secret {name!r}: not a valid secret name (letters, digits, '-')")
        path = self.folder / name
        try:
            mode = path.stat().st_mode
            if not stat.S_ISREG(mode):
                raise errors.SecretNotFoundError(f"secret {name!r}: {path} is not a file")
            if mode & 0o077:
                raise errors.SecretError(
                    f"secret {name!r}: {path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(mode):o}); run chmod 600 {path}"
                )
            value = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise errors.SecretNotFoundError(f"secret {name!r}: not found in {self.folder}") from None
        except UnicodeDecodeError:
            raise errors.SecretError(f"secret {name!r}: {path} is not UTF-8 text") from None
        except OSError as exc:
            raise errors.SecretError(f"secret {name!r}: cannot read {path} ({exc.strerror})") from None
        return value.removesuffix("\n").removesuffix("\r")

    def close(self) -> None:
        """Nothing to release: each ``get`` opens and closes its file."""
