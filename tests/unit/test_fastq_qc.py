"""The example analytics compute what they claim, on data whose answer is known."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from scalebus.demo import demo, fastq_qc


def test_counts_on_known_records() -> None:
    data = b"@r1\nGGCA\n+\nIIII\n@r2\nAT\n+\n!!\n"  # I = Phred 40, ! = Phred 0
    qc = fastq_qc.qc_stream(io.BytesIO(data)).to_dict()
    assert qc == {
        "reads": 2,
        "bases": 6,
        "gc_percent": 50.0,
        "mean_phred": round(160 / 6, 3),
        "length_distribution": {"2": 1, "4": 1},
    }


def test_program_writes_qc_json_and_rejects_malformed(tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "s_R1.fastq.gz").write_bytes(gzip.compress(demo.fastq_bytes(random.Random(1), reads=500, name="s")))
    env = {**os.environ, "SCALEBUS_INPUT_DIR": str(inp), "SCALEBUS_OUTPUT_DIR": str(out), "SCALEBUS_JOB_ID": "s"}
    run = subprocess.run(
        [sys.executable, "-m", "scalebus.demo.fastq_qc"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "qc.json").read_text())
    assert report["sample"]["reads"] == 500
    assert 45 < report["sample"]["gc_percent"] < 55  # uniform random bases
    (inp / "broken.fastq").write_text("@r1\nACGT\n+\nII\n")
    bad = subprocess.run(
        [sys.executable, "-m", "scalebus.demo.fastq_qc"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == fastq_qc.EXIT_REJECT
    assert b"broken.fastq" in bad.stderr
