"""The job message: its versioned schema, the one intake every body goes through, and the producer client.

A job body is untrusted input: producers may not be ours, and a bug or a hostile script can send anything. One
function, :func:`parse`, turns bytes into a :class:`Job` or raises :class:`~scalebus.errors.InvalidJobError` with a
reason code and a readable description, for *any* body. ``submit`` runs it on the exact bytes it is about to send
and workers run it on receipt, with the same :class:`Limits`, so a job refused by one is refused by the other and
a worker dead-letters what fails instead of crashing on it.

What the intake enforces: a bounded body (bytes, then nesting depth, both before parsing); UTF-8; JSON without
duplicate keys or ``NaN``; strict types (no coercion: ``true`` is not ``1``, ``"100"`` is not ``100.0``); bounded
inputs and params (count, sizes, characters, names that collide once upper-cased into environment names); URIs
checked by :mod:`scalebus.uris`, the code the storage adapters use; an output that overlaps no input; and, given
the configuration, ``file://`` paths inside ``storage.local_roots`` and outside the worker's own folders. What it
cannot decide from the message (symlinks, another job's committed output) is the worker's and adapter's check.
The Service Bus ``message_id`` is the job id.
"""

from __future__ import annotations

import functools
import itertools
import json
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import structlog
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from scalebus import errors, redact, settings, uris
from scalebus.backends import base

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024
"""Service Bus Standard tier's message size limit (headers included: we keep a margin below)."""
_HEADER_MARGIN_BYTES = 2 * 1024
SUPPORTED_SCHEMES = uris.SUPPORTED_SCHEMES
PARAM_ENV_PREFIX = "SCALEBUS_PARAM_"
MAX_ARG_STRLEN = 128 * 1024
"""Longest single argument or ``NAME=value`` environment string Linux launches a program with (execve(2))."""
MAX_JOBS_FILE_BYTES = 256 * 1024 * 1024
"""Largest ``--file`` that ``submit`` reads (a JSON list of jobs is parsed as a whole)."""
_SEND_BATCH = 100
_MAX_TIMEOUT_S = 7 * 24 * 3600
_ALLOWED_CONTROLS = frozenset("\t\n")

JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
ParamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one job (see ``[jobs]`` in the settings) and the configured local confinement.

    ``local_roots``: absolute folders ``file://`` inputs and outputs must lie in; ``None`` leaves ``file://``
    unconfined at intake (the schema alone), ``()`` refuses it. ``reserved``: absolute local folders no input
    or output may overlap (the worker's work dir, its secrets folder)."""

    max_body_bytes: int = 256 * 1024
    max_depth: int = 16
    max_inputs: int = 10_000
    max_params: int = 64
    max_param_value_bytes: int = 32 * 1024
    max_params_bytes: int = 64 * 1024
    local_roots: tuple[str, ...] | None = None
    reserved: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, cfg: settings.Settings, *, cwd: str, reserved: Iterable[str] = ()) -> Limits:
        """The limits a process configured with ``cfg`` applies; relative paths are taken from ``cwd``."""
        bounds = cfg.jobs
        return cls(
            max_body_bytes=bounds.max_body_bytes,
            max_depth=bounds.max_depth,
            max_inputs=bounds.max_inputs,
            max_params=bounds.max_params,
            max_param_value_bytes=bounds.max_param_value_bytes,
            max_params_bytes=bounds.max_params_bytes,
            local_roots=tuple(_absolute(root, cwd) for root in cfg.storage.local_roots),
            reserved=tuple(_absolute(path, cwd) for path in reserved),
        )


DEFAULT_LIMITS = Limits()


def _absolute(path: str, cwd: str) -> str:
    return posixpath.normpath(posixpath.join(cwd, path))


class Job(BaseModel):
    """A unit of work: stage ``inputs``, run the analytics with ``params``, publish to ``output``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Literal[1] = Field(default=1, alias="schema")
    """Body format version; workers refuse versions they do not know."""
    job_id: JobId
    """Unique id (1-128 characters: letters, digits, ``. _ : -``); the queue message id."""
    inputs: list[str] = Field(min_length=1)
    """Files or folders (ending in ``/``) to stage, as ``file://`` or ``abfss://`` URIs."""
    output: str
    """Folder URI that receives the outputs (committed once, with a ``_SUCCESS`` marker last)."""
    params: dict[ParamName, str] = Field(default_factory=dict)
    """String parameters for the analytics (passed as ``SCALEBUS_PARAM_<NAME>``, the name upper-cased)."""
    timeout_s: float | None = Field(default=None, gt=0, le=_MAX_TIMEOUT_S)
    """Analytics timeout; the worker's ``job_timeout_s`` when absent."""

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: object) -> object:
        if type(value) is not int:  # Literal[1] alone would take True and 1.0
            raise ValueError(f"must be the integer {SCHEMA_VERSION}")
        return value

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

    @field_validator("params")
    @classmethod
    def _check_params(cls, value: dict[str, str]) -> dict[str, str]:
        by_env: dict[str, str] = {}
        for name, text in value.items():
            bad = next((c for c in text if (ord(c) < 0x20 and c not in _ALLOWED_CONTROLS) or c == "\x7f"), None)
            if bad is not None:
                raise ValueError(f"{name} holds the control character {bad!r} (NUL and controls cannot be passed)")
            env = param_env_name(name)
            if env in by_env:
                raise ValueError(f"{by_env[env]} and {name} both become {env}: rename one")
            by_env[env] = name
        return value

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


def param_env_name(name: str) -> str:
    """The environment variable a param reaches the analytics as."""
    return PARAM_ENV_PREFIX + name.upper()


def check_uri(uri: str) -> str:
    """Accept a URI a worker can stage from or publish to; raise ``ValueError`` with the reason otherwise."""
    try:
        uris.check_job_uri(uri)
    except errors.UnsafePathError as exc:
        raise ValueError(str(exc)) from None
    return uri


# ---------------------------------------------------------------------------------------------------- intake


def parse(body: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Job:
    """The one intake: a message body to a :class:`Job`, or ``InvalidJobError`` (and nothing else) with the
    dead-letter reason. Safe on any input: sizes are checked before work proportional to them is done."""
    try:
        return _from_raw(_decode(body, max_bytes=limits.max_body_bytes, max_depth=limits.max_depth), limits)
    except errors.InvalidJobError as exc:
        raise errors.InvalidJobError(exc.reason, redact.redact(exc.description)) from None
    except Exception as exc:
        # The boundary the worker's settle path relies on: a body must never raise what the worker would treat
        # as its own crash. Every known failure is mapped above; this turns an
        # unforeseen one (a library's internal error on a pathological body) into a dead letter with its type.
        raise errors.InvalidJobError(
            "MalformedBody", redact.redact(f"the body could not be read ({type(exc).__name__})")
        ) from None


def parse_job(body: bytes) -> Job:
    """:func:`parse` with the default limits (and no local confinement)."""
    return parse(body)


def validate(raw: Mapping[str, object], *, limits: Limits = DEFAULT_LIMITS) -> Job:
    """A job from an already-parsed object (the ``submit`` flags); the checks of :func:`parse` after decoding."""
    try:
        return _from_raw(dict(raw), limits)
    except errors.InvalidJobError as exc:
        raise errors.InvalidJobError(exc.reason, redact.redact(exc.description)) from None


def _decode(body: bytes, *, max_bytes: int, max_depth: int) -> object:
    if not isinstance(body, bytes | bytearray | memoryview):
        raise errors.InvalidJobError("MalformedBody", f"the body is a {type(body).__name__}, not bytes")
    if len(body) > max_bytes:
        raise errors.InvalidJobError(
            "BodyTooLarge", f"the body is {len(body)} bytes; the limit is {max_bytes} (jobs.max_body_bytes)"
        )
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidJobError(
            "NotUtf8", f"the body is not UTF-8 (invalid byte at offset {exc.start})"
        ) from None
    _check_depth(text, max_depth)
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_refuse_constant)
    except RecursionError:  # the depth pre-scan makes this unreachable; kept so no parser limit becomes a crash
        raise errors.InvalidJobError("TooDeep", "the body nests too deeply") from None
    except ValueError as exc:
        raise errors.InvalidJobError("InvalidJson", f"the body is not JSON: {exc}") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` before the parser recurses into it (strings are skipped, so
    brackets inside them do not count)."""
    depth = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > max_depth:
            raise errors.InvalidJobError(
                "TooDeep", f"the body nests deeper than {max_depth} levels (jobs.max_depth); a job needs 2"
            )


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise errors.InvalidJobError("DuplicateKey", f"the key {uris.shown(key)} appears twice in one object")
        result[key] = value
    return result


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _from_raw(raw: object, limits: Limits) -> Job:
    if not isinstance(raw, dict):
        raise errors.InvalidJobError("SchemaViolation", "the body must be a JSON object")
    _check_unicode(raw)
    version = raw.get("schema", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:
        raise errors.InvalidJobError(
            "UnsupportedVersion",
            f"schema {_shown_value(version)} is not supported (this worker reads {SCHEMA_VERSION})",
        )
    _check_counts(raw, limits)
    try:
        job = Job.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise errors.InvalidJobError("SchemaViolation", describe(exc)) from None
    _check_param_sizes(job, limits)
    _check_paths(job, limits)
    return job


def _check_unicode(value: object) -> None:
    """Every string encodes as UTF-8: JSON's ``\\ud800`` escapes decode to lone surrogates, which no file name,
    environment variable or log line can carry."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.InvalidJobError(
                "SchemaViolation", "a string holds a lone surrogate (\\ud800-\\udfff)"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


def _check_counts(raw: dict[str, object], limits: Limits) -> None:
    """Counts first, before the per-item validation whose cost they bound."""
    inputs, params = raw.get("inputs"), raw.get("params")
    if isinstance(inputs, list) and len(inputs) > limits.max_inputs:
        raise errors.InvalidJobError(
            "TooManyInputs",
            f"{len(inputs)} inputs; the limit is {limits.max_inputs} (jobs.max_inputs): list a folder instead",
        )
    if isinstance(params, dict) and len(params) > limits.max_params:
        raise errors.InvalidJobError(
            "TooManyParams", f"{len(params)} params; the limit is {limits.max_params} (jobs.max_params)"
        )


def _check_param_sizes(job: Job, limits: Limits) -> None:
    total = 0
    for name, value in job.params.items():
        size = len(value.encode())
        if size > limits.max_param_value_bytes:
            raise errors.InvalidJobError(
                "ParamTooLarge",
                f"params.{name} is {size} bytes; the limit is {limits.max_param_value_bytes} "
                "(jobs.max_param_value_bytes): pass large values as an input file",
            )
        total += len(name) + size
    if total > limits.max_params_bytes:
        raise errors.InvalidJobError(
            "ParamsTooLarge",
            f"params total {total} bytes; the limit is {limits.max_params_bytes} (jobs.max_params_bytes)",
        )


def _check_paths(job: Job, limits: Limits) -> None:
    output = uris.check_job_uri(job.output)
    named = [(uri, uris.check_job_uri(uri)) for uri in job.inputs]
    for uri, where in named:
        if where.overlaps(output):
            raise errors.InvalidJobError(
                "OutputOverlapsInput",
                f"output {uris.shown(job.output)} overlaps input {uris.shown(uri)} (equal, or one inside the "
                "other): publishing would write into the job's own inputs; choose another output folder",
            )
    for uri, where, is_output in [*((u, w, False) for u, w in named), (job.output, output, True)]:
        if where.scheme == uris.FILE:
            _check_local(uri, where, limits, is_output=is_output)


def _check_local(uri: str, where: uris.Location, limits: Limits, *, is_output: bool) -> None:
    for reserved in limits.reserved:
        if where.overlaps(uris.local_location(reserved)):
            raise errors.InvalidJobError("PathNotAllowed", f"{uris.shown(uri)} overlaps the worker's own folders")
    if limits.local_roots is None:
        return
    if not limits.local_roots:
        raise errors.InvalidJobError(
            "PathNotAllowed",
            f"{uris.shown(uri)}: file:// URIs are not accepted here (storage.local_roots is empty)",
        )
    for root in limits.local_roots:
        segments = uris.local_location(root).segments
        inside = where.segments[: len(segments)] == segments
        if inside and (len(where.segments) > len(segments) or not is_output):
            return
    raise errors.InvalidJobError(
        "PathNotAllowed",
        f"{uris.shown(uri)} is outside storage.local_roots ({', '.join(limits.local_roots)})"
        + (" or is a root itself" if is_output else ""),
    )


def _shown_value(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "…"


def describe(exc: pydantic.ValidationError) -> str:
    """One line per problem, naming the field: what a person fixing the job needs."""
    problems = []
    for err in exc.errors()[:5]:
        where = ".".join(_shown_value(p) if not isinstance(p, int | str) else str(p) for p in err["loc"]) or "body"
        if len(where) > 80:
            where = where[:80] + "…"
        problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


# ---------------------------------------------------------------------------------------------------- launch


def launch_size_problem(
    argv: Sequence[str], env: Mapping[str, str], *, arg_max: int = 2 * 1024 * 1024
) -> str | None:
    """Why Linux would refuse to launch ``argv`` with ``env`` (``E2BIG``), or ``None``: each argument and each
    ``NAME=value`` string at most :data:`MAX_ARG_STRLEN` bytes, and all of them, with their pointers, within
    ``arg_max`` (``ARG_MAX``: a quarter of the stack limit, 2 MiB with the default 8 MiB stack; execve(2);
    ``os.sysconf("SC_ARG_MAX")`` reads it). The worker calls it before launching the analytics, so a job too
    large to launch is dead-lettered with this reason rather than failing as a crash."""
    total = 0
    for what, text in [*(("argument", a) for a in argv), *(("variable " + k, f"{k}={v}") for k, v in env.items())]:
        size = len(text.encode("utf-8", "surrogateescape")) + 1
        if size > MAX_ARG_STRLEN:
            return f"{what} is {size} bytes; Linux takes at most {MAX_ARG_STRLEN} per string"
        total += size + 8
    if total > arg_max:
        return f"arguments and environment total {total} bytes; Linux takes at most {arg_max} (ARG_MAX)"
    return None


# ---------------------------------------------------------------------------------------------------- producer


def to_message(job: Job, *, limits: Limits = DEFAULT_LIMITS) -> base.OutgoingMessage:
    """The queue message for a job, checked by the workers' intake (:func:`parse`) on its exact bytes; refuses one
    too large for Service Bus."""
    body = job.to_json()
    if len(body) > MAX_MESSAGE_BYTES - _HEADER_MARGIN_BYTES:
        raise errors.InvalidJobError(
            "MessageTooLarge",
            f"job {job.job_id} is {len(body)} bytes; Service Bus takes {MAX_MESSAGE_BYTES} with headers — "
            "list a folder instead of its files",
        )
    parse(body, limits=limits)
    return base.OutgoingMessage(message_id=job.job_id, body=body)


def read_jobs_file(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> list[Job]:
    """Jobs from a JSON file (one object or a list) or a JSON-lines file (``.jsonl``, one job per line), each
    through the workers' intake. Any problem is one :class:`~scalebus.errors.UserInputError` naming the place."""
    data = _read_bounded(path)
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        data = data[3:]
    if path.suffix in (".jsonl", ".ndjson"):
        lines = enumerate(data.split(b"\n"), 1)
        return [
            _user_error(f"{path}:{n}", functools.partial(parse, line, limits=limits))
            for n, line in lines
            if line.strip()
        ]
    try:
        raw = _decode(data, max_bytes=MAX_JOBS_FILE_BYTES, max_depth=limits.max_depth + 1)
    except errors.InvalidJobError as exc:
        hint = "; use .jsonl for one job per line" if exc.reason == "InvalidJson" else ""
        raise errors.UserInputError(f"{path}: {redact.redact(exc.description)}{hint}") from None
    items = raw if isinstance(raw, list) else [raw]
    return [
        _user_error(f"{path}[{i}]", functools.partial(_from_raw, item, limits)) for i, item in enumerate(items)
    ]


def _read_bounded(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_JOBS_FILE_BYTES + 1)
    except OSError as exc:
        raise errors.UserInputError(f"cannot read {path}: {exc.strerror}; pass a readable file") from None
    if len(data) > MAX_JOBS_FILE_BYTES:
        raise errors.UserInputError(f"{path} is over {MAX_JOBS_FILE_BYTES} bytes: split it into several files")
    return data


def _user_error(where: str, intake: Callable[[], Job]) -> Job:
    try:
        job = intake()
    except errors.InvalidJobError as exc:
        raise errors.UserInputError(f"{where}: {redact.redact(exc.description)}") from None
    return job


def output_uri_for(job: Job) -> str:
    return job.output if job.output.endswith("/") else job.output + "/"


def folder_name(uri: str) -> str:
    """The last path segment of a URI (what a staged folder or file is called locally)."""
    return posixpath.basename(urllib.parse.urlsplit(uri).path.rstrip("/"))


class JobProducer:
    """Submits jobs: checks all of them first (the workers' intake on each message's bytes, duplicate ids and
    overlapping outputs in the batch), then sends in batches."""

    def __init__(self, queue: base.JobQueue, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._queue = queue
        self._limits = limits

    def submit(self, jobs: Sequence[Job]) -> list[str]:
        messages = [to_message(job, limits=self._limits) for job in _unique(jobs)]
        for start in range(0, len(messages), _SEND_BATCH):
            self._queue.send(messages[start : start + _SEND_BATCH])
        log.info("jobs_submitted", count=len(messages), queue=self._queue.name)
        return [m.message_id for m in messages]


def _unique(jobs: Iterable[Job]) -> list[Job]:
    """Refuse a batch with a job id twice, or two outputs that overlap (one job would publish into another's)."""
    listed = list(jobs)
    seen: set[str] = set()
    for job in listed:
        if job.job_id in seen:
            raise errors.InvalidJobError("DuplicateId", f"job id {job.job_id} appears twice in this submission")
        seen.add(job.job_id)
    by_output = sorted((_output_key(job), job.job_id) for job in listed)
    # Sorted by path segments, a folder comes right before the first path inside it: neighbours suffice.
    for (first, first_id), (second, second_id) in itertools.pairwise(by_output):
        if second[: len(first)] == first:
            raise errors.InvalidJobError(
                "OutputConflict", f"jobs {first_id} and {second_id} have the same or nested outputs"
            )
    return listed


def _output_key(job: Job) -> tuple[str, ...]:
    where = uris.check_job_uri(job.output)
    return (where.scheme, where.store, *where.segments)
