"""Throughput as Nodes and distributor processes are added, on one Redis and on a Cluster.

Run ``python bench/scale.py [--seconds 5] [--connections 64]``. For each topology (one private
redis-server, then a 3-master Redis Cluster started by ``minidasgi.testing.ClusterSetup``) it
starts, in child processes, ``minidasgi distributor --workers W`` and N ``minidasgi node``
processes serving a hello-world app on one key, loads the distributor with ``wrk`` (or a
built-in asyncio generator when wrk is missing) and prints, side by side:

- requests/s with 1, 2 and 4 Nodes behind one distributor process, and with 1 and 2
  distributor processes (``--workers``) in front of 2 Nodes;
- the CPU each kind of process spent per request (microseconds, from ``/proc/PID/stat``,
  children included): distributor, Nodes, Redis (every server of the topology together).

The CPU figures say which process saturates first and how much Redis work a request costs,
which is what carries over to many hosts; the requests/s figures on a 2-core machine mostly
say that the load generator, the distributors, the Nodes and Redis share two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from measure import cpu_seconds, free_port

from minidasgi.testing import ClusterSetup, RedisServer

HOST = "127.0.0.1"
KEY = "bench-scale"
APP = """
BODY = b"Hello World!"


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
"""


def _cpu(pid: int) -> float:
    """CPU seconds of a process and of its reaped children, 0 once it is gone."""
    try:
        return cpu_seconds(pid, children=True)
    except OSError:
        return 0.0


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _tree_cpu(pid: int) -> float:
    return sum(_cpu(p) for p in _tree(pid))


def _wait_http(port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                if sock.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered 200 on port {port}")


def _wrk(port: int, connections: int, seconds: float) -> float:
    """Requests answered in ``seconds`` (wrk, else a built-in generator)."""
    if shutil.which("wrk"):
        out = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s",
             f"http://{HOST}:{port}/"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        match = re.search(r"(\d+) requests in", out)
        assert match is not None, out
        return float(match.group(1))
    return _builtin(port, connections, seconds)


def _builtin(port: int, connections: int, seconds: float) -> float:
    count = 0

    async def client(until: float) -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.monotonic() < until:
                writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head.lower())
                await reader.readexactly(int(length.group(1)) if length else 0)
                count += 1
        finally:
            writer.close()

    async def run() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client(until) for _ in range(connections)))

    asyncio.run(run())
    return float(count)


@contextmanager
def _stack(
    url: str, nodes: int, workers: int, app_dir: str
) -> Iterator[tuple[int, dict[str, list[int]]]]:
    """A distributor (``workers`` processes) and ``nodes`` Nodes; yields the port and pids."""
    port = free_port(HOST)
    env = dict(os.environ, PYTHONPATH=app_dir)
    quiet = ["--log-level", "warning"]
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "minidasgi", *quiet, "node", "scale_app:app", "--key", KEY,
             "--redis", url],
            env=env,
        )
        for _ in range(nodes)
    ]  # fmt: skip
    distributor = subprocess.Popen(
        [sys.executable, "-m", "minidasgi", *quiet, "distributor", "--key", KEY, "--redis", url,
         "--port", str(port), "--workers", str(workers), "--no-worker-status", "503"],
        env=env,
    )  # fmt: skip
    children.append(distributor)
    try:
        _wait_http(port)
        yield port, {"distributor": [distributor.pid], "nodes": [c.pid for c in children[:-1]]}
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _measure(
    url: str,
    redis_pids: list[int],
    nodes: int,
    workers: int,
    args: argparse.Namespace,
    app_dir: str,
) -> dict[str, float]:
    with _stack(url, nodes, workers, app_dir) as (port, pids):
        _wrk(port, args.connections, 1.0)  # warm up: connections, imports, JIT-less caches
        before = {name: sum(_tree_cpu(p) for p in group) for name, group in pids.items()}
        redis_before = sum(_cpu(p) for p in redis_pids)
        requests = _wrk(port, args.connections, args.seconds)
        after = {name: sum(_tree_cpu(p) for p in group) for name, group in pids.items()}
        redis_after = sum(_cpu(p) for p in redis_pids)
    per = max(requests, 1.0)
    return {
        "rps": requests / args.seconds,
        "distributor_us": (after["distributor"] - before["distributor"]) / per * 1e6,
        "nodes_us": (after["nodes"] - before["nodes"]) / per * 1e6,
        "redis_us": (redis_after - redis_before) / per * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients")
    parser.add_argument(
        "--topology", choices=["both", "single", "cluster"], default="both", help="what to run on"
    )
    args = parser.parse_args(argv)
    shapes = [(1, 1), (2, 1), (4, 1), (2, 2)]  # (nodes, distributor workers)
    results: dict[str, dict[tuple[int, int], dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as app_dir:
        Path(app_dir, "scale_app.py").write_text(APP)
        if args.topology in ("both", "single"):
            with RedisServer() as redis:
                assert redis.pid is not None
                results["one Redis"] = {
                    shape: _measure(redis.url, [redis.pid], *shape, args, app_dir)
                    for shape in shapes
                }
        if args.topology in ("both", "cluster"):
            with ClusterSetup(masters=3) as cluster:
                pids = [s.pid for s in cluster.masters if s.pid is not None]
                results["Cluster, 3 masters"] = {
                    shape: _measure(cluster.url, pids, *shape, args, app_dir) for shape in shapes
                }
    cpus = os.cpu_count()
    print(f"\n{args.connections} connections, {args.seconds:g} s per figure, {cpus} CPUs")
    print(f"{'topology':<20} {'nodes':>5} {'dist':>4} {'req/s':>8} "
          f"{'dist us':>8} {'node us':>8} {'redis us':>9}")  # fmt: skip
    for topology, figures in results.items():
        for (nodes, workers), f in figures.items():
            print(
                f"{topology:<20} {nodes:>5} {workers:>4} {f['rps']:>8.0f} "
                f"{f['distributor_us']:>8.0f} {f['nodes_us']:>8.0f} {f['redis_us']:>9.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
