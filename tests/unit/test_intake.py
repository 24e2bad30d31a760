"""Job intake: any body ends as a valid job or an ``InvalidJobError`` with a reason, never another exception.

The tables name a class of hostile body each; the property tests drive ``jobs.parse`` with generated ones.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalebus import errors, jobs, uris
from scalebus import settings as scalebus_settings
from scalebus.backends.azure import datalake
from scalebus.backends.local import folder

GOOD = {"job_id": "S01", "inputs": ["file:///lake/S01/"], "output": "file:///results/S01/"}


def body(**changes: object) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def reason_of(data: bytes, limits: jobs.Limits = jobs.DEFAULT_LIMITS) -> str:
    with pytest.raises(errors.InvalidJobError) as caught:
        jobs.parse(data, limits=limits)
    assert caught.value.description, "every refusal says why"
    return caught.value.reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"\xff\xfe{}", "NotUtf8", id="not-utf8"),
        pytest.param(b"\xed\xa0\x80", "NotUtf8", id="utf8-encoded-surrogate"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "TooDeep", id="deep-list"),
        pytest.param(b'{"a":' * 40_000 + b"1" + b"}" * 40_000, "TooDeep", id="deep-object"),
        pytest.param(b'{"job_id": "S01", "job_id": "S02"}', "DuplicateKey", id="duplicate-key"),
        pytest.param(body(params={"a": "1"})[:-1] + b', "params": {}}', "DuplicateKey", id="duplicate-params"),
        pytest.param(b" " * (300 * 1024), "BodyTooLarge", id="huge-body"),
        pytest.param(b'{"timeout_s": NaN}', "InvalidJson", id="nan"),
        pytest.param(b'{"timeout_s": Infinity}', "InvalidJson", id="infinity"),
        pytest.param(b"1" * 5000, "InvalidJson", id="huge-integer"),
        pytest.param(b"", "InvalidJson", id="empty"),
        pytest.param(b'"\\ud800"', "SchemaViolation", id="bare-string"),
        pytest.param(body(job_id="\\ud800").replace(b"\\\\", b"\\"), "SchemaViolation", id="lone-surrogate"),
        pytest.param(body(schema=True), "UnsupportedVersion", id="schema-true"),
        pytest.param(body(schema=1.0), "UnsupportedVersion", id="schema-float"),
        pytest.param(body(timeout_s=True), "SchemaViolation", id="timeout-bool"),
        pytest.param(body(timeout_s="100"), "SchemaViolation", id="timeout-string"),
        pytest.param(body(params={"n": 1}), "SchemaViolation", id="param-int"),
        pytest.param(body(params={"n": True}), "SchemaViolation", id="param-bool"),
        pytest.param(body(inputs="file:///lake/S01/"), "SchemaViolation", id="inputs-string"),
        pytest.param(body(job_id=1), "SchemaViolation", id="id-int"),
        pytest.param(body(params={"a": "x\x00y"}), "SchemaViolation", id="param-nul"),
        pytest.param(body(params={"a": "x\x1by"}), "SchemaViolation", id="param-escape"),
        pytest.param(body(params={"mode": "a", "MODE": "b"}), "SchemaViolation", id="param-case-collision"),
        pytest.param(body(params={"a": "x" * 40_000}), "ParamTooLarge", id="param-huge"),
        pytest.param(body(params={f"p{i}": "x" for i in range(65)}), "TooManyParams", id="params-many"),
        pytest.param(body(params={f"p{i}": "x" * 30_000 for i in range(3)}), "ParamsTooLarge", id="params-total"),
        pytest.param(body(inputs=[f"file:///lake/{i}" for i in range(10_001)]), "TooManyInputs", id="inputs-many"),
        pytest.param(body(output="file:///lake/S01/"), "OutputOverlapsInput", id="output-equals-input"),
        pytest.param(body(output="file:///lake/S01/out/"), "OutputOverlapsInput", id="output-inside-input"),
        pytest.param(body(output="file:///lake/"), "OutputOverlapsInput", id="input-inside-output"),
        pytest.param(body(output="file:///lake/./S01"), "OutputOverlapsInput", id="output-dot-segment"),
        pytest.param(
            body(
                inputs=["abfss://fs@Acct.dfs.core.windows.net/a/"],
                output="abfss://fs@acct.dfs.core.windows.net/a/b",
            ),
            "OutputOverlapsInput",
            id="abfss-host-case",
        ),
        pytest.param(body(inputs=["FILE:///lake/x"]), "SchemaViolation", id="scheme-case"),
        pytest.param(body(inputs=["abfss://fs@acct/x"]), "SchemaViolation", id="abfss-host-without-dot"),
        pytest.param(body(inputs=["abfss://fs@evil@acct.dfs.core.windows.net/x"]), "SchemaViolation", id="two-at"),
        pytest.param(body(inputs=["file:///lake/%2e%2e/etc"]), "SchemaViolation", id="encoded-dotdot"),
        pytest.param(body(inputs=["file:///lake/a%00b"]), "SchemaViolation", id="encoded-nul"),
        pytest.param(body(inputs=["file:///lake/a%ffb"]), "SchemaViolation", id="encoded-not-utf8"),
        pytest.param(body(inputs=["file:///lake/a\nb"]), "SchemaViolation", id="newline-in-uri"),
        pytest.param(body(inputs=["file:///lake/x?"]), "SchemaViolation", id="empty-query"),
        pytest.param(body(inputs=["file:///"]), "SchemaViolation", id="file-root"),
        pytest.param(body(inputs=["abfss://[fs@acct.dfs.core.windows.net/x"]), "SchemaViolation", id="bad-netloc"),
    ],
)
def test_hostile_body_classes_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason


def test_strict_types_keep_real_numbers() -> None:
    assert jobs.parse(body(timeout_s=60)).timeout_s == 60.0
    assert jobs.parse(body(timeout_s=0.5)).timeout_s == 0.5
    assert jobs.parse(body(params={"multi": "line\none\ttab"})).params == {"multi": "line\none\ttab"}


def test_limits_come_from_the_settings_and_confine_local_paths(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('[jobs]\nmax_params = 1\n[storage]\nlocal_roots = ["lake", "/results"]\n')
    limits = jobs.Limits.from_settings(
        scalebus_settings.load(toml, environ={}), cwd="/", reserved=["/lake/work", "secrets"]
    )
    assert limits.local_roots == ("/lake", "/results") and limits.reserved == ("/lake/work", "/secrets")
    assert jobs.parse(body(), limits=limits).job_id == "S01"
    assert reason_of(body(params={"a": "1", "b": "2"}), limits) == "TooManyParams"
    for hostile in (
        body(inputs=["file:///proc/self/environ"]),
        body(inputs=["file:///dev/zero"]),
        body(inputs=["file:///lakehouse/x"]),
        body(inputs=["file:///lake/work/other-job/"]),
        body(inputs=["file:///secrets/api-token"]),
        body(output="file:///results/"),
        body(output="file:///tmp/out/"),
    ):
        assert reason_of(hostile, limits) == "PathNotAllowed"
    refuse_all = jobs.Limits(local_roots=())
    assert reason_of(body(), refuse_all) == "PathNotAllowed"
    remote = {"inputs": ["abfss://fs@a.dfs.core.windows.net/x"], "output": "abfss://fs@a.dfs.core.windows.net/y/"}
    assert jobs.parse(body(**remote), limits=refuse_all).job_id == "S01"


def test_limits_bound_input_count() -> None:
    assert (
        reason_of(body(inputs=["file:///lake/a", "file:///lake/b"]), jobs.Limits(max_inputs=1)) == "TooManyInputs"
    )


def test_default_local_roots_are_the_demos() -> None:
    assert scalebus_settings.load(environ={}).storage.local_roots == [".demo/lake", ".demo/results"]
    with pytest.raises(errors.ConfigError, match="pass_env"):
        scalebus_settings.load(environ={"SCALEBUS_WORKER__PASS_ENV": '["SCALEBUS_QUEUE__URL"]'})


URIS = [
    "file:///lake/S01/",
    "file://localhost/lake/a.txt",
    "file:///lake/with%20space/",
    "file://host/lake",
    "file:lake",
    "file:///lake/../etc",
    "file:///lake/a%00",
    "file:///lake/a%ff",
    "file:///lake/x?sig=secret",
    "file:///lake/x#frag",
    "abfss://fs@acct.dfs.core.windows.net/samples/",
    "abfss://fs@acct.dfs.core.windows.net/",
    "abfss://fs@127.0.0.1:10000/samples/",
    "abfss://acct.dfs.core.windows.net/x",
    "abfss://@acct.dfs.core.windows.net/x",
    "abfss://fs@acct/x",
    "abfss://fs@a@acct.dfs.core.windows.net/x",
    "abfss://fs@acct.dfs.core.windows.net/x?sv=1&sig=abc",
    "abfss://fs@acct.dfs.core.windows.net/a/../b",
]


@pytest.mark.parametrize("uri", URIS)
def test_intake_and_adapter_agree_on_every_uri(uri: str) -> None:
    """A URI the intake accepts is one its adapter parses, so no job passes submit and fails the adapter."""
    try:
        jobs.check_uri(uri)
        accepted = True
    except ValueError:
        accepted = False
    adapter = folder.path_of if uri.startswith("file:") else datalake.AbfssPath.parse
    if accepted:
        adapter(uri)
    elif uri != "file:///":  # the file system root is a valid location, only not a job's
        with pytest.raises(errors.UnsafePathError):
            adapter(uri)


def test_launch_size_problem_names_e2big_causes() -> None:
    assert jobs.launch_size_problem(["python", "-m", "x"], {"SCALEBUS_JOB_ID": "S01"}) is None
    one = jobs.launch_size_problem(["run"], {"SCALEBUS_PARAM_A": "x" * jobs.MAX_ARG_STRLEN})
    assert one is not None and "SCALEBUS_PARAM_A" in one and "xxxx" not in one
    many = {f"V{i}": "x" * 100_000 for i in range(30)}
    total = jobs.launch_size_problem(["run"], many)
    assert total is not None and "ARG_MAX" in total
    assert jobs.launch_size_problem(["run"], many, arg_max=8 * 1024 * 1024) is None


def test_param_env_name_is_the_collision_rule() -> None:
    assert jobs.param_env_name("phred_offset") == "SCALEBUS_PARAM_PHRED_OFFSET"


def test_an_unforeseen_failure_inside_intake_is_still_an_invalid_job(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(job: jobs.Job, limits: jobs.Limits) -> None:
        raise KeyError("internal")

    monkeypatch.setattr(jobs, "_check_paths", broken)
    assert reason_of(body()) == "MalformedBody"


def test_descriptions_are_bounded_and_redacted() -> None:
    with pytest.raises(errors.InvalidJobError) as caught:
        jobs.parse(body(inputs=["abfss://fs@a.dfs.core.windows.net/" + "x" * 100_000 + "?sig=TOPSECRETSIG"]))
    assert "TOPSECRETSIG" not in caught.value.description
    assert len(caught.value.description) < 1000
    with pytest.raises(errors.InvalidJobError) as caught:
        jobs.parse(json.dumps({**GOOD, "k" * 10_000: 1}).encode())
    assert len(caught.value.description) < 1000


# ------------------------------------------------------------------------------------------- property tests

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
_FIELDS = st.sampled_from(["schema", "job_id", "inputs", "output", "params", "timeout_s", "extra"])


@st.composite
def _mutated_job(draw: st.DrawFn) -> bytes:
    raw: dict[str, object] = dict(GOOD)
    for field in draw(st.lists(_FIELDS, max_size=3)):
        raw[field] = draw(_JSON)
    text = json.dumps(raw, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def _textual_hostile(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(1, 3000))
    kind = draw(st.sampled_from(["deep", "deep-object", "dup", "surrogate", "big-string", "unbalanced"]))
    if kind == "deep":
        return b"[" * n + b"]" * draw(st.integers(0, n))
    if kind == "deep-object":
        return b'{"a":' * n + b"0" + b"}" * n
    if kind == "dup":
        return body()[:-1] + b', "' + draw(_FIELDS).encode() + b'": ' + json.dumps(draw(_JSON)).encode() + b"}"
    if kind == "surrogate":
        return body(params={"a": "PLACE"}).replace(b"PLACE", b"\\ud8%02x" % draw(st.integers(0, 255)))
    if kind == "big-string":
        return body(params={"a": "x" * draw(st.integers(0, 300_000))})
    return draw(st.sampled_from([b"{", b"[}", b'"', b'{"a"', b"]]]", b"{]"])) * n


_HOSTILE = st.one_of(
    st.binary(max_size=512),
    _JSON.map(lambda v: json.dumps(v).encode()),
    _mutated_job(),
    _textual_hostile(),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_HOSTILE)
def test_any_body_is_a_job_or_an_invalid_job(data: bytes) -> None:
    try:
        job = jobs.parse(data)
    except errors.InvalidJobError as exc:
        assert exc.reason and exc.description
        return
    assert jobs.parse(job.to_json()) == job


_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-_. é", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
_PARAM_NAME = st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True)
_PARAM_VALUE = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x7f"), max_size=50
)


@st.composite
def _valid_job(draw: st.DrawFn) -> jobs.Job:
    inputs = [
        uris_of("file:///lake/", draw(st.lists(_SEGMENT, min_size=1, max_size=3)))
        for _ in range(draw(st.integers(1, 5)))
    ]
    return jobs.validate(
        {
            "job_id": draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,30}", fullmatch=True)),
            "inputs": inputs,
            "output": uris_of("abfss://out@acct.dfs.core.windows.net/", draw(st.lists(_SEGMENT, max_size=3))),
            "params": draw(st.dictionaries(_PARAM_NAME, _PARAM_VALUE, max_size=5)),
            **({"timeout_s": draw(st.floats(0.001, 3600.0))} if draw(st.booleans()) else {}),
        }
    )


def uris_of(prefix: str, segments: list[str]) -> str:
    return prefix + "/".join(urllib.parse.quote(s) for s in segments) + "/"


@settings(max_examples=200, deadline=None)
@given(_valid_job())
def test_valid_jobs_round_trip_through_the_intake(job: jobs.Job) -> None:
    assert jobs.parse(job.to_json()) == job
    assert uris.check_job_uri(job.output).scheme == "abfss"
