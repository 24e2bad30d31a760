"""Job schema: what producers may submit and what workers dead-letter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalebus import errors, jobs
from scalebus.backends.local import sqlite_queue

GOOD = {"job_id": "S01", "inputs": ["file:///lake/S01/"], "output": "file:///results/S01/"}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(GOOD, id="minimal"),
        pytest.param({**GOOD, "params": {"phred_offset": "33"}, "timeout_s": 60}, id="params-timeout"),
        pytest.param({**GOOD, "inputs": ["abfss://fs@acct.dfs.core.windows.net/samples/S01/"]}, id="abfss"),
        pytest.param({**GOOD, "schema": 1}, id="explicit-version"),
    ],
)
def test_valid_jobs(raw: dict[str, object]) -> None:
    job = jobs.parse_job(json.dumps(raw).encode())
    assert job.job_id == "S01"
    assert jobs.parse_job(job.to_json()) == job


@pytest.mark.parametrize(
    ("body", "reason", "mentions"),
    [
        pytest.param(b"not json", "InvalidJson", "JSON", id="not-json"),
        pytest.param(b"[1, 2]", "SchemaViolation", "object", id="not-object"),
        pytest.param(json.dumps({**GOOD, "schema": 2}).encode(), "UnsupportedVersion", "2", id="future-version"),
        pytest.param(json.dumps({**GOOD, "inputs": []}).encode(), "SchemaViolation", "inputs", id="no-inputs"),
        pytest.param(
            json.dumps({**GOOD, "inputs": ["s3://bucket/x"]}).encode(),
            "SchemaViolation",
            "scheme",
            id="unknown-scheme",
        ),
        pytest.param(
            json.dumps({**GOOD, "inputs": ["file://host/x"]}).encode(),
            "SchemaViolation",
            "file:///",
            id="file-with-host",
        ),
        pytest.param(
            json.dumps({**GOOD, "inputs": ["file:///lake/../etc"]}).encode(), "SchemaViolation", "..", id="dotdot"
        ),
        pytest.param(
            json.dumps({**GOOD, "output": "abfss://acct.dfs.core.windows.net/x"}).encode(),
            "SchemaViolation",
            "filesystem",
            id="abfss-without-filesystem",
        ),
        pytest.param(
            json.dumps({**GOOD, "inputs": ["abfss://fs@a.dfs.core.windows.net/x?sig=secret"]}).encode(),
            "SchemaViolation",
            "SAS",
            id="sas-in-uri",
        ),
        pytest.param(
            json.dumps({**GOOD, "job_id": "has space"}).encode(), "SchemaViolation", "job_id", id="bad-id"
        ),
        pytest.param(
            json.dumps({**GOOD, "params": {"x": 1}}).encode(), "SchemaViolation", "params", id="int-param"
        ),
        pytest.param(json.dumps({**GOOD, "extra": 1}).encode(), "SchemaViolation", "extra", id="unknown-field"),
        pytest.param(
            json.dumps({**GOOD, "timeout_s": -1}).encode(), "SchemaViolation", "timeout_s", id="negative-timeout"
        ),
    ],
)
def test_invalid_jobs_name_the_reason(body: bytes, reason: str, mentions: str) -> None:
    with pytest.raises(errors.InvalidJobError) as caught:
        jobs.parse_job(body)
    assert caught.value.reason == reason
    assert mentions in caught.value.description


def test_oversize_job_is_refused_before_sending() -> None:
    job = jobs.validate({**GOOD, "inputs": [f"file:///lake/S01/file{i:06d}.fastq.gz" for i in range(9000)]})
    with pytest.raises(errors.InvalidJobError) as caught:
        jobs.to_message(job)
    assert caught.value.reason == "MessageTooLarge"


def test_producer_refuses_duplicates_in_batch_and_in_queue(tmp_path: Path) -> None:
    queue = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=3)
    producer = jobs.JobProducer(queue)
    job = jobs.validate(GOOD)
    with pytest.raises(errors.InvalidJobError, match="twice"):
        producer.submit([job, job])
    assert queue.read_depth().active == 0, "nothing of a refused batch is sent"
    assert producer.submit([job]) == ["S01"]
    with pytest.raises(errors.DuplicateJobError, match="S01"):
        producer.submit([job])
    assert queue.read_depth().active == 1
    queue.close()


def test_read_jobs_file_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "one.json").write_text(json.dumps(GOOD))
    (tmp_path / "many.jsonl").write_text(
        "\n".join(json.dumps({**GOOD, "job_id": f"S{i}"}) for i in range(3)) + "\n\n"
    )
    assert [j.job_id for j in jobs.read_jobs_file(tmp_path / "one.json")] == ["S01"]
    assert [j.job_id for j in jobs.read_jobs_file(tmp_path / "many.jsonl")] == ["S0", "S1", "S2"]


def test_read_jobs_file_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps({"job_id": "x"}) + "\n")
    with pytest.raises(errors.UserInputError, match=r"bad.jsonl:2: .*inputs"):
        jobs.read_jobs_file(tmp_path / "bad.jsonl")
    with pytest.raises(errors.UserInputError, match="cannot read"):
        jobs.read_jobs_file(tmp_path / "missing.json")


def test_read_jobs_file_hostile_files_give_one_clear_error(tmp_path: Path) -> None:
    cases = {
        "latin1.json": "é".encode("latin-1") + json.dumps(GOOD).encode(),
        "deep.json": b"[" * 100_000 + b"]" * 100_000,
        "deep.jsonl": json.dumps(GOOD).encode() + b"\n" + b'{"a":' * 50_000 + b"\n",
        "dup.json": b'{"job_id": "S01", "job_id": "S02", "inputs": ["file:///lake/S01/"], "output": "file:///r/"}',
        "latin1.jsonl": json.dumps(GOOD).encode() + b"\n\xff\xfe\n",
    }
    expected = {
        "latin1.json": "not UTF-8",
        "deep.json": "nests deeper",
        "deep.jsonl": r"deep.jsonl:2: .*nests deeper",
        "dup.json": "appears twice",
        "latin1.jsonl": r"latin1.jsonl:2: .*not UTF-8",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(errors.UserInputError, match=expected[name]):
            jobs.read_jobs_file(tmp_path / name)


def test_read_jobs_file_takes_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n")
    assert [j.job_id for j in jobs.read_jobs_file(tmp_path / "bom.jsonl")] == ["S01"]


def test_read_jobs_file_applies_the_limits(tmp_path: Path) -> None:
    (tmp_path / "many.json").write_text(json.dumps([{**GOOD, "params": {f"p{i}": "v" for i in range(5)}}]))
    with pytest.raises(errors.UserInputError, match=r"many.json\[0\]: 5 params"):
        jobs.read_jobs_file(tmp_path / "many.json", limits=jobs.Limits(max_params=4))


def test_producer_refuses_overlapping_outputs_in_a_batch(tmp_path: Path) -> None:
    queue = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=3)
    first = jobs.validate({**GOOD, "output": "file:///results/S01/"})
    nested = jobs.validate({**GOOD, "job_id": "S02", "output": "file:///results/S01/sub/"})
    other = jobs.validate({**GOOD, "job_id": "S03", "output": "file:///results/S01b/"})
    with pytest.raises(errors.InvalidJobError) as caught:
        jobs.JobProducer(queue).submit([first, other, nested])
    assert caught.value.reason == "OutputConflict"
    assert jobs.JobProducer(queue).submit([first, other]) == ["S01", "S03"]
    queue.close()


def test_producer_runs_the_workers_intake_with_its_limits(tmp_path: Path) -> None:
    queue = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=3)
    job = jobs.validate(GOOD)
    with pytest.raises(errors.InvalidJobError) as caught:
        jobs.JobProducer(queue, limits=jobs.Limits(local_roots=())).submit([job])
    assert caught.value.reason == "PathNotAllowed"
    assert queue.read_depth().active == 0
    queue.close()
