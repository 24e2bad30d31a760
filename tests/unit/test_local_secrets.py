"""The embedded secret source (a folder, one file per secret) and the worker's cache over any source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.backends.local import secrets as local_secrets
from scalebus.worker import secrets as worker_secrets


def _write(folder: Path, name: str, value: str, mode: int = 0o600) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(value)
    path.chmod(mode)
    return path


def test_one_trailing_newline_is_dropped(tmp_path: Path) -> None:
    _write(tmp_path, "a", "value\n")
    _write(tmp_path, "b", "value\n\n")
    _write(tmp_path, "c", "value\r\n")
    source = local_secrets.FolderSecretSource(tmp_path)
    assert [source.get(n) for n in "abc"] == ["value", "value\n", "value"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666], ids=oct)
def test_a_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path, "token", "hidden-value", mode)
    with pytest.raises(errors.SecretError, match=re.escape(f"chmod 600 {path}")) as caught:
        local_secrets.FolderSecretSource(tmp_path).get("token")
    assert not isinstance(caught.value, errors.SecretNotFoundError)
    assert "hidden-value" not in str(caught.value)


def test_a_folder_is_not_a_secret(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir()
    with pytest.raises(errors.SecretNotFoundError, match="not a file"):
        local_secrets.FolderSecretSource(tmp_path).get("token")


def test_missing_folder_means_missing_secrets(tmp_path: Path) -> None:
    with pytest.raises(errors.SecretNotFoundError, match=f"not found in {tmp_path / 'nope'}"):
        local_secrets.FolderSecretSource(tmp_path / "nope").get("token")


@pytest.mark.parametrize(
    ("url", "folder"),
    [
        ("local://.scalebus/secrets", ".scalebus/secrets"),
        ("local:///etc/scalebus/secrets", "/etc/scalebus/secrets"),
    ],
)
def test_url_names_the_folder(url: str, folder: str) -> None:
    assert local_secrets.FolderSecretSource.from_url(url).folder == Path(folder)


def test_url_without_folder_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError, match=r"secrets\.url"):
        local_secrets.FolderSecretSource.from_url("local://")


# ------------------------------------------------------------------ the worker's cache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_values_are_reused_for_cache_s_then_reread(tmp_path: Path) -> None:
    _write(tmp_path, "token", "v1")
    clock = Clock()
    env = worker_secrets.SecretEnv(
        local_secrets.FolderSecretSource(tmp_path), {"API_TOKEN": "token"}, cache_s=60, clock=clock
    )
    assert env.resolve() == {"API_TOKEN": "v1"}
    _write(tmp_path, "token", "v2")  # rotated
    clock.now += 59
    assert env.resolve() == {"API_TOKEN": "v1"}
    clock.now += 1
    assert env.resolve() == {"API_TOKEN": "v2"}


def test_missing_secret_names_the_variable_and_the_secret(tmp_path: Path) -> None:
    env = worker_secrets.SecretEnv(local_secrets.FolderSecretSource(tmp_path), {"API_TOKEN": "nope"}, cache_s=0)
    with pytest.raises(errors.SecretNotFoundError, match=r"\$API_TOKEN: secret 'nope'"):
        env.resolve()
    with pytest.raises(errors.ConfigError, match=r"worker\.secret_env") as caught:
        env.check()
    assert "'nope'" in str(caught.value)


def test_mask_scrubs_every_value_read(tmp_path: Path) -> None:
    _write(tmp_path, "a", "alpha-secret")
    _write(tmp_path, "b", "alpha-secret-longer")
    env = worker_secrets.SecretEnv(local_secrets.FolderSecretSource(tmp_path), {"A": "a", "B": "b"}, cache_s=0)
    assert env.mask("alpha-secret-longer / alpha-secret") == "alpha-secret-longer / alpha-secret"  # none read yet
    env.resolve()
    assert env.mask("got alpha-secret-longer and alpha-secret") == "got *** and ***"
