"""Settings: one tree from TOML + SCALEBUS_* env; every mistake names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalebus import errors, settings


def test_defaults_load_without_a_file() -> None:
    cfg = settings.load(environ={})
    assert cfg.queue.url.startswith("sqlite:///")
    assert cfg.scale_set.url == "local://"


def test_env_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[controller]\nmax_instances = 3\n[worker]\ncommand = ["echo", "hi"]\n')
    cfg = settings.load(path, environ={"SCALEBUS_CONTROLLER__MAX_INSTANCES": "7", "SCALEBUS_LOG__LEVEL": "debug"})
    assert cfg.controller.max_instances == 7
    assert cfg.worker.command == ["echo", "hi"]
    assert cfg.log.level == "debug"


@pytest.mark.parametrize(
    ("toml", "environ", "key", "fix"),
    [
        pytest.param(
            "[controller]\nmax_instances = 0\n",
            {},
            "controller.max_instances",
            "SCALEBUS_CONTROLLER__MAX_INSTANCES",
            id="out-of-range",
        ),
        pytest.param("[controler]\nmax_instances = 3\n", {}, "controler", "spelling", id="unknown-section"),
        pytest.param("[worker]\nidle_timeout = 3\n", {}, "worker.idle_timeout", "spelling", id="unknown-key"),
        pytest.param(
            "", {"SCALEBUS_QUEUE__LOCK_DURATION_S": "abc"}, "queue.lock_duration_s", "valid value", id="bad-env"
        ),
        pytest.param("[log]\nformat = 'xml'\n", {}, "log.format", "valid value", id="bad-literal"),
    ],
)
def test_errors_name_key_and_fix(tmp_path: Path, toml: str, environ: dict[str, str], key: str, fix: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(toml)
    with pytest.raises(errors.ConfigError) as caught:
        settings.load(path, environ=environ)
    assert caught.value.key == key
    assert fix in str(caught.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="does not exist"):
        settings.load(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue\nurl=")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        settings.load(bad, environ={})


def test_dump_toml_round_trips(tmp_path: Path) -> None:
    cfg = settings.load(
        environ={
            "SCALEBUS_WORKER__COMMAND": '["/opt/qc", "--say \\"hi\\""]',
            "SCALEBUS_CONTROLLER__PREWARM": "false",
            "SCALEBUS_STAGING__CHUNK_SIZE_BYTES": "1048576",
        }
    )
    path = tmp_path / "dumped.toml"
    path.write_text(settings.dump_toml(cfg))
    assert settings.load(path, environ={}) == cfg
