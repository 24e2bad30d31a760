"""Azure Service Bus as the job queue (``base.JobQueue``) and as a depth source (``base.QueueDepth``).

The adapters wrap the synchronous ``azure-servicebus`` SDK. Every call that can wait passes an explicit timeout
(``receive_messages`` without ``max_wait_time`` can block for a minute on an empty queue). SDK exceptions are
translated here: lock lost → ``LockLostError``, missing entity → ``QueueNotFoundError``, connection trouble →
``TransientQueueError`` (retried by the ``messaging`` policy), everything else → ``QueueError``. Error messages
name the queue and the exception type only: the SDK's own messages can quote endpoints, and connection strings and
SAS keys must never reach a log or an error.

Depth: ``ServiceBusAdminDepth`` reads ``get_queue_runtime_properties`` (real time, needs Manage rights) at most
once per ``depth_cache_s``. Service Bus counts a peek-locked message as *active* until it is settled, and
``CountDetails``
has no locked count (``MessageCount`` is the sum of the other counters, so subtracting them leaves nothing), so the
admin API cannot tell waiting from in-flight work: ``in_flight`` is ``None`` and ``active`` includes locked
messages. The controller learns in-flight work from worker heartbeats instead.

Releasing a job for a failure that is not its own (``release_later``): Service Bus has no abandon with a delay,
and abandoning counts a delivery ("The count is incremented when a message lock expires, or the message is
explicitly abandoned": https://learn.microsoft.com/dotnet/api/azure.messaging.servicebus.servicebusreceivedmessage.
deliverycount). Holding the lock through the back-off and then abandoning would spend the job's budget on an
outage; deferral sets the message aside until someone receives it by sequence number, which no other worker
knows (https://learn.microsoft.com/azure/service-bus-messaging/message-deferral). So the adapter sends a copy
scheduled for later ("Service Bus will hide the message from receivers until the requested time":
https://learn.microsoft.com/dotnet/api/azure.messaging.servicebus.servicebusreceivedmessage.scheduledenqueuetime)
carrying two application properties, the releases so far and the job's own deliveries so far, then completes the
original: send first, complete second, so a crash in between duplicates the job, never loses it (the copy's id is
:func:`base.requeued_message_id` of the original, the same on a retried send, so duplicate detection drops a
second copy). A copy starts a fresh broker count; the port adds the carried deliveries back, and with
``max_delivery_count`` known the adapter dead-letters a copy that carries deliveries once it is past that count
(``MaxDeliveryCountExceeded``), as the broker would have the original; a queue whose own MaxDeliveryCount is
higher than ``queue.max_delivery_count`` dead-letters such copies earlier than it would the original.

Requeueing dead letters settles many messages at once, and since 7.15 every settlement waits for the broker's
echo. A message settles only through the link that received it and an SDK receiver is not thread-safe, so
``requeue_dead_letters`` runs K receivers on the dead-letter queue, one thread each with its own sender: N dead
letters cost about N / K settlement round trips instead of N (bench/settle.py measures it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from azure.core import exceptions as core_exc
from azure.servicebus import (
    AutoLockRenewer,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusMessageState,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
    parse_connection_string,
)
from azure.servicebus import exceptions as sb_exc
from azure.servicebus.management import ServiceBusAdministrationClient

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import _cache, _errors, _retry
from scalebus.settings import QueueSettings

if TYPE_CHECKING:
    from scalebus.backends.azure import monitor

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024
"""Service Bus Standard's limit for one message, headers included."""
HEADER_ALLOWANCE_BYTES = 1024
"""Room kept for the AMQP header, properties and annotations when checking a body against the limit."""
SDK_RETRIES = 0
"""The SDK's own retry loop is off: transient failures surface as ``TransientQueueError`` and are retried once, by
the named ``messaging`` policy (sends, settlements, renewals) or by the caller's loop (receives), instead of by two
stacked loops that multiply the wait. A failed operation still makes the SDK reopen its link on the next call."""
CLOSE_TIMEOUT_S = 10.0
"""Longest wait for one link to close."""
NO_PRACTICAL_CAP_S = 10 * 365 * 24 * 3600.0
"""``AutoLockRenewer`` needs a maximum renewal duration; a job outlives its VM long before this."""
REQUEUE_BATCH = 16
"""Most dead letters one requeue receiver takes per round. It completes them one after another, each waiting for
the broker's echo, so a round holds their locks for about this many round trips (far inside the 5 s minimum
lock); small rounds also spread a short dead-letter queue over every receiver, at one receive per round."""
REQUEUE_WAIT_S = 2.0
"""How long a requeue receiver waits for a dead letter before it takes the dead-letter queue for drained."""
MAX_REQUEUE_CONCURRENCY = 32
"""Upper bound on requeue receivers (each is a connection with a sender of its own)."""
PEEK_TIMEOUT_S = 30.0
"""Longest wait for one peek (a management request on the queue's ``$management`` node)."""
OLDEST_PEEK_PAGES = 5
"""Pages ``status`` peeks looking for the oldest active message past scheduled, deferred and locked ones."""

_TRANSIENT_SB = (
    sb_exc.ServiceBusConnectionError,
    sb_exc.ServiceBusCommunicationError,
    sb_exc.OperationTimeoutError,
    sb_exc.ServiceBusServerBusyError,
)


def _to_scalebus(exc: BaseException, *, what: str) -> errors.BackendError:
    """The scalebus error for one Service Bus SDK exception (by type, never by message)."""
    if isinstance(exc, sb_exc.MessageLockLostError | sb_exc.MessageAlreadySettled):
        return errors.LockLostError(f"{what}: the message lock was lost ({type(exc).__name__})")
    if isinstance(exc, sb_exc.AutoLockRenewFailed) and isinstance(
        exc.inner_exception, sb_exc.MessageLockLostError
    ):
        return errors.LockLostError(f"{what}: the message lock was lost while renewing")
    if isinstance(exc, sb_exc.MessagingEntityNotFoundError) or _token_refused_with(exc, 404):
        return errors.QueueNotFoundError(f"{what}: queue not found")
    if isinstance(exc, _TRANSIENT_SB):
        return errors.TransientQueueError(f"{what}: {type(exc).__name__}")
    if isinstance(exc, sb_exc.ServiceBusAuthenticationError | sb_exc.ServiceBusAuthorizationError):
        return errors.QueueError(
            f"{what}: not authorised ({type(exc).__name__}); check the identity and its roles"
        )
    if isinstance(exc, sb_exc.ServiceBusError):
        return errors.QueueError(f"{what}: {type(exc).__name__}")
    return _errors.to_scalebus(exc, _errors.QUEUE, what=what)


def _denied(exc: core_exc.HttpResponseError) -> bool:
    """The admin API refuses a token without Manage claims with 401 (``SubCode=40100``: "Manage,EntityRead
    claims required for this operation") and an RBAC role that lacks the action with 403."""
    return exc.status_code in (401, 403)


def _token_refused_with(exc: BaseException, status: int) -> bool:
    """Service Bus answers the CBS put-token for a missing entity with 404, which the SDK raises as an
    authentication error whose inner exception carries the status code."""
    inner = getattr(exc, "inner_exception", None)
    return isinstance(exc, sb_exc.ServiceBusAuthenticationError) and getattr(inner, "status_code", None) == status


@contextlib.contextmanager
def _translated(*, what: str) -> Iterator[None]:
    try:
        yield
    except errors.ScalebusError:
        raise
    except (core_exc.AzureError, sb_exc.MessageAlreadySettled, OSError, TimeoutError) as exc:
        raise _to_scalebus(exc, what=what) from exc


def _epoch(value: Any) -> float:
    return float(value.timestamp()) if value is not None else 0.0


def _body(message: ServiceBusReceivedMessage) -> bytes:
    body = message.body
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    return b"".join(bytes(part) for part in body)


RELEASES_PROPERTY = "scalebus-releases"
"""Application property of a released copy: how many times the job was released so far."""
PRIOR_DELIVERIES_PROPERTY = "scalebus-prior-deliveries"
"""Application property of a released copy: the job's own deliveries before the copy was sent."""


def _carried(message: ServiceBusReceivedMessage, name: str) -> int:
    """An integer application property of ours (the SDK may hand keys back as bytes); 0 when absent."""
    properties = message.application_properties or {}
    value = properties.get(name, properties.get(name.encode(), 0))
    return int(value) if isinstance(value, int | str | bytes) and str(value).isdigit() else 0


def _port_delivery_count(message: ServiceBusReceivedMessage) -> int:
    """Service Bus puts prior deliveries on the wire (AMQP semantics) and the Python SDK reports that as-is;
    the port counts this delivery too, as the .NET and Java SDKs do, and the deliveries a released copy
    carries over from the message it replaced."""
    return int(message.delivery_count or 0) + 1 + _carried(message, PRIOR_DELIVERIES_PROPERTY)


# --------------------------------------------------------------------------------------------- job queue


class _RenewedLock:
    """One message's background renewal (``base.LockKeeper``), with an ``AutoLockRenewer`` of its own."""

    def __init__(
        self,
        *,
        receiver: Any,
        message: ServiceBusReceivedMessage,
        on_lost: Callable[[BaseException], None],
        queue_name: str,
    ) -> None:
        self._lost: BaseException | None = None
        self._stopped = False
        self._on_lost = on_lost
        self._queue_name = queue_name
        self._renewer = AutoLockRenewer(max_lock_renewal_duration=NO_PRACTICAL_CAP_S)
        self._renewer.register(receiver, message, on_lock_renew_failure=self._failed)

    @property
    def lost(self) -> BaseException | None:
        return self._lost

    def _failed(self, _renewable: object, error: BaseException | None) -> None:
        if self._stopped:  # a renewal racing the settlement that follows stop() is not a lost job
            return
        cause = error if error is not None else sb_exc.MessageLockLostError(message="lock expired")
        lost = _to_scalebus(cause, what=f"renew lock on {self._queue_name}")
        if not isinstance(lost, errors.LockLostError):
            lost = errors.LockLostError(
                f"renew lock on {self._queue_name}: renewal failed ({type(cause).__name__})"
            )
        lost.__cause__ = cause
        self._lost = lost
        log.warning("servicebus.lock_lost", queue=self._queue_name, error=type(cause).__name__)
        self._on_lost(lost)

    def stop(self) -> None:
        self._stopped = True
        self._renewer.close(wait=False)


class _Quota:
    """How many more dead letters a requeue may take, shared by its receivers (claimed before each receive, the
    unreceived part given back after it, so ``max_count`` holds however the receivers interleave). A claim is at
    most a fair share of what is left, so a small ``max_count`` still spreads over every receiver."""

    def __init__(self, total: int, *, receivers: int) -> None:
        self._left = total
        self._receivers = receivers
        self._stopped = False
        self._lock = threading.Lock()

    def take(self, wanted: int) -> int:
        with self._lock:
            fair_share = -(-self._left // self._receivers)
            granted = 0 if self._stopped else max(0, min(wanted, fair_share, self._left))
            self._left -= granted
            return granted

    def give_back(self, count: int) -> None:
        with self._lock:
            self._left += count

    def stop(self) -> None:
        """No receiver starts another round (one of them failed)."""
        with self._lock:
            self._stopped = True


class ServiceBusJobQueue:
    """A Service Bus queue in peek-lock mode behind ``base.JobQueue``.

    The sender and the receivers open on first use and stay open (opening a link costs a CBS round trip). The SDK
    message objects of received messages are kept by lock token until settled: the SDK settles through them.
    """

    def __init__(
        self, client: ServiceBusClient, *, queue_name: str, max_delivery_count: int | None = None
    ) -> None:
        self._client = client
        self._queue_name = queue_name
        self._max_delivery_count = max_delivery_count
        self._sender: Any = None
        self._receiver: Any = None
        self._dead_letter_receiver: Any = None
        self._received: dict[str, ServiceBusReceivedMessage] = {}
        self._lock = threading.Lock()
        # An SDK receiver is not thread-safe: receives and settlements take turns (the AutoLockRenewer's renewals
        # run beside them, as the SDK intends).
        self._receiver_lock = threading.RLock()
        self._log = log.bind(queue=queue_name)

    @property
    def name(self) -> str:
        return self._queue_name

    # ------------------------------------------------------------------ links

    def _get_sender(self) -> Any:
        if self._sender is None:
            self._sender = self._client.get_queue_sender(self._queue_name)
        return self._sender

    def _get_receiver(self) -> Any:
        if self._receiver is None:
            self._receiver = self._client.get_queue_receiver(
                self._queue_name, receive_mode=ServiceBusReceiveMode.PEEK_LOCK, prefetch_count=0
            )
        return self._receiver

    def _get_dead_letter_receiver(self) -> Any:
        if self._dead_letter_receiver is None:
            self._dead_letter_receiver = self._client.get_queue_receiver(
                self._queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER, prefetch_count=0
            )
        return self._dead_letter_receiver

    # ------------------------------------------------------------------ send

    def send(self, messages: Sequence[base.OutgoingMessage]) -> None:
        for message in messages:
            if len(message.body) + len(message.message_id) > MAX_MESSAGE_BYTES - HEADER_ALLOWANCE_BYTES:
                raise errors.InvalidJobError(
                    "MessageTooLarge",
                    f"job {message.message_id} is {len(message.body)} bytes; Service Bus takes at most "
                    f"{MAX_MESSAGE_BYTES} bytes per message: put large inputs in storage and reference them",
                )
        if messages:
            self._send_batches(list(messages))
            self._log.debug("servicebus.sent", count=len(messages))

    @_retry.retry_messaging
    def _send_batches(self, messages: list[base.OutgoingMessage]) -> None:
        with _translated(what=f"send to {self._queue_name}"):
            _send_in_batches(self._get_sender(), messages)

    # ------------------------------------------------------------------ receive and settle

    def receive(self, *, max_wait_s: float) -> base.ReceivedMessage | None:
        deadline = time.monotonic() + max_wait_s
        while True:
            with self._receiver_lock, _translated(what=f"receive from {self._queue_name}"):
                got = self._get_receiver().receive_messages(
                    max_message_count=1, max_wait_time=max(deadline - time.monotonic(), 0.001)
                )
            if not got:
                return None
            if not self._exceeded(got[0]):
                return self._taken(got[0])
            if time.monotonic() >= deadline:
                return None

    def _exceeded(self, sdk_message: ServiceBusReceivedMessage) -> bool:
        """A released copy past the job's budget goes where the broker would have sent the original."""
        count = _port_delivery_count(sdk_message)
        carried = _carried(sdk_message, PRIOR_DELIVERIES_PROPERTY)
        if self._max_delivery_count is None or not carried or count <= self._max_delivery_count:
            return False
        reason = "MaxDeliveryCountExceeded"
        with self._receiver_lock, _translated(what=f"dead-letter on {self._queue_name}"):
            self._get_receiver().dead_letter_message(
                sdk_message,
                reason=reason,
                error_description=f"delivered {count - 1} times without being completed",
            )
        self._log.warning("servicebus.dead_lettered", message_id=sdk_message.message_id, reason=reason)
        return True

    def _taken(self, sdk_message: ServiceBusReceivedMessage) -> base.ReceivedMessage:
        token = str(sdk_message.lock_token)
        with self._lock:
            self._received[token] = sdk_message
        return base.ReceivedMessage(
            message_id=str(sdk_message.message_id or ""),
            body=_body(sdk_message),
            lock_token=token,
            delivery_count=_port_delivery_count(sdk_message),
            sequence_number=int(sdk_message.sequence_number or 0),
            enqueued_at=_epoch(sdk_message.enqueued_time_utc),
            locked_until=_epoch(sdk_message.locked_until_utc),
            released=_carried(sdk_message, RELEASES_PROPERTY),
        )

    def _sdk_message(self, message: base.ReceivedMessage, *, what: str) -> ServiceBusReceivedMessage:
        with self._lock:
            sdk_message = self._received.get(message.lock_token)
        if sdk_message is None:
            raise errors.LockLostError(f"{what}: message {message.message_id} is not locked by this receiver")
        return sdk_message

    def _forget(self, message: base.ReceivedMessage) -> None:
        with self._lock:
            self._received.pop(message.lock_token, None)

    def renew_lock(self, message: base.ReceivedMessage) -> float:
        what = f"renew lock on {self._queue_name}"
        return self._renew_with_retry(self._sdk_message(message, what=what), what=what)

    @_retry.retry_messaging
    def _renew_with_retry(self, sdk_message: ServiceBusReceivedMessage, *, what: str) -> float:
        with self._receiver_lock, _translated(what=what):
            return _epoch(self._get_receiver().renew_message_lock(sdk_message, timeout=30))

    def keep_locked(
        self, message: base.ReceivedMessage, *, on_lost: Callable[[BaseException], None]
    ) -> base.LockKeeper:
        sdk_message = self._sdk_message(message, what=f"keep lock on {self._queue_name}")
        with self._receiver_lock, _translated(what=f"keep lock on {self._queue_name}"):
            return _RenewedLock(
                receiver=self._get_receiver(), message=sdk_message, on_lost=on_lost, queue_name=self._queue_name
            )

    def _settle(self, message: base.ReceivedMessage, *, what: str, settle: Callable[[Any], None]) -> None:
        sdk_message = self._sdk_message(message, what=what)
        try:
            self._settle_with_retry(sdk_message, what=what, settle=settle)
        except errors.LockLostError:
            self._forget(message)
            raise
        self._forget(message)

    @_retry.retry_messaging
    def _settle_with_retry(
        self, sdk_message: ServiceBusReceivedMessage, *, what: str, settle: Callable[[Any], None]
    ) -> None:
        with self._receiver_lock, _translated(what=what):
            settle(sdk_message)

    def complete(self, message: base.ReceivedMessage) -> None:
        receiver = self._get_receiver()
        self._settle(message, what=f"complete on {self._queue_name}", settle=receiver.complete_message)

    def abandon(self, message: base.ReceivedMessage) -> None:
        receiver = self._get_receiver()
        self._settle(message, what=f"abandon on {self._queue_name}", settle=receiver.abandon_message)

    def release_later(self, message: base.ReceivedMessage, *, delay_s: float) -> None:
        """Send a copy scheduled ``delay_s`` from now, then complete the original (see the module docstring)."""
        sdk_message = self._sdk_message(message, what=f"release on {self._queue_name}")
        copy = ServiceBusMessage(
            message.body,
            message_id=base.requeued_message_id(message.message_id, message.sequence_number),
            content_type=str(sdk_message.content_type or "application/json"),
            application_properties={
                RELEASES_PROPERTY: message.released + 1,
                PRIOR_DELIVERIES_PROPERTY: max(message.delivery_count - 1, 0),
            },
            scheduled_enqueue_time_utc=datetime.datetime.now(datetime.UTC)
            + datetime.timedelta(seconds=max(delay_s, 0.0)),
        )
        self._send_release(copy)
        self.complete(message)
        self._log.info("servicebus.released", message_id=message.message_id, delay_s=delay_s)

    @_retry.retry_messaging
    def _send_release(self, copy: ServiceBusMessage) -> None:
        with _translated(what=f"release to {self._queue_name}"):
            self._get_sender().send_messages(copy)

    def dead_letter(self, message: base.ReceivedMessage, *, reason: str, description: str) -> None:
        receiver = self._get_receiver()

        def settle(sdk_message: Any) -> None:
            receiver.dead_letter_message(sdk_message, reason=reason, error_description=description)

        self._settle(message, what=f"dead-letter on {self._queue_name}", settle=settle)
        self._log.info("servicebus.dead_lettered", message_id=message.message_id, reason=reason)

    def peek_dead_letters(self, *, max_count: int) -> list[base.DeadLetter]:
        """Page through ``<queue>/$deadletterqueue`` (a peek returns at most what is asked, often fewer)."""
        return base.page_dead_letters(self._peek_dead_letter_page, max_count=max_count)

    def _peek_dead_letter_page(self, from_sequence_number: int, count: int) -> list[base.DeadLetter]:
        with _translated(what=f"peek dead letters of {self._queue_name}"):
            peeked = self._get_dead_letter_receiver().peek_messages(
                max_message_count=count, sequence_number=from_sequence_number, timeout=PEEK_TIMEOUT_S
            )
        return [
            base.DeadLetter(
                message_id=str(m.message_id or ""),
                reason=m.dead_letter_reason or "",
                description=m.dead_letter_error_description or "",
                delivery_count=max(1, int(m.delivery_count or 0) + 1),
                body=_body(m),
                sequence_number=int(m.sequence_number or 0),
            )
            for m in peeked
        ]

    def oldest_active_enqueued_at(self, *, now: float) -> tuple[float | None, bool]:
        """When the oldest active message was enqueued, and whether that is known: ``(None, True)`` when the
        queue holds no active message, ``(None, False)`` when the first :data:`OLDEST_PEEK_PAGES` pages hold
        none but more remain. A peek starts at the lowest sequence number and shows scheduled,
        deferred and locked messages too ("Message browsing",
        https://learn.microsoft.com/azure/service-bus-messaging/message-browsing): scheduled and deferred ones
        are skipped by their state, a locked one wherever the broker tells its lock (``x-opt-locked-until``)."""
        start = 1
        for _ in range(OLDEST_PEEK_PAGES):
            with self._receiver_lock, _translated(what=f"peek {self._queue_name}"):
                page = self._get_receiver().peek_messages(
                    max_message_count=base.DEAD_LETTER_PAGE, sequence_number=start, timeout=PEEK_TIMEOUT_S
                )
            if not page:
                return None, True
            for message in page:
                locked_until = message.locked_until_utc
                if message.state == ServiceBusMessageState.ACTIVE and _epoch(locked_until) <= now:
                    return _epoch(message.enqueued_time_utc) or None, True
            start = max(int(m.sequence_number or 0) for m in page) + 1
        return None, False

    # ------------------------------------------------------------------ requeue dead letters

    def requeue_dead_letters(self, *, max_count: int, concurrency: int = 1) -> list[base.Requeued]:
        """``concurrency`` receivers on ``<queue>/$deadletterqueue``, one thread each with its own sender (neither
        SDK handler is thread-safe). Each round a receiver takes up to ``REQUEUE_BATCH`` dead letters, sends
        their copies in one batch and then completes each of its own dead letters. Receivers stop when
        ``max_count`` is reached or the dead-letter queue stays empty for ``REQUEUE_WAIT_S``.

        A dead letter whose lock was lost before it was completed is left in the dead-letter queue and not
        reported (its copy is on the queue: a later requeue sends the same id again, which duplicate detection
        drops within its window). The first error of any receiver stops the others after their round and is
        raised once they are done; what they moved stays moved.
        """
        if max_count <= 0:
            return []
        receivers = max(1, min(concurrency, MAX_REQUEUE_CONCURRENCY, max_count))
        quota = _Quota(max_count, receivers=receivers)
        moved: list[base.Requeued] = []
        moved_lock = threading.Lock()

        def record(item: base.Requeued) -> None:
            with moved_lock:
                moved.append(item)

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(receivers, thread_name_prefix="sb-requeue") as pool:
            futures = [pool.submit(self._requeue_rounds, quota, record) for _ in range(receivers)]
        failures = [exc for future in futures if (exc := future.exception()) is not None]
        self._log.info(
            "servicebus.dead_letters_requeued",
            count=len(moved),
            concurrency=receivers,
            elapsed_s=round(time.monotonic() - started, 3),
            failed=bool(failures),
        )
        if failures:
            raise failures[0]
        return moved

    def _requeue_rounds(self, quota: _Quota, record: Callable[[base.Requeued], None]) -> None:
        """One receiver's share of a requeue, on its own thread with its own links."""
        what = f"requeue dead letters of {self._queue_name}"
        handlers: list[Any] = []
        try:
            with _translated(what=what):
                receiver = self._client.get_queue_receiver(
                    self._queue_name,
                    sub_queue=ServiceBusSubQueue.DEAD_LETTER,
                    receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
                    prefetch_count=0,
                )
                handlers.append(receiver)
                sender = self._client.get_queue_sender(self._queue_name)
                handlers.append(sender)
            while (wanted := quota.take(REQUEUE_BATCH)) > 0:
                with _translated(what=what):
                    got = receiver.receive_messages(max_message_count=wanted, max_wait_time=REQUEUE_WAIT_S)
                quota.give_back(wanted - len(got))
                if not got:
                    return
                copies = [
                    base.OutgoingMessage(
                        message_id=base.requeued_message_id(str(m.message_id or ""), int(m.sequence_number or 0)),
                        body=_body(m),
                        content_type=str(m.content_type or "application/json"),
                    )
                    for m in got
                ]
                self._send_copies(sender, copies)
                for dead_letter, copy in zip(got, copies, strict=True):
                    try:
                        self._complete_dead_letter(receiver, dead_letter)
                    except errors.LockLostError:
                        self._log.warning(
                            "servicebus.requeue_lock_lost",
                            message_id=dead_letter.message_id,
                            new_message_id=copy.message_id,
                        )
                        continue
                    record(
                        base.Requeued(message_id=str(dead_letter.message_id or ""), new_message_id=copy.message_id)
                    )
        except BaseException:
            quota.stop()
            raise
        finally:
            _close_side_by_side(handlers)

    @_retry.retry_messaging
    def _send_copies(self, sender: Any, copies: list[base.OutgoingMessage]) -> None:
        with _translated(what=f"requeue to {self._queue_name}"):
            _send_in_batches(sender, copies)

    @_retry.retry_messaging
    def _complete_dead_letter(self, receiver: Any, message: ServiceBusReceivedMessage) -> None:
        with _translated(what=f"complete dead letter of {self._queue_name}"):
            receiver.complete_message(message)

    def close(self) -> None:
        """Close the links side by side: each close waits for the SDK's keep-alive thread (up to a second)."""
        handlers = [h for h in (self._sender, self._receiver, self._dead_letter_receiver) if h is not None]
        self._sender = self._receiver = self._dead_letter_receiver = None
        _close_side_by_side(handlers)
        _close_quietly(self._client)


def _send_in_batches(sender: Any, messages: Sequence[base.OutgoingMessage]) -> None:
    """As few sends as the batch size limit allows (each waits for the broker's outcome)."""
    batch = sender.create_message_batch()
    for message in messages:
        sb_message = ServiceBusMessage(
            message.body, message_id=message.message_id, content_type=message.content_type
        )
        try:
            batch.add_message(sb_message)
        except sb_exc.MessageSizeExceededError:
            sender.send_messages(batch)
            batch = sender.create_message_batch()
            batch.add_message(sb_message)
    sender.send_messages(batch)


def _close_side_by_side(handlers: Sequence[Any]) -> None:
    """Close handlers in parallel: each close waits for the SDK's keep-alive thread (up to a second)."""
    threads = [threading.Thread(target=_close_quietly, args=(h,), daemon=True) for h in handlers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLOSE_TIMEOUT_S)


def _close_quietly(handler: Any) -> None:
    """Close one handler from a background thread. A close racing a lock renewal in flight can fail inside the
    SDK's AMQP layer with errors that are not ``AzureError`` (a link already detached, a state check); nothing
    waits on this thread to see them, so every failure is logged here and none escapes it."""
    try:
        handler.close()
    except (core_exc.AzureError, OSError) as exc:
        log.debug("servicebus.close_failed", error=type(exc).__name__)
    except Exception as exc:  # a background thread's last stop: logged, never raised
        log.warning("servicebus.close_failed", error=type(exc).__name__, detail=str(exc)[:200])


# --------------------------------------------------------------------------------------------- depth


@dataclass(frozen=True, slots=True)
class RuntimeCounts:
    """What ``scalebus status`` shows for a Service Bus queue."""

    active: int
    scheduled: int
    dead_lettered: int
    transfer: int
    transfer_dead_lettered: int
    total: int
    size_bytes: int


class ServiceBusAdminDepth:
    """``base.QueueDepth`` from the admin API's runtime properties, read at most once per ``cache_s``."""

    def __init__(self, admin: ServiceBusAdministrationClient, *, queue_name: str, cache_s: float) -> None:
        self._admin = admin
        self._queue_name = queue_name
        self._cache: _cache.TtlCache[base.DepthSample] = _cache.TtlCache(cache_s)

    def read_depth(self) -> base.DepthSample:
        return self._cache.get(self._sample)

    def _sample(self) -> base.DepthSample:
        counts = self.runtime_counts()
        return base.DepthSample(
            active=counts.active,
            in_flight=None,
            dead_lettered=counts.dead_lettered,
            sampled_at=time.time(),
            scheduled=counts.scheduled,
            transfer=counts.transfer,
            source="servicebus-admin",
            active_includes_locked=True,
        )

    @_retry.retry_control_plane_read
    def runtime_counts(self) -> RuntimeCounts:
        """Uncached counts, for ``scalebus status``."""
        what = f"read runtime properties of {self._queue_name}"
        with _translated(what=what):
            try:
                props = self._admin.get_queue_runtime_properties(self._queue_name)
            except (core_exc.ClientAuthenticationError, core_exc.HttpResponseError) as exc:
                if not _denied(exc):
                    raise
                raise errors.QueueAccessDenied(
                    f"{what}: the identity lacks Manage rights on the queue (HTTP {exc.status_code}); "
                    "the admin API's counts need Azure Service Bus Data Owner or a SAS policy with Manage"
                ) from exc
        return RuntimeCounts(
            active=int(props.active_message_count or 0),
            scheduled=int(props.scheduled_message_count or 0),
            dead_lettered=int(props.dead_letter_message_count or 0),
            transfer=int(props.transfer_message_count or 0),
            transfer_dead_lettered=int(props.transfer_dead_letter_message_count or 0),
            total=int(props.total_message_count or 0),
            size_bytes=int(props.size_in_bytes or 0),
        )

    def close(self) -> None:
        with contextlib.suppress(core_exc.AzureError, OSError):
            self._admin.close()


# --------------------------------------------------------------------------------------------- history

NO_WAIT_PERCENTILES = (
    "wait and run percentiles: Service Bus keeps no record of each message and Azure Monitor has no wait metric; "
    "the oldest waiting age is the oldest active message's, which a worker may hold"
)


class ServiceBusHistory:
    """``base.QueueHistory`` of a Service Bus queue: the last hour's counts from Azure Monitor (when
    ``queue.namespace_resource_id`` and ``queue.monitor_endpoint`` are set), the oldest active message from a peek.
    Each part is read on its own: Monitor's counts are optional, so a Monitor query that fails (refused, no
    identity to ask with, the service down) is said in ``unavailable`` and leaves the peek's figure standing; the
    peek fails as the queue does (a missing queue is ``QueueNotFoundError``)."""

    def __init__(self, queue: ServiceBusJobQueue, *, metrics: monitor.MonitorHistory | None) -> None:
        self._queue = queue
        self._metrics = metrics

    def recent(self, *, since: float) -> base.History:
        now = time.time()
        unavailable = [NO_WAIT_PERCENTILES]
        enqueued_at, known = self._queue.oldest_active_enqueued_at(now=now)
        if not known:
            unavailable.append(
                f"oldest waiting: the first {OLDEST_PEEK_PAGES} peeks (up to {base.DEAD_LETTER_PAGE} messages "
                "each) found only scheduled, deferred or held messages"
            )
        counts = None
        if self._metrics is None:
            unavailable.append(
                "completed, enqueued and dead-lettered: set queue.namespace_resource_id and "
                "queue.monitor_endpoint to read them from Azure Monitor"
            )
        else:
            try:
                counts = self._metrics.counts(since=since, until=now)
            except errors.BackendError as exc:  # a refusal, no identity for Monitor, Monitor down: said, not fatal
                unavailable.append(f"completed, enqueued and dead-lettered: {type(exc).__name__}: {exc}")
        return base.History(
            since=since,
            until=now if counts is None or counts.newest_at is None else min(counts.newest_at, now),
            source="servicebus+azure-monitor" if counts is not None else "servicebus",
            completed=None if counts is None else counts.completed,
            dead_lettered=None if counts is None else counts.dead_lettered,
            enqueued=None if counts is None else counts.enqueued,
            oldest_waiting_s=None if enqueued_at is None else max(now - enqueued_at, 0.0),
            oldest_includes_locked=True,
            unavailable=tuple(unavailable),
        )

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()


def open_history(
    settings: QueueSettings, queue: ServiceBusJobQueue, *, credential: Any = None
) -> ServiceBusHistory:
    """The history ``status`` reads for ``queue``; Monitor only where the settings name it (``credential``
    defaults to ``DefaultAzureCredential``, as for the Monitor depth source)."""
    metrics = None
    if settings.namespace_resource_id and settings.monitor_endpoint:
        from scalebus.backends.azure import monitor

        metrics = monitor.MonitorHistory(
            monitor.open_monitor_client(settings, credential=credential),
            namespace_resource_id=settings.namespace_resource_id,
            queue_name=queue.name,
        )
    return ServiceBusHistory(queue, metrics=metrics)


# --------------------------------------------------------------------------------------------- wiring


@dataclass(frozen=True, slots=True)
class ServiceBusTarget:
    """Where the queue lives, parsed from ``queue.url`` (``servicebus://<namespace>/<queue>``)."""

    namespace: str
    queue_name: str


def parse_url(url: str) -> ServiceBusTarget:
    parts = urlsplit(url)
    queue_name = parts.path.strip("/")
    if parts.scheme != "servicebus" or not parts.netloc or not queue_name or "/" in queue_name:
        raise errors.ConfigError(
            "queue.url",
            f"{url!r} is not a Service Bus queue URL",
            "use servicebus://<namespace>.servicebus.windows.net/<queue>",
        )
    return ServiceBusTarget(namespace=parts.netloc, queue_name=queue_name)


def _connection_string(settings: QueueSettings, environ: Mapping[str, str]) -> str | None:
    if not settings.connection_string_env:
        return None
    value = environ.get(settings.connection_string_env, "")
    if not value:
        raise errors.ConfigError(
            "queue.connection_string_env",
            f"environment variable {settings.connection_string_env} is empty or unset",
            "export the Service Bus connection string there, or clear the setting to use a managed identity",
        )
    return value


def _with_endpoint(conn_str: str, host: str) -> str:
    """The same connection string pointing at another host (the admin endpoint override)."""
    parts = [p for p in conn_str.split(";") if p and not p.lower().startswith("endpoint=")]
    return ";".join([f"Endpoint=sb://{host}/", *parts])


def _http_options(verify: str) -> dict[str, Any]:
    return {"connection_verify": verify} if verify else {}


@dataclass(frozen=True, slots=True)
class _Auth:
    """How the namespace is reached: with a connection string's key, or with a token credential."""

    namespace: str
    conn_str: str | None
    credential: Any


def _resolve_auth(
    settings: QueueSettings, target: ServiceBusTarget, *, environ: Mapping[str, str], credential: Any
) -> _Auth:
    conn_str = _connection_string(settings, environ)
    if conn_str is None:
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        return _Auth(namespace=target.namespace, conn_str=None, credential=credential)
    try:
        props = parse_connection_string(conn_str)
    except ValueError:
        raise errors.ConfigError(
            "queue.connection_string_env",
            f"{settings.connection_string_env} does not hold a Service Bus connection string",
            "copy it from the namespace's Shared access policies",
        ) from None
    return _Auth(namespace=props.fully_qualified_namespace, conn_str=conn_str, credential=credential)


def _data_plane_client(auth: _Auth) -> ServiceBusClient:
    if auth.conn_str is not None:
        return ServiceBusClient.from_connection_string(auth.conn_str, retry_total=SDK_RETRIES)
    return ServiceBusClient(auth.namespace, auth.credential, retry_total=SDK_RETRIES)


def _open_depth(settings: QueueSettings, auth: _Auth, *, queue_name: str) -> base.QueueDepth:
    """The depth source ``queue.depth_source`` names: Azure Monitor's metric, or the admin API."""
    if settings.depth_source == "monitor":
        from scalebus.backends.azure import monitor

        return monitor.open_monitor_depth(settings, queue_name=queue_name, credential=auth.credential)
    admin_host = urlsplit(settings.admin_endpoint).netloc if settings.admin_endpoint else auth.namespace
    options = _http_options(settings.connection_verify)
    if auth.conn_str is not None:
        admin = ServiceBusAdministrationClient.from_connection_string(
            _with_endpoint(auth.conn_str, admin_host), **options
        )
    else:
        admin = ServiceBusAdministrationClient(admin_host, auth.credential, **options)
    return ServiceBusAdminDepth(admin, queue_name=queue_name, cache_s=settings.depth_cache_s)


def open_servicebus(
    settings: QueueSettings, *, environ: Mapping[str, str] | None = None, credential: Any = None
) -> tuple[ServiceBusJobQueue, base.QueueDepth]:
    """Build the queue and the configured depth source. ``credential`` (a ``TokenCredential``) defaults to
    ``DefaultAzureCredential``; with ``queue.connection_string_env`` the data plane and admin API use the key.
    If the depth source cannot be built, the queue is closed before the error propagates."""
    target = parse_url(settings.url)
    auth = _resolve_auth(
        settings, target, environ=os.environ if environ is None else environ, credential=credential
    )
    queue = ServiceBusJobQueue(
        _data_plane_client(auth), queue_name=target.queue_name, max_delivery_count=settings.max_delivery_count
    )
    log.info(
        "servicebus.opened",
        namespace=auth.namespace,
        queue=target.queue_name,
        depth_source=settings.depth_source,
        auth="connection_string" if auth.conn_str else "credential",
    )
    try:
        depth = _open_depth(settings, auth, queue_name=target.queue_name)
    except BaseException:
        queue.close()
        raise
    return queue, depth
