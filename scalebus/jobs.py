"""The job message: its versioned schema, validation, and the producer client.

One schema serves both ends. Producers validate before sending, so a job a worker could not run is refused at
submit time with a reason; workers validate again on receipt (a producer may not be ours) and dead-letter what
fails, with the same reason. The body is JSON; the Service Bus ``message_id`` is the job id.
"""

from __future__ import annotations

import json
import posixpath
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import pydantic
import structlog
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from scalebus import errors
from scalebus.backends import base

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024
"""Service Bus Standard tier's message size limit (headers included: we keep a margin below)."""
_HEADER_MARGIN_BYTES = 2 * 1024
SUPPORTED_SCHEMES = ("file", "abfss")
_SEND_BATCH = 100

JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
ParamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class Job(BaseModel):
    """A unit of work: stage ``inputs``, run the analytics with ``params``, publish to ``output``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(default=1, alias="schema")
    """Body format version; workers refuse versions they do not know."""
    job_id: JobId
    """Unique id (1-128 characters: letters, digits, ``. _ : -``); the queue message id."""
    inputs: list[str] = Field(min_length=1, max_length=10_000)
    """Files or folders (ending in ``/``) to stage, as ``file://`` or ``abfss://`` URIs."""
    output: str
    """Folder URI that receives the outputs (committed once, with a ``_SUCCESS`` marker last)."""
    params: dict[ParamName, str] = Field(default_factory=dict)
    """String parameters for the analytics (passed as ``SCALEBUS_PARAM_<NAME>``)."""
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    """Analytics timeout; the worker's ``job_timeout_s`` when absent."""

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, value: list[str]) -> list[str]:
        for uri in value:
            check_uri(uri)
        return value

    @field_validator("output")
    @classmethod
    def _check_output(cls, value: str) -> str:
        return check_uri(value)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


def check_uri(uri: str) -> str:
    """Accept a URI a worker can stage from or publish to; raise ``ValueError`` with the reason otherwise."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported scheme in {uri!r}: use one of {', '.join(SUPPORTED_SCHEMES)}")
    if parts.query or parts.fragment:
        raise ValueError(f"{uri!r} must not carry a query or fragment (no SAS tokens in jobs)")
    path = urllib.parse.unquote(parts.path)
    if ".." in path.split("/") or "\x00" in path:
        raise ValueError(f"{uri!r} has a '..' segment or NUL byte")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not path.startswith("/") or path == "/":
            raise ValueError(f"{uri!r} must be file:///absolute/path")
    elif "@" not in parts.netloc or not parts.netloc.split("@", 1)[0] or not parts.netloc.split("@", 1)[1]:
        raise ValueError(f"{uri!r} must be abfss://<filesystem>@<account>.dfs.core.windows.net/<path>")
    return uri


def parse_job(body: bytes) -> Job:
    """Validate a message body; raise ``InvalidJobError`` with a dead-letter reason otherwise."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidJobError("InvalidJson", f"body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise errors.InvalidJobError("SchemaViolation", "body must be a JSON object")
    version = raw.get("schema", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise errors.InvalidJobError(
            "UnsupportedVersion", f"schema {version!r} is not supported (this worker reads {SCHEMA_VERSION})"
        )
    return validate(raw)


def validate(raw: dict[str, object]) -> Job:
    try:
        return Job.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise errors.InvalidJobError("SchemaViolation", describe(exc)) from None


def describe(exc: pydantic.ValidationError) -> str:
    """One line per problem, naming the field: what a person fixing the job needs."""
    problems = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def to_message(job: Job) -> base.OutgoingMessage:
    """The queue message for a job; refuses one too large for Service Bus."""
    body = job.to_json()
    if len(body) > MAX_MESSAGE_BYTES - _HEADER_MARGIN_BYTES:
        raise errors.InvalidJobError(
            "MessageTooLarge",
            f"job {job.job_id} is {len(body)} bytes; Service Bus takes {MAX_MESSAGE_BYTES} with headers — "
            "list a folder instead of its files",
        )
    return base.OutgoingMessage(message_id=job.job_id, body=body)


def read_jobs_file(path: Path) -> list[Job]:
    """Jobs from a JSON file (one object or a list) or a JSON-lines file (``.jsonl``, one job per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.UserInputError(f"cannot read {path}: {exc.strerror}; pass a readable file") from None
    if path.suffix in (".jsonl", ".ndjson"):
        return [_job_at(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise errors.UserInputError(f"{path} is not JSON ({exc}); use .jsonl for one job per line") from None
    items = raw if isinstance(raw, list) else [raw]
    return [_validated(item, f"{path}[{i}]") for i, item in enumerate(items)]


def _job_at(line: str, where: str) -> Job:
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise errors.UserInputError(f"{where}: not JSON ({exc})") from None
    return _validated(raw, where)


def _validated(raw: object, where: str) -> Job:
    if not isinstance(raw, dict):
        raise errors.UserInputError(f"{where}: a job must be a JSON object")
    try:
        return validate(raw)
    except errors.InvalidJobError as exc:
        raise errors.UserInputError(f"{where}: {exc.description}") from None


def output_uri_for(job: Job) -> str:
    return job.output if job.output.endswith("/") else job.output + "/"


def folder_name(uri: str) -> str:
    """The last path segment of a URI (what a staged folder or file is called locally)."""
    return posixpath.basename(urllib.parse.urlsplit(uri).path.rstrip("/"))


class JobProducer:
    """Submits jobs: validates all of them first, refuses duplicates in the batch, sends in batches."""

    def __init__(self, queue: base.JobQueue) -> None:
        self._queue = queue

    def submit(self, jobs: Sequence[Job]) -> list[str]:
        messages = [to_message(job) for job in _unique(jobs)]
        for start in range(0, len(messages), _SEND_BATCH):
            self._queue.send(messages[start : start + _SEND_BATCH])
        log.info("jobs_submitted", count=len(messages), queue=self._queue.name)
        return [m.message_id for m in messages]


def _unique(jobs: Iterable[Job]) -> list[Job]:
    seen: set[str] = set()
    for job in jobs:
        if job.job_id in seen:
            raise errors.InvalidJobError("DuplicateId", f"job id {job.job_id} appears twice in this submission")
        seen.add(job.job_id)
    return list(jobs)
