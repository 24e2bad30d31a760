"""``scalebus demo`` as ``make demo`` runs it: relative folder, real processes, exit 0 and a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_to_completion_from_a_relative_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalebus",
            "demo",
            "--dir",
            "demo-run",
            "--samples",
            "3",
            "--reads",
            "300",
            "--max-workers",
            "2",
            "-o",
            "json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SCALEBUS_LOG__FORMAT": "json"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert (summary["submitted"], summary["ok"], summary["failed"], summary["dead_lettered"]) == (4, 3, 0, 1)
    assert summary["bytes_staged"] > 0 and summary["peak_workers"] >= 1
    results = Path(summary["results"])
    assert results == (tmp_path / "demo-run" / "results").resolve()
    qc = json.loads((results / "S01" / "qc.json").read_text())
    assert qc["sample"]["reads"] == 600  # two files of 300 reads


def test_demo_keeps_the_users_analytics_from_config(tmp_path: Path) -> None:
    program = tmp_path / "custom.py"
    program.write_text(
        "import os, pathlib\n"
        "inputs = sorted(p.name for p in pathlib.Path(os.environ['SCALEBUS_INPUT_DIR']).rglob('*.fastq.gz'))\n"
        "(pathlib.Path(os.environ['SCALEBUS_OUTPUT_DIR']) / 'custom.txt').write_text(','.join(inputs))\n"
    )
    config = tmp_path / "mine.toml"
    config.write_text(f'[worker]\ncommand = ["{sys.executable}", "{program}"]\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalebus",
            "demo",
            "--dir",
            "run",
            "--samples",
            "2",
            "--reads",
            "100",
            "--max-workers",
            "1",
            "--config",
            str(config),
            "-o",
            "json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SCALEBUS_LOG__FORMAT": "json"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = Path(json.loads(result.stdout)["results"])
    assert (results / "S02" / "custom.txt").read_text() == "S02_R1.fastq.gz,S02_R2.fastq.gz"
    assert not (results / "S02" / "qc.json").exists()


def test_the_demo_runs_two_pools_under_one_controller(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "scalebus", "demo", "--dir", "two", "--samples", "3", "--reads", "300"),
            *("--max-workers", "2", "--pools", "2", "-o", "json"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SCALEBUS_LOG__FORMAT": "json"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert (summary["submitted"], summary["ok"], summary["dead_lettered"]) == (4, 3, 1)
    pools = summary["pools"]
    assert {name: (p["submitted"], p["ok"]) for name, p in pools.items()} == {"short": (3, 2), "long": (1, 1)}
    assert all(p["peak_workers"] == 1 for p in pools.values())
