"""WebSocket echo round trips per second: directly under uvicorn, and through minidasgi.

Run ``python bench/websocket.py [--seconds 3] [--clients 1,16] [--size 64]``. It starts a
private ``redis-server`` on a free port (never 6379) in a temp dir, and three child processes:

    direct       uvicorn serving the echo app below;
    distributor  uvicorn serving ``create_distributor(key=...)`` on that redis-server;
    node         a minidasgi Node running the same echo app.

For each number of clients it opens that many sockets to each side (outside the timed phase),
then every socket does lockstep round trips (send a message, wait for its echo) for a fixed
time. The time is split into rounds that alternate direct/distributed (AB, BA, ...), so a noisy
machine penalises both alike; the median round is reported with the spread of the rounds, and
the ratio distributed/direct next to the target (>= 0.5x).

Below the table, steadier figures than throughput on a shared machine, over the rounds of each
side: CPU microseconds per round trip of each process (from ``/proc/PID/stat``: direct uvicorn;
the distributor, the Node and Redis), Redis commands per round trip (``INFO commandstats``;
each PUBLISH is one pub/sub delivery, every channel having one subscriber), and the coalescing
seen: conversation messages per round trip and per PUBLISH, of the distributor and of the Node
(each child prints its ``outbox`` counts when sent SIGUSR1).

All processes are stopped at exit, on Ctrl-C, on SIGTERM and on errors; on Linux the kernel
also terminates them should this process be killed outright. The children are this very
script, started with ``--role``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from measure import commandstats, cpu_seconds, free_port

from minidasgi.testing import RedisServer

HOST = "127.0.0.1"
KEY = "bench-ws"
WARMUP = 0.2  # seconds, per measurement
ROUNDS = 6  # each side's duration is split into this many alternated rounds
TARGET = 0.5  # distributed / direct

# ---------------------------------------------------------------------------------------------
# The app both sides serve.


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts a WebSocket and echoes every message back."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
        else:
            await send({"type": "websocket.send", "text": message.get("text", "")})


# ---------------------------------------------------------------------------------------------
# Child processes.


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel SIGTERM the child if this process dies (even on SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        **kwargs,
    )


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Child:
    """This script in a child process, in one of its ``--role``s."""

    def __init__(self, role: str, *args: str) -> None:
        self.role = role
        self.argv = [sys.executable, os.path.abspath(__file__), "--role", role, *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        self.proc = _spawn(self.argv, stdout=subprocess.PIPE)
        atexit.register(self.stop)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the child is ready or dies
        if b"ready" not in line:
            proc = self.proc
            self.stop()
            raise RuntimeError(f"{self.role} did not start (exit status {proc.returncode})")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _stop(proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def counts(self) -> tuple[int, int]:
        """(messages, PUBLISHes) the child's outbox sent so far."""
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        line = self.proc.stdout.readline().split()
        if len(line) != 3 or line[0] != b"counts":
            raise RuntimeError(f"{self.role} did not report its counts")
        return int(line[1]), int(line[2])


async def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


def _report_counts_on_signal(outbox: Any) -> None:
    """On SIGUSR1, print the outbox's counts (messages and PUBLISHes so far) on stdout, for
    the parent's figures (``Child.counts``)."""

    def report(signum: int, frame: object) -> None:
        batcher = outbox.batcher
        print(f"counts {batcher.items} {batcher.batches}", flush=True)

    signal.signal(signal.SIGUSR1, report)


def _serve_uvicorn(app: Any, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)

    async def serve() -> None:
        serving = asyncio.ensure_future(server.serve())
        await _wait_listening(port)
        print("ready", flush=True)
        await serving

    asyncio.run(serve())


def _serve_node(redis_url: str) -> None:
    from minidasgi import Node

    node = Node(url=redis_url, app=echo, key=KEY, lifespan="off")
    _report_counts_on_signal(node.outbox)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop)
        serving = asyncio.ensure_future(node.serve())
        await node.wait_started()
        print("ready", flush=True)
        await serving

    asyncio.run(serve())


def child_main(role: str, port: int, redis_url: str) -> int:
    if role == "direct":
        _serve_uvicorn(echo, port)
    elif role == "distributor":
        from minidasgi import create_distributor

        distributor = create_distributor(url=redis_url, key=KEY)
        _report_counts_on_signal(distributor.outbox)
        _serve_uvicorn(distributor, port)
    elif role == "node":
        _serve_node(redis_url)
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


# ---------------------------------------------------------------------------------------------
# Measuring.


@dataclass
class Rate:
    """Round trips/s of one side: the median of its rounds, and their spread."""

    median: float
    low: float
    high: float

    @property
    def spread(self) -> str:
        """Half the range of the rounds, as a share of the median: a rough noise figure."""
        return f"±{50 * (self.high - self.low) / self.median:.0f}%" if self.median else ""


@dataclass
class Costs:
    """What the round trips of one side cost, summed over its rounds: CPU seconds per
    process, Redis commands, and (distributed) the outboxes' messages and PUBLISHes."""

    round_trips: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)
    sent: dict[str, list[int]] = field(default_factory=dict)  # role: [messages, PUBLISHes]


class Meter:
    """Snapshots of the processes behind each side, taken around every round."""

    def __init__(self, redis: RedisServer, children: dict[str, Child]) -> None:
        assert redis.pid is not None
        self.redis = redis
        self.children = children
        self.pids = {
            "direct": {"direct": children["direct"].pid},
            "distributed": {
                "distributor": children["distributor"].pid,
                "node": children["node"].pid,
                "redis": redis.pid,
            },
        }

    def snapshot(self, side: str) -> dict[str, Any]:
        snap: dict[str, Any] = {
            "cpu": {name: cpu_seconds(pid) for name, pid in self.pids[side].items()}
        }
        if side == "distributed":
            snap["commands"] = commandstats(self.redis)
            snap["sent"] = {r: self.children[r].counts() for r in ("distributor", "node")}
        return snap

    @staticmethod
    def add(costs: Costs, before: dict[str, Any], after: dict[str, Any], n: int) -> None:
        costs.round_trips += n
        for name, spent in after["cpu"].items():
            costs.cpu[name] = costs.cpu.get(name, 0.0) + spent - before["cpu"][name]
        for command, calls in after.get("commands", {}).items():
            done = calls - before["commands"].get(command, 0)
            if done and command != "info":
                costs.commands[command] = costs.commands.get(command, 0) + done
        for role, (items, batches) in after.get("sent", {}).items():
            total = costs.sent.setdefault(role, [0, 0])
            total[0] += items - before["sent"][role][0]
            total[1] += batches - before["sent"][role][1]


async def _lockstep(sockets: list[Any], payload: str, duration: float) -> tuple[int, float]:
    start = time.perf_counter()
    deadline = start + duration

    async def client(ws: Any) -> int:
        n = 0
        while time.perf_counter() < deadline:
            await ws.send(payload)
            reply = await ws.recv()
            if len(reply) != len(payload):
                raise RuntimeError("the echo does not match")
            n += 1
        return n

    counts = await asyncio.gather(*(client(ws) for ws in sockets))
    return sum(counts), time.perf_counter() - start


async def measure(
    urls: dict[str, str], clients: int, payload: str, seconds: float, meter: Meter
) -> tuple[dict[str, Rate], dict[str, Costs]]:
    """Open ``clients`` sockets per side, then run alternated rounds (AB, BA, ...)."""
    import websockets

    rates: dict[str, list[float]] = {name: [] for name in urls}
    costs = {name: Costs() for name in urls}
    async with contextlib.AsyncExitStack() as stack:
        sockets: dict[str, list[Any]] = {}
        for name, url in urls.items():
            sockets[name] = [
                await stack.enter_async_context(websockets.connect(url, max_size=None))
                for _ in range(clients)
            ]
            await _lockstep(sockets[name], payload, WARMUP)
        order = list(urls)
        for _ in range(ROUNDS):
            for name in order:
                before = meter.snapshot(name)
                n, elapsed = await _lockstep(sockets[name], payload, seconds / ROUNDS)
                meter.add(costs[name], before, meter.snapshot(name), n)
                rates[name].append(n / elapsed)
            order.reverse()
    medians = {
        name: Rate(statistics.median(values), min(values), max(values))
        for name, values in rates.items()
    }
    return medians, costs


def _print_costs(clients: int, costs: dict[str, Costs]) -> None:
    direct, dist = costs["direct"], costs["distributed"]
    if not (direct.round_trips and dist.round_trips):
        return
    us = {name: 1e6 * spent / dist.round_trips for name, spent in dist.cpu.items()}
    direct_us = 1e6 * direct.cpu["direct"] / direct.round_trips
    total = sum(us.values())
    print(
        f"  {clients:>3} sockets: CPU us/round trip: direct {direct_us:.1f} | distributor"
        f" {us['distributor']:.1f} ({us['distributor'] / direct_us:.2f}x direct), node"
        f" {us['node']:.1f}, redis {us['redis']:.1f} (sum {total:.1f})"
    )
    commands = sum(dist.commands.values())
    by_command = ", ".join(
        f"{command} {calls / dist.round_trips:.3f}"
        for command, calls in sorted(dist.commands.items(), key=lambda kv: -kv[1])
    )
    per_rt = commands / dist.round_trips
    print(f"               Redis commands/round trip: {per_rt:.3f} ({by_command})")
    sent = []
    for role, (items, batches) in dist.sent.items():
        per_batch = items / batches if batches else 0.0
        sent.append(
            f"{role} {items / dist.round_trips:.3f} in {batches / dist.round_trips:.3f} PUBLISH"
            f" ({per_batch:.2f} per PUBLISH)"
        )
    print(f"               messages/round trip: {'; '.join(sent)}")


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))


async def run(
    redis: RedisServer,
    urls: dict[str, str],
    counts: list[int],
    size: int,
    seconds: float,
    meter: Meter,
) -> None:
    payload = "x" * size
    header = ["clients", "direct rt/s", "±", "distrib. rt/s", "±", "ratio", "target"]
    header += ["direct ms", "distrib. ms"]
    widths = [7, 12, 5, 13, 5, 6, 12, 10, 11]
    print(_row(header, widths))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    all_costs = []
    for clients in counts:
        rates, costs = await measure(urls, clients, payload, seconds, meter)
        all_costs.append((clients, costs))
        direct, distributed = rates["direct"], rates["distributed"]
        ratio = distributed.median / direct.median
        verdict = f">={TARGET:g}x {'ok' if ratio >= TARGET else 'MISS'}"
        cells = [
            str(clients),
            f"{direct.median:,.0f}",
            direct.spread,
            f"{distributed.median:,.0f}",
            distributed.spread,
            f"{ratio:.2f}x",
            verdict,
            f"{1000 * clients / direct.median:.2f}",
            f"{1000 * clients / distributed.median:.2f}",
        ]
        print(_row(cells, widths), flush=True)
    keys = redis.command("KEYS", "*")
    print(
        "\nrt/s: echo round trips per second over all sockets, the median of the rounds;"
        " ± is half their range relative to it; ms is the mean round trip per socket."
    )
    print(
        "\nCosts over all rounds (/proc, INFO commandstats; each PUBLISH is one pub/sub"
        " delivery; messages: what each side's outbox sent, in how many PUBLISHes):"
    )
    for clients, costs in all_costs:
        _print_costs(clients, costs)
    print(f"keys left in Redis: {keys!r}")


def _unshadow_stdlib() -> None:
    """Drop this script's directory from ``sys.path``: ``bench/http.py`` would otherwise hide
    the standard library's ``http`` from uvicorn and websockets (imported lazily, after this)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per side")
    parser.add_argument("--clients", default="1,16", help="comma-separated socket counts")
    parser.add_argument("--size", type=int, default=64, help="message size in characters")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--redis", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _unshadow_stdlib()
    if args.role:
        return child_main(args.role, args.port, args.redis)
    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        parser.error("--clients takes comma-separated integers")
    if not counts or min(counts) < 1:
        parser.error("--clients takes positive integers")

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwind through the finally below

    signal.signal(signal.SIGTERM, terminate)
    redis = RedisServer()
    children: dict[str, Child] = {}
    try:
        redis.start()
        direct_port, front_port = free_port(HOST), free_port(HOST)
        for child in (
            Child("direct", "--port", str(direct_port)),
            Child("distributor", "--port", str(front_port), "--redis", redis.url),
            Child("node", "--redis", redis.url),
        ):
            children[child.role] = child.start()
        from importlib.metadata import version

        import minidasgi

        print(f"redis-server {redis.version()} on {HOST}:{redis.port}")
        print(
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
            f"uvicorn {version('uvicorn')}, websockets {version('websockets')}, "
            f"minidasgi {minidasgi.__version__}"
        )
        print(
            f"{args.size}-character text messages, lockstep per socket, {args.seconds:g} s per"
            f" side in {ROUNDS} alternated rounds; direct = uvicorn (1 process), distributed ="
            " uvicorn + distributor (1 process) -> redis -> Node (1 process)\n"
        )
        urls = {
            "direct": f"ws://{HOST}:{direct_port}/",
            "distributed": f"ws://{HOST}:{front_port}/",
        }
        meter = Meter(redis, children)
        asyncio.run(run(redis, urls, counts, args.size, args.seconds, meter))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for child in reversed(list(children.values())):
            child.stop()
        redis.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
