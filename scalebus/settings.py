"""One typed settings tree, loaded once by the composition root.

Sources, later wins: built-in defaults, a TOML file (``--config``), then ``SCALEBUS_<SECTION>__<KEY>``
environment variables (``SCALEBUS_CONTROLLER__MAX_INSTANCES=8``). Units are in the names (``_s``, ``_bytes``).
Every validation failure becomes a :class:`~scalebus.errors.ConfigError` naming the key and the fix. Nothing
else in scalebus reads the environment for settings.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from scalebus import errors

ENV_PREFIX = "SCALEBUS_"

SECRET_NAME_PATTERN = r"^[0-9A-Za-z-]{1,127}$"
"""Key Vault's rule for secret names: 1-127 letters, digits and dashes (Azure docs, "About keys, secrets and
certificates", object identifiers). Checked here for ``worker.secret_env`` and applied by every ``SecretSource``,
so a name is never a path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class QueueSettings(_Section):
    url: str = "sqlite:///.scalebus/queue.db?queue=jobs"
    """Where jobs wait. ``sqlite:///path?queue=name`` (embedded) or
    ``servicebus://<namespace>.servicebus.windows.net/<queue>``."""
    lock_duration_s: float = Field(default=30.0, ge=5.0, le=300.0)
    """Peek-lock duration for the embedded queue (Service Bus: set on the queue itself; 5 s to 5 min)."""
    max_delivery_count: int = Field(default=5, ge=1, le=2000)
    """Deliveries before a message is dead-lettered (embedded queue; Service Bus reads the queue's own)."""
    connection_string_env: str = ""
    """Name of an environment variable holding a Service Bus connection string. Empty: use
    DefaultAzureCredential (managed identity on the VMs)."""
    depth_source: Literal["queue", "admin", "monitor"] = "queue"
    """Where the controller reads the depth: ``queue`` (embedded: the queue itself), ``admin`` (Service Bus
    runtime properties, real time, needs Manage rights), ``monitor`` (Azure Monitor ActiveMessages, minutes
    late, needs only Monitoring Reader)."""
    namespace_resource_id: str = ""
    """ARM id of the Service Bus namespace; required when ``depth_source = "monitor"``."""
    depth_cache_s: float = Field(default=2.0, ge=0.0)
    """Read the admin API at most once per this many seconds per queue."""
    admin_endpoint: str = ""
    """Override the admin API endpoint (``https://host:port``); for emulators and tests."""
    monitor_endpoint: str = ""
    """Override the Azure Monitor metrics endpoint; for sovereign clouds and tests."""
    connection_verify: str = ""
    """CA bundle path for HTTPS to the admin/metrics endpoints (self-signed test peers). Empty: system CAs."""


class ScaleSetSettings(_Section):
    url: str = "local://"
    """The worker fleet. ``local://`` (worker processes on this machine) or the ARM resource id of a VM scale
    set (``/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachineScaleSets/<n>``)."""
    arm_endpoint: str = "https://management.azure.com"
    """Azure Resource Manager endpoint (change for sovereign clouds and tests)."""
    connection_verify: str = ""
    """CA bundle path for HTTPS to ARM (self-signed test peers). Empty: system CAs."""
    polling_interval_s: float = Field(default=15.0, gt=0)
    """How often to poll a long-running ARM operation (a capacity write, a delete) until it finishes."""
    protect_busy: bool = False
    """Set ``protectFromScaleIn`` on busy instances (only useful alongside Azure's native autoscale)."""
    state_path: str = ".scalebus/pool.db"
    """Where the local pool keeps its instance table and worker heartbeats."""


class StorageSettings(_Section):
    account_url: str = ""
    """Override the blob endpoint for ``abfss://`` URIs (Azurite, sovereign clouds). Empty: derive it."""
    connection_string_env: str = ""
    """Name of an environment variable holding a storage connection string or SAS. Empty:
    DefaultAzureCredential."""
    connection_verify: str = ""
    """CA bundle path for HTTPS to the storage endpoint. Empty: system CAs."""
    local_roots: list[str] = Field(default_factory=lambda: [".demo/lake", ".demo/results"])
    """Local folders a job's ``file://`` inputs and output must lie in (relative paths: from the working
    directory). The default is where ``scalebus demo`` writes its lake and results; empty refuses ``file://`` in
    jobs altogether (a fleet on Azure reads only ``abfss://``)."""


class StagingSettings(_Section):
    max_concurrency: int = Field(default=16, ge=1, le=512)
    """Files downloaded at once."""
    chunk_size_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Smallest ranged read when a large file is split across threads. Files are split only as far as keeping
    ``max_concurrency`` threads busy needs; otherwise each file is one streamed GET."""
    memory_budget_bytes: int = Field(default=96 * 1024 * 1024, ge=1024 * 1024)
    """Upper bound on bytes buffered in memory by staging at once."""
    bandwidth_cap_bytes_per_s: int = Field(default=0, ge=0)
    """Per-VM cap on download rate (0 = none); keeps a large fleet within the account's egress."""
    verify_md5: bool = True
    """Check Content-MD5 where the service stored one."""
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Disk space that must remain free after staging (the preflight refuses otherwise)."""
    processes: int = Field(default=0, ge=0, le=64)
    """Processes that download at once (the staging's own plus helpers; concurrency, memory budget and bandwidth
    cap are shared between them). 0 = auto: start with one and add helpers, up to one per available core, while
    it is bound by its own CPU (many small files: one process tops out near the GIL's limit) and at least 2,000
    files are left. N = exactly N from the start. 1 = never spawn helpers."""
    list_concurrency: int = Field(default=8, ge=1, le=64)
    """Folders listed at once, where the store lists folder by folder (Blob and ADLS, the local folder store);
    downloads start with the first page while listing continues."""


class IngestSettings(_Section):
    endpoint_url: str = ""
    """S3 endpoint override (``http://host:port``) for S3-compatible stores and tests (``--endpoint-url`` wins).
    Empty: AWS S3 for the region."""
    region: str = ""
    """AWS region of the bucket. Empty: the AWS chain (``AWS_REGION``, the profile), else us-east-1; S3 redirects
    to the bucket's own region either way."""
    profile: str = ""
    """Named AWS profile (``~/.aws/config``). Empty: the standard chain (environment, ``AWS_PROFILE``, the
    instance's or container's role)."""
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    """S3 bucket addressing: ``path`` for S3-compatible stores that serve no virtual-host buckets."""
    max_concurrency: int = Field(default=8, ge=1, le=256)
    """Objects copied at once (those over 1 MiB each through a temporary file in ``scratch_dir``)."""
    max_attempts: int = Field(default=5, ge=1, le=20)
    """Attempts per S3 request (botocore's standard retry mode: throttling, 5xx and connection errors, with
    jittered back-off); a body cut off part-way resumes from the last byte received, as often."""
    read_timeout_s: float = Field(default=60.0, gt=0)
    """Longest wait for bytes from S3 on an open connection before the request counts as failed (and retried)."""
    scratch_dir: str = ""
    """Local folder for objects in transit (at most ``max_concurrency`` objects at a time). Empty: the system
    temporary directory."""
    scratch_min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Space that must stay free in ``scratch_dir`` with the largest ``max_concurrency`` objects in transit: a run
    that would not fit is refused before copying anything."""
    bandwidth_cap_bytes_per_s: int = Field(default=0, ge=0)
    """Cap on the rate objects are read from the source (0 = none), to leave the link to other traffic."""
    checkpoint_interval_s: float = Field(default=30.0, ge=0)
    """How often the record of copied objects is rewritten at the destination during a run (and always at its
    end, or when it fails): a run killed outright copies again at most what it copied in its last interval.
    The least interval: with millions of objects it grows so that rewrites take at most 5 % of the run (0: after
    every object, whatever that costs)."""
    state_dir: str = ""
    """Where the local record of each (source, destination) ingest is kept (an append-only log, so a checkpoint
    costs what changed). Empty: beside ``scratch_dir`` (the system temporary directory by default, which a reboot
    may empty; the destination's manifest then serves and the next run rebuilds the record from it)."""
    server_side_copy: bool = True
    """Let the destination service read each object from the source itself (Put Block From URL through a
    presigned URL) where both sides allow it, so the bytes do not pass through this machine; objects stream
    through it otherwise. ``false``: always stream."""
    verify_md5: bool = True
    """Check each object against its MD5: the S3 ETag of a single-part, not KMS-encrypted upload, or the
    Content-MD5 another store lists. The size is always checked."""


class JobsSettings(_Section):
    """Bounds on one job message, applied by ``submit`` and by every worker on receipt: a body outside them is
    refused at submit time and dead-lettered by a worker, with the reason."""

    max_body_bytes: int = Field(default=256 * 1024, ge=1024, le=100 * 1024 * 1024)
    """Largest body, checked before it is parsed (Service Bus Standard's message limit; Premium takes up to
    100 MiB)."""
    max_depth: int = Field(default=16, ge=3, le=256)
    """Deepest nesting of JSON objects and arrays in a body (a job needs 2), checked before it is parsed."""
    max_inputs: int = Field(default=10_000, ge=1, le=1_000_000)
    """Most input URIs in one job (list a folder instead of its files)."""
    max_params: int = Field(default=64, ge=0, le=4096)
    """Most params in one job."""
    max_param_value_bytes: int = Field(default=32 * 1024, ge=1, le=128 * 1024 - 256)
    """Largest param value (UTF-8). Linux refuses to launch a program with a single environment string over
    128 KiB (``MAX_ARG_STRLEN``, execve(2))."""
    max_params_bytes: int = Field(default=64 * 1024, ge=1, le=1024 * 1024)
    """Largest total of param names and values (UTF-8): they reach the analytics as environment variables, and
    Linux bounds the whole environment with the arguments (``ARG_MAX``, a quarter of the stack limit: 2 MiB by
    default, execve(2))."""


class ControllerSettings(_Section):
    min_instances: int = Field(default=0, ge=0)
    """Instances kept even with an empty queue."""
    max_instances: int = Field(default=10, ge=1)
    """Upper bound on instances."""
    jobs_per_instance: int = Field(default=1, ge=1)
    """Jobs one instance works on at once (workers run one job each by default)."""
    poll_interval_s: float = Field(default=2.0, gt=0)
    """Seconds between observe → decide → apply rounds."""
    boot_timeout_s: float = Field(default=600.0, gt=0)
    """An instance still starting after this long is deleted as broken."""
    heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    """A running instance silent for this long is deleted as broken."""
    max_writes_per_minute: int = Field(default=4, ge=1)
    """Capacity writes per minute the controller allows itself (ARM allows ~4/min per scale set)."""
    max_writes_per_minute_total: int = Field(default=0, ge=0)
    """Scale-set writes per minute all pools on one subscription may make together (ARM and Compute count
    their write limits per subscription, not per scale set), handed out in turn to the pools that want to
    write, so a busy pool cannot starve a quiet one. Set at the top level only. 0: no shared cap beyond each
    pool's ``max_writes_per_minute``; a 429 seen by one pool holds back every pool's writes either way."""
    exit_when_drained: bool = False
    """Stop once the queue is empty and no instances remain (the demo and batch runs)."""
    boot_estimate_s: float = Field(default=120.0, gt=0)
    """What booting a new instance costs, in seconds (a VM's typical boot to first heartbeat). The policy weighs
    it against idle time: idle workers are kept while the next job the busy workers cannot take is expected
    within about twice this, and
    waiting jobs the busy fleet will start within this time are not booted for (``absorb_factor``)."""
    idle_grace_min_s: float = Field(default=5.0, ge=0)
    """Shortest time the controller tells idle workers to wait for work before retiring (sparse arrivals).
    Workers fall back to ``worker.idle_timeout_s`` while the controller publishes no grace."""
    idle_grace_max_s: float = Field(default=1200.0, ge=0)
    """Longest time the controller tells idle workers to wait for work (frequent or periodic arrivals): the
    most idle VM time one worker may cost on a forecast."""
    prewarm: bool = True
    """For periodic arrivals (a cron-like producer), boot a worker ``prewarm_lead_s`` before the next job is
    due and keep it waiting for that job."""
    prewarm_lead_s: float = Field(default=360.0, ge=0)
    """How long before a periodic job is due a worker is booted (about the p95 boot time)."""
    absorb_factor: float = Field(default=0.8, ge=0)
    """Waiting jobs the busy workers will start within ``boot_estimate_s`` anyway (estimated from the learned
    job durations and how long each busy job has run, times this) get no new instance. 0 turns it off: every
    waiting job asks for an instance."""
    lease_s: float = Field(default=30.0, ge=0)
    """How long the controllers' lease lasts unless renewed (a row in the pool's database locally, a blob lease
    in the heartbeat container on Azure: whole seconds from 15 to 60). Any number of controllers may run: the one
    holding the lease acts, the others wait and one takes over within two lease periods of the leader's end.
    0: no lease, a single controller."""

    @pydantic.field_validator("idle_grace_max_s")
    @classmethod
    def _grace_max_not_below_min(cls, value: float, info: pydantic.ValidationInfo) -> float:
        low = info.data.get("idle_grace_min_s")
        if low is not None and value < low:
            raise ValueError(f"must be at least idle_grace_min_s ({low})")
        return value


class WorkerSettings(_Section):
    command: list[str] = Field(default_factory=lambda: ["python", "-m", "scalebus.demo.fastq_qc"])
    """The analytics, as an argv list (never a shell). It runs with cwd = the job's work directory and gets
    SCALEBUS_INPUT_DIR, SCALEBUS_OUTPUT_DIR, SCALEBUS_JOB_ID and each param as SCALEBUS_PARAM_<NAME>."""
    work_dir: str = ".scalebus/work"
    """Local disk where inputs are staged and outputs written (the VM's premium/NVMe disk)."""
    cache_bytes: int = Field(default=0, ge=0)
    """Size of the VM's input cache in ``<work_dir>/cache`` (0 = off): input files a job staged are kept, keyed
    by URI, etag and size, and a later job (or a redelivery) naming the same object gets a hard link instead of
    a download; least recently used entries go first. Off by default because it takes scratch disk the jobs
    also need (size it to the shared inputs, e.g. a reference genome, leaving room for the largest job plus
    ``staging.min_free_bytes``) and because cached inputs are read-only (mode 0444): an analytics that
    rewrites its inputs in place must copy them first."""
    idle_timeout_s: float = Field(default=30.0, ge=0)
    """With no message for this long the worker retires (see ``retire_wait_s``) — unless the controller
    publishes an idle grace (``controller.idle_grace_min_s`` … ``idle_grace_max_s``), which then applies instead.
    This is the fallback: no controller, or its hint is over 2 minutes old."""
    retire_wait_s: float = Field(default=15.0, ge=0)
    """Once idle, how long to wait for the controller to delete this instance (in a batch, sparing the ARM
    budget) before deleting itself."""
    receive_wait_s: float = Field(default=5.0, gt=0, le=60)
    """Longest single wait for a message."""
    job_timeout_s: float = Field(default=172_800.0, gt=0)
    """Analytics timeout when the job does not set its own (48 h: multi-hour genomics jobs are normal)."""
    drain_timeout_s: float = Field(default=20.0, ge=0)
    """On SIGTERM, how long the running job may continue before it is stopped and abandoned."""
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    """How often the worker reports busy/idle."""
    self_destroy: bool = True
    """Delete this instance when idle. Off for a worker run by hand."""
    eviction_poll_s: float = Field(default=5.0, ge=0)
    """How often the worker asks for scheduled events (IMDS on Azure; the pool's notices locally). On a Spot
    eviction (``Preempt``, 30 s notice) or ``Terminate`` it takes no new work, abandons a job that cannot end in
    time at once (so another worker takes it without waiting out the lock) and exits. 0 turns it off."""
    eviction_acknowledge: bool = True
    """Once the job is released, approve the eviction so it proceeds without waiting for its NotBefore time (only
    events naming this instance alone: an approval lets the event start for every instance it names)."""
    secret_env: dict[str, str] = Field(default_factory=dict)
    """Environment variable → secret name (``{API_TOKEN = "genomics-api-token"}``): each job's analytics gets
    these variables, read from ``[secrets]`` by the worker. Values never reach logs or errors."""

    pass_env: list[str] = Field(default_factory=list)
    """Names of the worker's environment variables the analytics also gets (``["TMPDIR", "OMP_NUM_THREADS"]``).
    Nothing else of the worker's environment reaches it: only the job's ``SCALEBUS_*`` variables, ``secret_env``,
    these, and a minimal ``PATH``, ``HOME`` and ``LANG``."""
    env_backoff_max_s: float = Field(default=60.0, ge=0)
    """After a job fails for a reason of the environment (storage or the scratch disk unavailable, the analytics
    killed by a signal), the worker holds its message, lock renewed, for 1 s, then 2, 4 … up to this, before
    giving it back, so an outage does not spend the queue's delivery counts. 0 gives it back at once."""

    @pydantic.field_validator("pass_env")
    @classmethod
    def _pass_env_names(cls, value: list[str]) -> list[str]:
        for var in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var) or var.upper().startswith("SCALEBUS_"):
                raise ValueError(f"{var!r} is not a usable variable name (letters, digits, _; not SCALEBUS_*)")
        return value

    @pydantic.field_validator("secret_env")
    @classmethod
    def _secret_env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for var, name in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var) or var.upper().startswith("SCALEBUS_"):
                raise ValueError(f"{var!r} is not a usable variable name (letters, digits, _; not SCALEBUS_*)")
            if not re.fullmatch(SECRET_NAME_PATTERN, name):
                raise ValueError(f"{name!r} (for {var}) is not a Key Vault secret name (1-127 letters, digits, -)")
        return value


class LogSettings(_Section):
    format: Literal["auto", "console", "json"] = "auto"
    """``auto``: console on a terminal, JSON otherwise."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged."""


class SecretsSettings(_Section):
    url: str = "local://.scalebus/secrets"
    """Where ``worker.secret_env`` reads secrets: ``local://<folder>`` (embedded: one file per secret, named like
    the secret, mode 600) or ``https://<vault>.vault.azure.net`` (Azure Key Vault; the workers' managed identity
    needs *Key Vault Secrets User*)."""
    cache_s: float = Field(default=300.0, ge=0)
    """A worker reuses a secret it read for this long (0: read for every job); a rotated value is picked up
    within this time. Keeps a large fleet of short jobs within Key Vault's request limits."""
    connection_verify: str = ""
    """CA bundle path for HTTPS to the vault (self-signed test peers). Empty: system CAs."""
    verify_challenge_resource: bool = True
    """Check that the vault's auth challenge names a resource matching the vault's host (the Key Vault SDK's
    guard against sending tokens elsewhere). Turn off only for an emulator served on another host name."""


class MetricsSettings(_Section):
    """Prometheus metrics and health endpoints (``/metrics``, ``/healthz``, ``/readyz``), off by default."""

    port: int = Field(default=0, ge=0, le=65535)
    """Port the controller serves metrics and health on (0: off)."""
    worker_port: int = Field(default=0, ge=0, le=65535)
    """Port each worker serves them on (0: off). On a VM there is one worker, so one port fits the fleet; on the
    embedded default workers share this machine and only the first one to bind it serves (the others log
    ``metrics_port_busy`` and run without)."""
    bind: str = "127.0.0.1"
    """Address to listen on. ``0.0.0.0`` lets a Prometheus server elsewhere scrape (keep the port closed to the
    internet: the endpoints have no authentication)."""
    stall_s: float = Field(default=60.0, gt=0)
    """How long a loop may stay silent beyond the wait it announced (its poll interval, a back-off, a receive)
    before ``/healthz`` answers 503. (The systemd watchdog is fed by each controller round itself.)"""


class IdentitySettings(_Section):
    imds_endpoint: str = "http://169.254.169.254"
    """Instance Metadata Service (changed only for tests)."""


POOL_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$"
"""A pool's name: 1-32 lower-case letters, digits and inner dashes (it becomes a metric label and a log field)."""
DEFAULT_POOL = "default"
"""The one pool of a config without ``[[pools]]``: the top-level ``queue``, ``scale_set``, ``controller`` and
``worker`` tables."""
POOL_SECTIONS = ("queue", "scale_set", "controller", "worker")
"""The tables a ``[[pools]]`` entry may set; each inherits the top-level table of the same name field by field."""


class PoolSettings(_Section):
    """One pool: a queue, the scale set that serves it, its scaling policy and its worker.

    Written as ``[[pools]]`` with ``name`` and any of ``[pools.queue]``, ``[pools.scale_set]``,
    ``[pools.controller]``, ``[pools.worker]``; a key a pool does not set comes from the top-level table (which the
    ``SCALEBUS_*`` environment overrides)."""

    name: str = Field(pattern=POOL_NAME_PATTERN)
    """Metric label, log field and ``status`` row of this pool; ``scalebus worker run --pool NAME`` picks it."""
    queue: QueueSettings = QueueSettings()
    scale_set: ScaleSetSettings = ScaleSetSettings()
    controller: ControllerSettings = ControllerSettings()
    worker: WorkerSettings = WorkerSettings()


class Settings(_Section):
    """The whole tree. Sections match the TOML tables."""

    queue: QueueSettings = QueueSettings()
    scale_set: ScaleSetSettings = ScaleSetSettings()
    storage: StorageSettings = StorageSettings()
    staging: StagingSettings = StagingSettings()
    ingest: IngestSettings = IngestSettings()
    jobs: JobsSettings = JobsSettings()
    controller: ControllerSettings = ControllerSettings()
    worker: WorkerSettings = WorkerSettings()
    log: LogSettings = LogSettings()
    identity: IdentitySettings = IdentitySettings()
    secrets: SecretsSettings = SecretsSettings()
    metrics: MetricsSettings = MetricsSettings()
    pools: tuple[PoolSettings, ...] = ()
    """Several pools in one controller (``[[pools]]``); empty: the top-level tables are the one pool
    :data:`DEFAULT_POOL`."""

    @pydantic.field_validator("pools")
    @classmethod
    def _distinct_pools(cls, value: tuple[PoolSettings, ...]) -> tuple[PoolSettings, ...]:
        names = [pool.name for pool in value]
        twice = next((name for n, name in enumerate(names) if name in names[:n]), None)
        if twice is not None:
            raise ValueError(f"two pools are named {twice!r}; give each pool its own name")
        for what, key in (("queue", lambda p: p.queue.url), ("scale set", _scale_set_identity)):
            seen: dict[object, str] = {}
            for pool in value:
                other = seen.setdefault(key(pool), pool.name)
                if other != pool.name:
                    raise ValueError(f"pools {other!r} and {pool.name!r} share one {what}; give each its own")
        return value

    @pydantic.model_validator(mode="after")
    def _shared_budget_at_top(self) -> Settings:
        total = self.controller.max_writes_per_minute_total
        for pool in self.pools:
            if pool.controller.max_writes_per_minute_total != total:
                raise ValueError(
                    f"pool {pool.name!r} sets controller.max_writes_per_minute_total: it is shared by all pools, "
                    "set it in the top-level [controller] only"
                )
        return self

    def pool_names(self) -> tuple[str, ...]:
        """Every pool's name, in config order (:data:`DEFAULT_POOL` alone without ``[[pools]]``)."""
        return tuple(pool.name for pool in self.pools) or (DEFAULT_POOL,)

    def for_pool(self, name: str | None = None) -> Settings:
        """This tree as one pool sees it: its ``queue``, ``scale_set``, ``controller`` and ``worker`` at the top
        (``pools`` emptied). ``None`` means the only pool; naming no pool while there are several, or an unknown
        one, is a ``ConfigError``."""
        if not self.pools:
            if name not in (None, DEFAULT_POOL):
                raise errors.ConfigError(
                    "pool", f"no pool named {name!r}", f"this config has only {DEFAULT_POOL!r}"
                )
            return self
        names = ", ".join(self.pool_names())
        if name is None:
            if len(self.pools) > 1:
                raise errors.ConfigError(
                    "pool", "this config has several pools", f"name one with --pool ({names})"
                )
            name = self.pools[0].name
        pool = next((p for p in self.pools if p.name == name), None)
        if pool is None:
            raise errors.ConfigError("pool", f"no pool named {name!r}", f"name one of: {names}")
        return self.model_copy(
            update={
                "queue": pool.queue,
                "scale_set": pool.scale_set,
                "controller": pool.controller,
                "worker": pool.worker,
                "pools": (),
            }
        )


def _scale_set_identity(pool: PoolSettings) -> object:
    """What makes two pools' scale sets one: the local pool's database, or the VMSS resource id (ARM ids are
    case-insensitive)."""
    if pool.scale_set.url.startswith("local://"):
        return ("local", str(Path(pool.scale_set.state_path).resolve()))
    return pool.scale_set.url.lower().rstrip("/")


def load(path: Path | None = None, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any) and the ``SCALEBUS_*`` environment, once."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = _read_toml(path) if path is not None else {}
    from_env: dict[tuple[str, str], str] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            where = _apply_env(tree, key, value)
            if where is not None:
                from_env[where] = key
    _inherit_pool_sections(tree)
    try:
        return Settings.model_validate(tree)
    except pydantic.ValidationError as exc:
        raise _config_error(exc, path, from_env, tree) from None


def _inherit_pool_sections(tree: dict[str, Any]) -> None:
    """Give every ``[[pools]]`` entry the top-level ``queue``/``scale_set``/``controller``/``worker`` keys it does
    not set itself (a shallow merge per table: a pool's ``worker.command`` replaces the top-level one whole)."""
    pools = tree.get("pools")
    if not isinstance(pools, list):
        return
    for pool in pools:
        if not isinstance(pool, dict):
            continue
        for section in POOL_SECTIONS:
            top, own = tree.get(section), pool.get(section, {})
            if isinstance(top, dict) and isinstance(own, dict):
                pool[section] = {**top, **own}


def dump_toml(cfg: Settings) -> str:
    """The whole tree as TOML that :func:`load` reads back to an equal tree (for generated config files)."""
    lines = ["# Written by scalebus. Every key is documented in README.md."]
    for section in Settings.model_fields:
        if section == "pools":
            continue
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in getattr(cfg, section).model_dump().items()]
    for pool in cfg.pools:
        lines.append(f"\n[[pools]]\nname = {_toml_value(pool.name)}")
        for section in POOL_SECTIONS:
            lines.append(f"[pools.{section}]")
            lines += [
                f"{key} = {_toml_value(value)}" for key, value in getattr(pool, section).model_dump().items()
            ]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are valid TOML


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise errors.ConfigError("--config", f"{path} does not exist", "pass an existing TOML file") from None
    except OSError as exc:
        raise errors.ConfigError("--config", f"cannot read {path} ({exc.strerror})", "check permissions") from None
    except tomllib.TOMLDecodeError as exc:
        raise errors.ConfigError("--config", f"{path} is not valid TOML ({exc})", "fix the syntax") from None


def _apply_env(tree: dict[str, Any], key: str, raw: str) -> tuple[str, str] | None:
    """Set the key one variable names; where in the tree it went, or ``None`` if it names none."""
    section, _, field = key[len(ENV_PREFIX) :].lower().partition("__")
    if not section or not field:
        return None
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        return None
    node[field] = _parse_env_value(raw)
    return section, field


def _parse_env_value(raw: str) -> Any:
    """JSON where it parses (numbers, booleans, lists), the plain string otherwise."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _config_error(
    exc: pydantic.ValidationError,
    path: Path | None,
    from_env: Mapping[tuple[str, str], str],
    tree: Mapping[str, Any],
) -> errors.ConfigError:
    """The first problem, naming the key and where it was set: the whole variable when the environment set it
    (``SCALEBUS_WORKR__X`` for an unknown section ``workr``), else the file."""
    first = exc.errors()[0]
    loc = tuple(str(part) for part in first["loc"]) or ("pools",)  # the one check across tables: pools
    if loc[0] == "pools":
        return _pool_error(first, loc, path, tree)
    key = ".".join(loc)
    variable = next((name for where, name in from_env.items() if where[: len(loc[:2])] == loc[:2]), None)
    unknown = first["type"] == "extra_forbidden"
    problem = "unknown setting" if unknown else str(first["msg"])
    if variable is not None:
        fix = "unset it or check its spelling" if unknown else "set a valid value"
        return errors.ConfigError(key, f"{problem} (from the environment variable {variable})", fix)
    if unknown:
        where = f"remove it from {path} or check" if path else "check"
        return errors.ConfigError(key, problem, f"{where} its spelling")
    env = ENV_PREFIX + "__".join(loc[:2]).upper()
    where = f"in {path} or " if path else ""
    return errors.ConfigError(key, problem, f"set a valid value {where}via {env}")


def _pool_error(
    first: Any, loc: tuple[str, ...], path: Path | None, tree: Mapping[str, Any]
) -> errors.ConfigError:
    """A problem in ``[[pools]]``, named by the pool (``pools.fast.controller.max_instances``). Pools are set in
    the file only (a pool's key missing there comes from the top-level table)."""
    pools = tree.get("pools")
    if len(loc) > 1 and loc[1].isdigit() and isinstance(pools, list) and int(loc[1]) < len(pools):
        entry = pools[int(loc[1])]
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name:
            loc = (loc[0], name, *loc[2:])
    key = ".".join(loc)
    where = f"in {path}" if path else "in the config file"
    if first["type"] == "extra_forbidden":
        return errors.ConfigError(key, "unknown setting", f"remove it {where} or check its spelling")
    return errors.ConfigError(key, str(first["msg"]), f"fix it {where}")
