"""The composition root: the one module that reads settings and picks each port's backend by URL.

Commands ask here for what they need (``open_queue``, ``open_scale_set``, ...) and get ports, never backend
types. Azure and S3 backends are imported by the function that opens them, so a command on the embedded
default pays no start-up for them.

``StoreResolver`` is pickled into every staging helper process, which imports this module to unpickle it: so
nothing here imports typer, the output modules or the commands (``tests/unit/test_cli_resources.py`` checks
it). structlog still imports part of rich when rich is installed; that is structlog's doing, not ours.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from scalebus import errors, jobs, logs, settings
from scalebus.backends import base
from scalebus.backends.local import folder, pool, sqlite_queue
from scalebus.transfer import cache as input_cache
from scalebus.worker import secrets as worker_secrets

if TYPE_CHECKING:
    from scalebus.worker.job import JobRules


class Closeable(Protocol):
    def close(self) -> None: ...


def close_on_exit(stack: contextlib.ExitStack, *resources: Closeable | None) -> None:
    """Close each resource when ``stack`` unwinds, once however often it is listed (a SQLite queue is its own
    depth source); ``None`` stands for a resource the settings do not call for."""
    seen: set[int] = set()
    for resource in resources:
        if resource is not None and id(resource) not in seen:
            seen.add(id(resource))
            stack.callback(resource.close)


def load_settings(config: Path | None, log_format: str | None = None) -> settings.Settings:
    """The settings tree (file, then ``SCALEBUS_*`` variables), with logging configured from it."""
    loaded = settings.load(config)
    fmt = log_format or loaded.log.format
    if fmt not in ("auto", "console", "json"):
        raise errors.UserInputError(f"--log-format {fmt!r} is not one of console, json")
    logs.configure(fmt=fmt, level=loaded.log.level)  # type: ignore[arg-type]
    return loaded


def open_queue(cfg: settings.Settings) -> tuple[base.JobQueue, base.QueueDepth]:
    """The job queue and where its depth is read (the same object on SQLite)."""
    scheme = urllib.parse.urlsplit(cfg.queue.url).scheme
    if scheme == "sqlite":
        queue = sqlite_queue.SqliteJobQueue.from_url(
            cfg.queue.url,
            lock_duration_s=cfg.queue.lock_duration_s,
            max_delivery_count=cfg.queue.max_delivery_count,
        )
        return queue, queue
    if scheme == "servicebus":
        from scalebus.backends.azure import servicebus

        return servicebus.open_servicebus(cfg.queue)
    raise errors.ConfigError(
        "queue.url",
        f"unknown scheme {scheme!r}",
        "use sqlite:///path?queue=jobs or servicebus://<namespace>.servicebus.windows.net/<queue>",
    )


def open_queue_to_inspect(cfg: settings.Settings) -> tuple[base.JobQueue, base.QueueDepth]:
    """:func:`open_queue` for a command that only reads (``status``): an embedded queue database that does not
    exist is the caller's mistake (a wrong path or working directory), never created empty and shown as zeros."""
    if urllib.parse.urlsplit(cfg.queue.url).scheme == "sqlite":
        path, _queue = sqlite_queue.parse_url(cfg.queue.url)
        if not path.is_file():
            raise errors.UserInputError(
                f"queue database {path} does not exist (queue.url {cfg.queue.url!r}); check the path and the "
                "working directory, or submit a job to create it"
            )
    return open_queue(cfg)


def is_local_pool(cfg: settings.Settings) -> bool:
    return cfg.scale_set.url.startswith("local://")


def scale_set_id(cfg: settings.Settings) -> str:
    """The scale set's identity as its instances are told it (the check self-destroy makes)."""
    return pool.pool_url(Path(cfg.scale_set.state_path)) if is_local_pool(cfg) else cfg.scale_set.url


def open_scale_set(
    cfg: settings.Settings, config_path: Path | None, *, pool_name: str | None = None
) -> base.ScaleSet:
    """The local process pool (its workers get ``config_path``, and ``--pool`` when the config has several) or the
    VM scale set ``scale_set.url`` names. ``cfg`` is one pool's view (``Settings.for_pool``)."""
    if is_local_pool(cfg):
        argv = [sys.executable, "-m", "scalebus", "worker", "run"]
        if config_path is not None:
            argv += ["--config", str(config_path.resolve())]
        if pool_name is not None:
            argv += ["--pool", pool_name]
        return pool.LocalScaleSet(Path(cfg.scale_set.state_path), worker_argv=argv, worker_env={})
    if cfg.scale_set.url.lower().startswith("/subscriptions/"):
        from scalebus.backends.azure import compute

        return compute.open_scale_set(cfg.scale_set, credential=_managed_identity(cfg))
    raise errors.ConfigError(
        "scale_set.url",
        f"{cfg.scale_set.url!r} is neither local:// nor a VM scale set resource id",
        "use local:// or /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/<name>",
    )


def open_image_baker(cfg: settings.Settings, *, vm_id: str) -> Any:
    """What ``scalebus image bake`` captures a VM with (``backends.azure.compute.GalleryImageBaker``), in the
    VM's subscription, at ``scale_set.arm_endpoint``. Typed ``Any``: only ``backends/azure`` names azure types."""
    from scalebus.backends.azure import compute

    subscription = compute.subscription_of(vm_id)
    return compute.open_image_baker(cfg.scale_set, subscription_id=subscription, credential=_managed_identity(cfg))


def _managed_identity(cfg: settings.Settings) -> Any:
    """The managed identity at a non-default IMDS endpoint (a test peer), else ``None``: the adapter's default.
    Typed ``Any``: the credential is an azure-identity object, and only ``backends/azure`` imports ``azure.*``."""
    from scalebus.backends.azure import imds

    if cfg.identity.imds_endpoint.rstrip("/") == imds.DEFAULT_IMDS_ENDPOINT:
        return None
    return imds.managed_identity_credential(imds_endpoint=cfg.identity.imds_endpoint)


def open_heartbeats(cfg: settings.Settings) -> base.HeartbeatStore:
    if is_local_pool(cfg):
        return pool.SqliteHeartbeatStore.open(Path(cfg.scale_set.state_path))
    from scalebus.backends.azure import heartbeats

    return heartbeats.open_heartbeats(cfg.storage, cfg.scale_set)


def open_lease(cfg: settings.Settings) -> base.Lease | None:
    """The controllers' lease (``controller.lease_s``): a row in the pool's database, or a blob lease beside the
    fleet's heartbeats; ``None`` with ``lease_s = 0`` (a single controller, no lease). One lease for all pools:
    it lives with the first pool's scale set (every controller reads the same config, so the same one)."""
    if cfg.controller.lease_s <= 0:
        return None
    lease_s = cfg.controller.lease_s  # the top level's: a pool's own lease_s has no lease to apply to
    cfg = cfg.for_pool(cfg.pool_names()[0])
    if is_local_pool(cfg):
        from scalebus.backends.local import lease

        return lease.SqliteLease.open(Path(cfg.scale_set.state_path), duration_s=lease_s)
    from scalebus.backends.azure import lease as blob_lease

    return blob_lease.open_lease(cfg.storage, cfg.scale_set, duration_s=lease_s)


def controller_holder() -> str:
    """How a controller is named as the lease's holder: its host and process."""
    return f"{socket.gethostname()}/{os.getpid()}"


def open_identity(cfg: settings.Settings) -> base.InstanceIdentity:
    if is_local_pool(cfg):
        return pool.LocalIdentity(os.environ)
    from scalebus.backends.azure import imds

    return imds.ImdsIdentity(cfg.identity.imds_endpoint)


def open_notices(cfg: settings.Settings, identity: base.InstanceInfo | None) -> base.NoticeSource | None:
    """Where a worker learns its instance is being evicted: the pool's notices, or IMDS scheduled events (matched
    on the VM name). ``None`` outside a scale set or with ``worker.eviction_poll_s = 0``."""
    if identity is None or cfg.worker.eviction_poll_s <= 0:
        return None
    if is_local_pool(cfg):
        from scalebus.backends.local import notices

        return notices.SqliteNoticeSource.open(Path(cfg.scale_set.state_path), identity.instance_id)
    from scalebus.backends.azure import scheduled_events

    return scheduled_events.ImdsNoticeSource(
        cfg.identity.imds_endpoint, vm_name=identity.name or identity.instance_id
    )


def open_secrets(cfg: settings.Settings) -> base.SecretSource:
    """``secrets.url``: ``local://<folder>`` or a Key Vault URL (read with the same credential as ARM)."""
    scheme = urllib.parse.urlsplit(cfg.secrets.url).scheme
    if scheme == "local":
        from scalebus.backends.local import secrets as local_secrets

        return local_secrets.FolderSecretSource.from_url(cfg.secrets.url)
    if scheme in ("https", "http"):  # keyvault explains that a vault is https only
        from scalebus.backends.azure import keyvault

        return keyvault.open_secret_source(cfg.secrets, credential=_managed_identity(cfg))
    raise errors.ConfigError(
        "secrets.url",
        f"{cfg.secrets.url!r} is neither local:// nor a Key Vault URL",
        "use local://<folder> (e.g. local://.scalebus/secrets) or https://<vault>.vault.azure.net",
    )


def open_vault_search(cfg: settings.Settings, *, subscription: str = "") -> Any:
    """What ``scalebus secret get`` reads vaults with (``backends.azure.vaults.VaultSearch``): vaults listed in
    ``subscription`` (default: the one ``scale_set.url`` names) at ``scale_set.arm_endpoint``, secrets read with
    the ``[secrets]`` TLS settings. Typed ``Any``: only ``backends/azure`` names azure types."""
    from scalebus.backends.azure import compute, vaults

    if not subscription and cfg.scale_set.url.lower().startswith("/subscriptions/"):
        subscription = compute.subscription_of(cfg.scale_set.url)
    return vaults.open_vault_search(
        cfg.secrets,
        subscription_id=subscription,
        arm_endpoint=cfg.scale_set.arm_endpoint,
        arm_connection_verify=cfg.scale_set.connection_verify,
        credential=_managed_identity(cfg),
    )


def open_secret_env(cfg: settings.Settings) -> worker_secrets.SecretEnv | None:
    """The analytics' secrets (``worker.secret_env``), or ``None`` when it maps none (no source is opened)."""
    if not cfg.worker.secret_env:
        return None
    return worker_secrets.SecretEnv(open_secrets(cfg), cfg.worker.secret_env, cache_s=cfg.secrets.cache_s)


def open_input_cache(cfg: settings.Settings) -> input_cache.DiskInputCache | None:
    """The VM's input cache in ``worker.work_dir`` (``worker.cache_bytes``); ``None`` when it is off or its
    folder is unusable (logged; the worker then downloads every input)."""
    return input_cache.open_input_cache(cfg.worker.work_dir, cap_bytes=cfg.worker.cache_bytes)


class StoreResolver:
    """URI → store, one store per (scheme, filesystem@account).

    Picklable (the settings travel, the open stores do not): staging helper processes rebuild their own stores
    from the same settings, so credentials are looked up again in each process, never sent over a pipe.
    """

    def __init__(self, cfg: settings.Settings, *, limits: jobs.Limits | None = None) -> None:
        self._cfg = cfg
        self._limits = limits  # the worker's: its file:// stores confined to the roots, outside its own folders
        self._cache: dict[tuple[str, str], base.ObjectStore] = {}
        self._lock = threading.Lock()

    def __call__(self, uri: str) -> base.ObjectStore:
        parts = urllib.parse.urlsplit(uri)
        key = (parts.scheme, parts.netloc)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = _open_store(parts.scheme, uri, self._cfg, self._limits)
            return self._cache[key]

    def close(self) -> None:
        """Close every store opened so far (closing twice does nothing more)."""
        with self._lock:
            stores, self._cache = list(self._cache.values()), {}
        for store in stores:
            store.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self._cfg, "limits": self._limits}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cfg"], limits=state.get("limits"))  # type: ignore[misc]


def _open_store(scheme: str, uri: str, cfg: settings.Settings, limits: jobs.Limits | None) -> base.ObjectStore:
    if scheme == "file":
        if limits is None:
            return folder.FolderStore()
        return folder.FolderStore(roots=limits.local_roots, reserved=limits.reserved)
    if scheme == "abfss":
        from scalebus.backends.azure import datalake

        return datalake.open_store(uri, cfg.storage)
    raise errors.UserInputError(f"{uri!r}: unsupported scheme {scheme!r}; use file:// or abfss://")


def open_source(
    uri: str, cfg: settings.Settings, *, resolver: StoreResolver, endpoint_url: str = ""
) -> base.ObjectSource:
    """The source ``scalebus ingest`` reads: S3 (a client of its own), or any store ``resolver`` knows. The caller
    closes it; a store the resolver handed out may be closed again with the resolver (closing is idempotent)."""
    if urllib.parse.urlsplit(uri).scheme != "s3":
        return resolver(uri)
    from scalebus.backends.aws import s3

    s3.S3Uri.parse(uri)
    try:
        return s3.open_source(cfg.ingest, endpoint_url=endpoint_url)
    except ModuleNotFoundError as exc:  # boto3 is the optional extra ``s3``
        if (exc.name or "").partition(".")[0] not in ("boto3", "botocore"):
            raise
        raise errors.UserInputError(f"s3:// sources need {exc.name}: pip install 'scalebus[s3]'") from None


def job_rules(cfg: settings.Settings) -> JobRules:
    """What the worker must know to judge a job: the intake's limits (with the work dir and a local secrets
    folder reserved, so no job can read or write them) and the queue's max delivery count where it is ours to
    know (the embedded queue; Service Bus keeps its own and dead-letters by it, so there it stays unknown)."""
    from scalebus.worker import job

    reserved = [cfg.worker.work_dir]
    if cfg.secrets.url.startswith("local://"):
        reserved.append(cfg.secrets.url[len("local://") :])
    limits = jobs.Limits.from_settings(cfg, cwd=os.getcwd(), reserved=reserved)
    is_embedded = urllib.parse.urlsplit(cfg.queue.url).scheme == "sqlite"
    return job.JobRules(limits=limits, max_deliveries=cfg.queue.max_delivery_count if is_embedded else None)


def open_queue_history(cfg: settings.Settings, queue: base.JobQueue) -> base.QueueHistory | None:
    """Where ``status`` reads the last hour of ``queue`` (opened by :func:`open_queue`): the embedded queue's own
    record, or Service Bus with Azure Monitor's counts; ``None`` for a queue that keeps none. The caller closes
    it (the embedded queue is the same object as the queue: close both through :func:`close_on_exit`)."""
    if isinstance(queue, base.QueueHistory):
        return queue
    if urllib.parse.urlsplit(cfg.queue.url).scheme == "servicebus":
        from scalebus.backends.azure import servicebus

        if isinstance(queue, servicebus.ServiceBusJobQueue):
            return servicebus.open_history(cfg.queue, queue)
    return None
