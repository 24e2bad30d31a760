"""The ports: what the controller, worker and self-destroy need from the outside world.

Each port is a ``typing.Protocol``. ``backends/local`` (SQLite, process pool, folder) and ``backends/azure``
(Service Bus, VMSS, ADLS Gen2) implement them and pass the same contract tests in ``tests/contract``. Values
crossing a port are plain frozen dataclasses, never SDK objects, and times are epoch seconds (``time.time()``).
Adapters raise only :mod:`scalebus.errors` types. Every port whose adapters may hold a client, a connection or a
file has ``close()``, and closing twice is harmless: the CLI closes what it opens on every exit path.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

# --------------------------------------------------------------------------------------------- queue


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message to enqueue. ``message_id`` is the job id, so Service Bus duplicate detection works."""

    message_id: str
    body: bytes
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message received in peek-lock mode. Service Bus semantics: ``delivery_count`` is 1 on first delivery."""

    message_id: str
    body: bytes
    lock_token: str
    delivery_count: int
    sequence_number: int
    enqueued_at: float
    locked_until: float
    released: int = 0
    """How many times the job was given back with :meth:`JobQueue.release_later` (failures of the environment,
    not of the job); those deliveries are not in ``delivery_count``."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered message as ``status`` and tests see it."""

    message_id: str
    reason: str
    description: str
    delivery_count: int
    body: bytes
    sequence_number: int = 0
    """Where it stands in the dead-letter queue: a peek goes on from the highest one it saw, plus one."""


DEAD_LETTER_PAGE = 100
"""Dead letters asked for per peek. Service Bus returns at most what is asked, often fewer (at most 250 a peek
was measured: Azure/azure-sdk-for-python#26643), so readers page until a peek returns nothing."""


def page_dead_letters(
    peek_page: Callable[[int, int], Sequence[DeadLetter]], *, max_count: int, page_size: int = DEAD_LETTER_PAGE
) -> list[DeadLetter]:
    """Every dead letter up to ``max_count``, oldest first, from ``peek_page(from_sequence_number, count)``
    called page after page (``from`` = the last sequence number seen + 1) until a page comes back empty.
    A short page is not the end: a broker may return fewer than asked while more remain."""
    found: list[DeadLetter] = []
    start = 1
    while len(found) < max_count:
        page = peek_page(start, min(page_size, max_count - len(found)))
        if not page:
            break
        found += page[: max_count - len(found)]
        after = max(d.sequence_number for d in page) + 1
        if after <= start:  # a backend without sequence numbers: nothing further to ask for
            break
        start = after
    return found


@dataclass(frozen=True, slots=True)
class Requeued:
    """A dead-lettered message that went back on the queue: its old id and the id of the copy."""

    message_id: str
    new_message_id: str


MAX_MESSAGE_ID_CHARS = 128
"""Service Bus's limit on a message id."""
REQUEUE_MARK = "+r"
"""Separates a job id from the sequence number in a requeued copy's id; ``+`` is never part of a job id."""


def requeued_message_id(message_id: str, sequence_number: int) -> str:
    """The id a dead-lettered message is requeued under: the job id, ``+r``, the dead letter's sequence number.

    Not the old id: Service Bus duplicate detection remembers every id sent within its window (up to 7 days)
    and silently drops a copy that reuses one, so the dead letter would be completed and the job lost. The
    sequence number makes the id unique per dead letter yet the same if a requeue is retried, so duplicate
    detection still drops a second copy of the *same* dead letter. A mark from an earlier requeue is replaced,
    not stacked.
    """
    head, mark, tail = message_id.rpartition(REQUEUE_MARK)
    job_id = head if mark and tail.isdigit() else message_id
    suffix = f"{REQUEUE_MARK}{sequence_number}"
    return job_id[: MAX_MESSAGE_ID_CHARS - len(suffix)] + suffix


@dataclass(frozen=True, slots=True)
class DepthSample:
    """How much work is waiting, and how old that knowledge is.

    ``in_flight`` (messages locked by a receiver) is ``None`` when the source cannot tell (Azure Monitor).
    ``sampled_at`` is when the numbers were true: a Monitor metric is minutes old, the policy must know.
    """

    active: int
    in_flight: int | None
    dead_lettered: int
    sampled_at: float
    scheduled: int = 0
    transfer: int = 0
    source: str = ""
    active_includes_locked: bool = False
    """Whether ``active`` also counts messages a receiver holds under peek-lock. Service Bus's
    ``ActiveMessageCount`` and Monitor's ActiveMessages metric do (a locked message stays active until settled:
    https://learn.microsoft.com/azure/service-bus-messaging/message-counters); the SQLite queue reports locked
    messages apart, in ``in_flight``. The policy subtracts the work it knows is running, never counting a job
    twice."""


class LockKeeper(Protocol):
    """Keeps one message's lock alive in the background until ``stop``."""

    @property
    def lost(self) -> BaseException | None:
        """The error that ended renewal, or ``None`` while the lock is held."""

    def stop(self) -> None:
        """Stop renewing (before settling the message)."""


class JobQueue(Protocol):
    """A peek-lock queue with Service Bus semantics (complete / abandon / dead-letter, max deliveries)."""

    @property
    def name(self) -> str: ...

    def send(self, messages: Sequence[OutgoingMessage]) -> None:
        """Enqueue messages (batched where the service allows). A duplicate id raises ``DuplicateJobError``
        where the backend can tell (SQLite); Service Bus duplicate detection drops it silently."""

    def receive(self, *, max_wait_s: float) -> ReceivedMessage | None:
        """Lock and return the next message, or ``None`` after ``max_wait_s``. Messages delivered more than
        the queue's max delivery count are dead-lettered (``MaxDeliveryCountExceeded``), never returned."""

    def renew_lock(self, message: ReceivedMessage) -> float:
        """Extend the lock; returns the new ``locked_until``. Raises ``LockLostError`` if no longer held."""

    def keep_locked(self, message: ReceivedMessage, *, on_lost: Callable[[BaseException], None]) -> LockKeeper:
        """Renew the lock in the background for as long as the job runs, however long that is."""

    def complete(self, message: ReceivedMessage) -> None:
        """Remove the message for good. Raises ``LockLostError`` if the lock is gone."""

    def abandon(self, message: ReceivedMessage) -> None:
        """Release the lock so the message is delivered again (delivery count + 1)."""

    def release_later(self, message: ReceivedMessage, *, delay_s: float) -> None:
        """Give the message back for a failure that is not the job's own (storage or disk unavailable): nobody
        receives it for ``delay_s``, then it is delivered again with ``released`` one higher and the same
        ``delivery_count`` as this delivery had before it, so the job's own budget of deliveries is not spent.
        Its message id may change to :func:`requeued_message_id` (a backend that must send a copy); the body
        does not. Raises ``LockLostError`` if the lock is gone; a crash inside may leave a duplicate, never a
        loss. Bounding how often a job is released is the caller's part."""

    def dead_letter(self, message: ReceivedMessage, *, reason: str, description: str) -> None:
        """Move the message to the dead-letter queue with a reason."""

    def peek_dead_letters(self, *, max_count: int) -> list[DeadLetter]:
        """Look at dead-lettered messages without removing them: every one up to ``max_count``, oldest first
        (by sequence number), read in pages (:func:`page_dead_letters`) however many there are."""

    def requeue_dead_letters(self, *, max_count: int, concurrency: int = 1) -> list[Requeued]:
        """Move up to ``max_count`` dead-lettered messages back onto the queue (once their cause is fixed).

        Each copy has the same body under :func:`requeued_message_id` and a fresh delivery count. The copy is
        sent before the dead letter is removed, so a crash in between leaves a duplicate, never a loss: Service
        Bus duplicate detection drops a second copy of the same dead letter (same derived id) and a job whose
        outputs are already committed is completed without running again. ``concurrency`` is how many dead
        letters settle at once (one receiver each, since a message settles only through the link that received
        it); backends that move them in one transaction ignore it. Returns what was moved, in no set order.
        """

    def close(self) -> None:
        """Release links and clients; safe to call twice."""


class QueueDepth(Protocol):
    """Where the controller learns the queue depth (the queue itself, an admin API, or a metric)."""

    def read_depth(self) -> DepthSample: ...

    def close(self) -> None:
        """Release clients; safe to call twice. A queue that is its own depth source closes once for both."""


@dataclass(frozen=True, slots=True)
class History:
    """What a queue went through between ``since`` and ``until``, and how long its oldest waiting job has waited.

    A figure the source cannot give is ``None`` and ``unavailable`` says why (Service Bus keeps no record of
    each message, so Azure Monitor's counts stand in and waits have no percentiles). Durations are seconds:
    a wait runs from enqueue to first delivery, a run from the completing delivery to completion.
    """

    since: float
    until: float
    source: str
    completed: int | None = None
    dead_lettered: int | None = None
    enqueued: int | None = None
    wait_p50_s: float | None = None
    wait_p95_s: float | None = None
    wait_max_s: float | None = None
    run_p50_s: float | None = None
    run_p95_s: float | None = None
    oldest_waiting_s: float | None = None
    """Age of the oldest job no worker has taken yet (0 waiting: ``None`` with nothing in ``unavailable``)."""
    oldest_includes_locked: bool = False
    """Whether ``oldest_waiting_s`` may be a job a worker holds (a Service Bus peek shows locked messages too)."""
    unavailable: tuple[str, ...] = ()


@runtime_checkable
class QueueHistory(Protocol):
    """Where ``status`` reads a queue's recent throughput and waits (optional: not every queue keeps any)."""

    def recent(self, *, since: float) -> History: ...

    def close(self) -> None:
        """Release clients; safe to call twice."""


# --------------------------------------------------------------------------------------------- scale set


class InstanceState(enum.StrEnum):
    """An instance's life as the scale set reports it (not whether it is busy: see ``Heartbeat``)."""

    STARTING = "starting"
    RUNNING = "running"
    DELETING = "deleting"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    state: InstanceState
    created_at: float
    protected: bool = False
    name: str = ""
    model: str = ""
    """The image (the scale set model's image reference) this instance was created from, as
    :meth:`ModelledScaleSet.model` names it; ``""`` where the backend cannot tell."""


class ScaleSet(Protocol):
    """A set of identical worker machines the controller sizes.

    Lowering capacity removes instances the *scale set* chooses (as VMSS does), so the controller never lowers
    it to scale in: idle workers delete themselves, and the controller deletes only named broken instances.
    """

    def get_capacity(self) -> int: ...

    def list_instances(self) -> list[Instance]: ...

    def set_capacity(self, capacity: int) -> None:
        """One write; returns when the scale set has accepted it (long-running operations polled to the end)."""

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        """Delete named instances in one call; capacity drops by as many. Already gone counts as done."""

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        """Protect a busy instance from scale-in by anything else (a no-op where nothing else scales in)."""

    def close(self) -> None:
        """Release clients (the instances keep running); safe to call twice."""


@runtime_checkable
class InstanceViews(Protocol):
    """A scale set whose listing reports only what is cheap to list (VMSS: the provisioning state, without
    each VM's instance view) and that can tell more about a few instances on request."""

    def instance_states(self, instance_ids: Sequence[str]) -> dict[str, InstanceState]:
        """The state of some listed instances from their detailed view (a stopped or deallocated VM is failed, a
        failed one that still runs is running). The backend bounds the calls this costs: an instance it left
        out keeps its listed state."""


@runtime_checkable
class ModelledScaleSet(ScaleSet, Protocol):
    """A scale set whose model (the image new instances boot) can be read and replaced: what ``scalebus
    rollout`` needs. Replacing the model never touches existing instances: they keep their image until they
    retire, so no running job is reimaged."""

    def model(self) -> str:
        """The image new instances boot (an image resource id on Azure, a name on the local pool)."""

    def update_model(self, image: str) -> None:
        """Make new instances boot ``image``; existing instances are left as they are. Refuses (``ConfigError``)
        a scale set that would itself upgrade running instances to the new model (reimaging them)."""


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """Who this process runs on: what IMDS tells a VM, what the local pool tells its processes."""

    instance_id: str
    scale_set: str
    name: str = ""


class InstanceIdentity(Protocol):
    def whoami(self) -> InstanceInfo:
        """Raises ``IdentityError`` when this process is not an instance of a scale set."""

    def close(self) -> None:
        """Release clients; safe to call twice."""


class NoticeKind(enum.StrEnum):
    """What a scheduled platform event does to the instance (IMDS ``EventType``)."""

    PREEMPT = "Preempt"
    """A Spot instance is being evicted (deleted), at 30 s notice: the VM and its disks are lost."""
    TERMINATE = "Terminate"
    """The instance is being deleted (scale-set terminate notification, 5–15 minutes)."""
    REBOOT = "Reboot"
    REDEPLOY = "Redeploy"
    FREEZE = "Freeze"


INSTANCE_LOSING_NOTICES = frozenset({NoticeKind.PREEMPT, NoticeKind.TERMINATE})
"""Notices after which this instance is gone: the worker releases its job and exits. The others pause or move it
and it comes back, so they are only logged."""


@dataclass(frozen=True, slots=True)
class Notice:
    """A scheduled platform event that names this instance."""

    event_id: str
    kind: NoticeKind
    not_before: float | None
    """When the event may start (epoch seconds); ``None`` once it has started (IMDS leaves NotBefore blank) or
    when the platform gave no usable time: treat it as now."""
    started: bool = False
    others_affected: bool = False
    """The event names other instances too: acknowledging it lets it proceed for them as well."""


class NoticeSource(Protocol):
    """Where a worker learns that its instance is about to be evicted, deleted, rebooted or paused: IMDS
    scheduled events on Azure, the pool's database locally. Bound to one instance when opened."""

    def pending(self) -> list[Notice]:
        """The current events that name this instance (events for other instances are left out). Raises
        ``TransientNoticeError`` when asking again later may help, ``NoticeError`` otherwise."""

    def acknowledge(self, event_id: str) -> None:
        """Let the event start now instead of at its ``not_before`` (IMDS ``StartRequests``). Acknowledging twice
        is fine; an event that is gone (finished, cancelled, never existed) raises ``NoticeError``."""

    def close(self) -> None:
        """Release clients; safe to call twice."""


class WorkerState(enum.StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    instance_id: str
    state: WorkerState
    at: float
    job_id: str | None = None


HINT_MAX_AGE_S = 120.0
"""A :class:`FleetHint` older than this is ignored (the controller is gone); the controller republishes well
within it."""


@dataclass(frozen=True, slots=True)
class FleetHint:
    """What the controller tells every worker of its fleet (one record per fleet, the latest wins)."""

    idle_grace_s: float
    """How long an idle worker should wait for work before retiring (the policy's ``Decision.idle_grace_s``)."""
    at: float
    """When it was published (epoch seconds), so workers can ignore a hint a dead controller left behind."""
    retire_instance_ids: tuple[str, ...] | None = None
    """Instances that must take no more work (``scalebus rollout``'s old-model instances): each finishes the job
    it holds, then retires as an idle worker does. ``None`` in a published hint keeps the list already stored
    (the controller rewrites the idle grace without knowing it); ``()`` clears it. Workers honour it whatever
    the hint's age: it is the operator's decision, not a forecast that goes stale."""


class HeartbeatStore(Protocol):
    """Workers report liveness and busy/idle here; the controller reads it to tell idle from busy.

    The flow back, controller to workers, is one :class:`FleetHint` per fleet, kept apart from the heartbeats
    (``read_all`` never returns it).
    """

    def beat(self, heartbeat: Heartbeat) -> None: ...

    def read_all(self) -> list[Heartbeat]: ...

    def forget(self, instance_id: str) -> None: ...

    def publish_hint(self, hint: FleetHint) -> None:
        """Replace the fleet's hint (its ``retire_instance_ids`` only when it is not ``None``)."""

    def read_hint(self) -> FleetHint | None:
        """The fleet's latest hint, or ``None`` if none was ever published (or it is unreadable)."""

    def close(self) -> None:
        """Release clients; safe to call twice."""


# --------------------------------------------------------------------------------------------- storage


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """A file in the object store. ``rel_path`` is '/'-separated, relative to the URI that was listed."""

    uri: str
    rel_path: str
    size: int
    etag: str
    content_md5: bytes | None = None
    modified_at: float | None = None
    """Last modification (epoch seconds) where the listing reports it (S3); ``None`` elsewhere."""


@runtime_checkable
class ObjectStore(Protocol):
    """A data lake: list, read (ranged) and write files addressed by URI (``file://``, ``abfss://``)."""

    def list_files(self, uri: str) -> Iterator[RemoteObject]:
        """Every file under ``uri`` (recursively); a file URI yields itself with its base name as
        ``rel_path``. Directory markers are skipped. Raises ``ObjectNotFoundError`` if nothing is there."""

    def read_into(self, obj: RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None) -> int:
        """Stream bytes ``[offset, offset+length)`` of ``obj`` into ``sink``; returns the count written."""

    def write_file(self, source: Path, uri: str) -> None:
        """Upload a local file to ``uri`` (overwriting)."""

    def write_bytes(self, data: bytes, uri: str) -> None: ...

    def exists(self, uri: str) -> bool: ...

    def close(self) -> None:
        """Release connections (the store is not used afterwards); safe to call twice."""


@dataclass(frozen=True, slots=True)
class SubFolder:
    """A folder one level below a listed folder: list it with ``FolderLister.list_level(uri, rel_prefix)``."""

    uri: str
    rel_prefix: str
    """``rel_path`` prefix of everything below it, relative to the URI the staging listed, ending in ``/``."""


@runtime_checkable
class FolderLister(Protocol):
    """An ``ObjectStore`` that can list one folder level at a time, so a staging lists many folders at once
    instead of one long serial listing (Blob: List Blobs with ``delimiter=/``; ADLS: List Paths non-recursive;
    local: one ``scandir``)."""

    def list_level(self, uri: str, rel_prefix: str = "") -> Iterator[RemoteObject | SubFolder]:
        """The files directly under folder ``uri`` (``rel_path`` = ``rel_prefix`` + name) and its sub-folders,
        yielded as each page arrives. A file URI yields itself with its base name as ``rel_path``, as
        ``list_files`` does; directory markers are skipped. Raises ``ObjectNotFoundError`` (on the first
        ``next``) if nothing is there."""


class ObjectSource(Protocol):
    """The read half of ``ObjectStore``: where ``scalebus ingest`` copies from (S3, or any ``ObjectStore``)."""

    def list_files(self, uri: str) -> Iterator[RemoteObject]:
        """Every file under ``uri``, as ``ObjectStore.list_files``."""

    def read_into(self, obj: RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None) -> int:
        """Stream bytes of ``obj`` into ``sink``, as ``ObjectStore.read_into``."""

    def close(self) -> None:
        """Release connections; safe to call twice."""


# --------------------------------------------------------------------------------------------- secrets


class SecretSource(Protocol):
    """Named secrets for the analytics: Key Vault, or a folder of files on the embedded default.

    Only the worker reads secrets, and hands them to the analytics as environment variables; values never reach
    logs, error messages or ``status`` (errors name the secret, never its value).
    """

    def get(self, name: str) -> str:
        """The current value of secret ``name``. Raises ``SecretNotFoundError`` when there is no such secret (or
        it is disabled, or the name breaks ``settings.SECRET_NAME_PATTERN``), ``TransientSecretError`` when asking
        again later may help, ``SecretError`` otherwise (access denied, unreadable)."""

    def close(self) -> None:
        """Release clients; safe to call twice."""


# --------------------------------------------------------------------------------------------- leadership


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """What holding the lease gives: proof to renew or release it, and the fencing token of this tenure."""

    holder: str
    token: int
    """Grows with each new holder (each new tenure), never with a renewal: a write stamped with a lower token
    than the latest was made by a leader that had already been replaced."""
    key: str = ""
    """The backend's own proof of holding (a blob lease id); ``""`` where the holder and token suffice."""


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Who holds the lease now, as anyone may read it (``status``)."""

    holder: str
    token: int
    expires_at: float | None = None
    """When the lease runs out unless renewed (epoch seconds); ``None`` where the backend does not tell."""


class Lease(Protocol):
    """One named lease for many would-be holders (controllers): at most one holds it at a time.

    A lease runs out ``duration_s`` after it was acquired or last renewed unless renewed again; then anyone may
    acquire it. The holder cannot know when the service started counting, only that it was after the call was
    sent, so it counts from there and stops acting well before that time plus ``duration_s``.
    """

    @property
    def duration_s(self) -> float: ...

    def acquire(self, holder: str) -> LeaseGrant | None:
        """Take the lease if nobody holds it (never held, released, or run out), with a token above every one
        handed out before; ``None`` while it is held, by another holder or by this one."""

    def renew(self, grant: LeaseGrant) -> LeaseGrant:
        """Extend the lease by ``duration_s`` from now, keeping its token. Raises ``LeaseLostError`` once
        someone else has acquired it (or it was released)."""

    def release(self, grant: LeaseGrant) -> None:
        """Give the lease up so another holder can acquire it at once; a lease already lost is left alone."""

    def holder(self) -> LeaseHolder | None:
        """Who holds the lease now, or ``None`` when nobody does."""

    def close(self) -> None:
        """Release clients (not the lease); safe to call twice."""
