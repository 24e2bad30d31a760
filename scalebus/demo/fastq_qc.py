"""FASTQ quality control per sample: reads, bases, GC %, mean Phred quality, read-length distribution.

Run by the worker as ``python -m scalebus.demo.fastq_qc`` with ``SCALEBUS_INPUT_DIR`` and
``SCALEBUS_OUTPUT_DIR`` set; writes ``qc.json`` to the output folder. Param ``phred_offset`` (default 33).
Exits 3 (the worker dead-letters the job) when the input holds no FASTQ or a file is malformed: running the
same job again cannot help. Bytes are counted with ``bytes.count`` on batches, not per character in Python.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

EXIT_REJECT = 3
_BATCH = 20_000
_MAX_PHRED = 60


class MalformedFastq(Exception):
    pass


@dataclass
class FileQc:
    reads: int = 0
    bases: int = 0
    gc: int = 0
    quality_sum: int = 0
    lengths: collections.Counter[int] = field(default_factory=collections.Counter)

    def to_dict(self) -> dict[str, object]:
        return {
            "reads": self.reads,
            "bases": self.bases,
            "gc_percent": round(100.0 * self.gc / self.bases, 3) if self.bases else 0.0,
            "mean_phred": round(self.quality_sum / self.bases, 3) if self.bases else 0.0,
            "length_distribution": {str(k): v for k, v in sorted(self.lengths.items())},
        }


def _records(stream: BinaryIO) -> Iterator[tuple[bytes, bytes]]:
    lines = iter(stream)
    for number, header in enumerate(lines):
        seq, plus, qual = next(lines, b""), next(lines, b""), next(lines, b"")
        seq, qual = seq.rstrip(b"\r\n"), qual.rstrip(b"\r\n")
        if not header.startswith(b"@") or not plus.startswith(b"+") or len(seq) != len(qual):
            raise MalformedFastq(f"record {number + 1} is not a FASTQ record")
        yield seq, qual


def qc_stream(stream: BinaryIO, *, phred_offset: int = 33) -> FileQc:
    qc = FileQc()
    seqs: list[bytes] = []
    quals: list[bytes] = []
    for seq, qual in _records(stream):
        seqs.append(seq)
        quals.append(qual)
        if len(seqs) >= _BATCH:
            _add_batch(qc, seqs, quals, phred_offset)
            seqs, quals = [], []
    _add_batch(qc, seqs, quals, phred_offset)
    return qc


def _add_batch(qc: FileQc, seqs: list[bytes], quals: list[bytes], offset: int) -> None:
    seq, qual = b"".join(seqs), b"".join(quals)
    qc.reads += len(seqs)
    qc.bases += len(seq)
    qc.gc += sum(seq.count(base) for base in (b"G", b"C", b"g", b"c"))
    qc.quality_sum += sum(qual.count(bytes([offset + q])) * q for q in range(_MAX_PHRED + 1))
    qc.lengths.update(len(s) for s in seqs)


def open_fastq(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")  # type: ignore[return-value]


def main() -> int:
    in_dir = Path(os.environ["SCALEBUS_INPUT_DIR"])
    out_dir = Path(os.environ["SCALEBUS_OUTPUT_DIR"])
    offset = int(os.environ.get("SCALEBUS_PARAM_PHRED_OFFSET", "33"))
    files = sorted(p for p in in_dir.rglob("*") if p.name.endswith((".fastq", ".fastq.gz", ".fq", ".fq.gz")))
    if not files:
        print(f"no FASTQ files under {in_dir}", file=sys.stderr)
        return EXIT_REJECT
    report: dict[str, object] = {"job_id": os.environ.get("SCALEBUS_JOB_ID", ""), "files": {}}
    total = FileQc()
    for path in files:
        try:
            with open_fastq(path) as stream:
                qc = qc_stream(stream, phred_offset=offset)
        except (MalformedFastq, OSError, EOFError) as exc:
            print(f"{path.relative_to(in_dir)}: {exc}", file=sys.stderr)
            return EXIT_REJECT
        report["files"][str(path.relative_to(in_dir))] = qc.to_dict()  # type: ignore[index]
        total.reads, total.bases = total.reads + qc.reads, total.bases + qc.bases
        total.gc, total.quality_sum = total.gc + qc.gc, total.quality_sum + qc.quality_sum
        total.lengths.update(qc.lengths)
    report["sample"] = total.to_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "qc.json").write_text(json.dumps(report, indent=2))
    print(f"qc: {total.reads} reads, {total.bases} bases in {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
