"""Throughput of minidasgi's RESP client against redis-py's ``redis.asyncio``, side by side.

Run ``python bench/resp.py [--seconds 2] [--parsers python,hiredis]``. It starts a private
``redis-server`` on a free port (never 6379) in a temp dir, measures ops/s for four workloads
and prints a table with the ratio minidasgi / redis-py next to each target:

    (a) sequential awaited LPUSH on one connection (redis-py: one client);
    (b) 50 tasks doing LPUSH in a loop on ONE shared connection (redis-py: one shared client,
        which hands each task a connection from its pool: its normal usage);
    (c) LPUSH/BRPOP ping-pong between two connections: round trips/s;
    (d) 50 publisher tasks PUBLISH on one shared connection (redis-py: one shared client) to a
        subscriber in the same process: messages/s received end to end, until all arrived.

Each measurement opens its own connections, warms them up briefly, then runs for a fixed
duration. The duration is split into rounds and the implementations are alternated (ABC, CBA,
...) so that a noisy machine penalises all of them alike; the median round is reported, with
the spread of the rounds. Keys are deleted between runs. ``--workloads ab`` runs a subset.

The server is stopped at exit, on Ctrl-C, on SIGTERM and on errors; on Linux the kernel also
terminates it should this process be killed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import minidasgi
from minidasgi.resp import Connection, Subscriber, connect
from minidasgi.testing import RedisServer

try:
    import redis
    import redis.asyncio as aioredis
except ImportError:  # pragma: no cover - redis-py is optional
    redis = None  # type: ignore[assignment]
    aioredis = None  # type: ignore[assignment]

HOST = "127.0.0.1"
PAYLOAD = b"x" * 64  # a small message, like a serialised ASGI event
CONCURRENCY = 50
WARMUP = 0.1  # seconds, per measurement
ROUNDS = 5  # each implementation's duration is split into this many alternated rounds
DRAIN_TIMEOUT = 30.0  # seconds to wait for the last pub/sub messages

TARGETS = {"a": 1.5, "b": 10.0, "d": 3.0}

# ---------------------------------------------------------------------------------------------
# The implementations, behind one small interface. The hot loops call the underlying client's
# own bound methods (``lpush``, ``publish``), so no adapter layer is timed for either side.


Send = Callable[[str, bytes], Awaitable[Any]]  # lpush(key, value), publish(channel, message)


class Commands(Protocol):
    """What the workloads need of a command connection (or redis-py client)."""

    lpush: Send
    publish: Send

    async def brpop_value(self, key: str) -> bytes: ...

    async def close(self) -> None: ...


class Impl(Protocol):
    name: str
    redis_py: bool

    async def connect(self) -> Commands: ...

    async def subscribe(self, channel: str, on_message: Callable[[], None]) -> Closer: ...


Closer = Callable[[], Awaitable[None]]


class MiniCommands:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.lpush: Send = connection.lpush
        self.publish: Send = connection.publish

    async def brpop_value(self, key: str) -> bytes:
        reply = await self._connection.brpop(key, timeout=0)
        assert reply is not None
        return reply[1]

    async def close(self) -> None:
        await self._connection.close()


@dataclass
class MiniImpl:
    port: int
    parser: str
    redis_py: bool = False
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"minidasgi[{self.parser}]"

    async def connect(self) -> Commands:
        return MiniCommands(await connect(host=HOST, port=self.port, parser=self.parser))

    async def subscribe(self, channel: str, on_message: Callable[[], None]) -> Closer:
        subscriber = Subscriber(
            host=HOST, port=self.port, parser=self.parser, on_message=lambda c, d: on_message()
        )
        await asyncio.wait_for(subscriber.subscribe(channel), 10)
        return subscriber.close


class RedisPyCommands:
    def __init__(self, client: Any) -> None:
        self._client = client
        self.lpush: Send = client.lpush
        self.publish: Send = client.publish

    async def brpop_value(self, key: str) -> bytes:
        reply = await self._client.brpop([key], timeout=0)
        value: bytes = reply[1]
        return value

    async def close(self) -> None:
        await self._client.aclose()


@dataclass
class RedisPyImpl:
    port: int
    redis_py: bool = True
    name: str = "redis-py"

    def _client(self) -> Any:
        assert aioredis is not None
        return aioredis.Redis(host=HOST, port=self.port, protocol=2)

    async def connect(self) -> Commands:
        client = self._client()
        await client.ping()  # open the first connection outside the timed phase
        return RedisPyCommands(client)

    async def subscribe(self, channel: str, on_message: Callable[[], None]) -> Closer:
        client = self._client()
        pubsub = client.pubsub()
        await pubsub.subscribe(channel)
        confirmed = asyncio.Event()

        async def listen() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    on_message()
                elif message["type"] == "subscribe":
                    confirmed.set()

        task = asyncio.create_task(listen())
        await asyncio.wait_for(confirmed.wait(), 10)

        async def close() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pubsub.aclose()
            await client.aclose()

        return close


# ---------------------------------------------------------------------------------------------
# The workloads. Each opens its connections, runs a warm-up phase and a measured phase, and
# returns (operations, seconds) for the measured one.

Result = tuple[int, float]


async def sequential_lpush(impl: Impl, server: RedisServer, seconds: float) -> Result:
    conn = await impl.connect()
    key = "bench:a"

    async def phase(duration: float) -> Result:
        lpush = conn.lpush
        n = 0
        start = time.perf_counter()
        deadline = start + duration
        while time.perf_counter() < deadline:
            await lpush(key, PAYLOAD)
            n += 1
        return n, time.perf_counter() - start

    try:
        await phase(WARMUP)
        server.command("DEL", key)
        return await phase(seconds)
    finally:
        await conn.close()
        server.command("DEL", key)


async def concurrent_lpush(impl: Impl, server: RedisServer, seconds: float) -> Result:
    conn = await impl.connect()
    key = "bench:b"

    async def phase(duration: float) -> Result:
        lpush = conn.lpush
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> int:
            n = 0
            while time.perf_counter() < deadline:
                await lpush(key, PAYLOAD)
                n += 1
            return n

        counts = await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return sum(counts), time.perf_counter() - start

    try:
        await phase(WARMUP)
        server.command("DEL", key)
        return await phase(seconds)
    finally:
        await conn.close()
        server.command("DEL", key)


async def ping_pong(impl: Impl, server: RedisServer, seconds: float) -> Result:
    ping, pong = "bench:c:ping", "bench:c:pong"
    client = await impl.connect()
    echo = await impl.connect()

    async def phase(duration: float) -> Result:
        async def answer() -> None:
            while (item := await echo.brpop_value(ping)) != b"stop":
                await echo.lpush(pong, item)

        answering = asyncio.create_task(answer())
        n = 0
        start = time.perf_counter()
        deadline = start + duration
        while time.perf_counter() < deadline:
            await client.lpush(ping, PAYLOAD)
            await client.brpop_value(pong)
            n += 1
        elapsed = time.perf_counter() - start
        await client.lpush(ping, b"stop")
        await asyncio.wait_for(answering, 10)
        return n, elapsed

    try:
        await phase(WARMUP)
        return await phase(seconds)
    finally:
        await client.close()
        await echo.close()
        server.command("DEL", ping, pong)


class Received:
    """Counts messages; ``done`` is set once ``expected`` of them arrived."""

    def __init__(self) -> None:
        self.count = 0
        self.expected: int | None = None
        self.last = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.expected is not None and self.count >= self.expected:
            self.last = time.perf_counter()
            self.done.set()

    def expect(self, n: int) -> None:
        self.expected = n
        if self.count >= n:
            self.last = time.perf_counter()
            self.done.set()


async def publish_subscribe(impl: Impl, server: RedisServer, seconds: float) -> Result:
    channel = "bench:d"
    received = Received()
    close_subscriber = await impl.subscribe(channel, lambda: received.hit())
    conn = await impl.connect()

    async def phase(duration: float) -> Result:
        nonlocal received
        received = Received()
        publish = conn.publish
        start = time.perf_counter()
        deadline = start + duration

        async def publisher() -> int:
            n = 0
            while time.perf_counter() < deadline:
                await publish(channel, PAYLOAD)
                n += 1
            return n

        sent = sum(await asyncio.gather(*(publisher() for _ in range(CONCURRENCY))))
        received.expect(sent)
        try:
            await asyncio.wait_for(received.done.wait(), DRAIN_TIMEOUT)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"{impl.name}: only {received.count} of {sent} messages arrived"
            ) from None
        return received.count, received.last - start

    try:
        await phase(WARMUP)
        return await phase(seconds)
    finally:
        await conn.close()
        await close_subscriber()


Workload = Callable[[Impl, RedisServer, float], Awaitable[Result]]

WORKLOADS: list[tuple[str, str, Workload]] = [
    ("a", "sequential LPUSH, 1 connection", sequential_lpush),
    ("b", f"{CONCURRENCY} tasks LPUSH, shared connection", concurrent_lpush),
    ("c", "LPUSH/BRPOP ping-pong (round trips)", ping_pong),
    ("d", f"PUBLISH x{CONCURRENCY} tasks -> subscriber (msgs)", publish_subscribe),
]


# ---------------------------------------------------------------------------------------------
# Running and reporting.


@dataclass
class Rate:
    """ops/s of one implementation: the median of its rounds, and their spread."""

    median: float
    low: float
    high: float

    @property
    def spread(self) -> str:
        """Half the range of the rounds, as a share of the median: a rough noise figure."""
        return f"±{50 * (self.high - self.low) / self.median:.0f}%" if self.median else ""


async def measure(
    workload: Workload, impls: list[Impl], server: RedisServer, seconds: float
) -> dict[str, Rate]:
    """Run each implementation ROUNDS times, alternated (ABC, CBA, ABC, ...).

    The median of the rounds is reported: on a shared or virtual machine, a round now and then
    runs much faster or slower (scheduling of redis-server against the client), and a sum would
    let that one round decide the ratio.
    """
    rates: dict[str, list[float]] = {impl.name: [] for impl in impls}
    order = list(impls)
    for _ in range(ROUNDS):
        for impl in order:
            n, t = await workload(impl, server, seconds / ROUNDS)
            rates[impl.name].append(n / t)
        order.reverse()
    return {
        name: Rate(statistics.median(values), min(values), max(values))
        for name, values in rates.items()
    }


def _row(cells: list[str], widths: list[int]) -> str:
    """Two left-aligned text columns, then right-aligned numbers."""
    left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
    right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
    return "  ".join(left + right).rstrip()


async def run(server: RedisServer, parsers: list[str], seconds: float, only: str) -> None:
    impls: list[Impl] = [MiniImpl(server.port, parser) for parser in parsers]
    if aioredis is not None:
        impls.append(RedisPyImpl(server.port))
    header = ["workload", "implementation", "ops/s", "rounds", "vs redis-py", "target"]
    widths = [44, 18, 10, 7, 11, 12]
    print(_row(header, widths))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for letter, title, workload in WORKLOADS:
        if letter not in only:
            continue
        rates = await measure(workload, impls, server, seconds)
        baseline = rates["redis-py"].median if "redis-py" in rates else None
        target = TARGETS.get(letter)
        for i, impl in enumerate(impls):
            rate = rates[impl.name]
            ratio = goal = ""
            if baseline and not impl.redis_py:
                times = rate.median / baseline
                ratio = f"{times:.2f}x"
                if target is not None:
                    goal = f">={target:g}x {'ok' if times >= target else 'MISS'}"
            label = f"({letter}) {title}" if i == 0 else ""
            cells = [label, impl.name, f"{rate.median:,.0f}", rate.spread, ratio, goal]
            print(_row(cells, widths), flush=True)
    print(
        "\nops/s is the median of the rounds; 'rounds' is half their range, relative to it."
        " Targets compare the medians."
    )


def _describe(server: RedisServer) -> None:
    print(f"redis-server {server.version()} on {HOST}:{server.port}")
    print(f"Python {platform.python_version()} ({platform.python_implementation()})", end="")
    print(f", asyncio {type(asyncio.get_event_loop_policy()).__name__}, {os.cpu_count()} CPUs")
    print(f"minidasgi {minidasgi.__version__}", end="")
    if redis is not None:
        from redis.asyncio.connection import DefaultParser

        print(f", redis-py {redis.__version__} (parser {DefaultParser.__name__})")
    else:
        print(", redis-py not installed: no comparison")
    print(
        f"payload {len(PAYLOAD)} bytes, {WARMUP} s warm-up, "
        f"{ROUNDS} alternated rounds per workload and implementation\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="measured seconds per workload and client"
    )
    parser.add_argument(
        "--parsers",
        default="python,hiredis",
        help="comma-separated minidasgi parsers to measure (python, hiredis)",
    )
    parser.add_argument(
        "--workloads", default="abcd", help="which workloads to run, by letter (default: abcd)"
    )
    args = parser.parse_args(argv)
    parsers = [p.strip() for p in args.parsers.split(",") if p.strip()]
    for name in parsers:
        if name not in ("python", "hiredis"):
            parser.error(f"unknown parser {name!r}")
    letters = {w[0] for w in WORKLOADS}
    if not args.workloads or not set(args.workloads) <= letters:
        parser.error(f"--workloads takes letters among {''.join(sorted(letters))}")

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwind through the finally below

    signal.signal(signal.SIGTERM, terminate)
    # The subscriber may fall behind the publishers for a moment: never drop it.
    server = RedisServer(extra_args=["--client-output-buffer-limit", "pubsub 0 0 0"])
    try:
        server.start()
        _describe(server)
        asyncio.run(run(server, parsers, args.seconds, args.workloads))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
