"""Settling many Service Bus messages at once (issue 3): ``requeue_dead_letters`` at 1, 4, 8 and 16 receivers.

Since azure-servicebus 7.15 every settlement waits for the broker's settled echo, so settling N messages through
one receiver costs N round trips. ``ServiceBusJobQueue.requeue_dead_letters`` spreads them over K receivers, one
thread and one link each (a message settles only through the link that received it, and an SDK receiver is not
thread-safe): about N / K round trips.

Each trial sends N jobs to a fresh queue on the fake broker (tests/fakes/servicebus_amqp.py) and dead-letters them
all with no added latency, then turns on ``disposition_delay_ms`` (every disposition the broker sends — a
settlement's echo, a send's outcome, a token's acceptance — waits that long, standing in for a network round trip)
and times ``requeue_dead_letters(max_count=N, concurrency=K)`` through the real SDK, from opening the links to
closing them; then checks that the dead-letter queue is empty and all N copies are on the queue. The broker runs in
a child process so it does not share the client's GIL. Medians over the repetitions.

Writes the ``## Settlement (requeue dead letters)`` section of bench/README.md and prints it. Reproduce with
``make bench-settle`` (``.venv/bin/python bench/settle.py``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _readme  # noqa: E402  (bench/ is on sys.path when a benchmark runs as a script)

from scalebus import logs  # noqa: E402  (after the path set-up, as a script)
from scalebus.backends import base  # noqa: E402
from scalebus.backends.azure import servicebus  # noqa: E402
from scalebus.settings import QueueSettings  # noqa: E402
from tests.fakes.servicebus_amqp import ServiceBusBroker  # noqa: E402

HEADING = "## Settlement (requeue dead letters)"
CONNECTION_ENV = "SCALEBUS_BENCH_SERVICEBUS"


def _serve_broker(pipe: Connection) -> None:
    """The child process: a broker, driven by (command, argument) requests over ``pipe``."""
    broker = ServiceBusBroker().start()
    pipe.send((broker.host, broker.port, broker.connection_string))
    while True:
        command, argument = pipe.recv()
        if command == "create":
            broker.create_queue(argument, lock_duration_s=60, max_delivery_count=10)
            pipe.send(None)
        elif command == "delay":
            broker.disposition_delay_ms = argument
            pipe.send(None)
        elif command == "counts":
            counts = broker.counts(argument)
            assert counts is not None
            pipe.send((counts.active, counts.locked, counts.dead_lettered, counts.total_received))
        else:
            broker.stop()
            pipe.send(None)
            return


class BrokerProcess:
    def __init__(self) -> None:
        self._pipe, child = multiprocessing.Pipe()
        self._process = multiprocessing.Process(target=_serve_broker, args=(child,), daemon=True)
        self._process.start()
        self.host, self.port, self.connection_string = self._pipe.recv()

    def call(self, command: str, argument: object = None) -> object:
        self._pipe.send((command, argument))
        return self._pipe.recv()

    def stop(self) -> None:
        self.call("stop")
        self._process.join(10)


def open_queue(broker: BrokerProcess, name: str) -> servicebus.ServiceBusJobQueue:
    broker.call("create", name)
    settings = QueueSettings(
        url=f"servicebus://{broker.host}:{broker.port}/{name}", connection_string_env=CONNECTION_ENV
    )
    queue, _ = servicebus.open_servicebus(settings, environ={CONNECTION_ENV: broker.connection_string})
    return queue


def trial(broker: BrokerProcess, *, name: str, messages: int, concurrency: int, delay_ms: float) -> float:
    """Seconds one requeue of ``messages`` dead letters takes at ``concurrency`` receivers."""
    broker.call("delay", 0.0)
    queue = open_queue(broker, name)
    try:
        queue.send([base.OutgoingMessage(f"job-{i}", f'{{"n": {i}}}'.encode()) for i in range(messages)])
        for _ in range(messages):
            got = queue.receive(max_wait_s=5)
            assert got is not None
            queue.dead_letter(got, reason="Bench", description="dead-lettered for the benchmark")
        broker.call("delay", delay_ms)
        started = time.perf_counter()
        moved = queue.requeue_dead_letters(max_count=messages, concurrency=concurrency)
        wall_s = time.perf_counter() - started
    finally:
        queue.close()
    active, locked, dead, received = broker.call("counts", name)  # type: ignore[misc]
    if (len(moved), active, locked, dead, received) != (messages, messages, 0, 0, 2 * messages):
        raise SystemExit(f"{name}: moved {len(moved)}, active {active}, locked {locked}, dead {dead}")
    return wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added to every disposition the broker sends")
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated receiver counts")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-readme", action="store_true", help="print only; leave bench/README.md alone")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    logs.configure(fmt="console", level="warning")
    load = os.getloadavg()[0]
    broker = BrokerProcess()
    walls: dict[int, list[float]] = {level: [] for level in levels}
    try:
        for rep in range(args.reps):
            for level in levels:
                wall_s = trial(
                    broker,
                    name=f"bench-{rep}-{level}",
                    messages=args.messages,
                    concurrency=level,
                    delay_ms=args.delay_ms,
                )
                walls[level].append(wall_s)
                print(f"rep {rep + 1}: concurrency {level}: {wall_s:.2f} s", file=sys.stderr)
    finally:
        broker.stop()
    medians = {level: statistics.median(walls[level]) for level in levels}
    rows = [
        f"| {level} | {wall_s:.2f} | {args.messages / wall_s:.0f} | {medians[levels[0]] / wall_s:.1f}× "
        f"| {-(-args.messages // level)} |"
        for level, wall_s in medians.items()
    ]
    section = "\n".join(
        [
            HEADING,
            "",
            f"`bench/settle.py`: {args.messages} dead letters requeued through the real SDK against the fake "
            f"broker with {args.delay_ms:g} ms added to every disposition it sends (a settlement's echo, a send's "
            f"outcome), median of {args.reps}; wall time includes opening and closing each receiver's links "
            f"(about 1.5 s on the fake whatever the receiver count: the SDK takes ~0.5 s to open a link here and "
            f"~0.5 s to close one). {os.cpu_count()} cores, broker in its own process, 1-min load {load:.2f} at "
            f"the start. Reproduce: `make bench-settle`.",
            "",
            "| receivers | wall s | messages/s | vs 1 | settlements per receiver |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(section)
    if not args.no_readme:
        _readme.write_section(HEADING, section)


if __name__ == "__main__":
    main()
