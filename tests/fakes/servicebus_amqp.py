"""An in-process AMQP 1.0 broker that speaks enough of the Azure Service Bus dialect for the real SDK.

``ServiceBusBroker`` listens on 127.0.0.1 (a free port) in a background thread with its own asyncio loop and serves
the sync and async ``azure-servicebus`` 7.15 clients over plain TCP (``UseDevelopmentEmulator=true`` turns TLS
off). It implements, per queue: SASL ANONYMOUS, the ``$cbs`` put-token exchange, sender links with credit and
batched messages, peek-lock receiver links (rcv-settle-mode second) with flow and drain, 16-byte delivery tags
that are the lock tokens, the ``x-opt-locked-until`` / ``x-opt-sequence-number`` / ``x-opt-enqueued-time``
annotations, settlement (accepted = complete, modified = abandon or defer, rejected with
``com.microsoft:dead-letter`` = dead-letter, released = give back without counting a delivery) answered with the
settled echo 7.15 waits for, lock expiry with redelivery, ``max_delivery_count`` → ``<queue>/$deadletterqueue``
(``MaxDeliveryCountExceeded``), duplicate detection by message id on queues created with it (Service Bus drops a
message whose id was seen within the history window only when the queue has ``requiresDuplicateDetection``,
which is off by default: "Duplicate detection", https://learn.microsoft.com/en-us/azure/service-bus-messaging/
duplicate-detection), scheduled messages, and the
``<queue>/$management`` node (``renew-lock``, ``peek-message``, ``update-disposition``,
``receive-by-sequence-number``). A peek answers as the service's ``com.microsoft:peek-message`` does ("AMQP 1.0
in Microsoft Azure Service Bus: request-response-based operations", Message operations: request map
``from-sequence-number`` and ``message-count``, response 200 with ``messages``, each an encoded ``message``, or 204
when none; https://learn.microsoft.com/azure/service-bus-messaging/service-bus-amqp-request-response): from the
sequence number given, in order, at most what is asked and at most :data:`PEEK_LIMIT`. Its state is readable
from any thread (:meth:`ServiceBusBroker.counts`), so the admin and metrics fakes report real numbers.
``disposition_delay_ms`` holds back every disposition the broker sends (the settled echo a settlement waits for,
the outcome a sender waits for) to stand in for a network round trip; nothing else is delayed, so benchmarks
against it see the cost of waiting for settlements.

Frames are encoded and decoded with the SDK's own codec, ``azure.servicebus._pyamqp``. That module is private and
a minor release may change it, so the dev extra pins ``azure-servicebus~=7.15.0`` (:data:`SDK_SERIES`) while
scalebus itself takes any 7.x from 7.15; ``tests/unit/test_servicebus_pin.py`` fails with a clear message when the
installed SDK is another series.

What this follows:
- OASIS AMQP 1.0 (2012), part 2 (transport: frames, open/begin/attach/flow/transfer/disposition/detach/end/close,
  link credit and drain, settlement modes) and part 5 (SASL layer).
- AMQP Claims-Based Security 1.0 draft (put-token request/response with ``status-code``) and AMQP Management
  1.0 draft (request/response correlated by message id), as used by Service Bus.
- Microsoft Learn, "AMQP 1.0 in Azure Service Bus and Event Hubs protocol guide" and "Message transfers, locks,
  and settlement": lock tokens as delivery tags, settlement outcomes, the management operations and their
  request/response maps, the dead-letter reason properties.
- The azure-servicebus 7.15 sources installed in the venv (``_pyamqp/receiver.py`` for the awaited settlement
  echo, ``_transport/_pyamqp_transport.py`` for outcomes and the close-time drain, ``_common/message.py`` for the
  annotations it reads, ``_common/mgmt_handlers.py`` for response shapes). The AMQP header delivery-count is the
  number of *prior* deliveries (AMQP spec), which the SDK reports as-is.

It is a test peer, not a broker: one process, no persistence, no sessions, no topics, no transactions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from azure.servicebus._pyamqp import _decode, _encode, performatives
from azure.servicebus._pyamqp.endpoints import Source, Target
from azure.servicebus._pyamqp.error import AMQPError
from azure.servicebus._pyamqp.message import Header, Message, Properties
from azure.servicebus._pyamqp.outcomes import Accepted, Modified, Rejected, Released
from azure.servicebus._pyamqp.types import TYPE, VALUE, AMQPTypes

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
ROLE_SENDER = False
ROLE_RECEIVER = True
BATCH_FORMAT = 0x80013700
MAX_FRAME_SIZE = 4 * 1024 * 1024
SESSION_WINDOW = 1_000_000
SENDER_CREDIT = 500
DEAD_LETTER_CONDITION = b"com.microsoft:dead-letter"
LOCK_LOST_CONDITION = b"com.microsoft:message-lock-lost"
SWEEP_INTERVAL_S = 0.05
PEEK_LIMIT = 250
"""Most messages one peek returns whatever is asked: Service Bus "returns at most the requested number of
messages" (https://learn.microsoft.com/azure/service-bus-messaging/message-browsing), "may be fewer and are
subject to service limits" (the SDK's ``peek_messages`` docstring, Azure/azure-sdk-for-python#28209), and 250 is
the most one peek was seen to return (Azure/azure-sdk-for-python#26643, paolosalvatori/ServiceBusExplorer#55)."""
SCHEDULED_STATE = 2
"""``x-opt-message-state`` of a scheduled message (0 active, 1 deferred: the SDK's ``ServiceBusMessageState``)."""

_OPEN, _BEGIN, _ATTACH, _FLOW, _TRANSFER, _DISPOSITION, _DETACH, _END, _CLOSE = range(0x10, 0x19)
_SASL_INIT = 0x41


SDK_SERIES = (7, 15)
"""The azure-servicebus major.minor whose private ``_pyamqp`` codec this broker was written against."""


def _now_ms(now: float) -> int:
    return int(now * 1000)


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


@dataclasses.dataclass(slots=True)
class StoredMessage:
    """One message as the broker holds it (the decoded AMQP message plus broker-side state)."""

    sequence_number: int
    message: Message
    size: int
    enqueued_at: float
    visible_at: float
    delivery_count: int = 0
    lock_token: uuid.UUID | None = None
    locked_until: float = 0.0
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    dead_letter_source: str | None = None

    @property
    def message_id(self) -> str | None:
        props = self.message.properties
        return None if props is None or props.message_id is None else _text(props.message_id)


@dataclasses.dataclass(frozen=True, slots=True)
class EntityCounts:
    """A snapshot of one queue, the numbers the admin API and metrics report."""

    active: int
    locked: int
    scheduled: int
    dead_lettered: int
    size_bytes: int
    total_received: int
    completed: int


class Entity:
    """A queue or its dead-letter sub-queue. All methods run with the broker lock held."""

    def __init__(
        self,
        name: str,
        *,
        lock_duration_s: float,
        max_delivery_count: int,
        is_dlq: bool = False,
        requires_duplicate_detection: bool = False,
    ) -> None:
        self.name = name
        self.requires_duplicate_detection = requires_duplicate_detection
        self.lock_duration_s = lock_duration_s
        self.max_delivery_count = max_delivery_count
        self.is_dlq = is_dlq
        self.messages: dict[int, StoredMessage] = {}  # by sequence number, in order
        self.locks: dict[uuid.UUID, StoredMessage] = {}
        self.dead_letters: Entity | None = None
        self.seen_ids: dict[str, float] = {}
        self.created_at = time.time()
        self.updated_at = self.created_at
        self.accessed_at = self.created_at
        self.total_received = 0
        self.completed = 0
        self.parent: Entity | None = None
        """The queue a dead-letter sub-queue belongs to."""
        self.metric_events: list[tuple[float, str]] = []
        """(time, metric) for each message sent to this queue (``IncomingMessages``) or completed on it
        (``CompleteMessage``): what the metrics fake counts per minute."""
        self.dead_letter_gauge: list[tuple[float, int]] = []
        """(time, dead letters held) after each change: the ``DeadletteredMessages`` gauge's history."""

    def record_dead_letters(self, now: float) -> None:
        if self.dead_letters is not None:
            self.dead_letter_gauge.append((now, len(self.dead_letters.messages)))

    def visible(self, now: float) -> Iterator[StoredMessage]:
        for msg in self.messages.values():
            if msg.lock_token is None and msg.visible_at <= now:
                yield msg

    def lock_next(self, now: float) -> StoredMessage | None:
        msg = next(self.visible(now), None)
        if msg is None:
            return None
        msg.delivery_count += 1
        msg.lock_token = uuid.uuid4()
        msg.locked_until = now + self.lock_duration_s
        self.locks[msg.lock_token] = msg
        self.accessed_at = now
        return msg

    def held(self, token: uuid.UUID, now: float) -> StoredMessage | None:
        msg = self.locks.get(token)
        if msg is None or msg.locked_until <= now:
            return None
        return msg

    def unlock(self, msg: StoredMessage, *, counted: bool) -> None:
        """Give a locked message back; past the max delivery count it goes to the dead-letter queue."""
        if msg.lock_token is not None:
            self.locks.pop(msg.lock_token, None)
        msg.lock_token = None
        if not counted:
            msg.delivery_count = max(0, msg.delivery_count - 1)
        elif self.dead_letters is not None and msg.delivery_count >= self.max_delivery_count:
            self.move_to_dead_letters(
                msg,
                reason="MaxDeliveryCountExceeded",
                description=f"Message could not be consumed after {self.max_delivery_count} delivery attempts.",
            )

    def remove(self, msg: StoredMessage) -> None:
        if msg.lock_token is not None:
            self.locks.pop(msg.lock_token, None)
        msg.lock_token = None
        self.messages.pop(msg.sequence_number, None)
        self.updated_at = time.time()

    def move_to_dead_letters(self, msg: StoredMessage, *, reason: str | None, description: str | None) -> None:
        self.remove(msg)
        if self.dead_letters is None:  # dead-lettering from the DLQ itself is a no-op, as in Service Bus
            self.messages[msg.sequence_number] = msg
            return
        msg.dead_letter_reason = reason
        msg.dead_letter_description = description
        msg.dead_letter_source = self.name
        msg.visible_at = 0.0
        self.dead_letters.messages[msg.sequence_number] = msg
        self.dead_letters.messages = dict(sorted(self.dead_letters.messages.items()))
        self.record_dead_letters(time.time())

    def expire_locks(self, now: float) -> bool:
        expired = [msg for msg in self.locks.values() if msg.locked_until <= now]
        for msg in expired:
            self.unlock(msg, counted=True)
        return bool(expired)

    def counts(self, now: float) -> EntityCounts:
        active = locked = scheduled = 0
        for msg in self.messages.values():
            if msg.lock_token is not None:
                locked += 1
            elif msg.visible_at > now:
                scheduled += 1
            else:
                active += 1
        dead = len(self.dead_letters.messages) if self.dead_letters is not None else 0
        size = sum(m.size for m in self.messages.values())
        if self.dead_letters is not None:
            size += sum(m.size for m in self.dead_letters.messages.values())
        return EntityCounts(active, locked, scheduled, dead, size, self.total_received, self.completed)


# --------------------------------------------------------------------------------------------- encoding helpers


def _frame_bytes(channel: int, frame: Any, *, sasl: bool = False) -> bytes:
    header, body = _encode.encode_frame(frame, frame_type=b"\x01" if sasl else b"\x00")
    if body is None:
        return header + b"\x00\x00"
    return header + struct.pack(">H", channel) + bytes(body)


def _encode_message(message: Message) -> bytes:
    return bytes(_encode.encode_payload(bytearray(), message))


def _timestamp(ms: int) -> dict[str, Any]:
    return {TYPE: AMQPTypes.timestamp, VALUE: ms}


def _long(value: int) -> dict[str, Any]:
    return {TYPE: AMQPTypes.long, VALUE: value}


def _delivery_message(entity: Entity, msg: StoredMessage, *, with_lock: bool) -> Message:
    """The message as delivered: broker annotations added, header delivery-count = prior deliveries."""
    original = msg.message
    # Decoded strings come back as bytes and are re-encoded as binary: the SDK decodes both to bytes.
    annotations: dict[Any, Any] = dict(original.message_annotations or {})
    annotations[b"x-opt-sequence-number"] = _long(msg.sequence_number)
    annotations[b"x-opt-enqueued-time"] = _timestamp(_now_ms(msg.enqueued_at))
    scheduled = annotations.get(b"x-opt-scheduled-enqueue-time")
    if isinstance(scheduled, int):  # decoded to a bare int: sent back as the timestamp it was
        annotations[b"x-opt-scheduled-enqueue-time"] = _timestamp(scheduled)
    if with_lock:
        annotations[b"x-opt-locked-until"] = _timestamp(_now_ms(msg.locked_until))
    if msg.dead_letter_source is not None:
        annotations[b"x-opt-deadletter-source"] = msg.dead_letter_source
    app = dict(original.application_properties or {})
    if msg.dead_letter_reason is not None:
        app["DeadLetterReason"] = msg.dead_letter_reason
    if msg.dead_letter_description is not None:
        app["DeadLetterErrorDescription"] = msg.dead_letter_description
    header = original.header or Header()
    prior = max(0, msg.delivery_count - 1)
    header = header._replace(delivery_count=prior)
    return original._replace(header=header, message_annotations=annotations, application_properties=app or None)


def _split_batch(message_format: int, payload: bytes) -> list[Message]:
    decoded = _decode.decode_payload(memoryview(payload))
    if message_format != BATCH_FORMAT:
        return [decoded]
    return [_decode.decode_payload(memoryview(bytes(part))) for part in decoded.data or []]


def _entity_path(address: object) -> str:
    text = _text(address)
    if "://" in text:
        text = urlsplit(text).path
    return text.strip("/").lower()


# --------------------------------------------------------------------------------------------- links and sessions


@dataclasses.dataclass(slots=True)
class Link:
    """One attached link, seen from the broker. ``outgoing`` links carry messages to the client."""

    session: Session
    name: bytes
    handle: int
    outgoing: bool
    path: str
    node: str  # "queue", "cbs", "management"
    entity: Entity | None
    credit: int = 0
    delivery_count: int = 0
    drain: bool = False
    pending: list[bytes] = dataclasses.field(default_factory=list)  # replies waiting for credit (mgmt, cbs)
    partial: bytearray = dataclasses.field(default_factory=bytearray)
    partial_first: list[Any] | None = None
    detached: bool = False


@dataclasses.dataclass(slots=True)
class Session:
    connection: Connection
    channel: int
    next_outgoing_id: int = 0
    next_incoming_id: int = 0
    links: dict[int, Link] = dataclasses.field(default_factory=dict)  # by the client's handle
    unsettled: dict[int, tuple[Link, uuid.UUID]] = dataclasses.field(default_factory=dict)


class Connection:
    """One client connection: frame loop, sessions and links."""

    def __init__(
        self, broker: ServiceBusBroker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.broker = broker
        self.reader = reader
        self.writer = writer
        self.sessions: dict[int, Session] = {}
        self.remote_max_frame = 512
        self.closed = False
        self.heartbeat: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ wire

    def send(self, channel: int, frame: Any) -> None:
        if not self.closed:
            self.writer.write(_frame_bytes(channel, frame))

    def send_disposition(self, channel: int, frame: performatives.DispositionFrame) -> None:
        """Send now, or after the broker's ``disposition_delay_ms`` (each on its own timer: replies overlap as
        they would on a network, they do not queue behind each other)."""
        delay_s = self.broker.disposition_delay_ms / 1000
        if delay_s <= 0:
            self.send(channel, frame)
        else:
            asyncio.get_running_loop().call_later(delay_s, self.send, channel, frame)

    async def read_frame(self) -> tuple[int, int, int | None, list[Any] | None]:
        head = await self.reader.readexactly(8)
        size, doff, ftype, channel = struct.unpack(">IBBH", head)
        body = await self.reader.readexactly(size - 8) if size > 8 else b""
        body = body[doff * 4 - 8 :]
        if not body:
            return ftype, channel, None, None
        code, fields = _decode.decode_frame(memoryview(body))
        return ftype, channel, code, fields

    async def serve(self) -> None:
        try:
            await self._handshake()
            while not self.closed:
                _, channel, code, fields = await self.read_frame()
                if code is None or fields is None:
                    continue  # heartbeat
                with self.broker.lock:
                    self.dispatch(channel, code, fields)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.close()

    async def _handshake(self) -> None:
        header = await self.reader.readexactly(8)
        if header == SASL_HEADER:
            self.writer.write(SASL_HEADER)
            mechanisms = performatives.SASLMechanism(sasl_server_mechanisms=[b"ANONYMOUS", b"MSSBCBS"])
            self.writer.write(_frame_bytes(0, mechanisms, sasl=True))
            _, _, code, _ = await self.read_frame()
            if code != _SASL_INIT:
                raise ConnectionError("expected sasl-init")
            outcome = performatives.SASLOutcome(code=0, additional_data=None)
            self.writer.write(_frame_bytes(0, outcome, sasl=True))
            header = await self.reader.readexactly(8)
        if header != AMQP_HEADER:
            raise ConnectionError("unsupported protocol header")
        self.writer.write(AMQP_HEADER)
        await self.writer.drain()

    def close(self, *, abort: bool = False) -> None:
        if abort:
            self.writer.transport.abort()
        if self.closed:
            return
        self.closed = True
        if self.heartbeat is not None:
            self.heartbeat.cancel()
        with self.broker.lock:
            for session in self.sessions.values():
                self._release_session(session)
        self.broker.connections.discard(self)
        with contextlib.suppress(Exception):
            self.writer.close()

    def _release_session(self, session: Session) -> None:
        """Deliveries still unsettled when a session goes away keep their locks until they expire, as in Service
        Bus; only the links are forgotten."""
        for link in session.links.values():
            link.detached = True
        session.links.clear()

    async def _beat(self, interval_s: float) -> None:
        while not self.closed:
            await asyncio.sleep(interval_s)
            self.writer.write(b"\x00\x00\x00\x08\x02\x00\x00\x00")

    # ------------------------------------------------------------------ performatives

    def dispatch(self, channel: int, code: int, fields: list[Any]) -> None:
        if code == _OPEN:
            self.remote_max_frame = int(fields[2] or MAX_FRAME_SIZE)
            idle_ms = fields[4]
            if idle_ms:
                self.heartbeat = asyncio.get_running_loop().create_task(self._beat(idle_ms / 2000))
            self.send(
                0,
                performatives.OpenFrame(
                    container_id="scalebus-fake-servicebus",
                    hostname=None,
                    max_frame_size=MAX_FRAME_SIZE,
                    channel_max=255,
                    idle_timeout=None,
                    outgoing_locales=None,
                    incoming_locales=None,
                    offered_capabilities=None,
                    desired_capabilities=None,
                    properties=None,
                ),
            )
        elif code == _BEGIN:
            session = Session(self, channel, next_incoming_id=fields[1] or 0)
            self.sessions[channel] = session
            self.send(
                channel,
                performatives.BeginFrame(
                    remote_channel=channel,
                    next_outgoing_id=0,
                    incoming_window=SESSION_WINDOW,
                    outgoing_window=SESSION_WINDOW,
                    handle_max=4294967295,
                    offered_capabilities=None,
                    desired_capabilities=None,
                    properties=None,
                ),
            )
        elif code == _ATTACH:
            self._attach(self.sessions[channel], fields)
        elif code == _FLOW:
            self._flow(self.sessions[channel], fields)
        elif code == _TRANSFER:
            self._transfer(self.sessions[channel], fields)
        elif code == _DISPOSITION:
            self._disposition(self.sessions[channel], fields)
        elif code == _DETACH:
            session = self.sessions[channel]
            link = session.links.pop(fields[0], None)
            if link is not None:
                link.detached = True
                self.send(channel, performatives.DetachFrame(handle=link.handle, closed=fields[1], error=None))
        elif code == _END:
            session = self.sessions.pop(channel, None)
            if session is not None:
                self._release_session(session)
            self.send(channel, performatives.EndFrame(error=None))
        elif code == _CLOSE:
            self.send(0, performatives.CloseFrame(error=None))
            self.closed = True

    def _attach(self, session: Session, fields: list[Any]) -> None:
        name, handle, role = fields[0], fields[1], fields[2]
        source = Source(*fields[5]) if fields[5] else Source()
        target = Target(*fields[6]) if fields[6] else Target()
        outgoing = role == ROLE_RECEIVER  # the client receives, so the broker sends
        address = source.address if outgoing else target.address
        path = _entity_path(address)
        if path == "$cbs":
            node, entity = "cbs", None
        elif path.endswith("/$management"):
            node, entity = "management", self.broker.entity(path.removesuffix("/$management"))
        else:
            node, entity = "queue", self.broker.entity(path)
        link = Link(session, name, handle, outgoing, path, node, entity)
        session.links[handle] = link
        self.send(
            session.channel,
            performatives.AttachFrame(
                name=name,
                handle=handle,
                role=not role,
                send_settle_mode=fields[3],
                rcv_settle_mode=fields[4],
                source=source,
                target=target,
                unsettled=None,
                incomplete_unsettled=False,
                initial_delivery_count=0 if outgoing else None,
                max_message_size=1024 * 1024,
                offered_capabilities=None,
                desired_capabilities=None,
                properties=None,
            ),
        )
        if node != "cbs" and entity is None:
            error = AMQPError(
                condition=b"amqp:not-found", description=f"The messaging entity '{path}' could not be found."
            )
            session.links.pop(handle, None)
            self.send(session.channel, performatives.DetachFrame(handle=handle, closed=True, error=error))
            return
        if not outgoing:
            self._grant(link, SENDER_CREDIT)

    def _grant(self, link: Link, credit: int) -> None:
        link.credit = credit
        self.send(link.session.channel, self._link_flow(link))

    def _link_flow(self, link: Link, *, drain: bool = False) -> performatives.FlowFrame:
        session = link.session
        return performatives.FlowFrame(
            next_incoming_id=session.next_incoming_id,
            incoming_window=SESSION_WINDOW,
            next_outgoing_id=session.next_outgoing_id,
            outgoing_window=SESSION_WINDOW,
            handle=link.handle,
            delivery_count=link.delivery_count,
            link_credit=link.credit,
            available=0,
            drain=drain,
            echo=False,
            properties=None,
        )

    def _flow(self, session: Session, fields: list[Any]) -> None:
        handle = fields[4]
        if handle is None:
            return
        link = session.links.get(handle)
        if link is None or not link.outgoing:
            return
        their_count = fields[5]
        credit = fields[6] or 0
        link.credit = (their_count + credit - link.delivery_count) if their_count is not None else credit
        link.drain = bool(fields[8])
        self.pump_link(link, time.time())
        if link.drain or fields[9]:
            if link.drain:
                link.delivery_count += max(0, link.credit)
                link.credit = 0
            self.send(session.channel, self._link_flow(link, drain=link.drain))

    def _transfer(self, session: Session, fields: list[Any]) -> None:
        link = session.links.get(fields[0])
        session.next_incoming_id += 1
        if link is None:
            return
        if link.partial_first is None:
            link.partial_first = fields
        link.partial.extend(bytes(fields[11]))
        if fields[5]:  # more frames follow
            return
        first, payload = link.partial_first, bytes(link.partial)
        link.partial_first, link.partial = None, bytearray()
        link.delivery_count += 1
        link.credit -= 1
        now = time.time()
        if link.node == "queue":
            assert link.entity is not None
            for message in _split_batch(first[3] or 0, payload):
                self.broker.enqueue(link.entity, message, size=len(payload), now=now)
        else:
            self._request(link, _decode.decode_payload(memoryview(payload)), now)
        if not first[4]:  # unsettled: the client waits for our outcome
            self.send_disposition(
                session.channel,
                performatives.DispositionFrame(
                    role=ROLE_RECEIVER,
                    first=first[1],
                    last=first[1],
                    settled=True,
                    state=Accepted(),
                    batchable=None,
                ),
            )
        if link.credit < SENDER_CREDIT // 2:
            self._grant(link, SENDER_CREDIT)

    # ------------------------------------------------------------------ delivering to clients

    def pump_link(self, link: Link, now: float) -> None:
        if link.detached or self.closed:
            return
        while link.credit > 0 and link.pending:
            self._deliver(link, link.pending.pop(0), tag=uuid.uuid4().bytes_le, settled=True)
        if link.node != "queue" or link.entity is None:
            return
        while link.credit > 0:
            msg = link.entity.lock_next(now)
            if msg is None:
                return
            assert msg.lock_token is not None
            payload = _encode_message(_delivery_message(link.entity, msg, with_lock=True))
            delivery_id = self._deliver(link, payload, tag=msg.lock_token.bytes_le, settled=False)
            link.session.unsettled[delivery_id] = (link, msg.lock_token)

    def _deliver(self, link: Link, payload: bytes, *, tag: bytes, settled: bool) -> int:
        session = link.session
        delivery_id = session.next_outgoing_id
        session.next_outgoing_id += 1
        link.delivery_count += 1
        link.credit -= 1
        self.send(
            session.channel,
            performatives.TransferFrame(
                handle=link.handle,
                delivery_id=delivery_id,
                delivery_tag=tag,
                message_format=0,
                settled=settled,
                more=False,
                payload=payload,
            ),
        )
        return delivery_id

    def _disposition(self, session: Session, fields: list[Any]) -> None:
        role, first, last, settled, state = fields[0], fields[1], fields[2], fields[3], fields[4]
        if role != ROLE_RECEIVER:
            return
        last = first if last is None else last
        now = time.time()
        for delivery_id in range(first, last + 1):
            entry = session.unsettled.pop(delivery_id, None)
            if entry is None:
                continue
            link, token = entry
            assert link.entity is not None
            echo = self.broker.settle(link.entity, token, state, now)
            if not settled:
                self.send_disposition(
                    session.channel,
                    performatives.DispositionFrame(
                        role=ROLE_SENDER,
                        first=delivery_id,
                        last=delivery_id,
                        settled=True,
                        state=echo,
                        batchable=None,
                    ),
                )
        self.broker.pump_all(now)

    # ------------------------------------------------------------------ $cbs and $management

    def _request(self, link: Link, request: Message, now: float) -> None:
        app = {_text(k): v for k, v in (request.application_properties or {}).items()}
        operation = _text(app.get("operation"))
        if link.node == "cbs":
            # Service Bus refuses a token for an entity that does not exist with 404 (the SDK's
            # "CBS Token authentication failed. Status code: 404").
            audience = _entity_path(app.get("name")).split("/")[0]
            if audience and self.broker.entity(audience) is None:
                body, extra = (
                    None,
                    {
                        "status-code": 404,
                        "status-description": f"The messaging entity '{audience}' could not be found.",
                    },
                )
            else:
                body, extra = None, {"status-code": 200, "status-description": "OK"}
        else:
            assert link.entity is not None
            status, body = self.broker.management(link.entity, operation, request.value or {}, now)
            extra = {"statusCode": status, "statusDescription": "OK" if status < 300 else "failed"}
            if status == 410:
                extra["errorCondition"] = LOCK_LOST_CONDITION
            elif status == 404:
                extra["errorCondition"] = b"com.microsoft:message-not-found"
        request_id = request.properties.message_id if request.properties else None
        response = Message(
            properties=Properties(correlation_id=request_id),
            application_properties=extra,
            value=body,
        )
        reply_link = next(
            (
                other
                for other in link.session.links.values()
                if other.outgoing and other.node == link.node and other.path == link.path
            ),
            None,
        )
        if reply_link is None:
            return
        reply_link.pending.append(_encode_message(response))
        self.pump_link(reply_link, now)


# --------------------------------------------------------------------------------------------- the broker


class ServiceBusBroker:
    """The fake namespace: queues, connections, and a thread running their event loop."""

    def __init__(
        self, *, host: str = "127.0.0.1", duplicate_window_s: float = 600.0, disposition_delay_ms: float = 0.0
    ) -> None:
        self.host = host
        self.port = 0
        self.duplicate_window_s = duplicate_window_s
        self.disposition_delay_ms = disposition_delay_ms
        self.key = base64.b64encode(b"scalebus-fake-servicebus-key-0000").decode()
        self.lock = threading.RLock()
        self.entities: dict[str, Entity] = {}
        self.connections: set[Connection] = set()
        self.next_sequence_number = 1
        self.peek_limit = PEEK_LIMIT
        """Most messages one peek returns (lower it to make readers page through short pages)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def connection_string(self) -> str:
        return (
            f"Endpoint=sb://{self.host}:{self.port};SharedAccessKeyName=k;SharedAccessKey={self.key};"
            "UseDevelopmentEmulator=true"
        )

    def start(self) -> ServiceBusBroker:
        self._thread = threading.Thread(target=self._run, name="fake-servicebus", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake Service Bus did not start")
        return self

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None:
            loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> ServiceBusBroker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        sweeper = asyncio.create_task(self._sweep())
        await self._stopped.wait()
        sweeper.cancel()
        self._server.close()
        open_connections = list(self.connections)
        for conn in open_connections:
            conn.close(abort=True)
        # Let the transports finish closing while the loop still runs (else they warn as unclosed).
        await asyncio.gather(*(c.writer.wait_closed() for c in open_connections), return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        await conn.serve()
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            await writer.wait_closed()

    async def _sweep(self) -> None:
        """Expire locks and release scheduled messages, then offer them to waiting receivers."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.time()
            with self.lock:
                for entity in list(self.entities.values()):
                    entity.expire_locks(now)
                self.pump_all(now)

    # ------------------------------------------------------------------ queues (any thread)

    def create_queue(
        self,
        name: str,
        *,
        lock_duration_s: float = 30.0,
        max_delivery_count: int = 10,
        requires_duplicate_detection: bool = False,
    ) -> None:
        """A queue; like Service Bus, without duplicate detection unless asked (the deployment template asks)."""
        key = name.lower()
        with self.lock:
            queue = Entity(
                key,
                lock_duration_s=lock_duration_s,
                max_delivery_count=max_delivery_count,
                requires_duplicate_detection=requires_duplicate_detection,
            )
            dlq = Entity(
                f"{key}/$deadletterqueue", lock_duration_s=lock_duration_s, max_delivery_count=2**31, is_dlq=True
            )
            queue.dead_letters = dlq
            dlq.parent = queue
            self.entities[key] = queue
            self.entities[dlq.name] = dlq

    def entity(self, path: str) -> Entity | None:
        return self.entities.get(path.lower())

    def counts(self, name: str) -> EntityCounts | None:
        """Per-queue active / locked / scheduled / dead-lettered counts right now (``None``: no such queue)."""
        with self.lock:
            entity = self.entities.get(name.lower())
            if entity is None or entity.is_dlq:
                return None
            return entity.counts(time.time())

    def expire_locks_now(self, name: str) -> int:
        """Make every lock on the queue lapse at once (as a broker failover would); returns how many."""
        with self.lock:
            entity = self.entities[name.lower()]
            held = list(entity.locks.values())
            for msg in held:
                msg.locked_until = 0.0
            entity.expire_locks(time.time())
            return len(held)

    def queue_info(self, name: str) -> tuple[Entity, EntityCounts] | None:
        with self.lock:
            entity = self.entities.get(name.lower())
            if entity is None or entity.is_dlq:
                return None
            return entity, entity.counts(time.time())

    # ------------------------------------------------------------------ operations (loop thread, lock held)

    def enqueue(self, entity: Entity, message: Message, *, size: int, now: float) -> None:
        props = message.properties
        message_id = None if props is None or props.message_id is None else _text(props.message_id)
        if message_id is not None and entity.requires_duplicate_detection:
            seen = entity.seen_ids.get(message_id)
            if seen is not None and now - seen < self.duplicate_window_s:
                return
            entity.seen_ids[message_id] = now
        annotations = message.message_annotations or {}
        scheduled = annotations.get(b"x-opt-scheduled-enqueue-time")
        visible_at = scheduled / 1000 if isinstance(scheduled, int) else now
        seq = self.next_sequence_number
        self.next_sequence_number += 1
        entity.messages[seq] = StoredMessage(seq, message, size, enqueued_at=now, visible_at=visible_at)
        entity.total_received += 1
        entity.metric_events.append((now, "IncomingMessages"))
        entity.updated_at = now
        self.pump_all(now)

    def pump_all(self, now: float) -> None:
        for conn in list(self.connections):
            for session in list(conn.sessions.values()):
                for link in list(session.links.values()):
                    if link.outgoing and (link.credit > 0):
                        conn.pump_link(link, now)

    def settle(self, entity: Entity, token: uuid.UUID, state: Any, now: float) -> Any:
        """Apply one settlement outcome; return the outcome to echo (a lock-lost rejection if not held)."""
        outcome, args = next(iter(state.items())) if isinstance(state, dict) and state else ("accepted", [])
        msg = entity.held(token, now)
        if msg is None:
            return Rejected(
                error=AMQPError(
                    condition=LOCK_LOST_CONDITION,
                    description="The lock supplied is invalid. Either the lock expired, or the message has "
                    "already "
                    "been removed from the queue.",
                )
            )
        if outcome == "accepted":
            entity.remove(msg)
            entity.completed += 1
            entity.metric_events.append((now, "CompleteMessage"))
            if entity.parent is not None:
                entity.parent.record_dead_letters(now)
            return Accepted()
        if outcome == "modified":
            # abandon (and defer, which this fake treats as abandon: deferral is not part of the port)
            entity.unlock(msg, counted=True)
            return Modified(delivery_failed=None, undeliverable_here=None, message_annotations=None)
        if outcome == "rejected":
            error = args[0] if args else None
            info = error[2] if error is not None and len(error) > 2 and error[2] else {}
            info = {_text(k): _text(v) for k, v in info.items() if v is not None}
            entity.move_to_dead_letters(
                msg, reason=info.get("DeadLetterReason"), description=info.get("DeadLetterErrorDescription")
            )
            return Rejected(error=None)
        if outcome == "released":
            entity.unlock(msg, counted=False)
            return Released()
        entity.unlock(msg, counted=True)
        return Released()

    def peek(self, entity: Entity, request: dict[str, Any], now: float) -> tuple[int, Any]:
        """``com.microsoft:peek-message``: from ``from-sequence-number`` on, at most ``message-count`` messages
        and never more than ``peek_limit`` (:data:`PEEK_LIMIT`), in sequence order, locked and scheduled ones
        included (each scheduled one marked ``x-opt-message-state`` 2); 204 with no body when there are none."""
        start = int(request.get("from-sequence-number") or 0)
        count = min(int(request.get("message-count") or 1), self.peek_limit)
        found = [m for m in entity.messages.values() if m.sequence_number >= start][:count]
        if not found:
            return 204, None
        peeked = []
        for msg in found:
            delivered = _delivery_message(entity, msg, with_lock=False)
            if msg.visible_at > now:
                annotations = {**(delivered.message_annotations or {}), b"x-opt-message-state": SCHEDULED_STATE}
                delivered = delivered._replace(message_annotations=annotations)
            peeked.append({"message": _encode_message(delivered)})
        return 200, {"messages": peeked}

    def management(self, entity: Entity, operation: str, body: dict[Any, Any], now: float) -> tuple[int, Any]:
        request = {_text(k): v for k, v in body.items()}
        if operation == "com.microsoft:renew-lock":
            expirations = []
            for token in request.get("lock-tokens") or []:
                msg = entity.held(token, now)
                if msg is None:
                    return 410, None
                msg.locked_until = now + entity.lock_duration_s
                expirations.append(_timestamp(_now_ms(msg.locked_until)))
            return 200, {"expirations": {TYPE: AMQPTypes.array, VALUE: expirations}}
        if operation == "com.microsoft:peek-message":
            return self.peek(entity, request, now)
        if operation == "com.microsoft:update-disposition":
            status = _text(request.get("disposition-status"))
            outcomes: dict[str, Any] = {
                "completed": {"accepted": []},
                "abandoned": {"modified": [True, False, None]},
                "defered": {"modified": [True, True, None]},
                "suspended": {
                    "rejected": [
                        [
                            DEAD_LETTER_CONDITION,
                            None,
                            {
                                "DeadLetterReason": request.get("deadletter-reason"),
                                "DeadLetterErrorDescription": request.get("deadletter-description"),
                            },
                        ]
                    ]
                },
            }
            for token in request.get("lock-tokens") or []:
                if entity.held(token, now) is None:
                    return 410, None
                self.settle(entity, token, outcomes.get(status, {"modified": [True, False, None]}), now)
            self.pump_all(now)
            return 200, {}
        if operation == "com.microsoft:receive-by-sequence-number":
            return 404, None
        return 400, None
