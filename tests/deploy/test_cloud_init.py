"""The node's cloud-init files pass Debian's ``cloud-init schema`` and write a complete scalebus config."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from scalebus import settings
from tests.deploy import _tools

CLOUD_INITS = {
    "worker": _tools.DOCKER / "cloud-init.yaml",
    "controller": _tools.DOCKER / "cloud-init-controller.yaml",
}


def schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    binary = _tools.validator("cloud-init", install_hint="apt-get install cloud-init")
    return subprocess.run(
        [binary, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def written_file(doc: dict[str, object], path: str) -> str:
    files = doc["write_files"]
    assert isinstance(files, list)
    (entry,) = [f for f in files if f["path"] == path]
    content: str = entry["content"]
    return content


@pytest.mark.parametrize("role", sorted(CLOUD_INITS))
def test_rendered_cloud_init_passes_the_schema(role: str, tmp_path: Path) -> None:
    rendered = tmp_path / "user-data.yaml"
    rendered.write_text(_tools.render(CLOUD_INITS[role].read_text()))
    result = schema_check(rendered)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_the_schema_check_rejects_what_it_should(tmp_path: Path) -> None:
    """A numbered fs_setup partition (the old file's mistake) is refused: the check above can fail."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("#cloud-config\nfs_setup:\n  - {device: /dev/sdb, partition: 1, filesystem: ext4}\n")
    result = schema_check(bad)
    assert result.returncode != 0
    assert "fs_setup.0.partition" in result.stdout + result.stderr


@pytest.mark.parametrize("role", sorted(CLOUD_INITS))
def test_boot_keeps_the_default_user_and_downloads_nothing(role: str) -> None:
    text = CLOUD_INITS[role].read_text()
    doc = yaml.safe_load(_tools.render(text))
    assert doc["users"][0] == "default"
    assert not {"packages", "package_update", "package_upgrade"} & set(doc)
    commands = " ".join(" ".join(map(str, c)) if isinstance(c, list) else c for c in doc.get("runcmd", []))
    for word in ("pip", "apt", "curl", "wget"):
        assert word not in commands


@pytest.mark.parametrize("role", sorted(CLOUD_INITS))
def test_the_written_config_is_complete(role: str, tmp_path: Path) -> None:
    doc = yaml.safe_load(_tools.render(CLOUD_INITS[role].read_text()))
    path = tmp_path / "scalebus.toml"
    path.write_text(written_file(doc, "/etc/scalebus/scalebus.toml"))
    cfg = settings.load(path, environ={})
    assert cfg.queue.url == _tools.SAMPLE_VALUES["QUEUE_URL"]
    assert cfg.queue.depth_source == "admin"
    assert cfg.scale_set.url == _tools.SAMPLE_VALUES["SCALE_SET_ID"]
    assert cfg.storage.account_url == _tools.SAMPLE_VALUES["STORAGE_ACCOUNT_URL"]
    assert list(cfg.storage.local_roots) == [], "an Azure node stages from the lake only: file:// is refused"
    env = written_file(doc, "/etc/scalebus/environment")
    assert f"AZURE_CLIENT_ID={_tools.SAMPLE_VALUES['CLIENT_ID']}" in env
    if role == "worker":
        assert cfg.worker.command == ["/opt/analytics/bin/run-sample", "--threads", "4"]
        assert cfg.worker.work_dir == "/mnt/scratch/scalebus"
        assert cfg.worker.drain_timeout_s == 300
        assert cfg.secrets.url == _tools.SAMPLE_VALUES["KEY_VAULT_URL"]
    else:
        assert cfg.controller.max_instances == 10


def test_worker_mounts_the_scratch_disk_and_sets_the_stop_timeout() -> None:
    doc = yaml.safe_load(_tools.render(CLOUD_INITS["worker"].read_text()))
    (mount,) = doc["mounts"]
    assert mount[:2] == ["ephemeral0", "/mnt/scratch"]
    assert "nofail" in mount[3]
    drop_in = written_file(doc, "/etc/systemd/system/scalebus-worker.service.d/stop-timeout.conf")
    timeout = int(drop_in.split("TimeoutStopSec=")[1].split()[0])
    assert timeout == int(_tools.SAMPLE_VALUES["DRAIN_TIMEOUT_S"]) + 60
    work_dir = tomllib.loads(written_file(doc, "/etc/scalebus/scalebus.toml"))["worker"]["work_dir"]
    assert work_dir.startswith("/mnt/scratch/")
