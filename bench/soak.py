"""Soak: 50,000 mixed requests with faults through one long-lived distributor, watched.

Run ``python bench/soak.py [--requests 50000] [--concurrency 32]`` (not part of CI). It starts
a private redis-server, the distributor under uvicorn and a Node in child processes, then sends
a mix of hello-world, streamed, uploaded, failing and unroutable requests, and requests to a
list no Node serves. Along the way it kills the Node with SIGKILL and starts a new one, and
restarts redis-server, without restarting the distributor. Every 5,000 requests it prints the
distributor's and the Node's RSS, Redis' client count and key count: they should stay flat.
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the stdlib's http package (httpx needs it): this folder goes last
# on sys.path (for measure.py) before importing anything else. Last, an installed module named
# measure would shadow bench/measure.py in turn: none is (the venv's `import measure` fails
# outside bench/).
_HERE_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE_DIR] + [_HERE_DIR]

import argparse
import asyncio
import collections
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from measure import free_port

from minidasgi.testing import RedisServer

HOST = "127.0.0.1"
_HERE = Path(__file__).resolve().parent

APPS = """
import os

from minidasgi import create_path_distributor


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    body = b""
    while True:
        message = await receive()
        body = body + message.get("body", b"") if len(body) < 4096 else body
        if not message.get("more_body"):
            break
    if path.endswith("/error"):
        raise RuntimeError("soak: an app error")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if path.endswith("/stream"):
        for _ in range(20):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
    await send({"type": "http.response.body", "body": b"Hello World!"})


distributor = create_path_distributor(
    url=os.environ["SOAK_REDIS_URL"],
    routes={"/app/": "soak", "/nobody/": "soak-nobody"},
    worker_timeout=0.5,
    no_worker_status=503,
)
"""


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self.args = args
        self.tmp = tmp
        self.redis = RedisServer()
        self.url = f"redis://{HOST}:{self.redis.port}"
        self.port = int(os.environ.get("SOAK_PORT", "0")) or free_port(HOST)
        self.env = dict(os.environ, SOAK_REDIS_URL=self.url)
        self.distributor: subprocess.Popen[bytes] | None = None
        self.node: subprocess.Popen[bytes] | None = None
        self.statuses: collections.Counter[str] = collections.Counter()

    def start_node(self) -> None:
        self.node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "minidasgi",
                "--log-level",
                "error",
                "node",
                "soak_apps:app",
                "--app-dir",
                self.tmp,
                "--key",
                "soak",
                "--redis",
                self.url,
                "--lifespan",
                "off",
            ],
            env=self.env,
        )

    def start(self) -> None:
        self.redis.start()
        self.distributor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "soak_apps:distributor",
                "--app-dir",
                self.tmp,
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "critical",
            ],
            env=self.env,
        )
        self.start_node()

    def stop(self) -> None:
        for process in (self.node, self.distributor):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.redis.close()

    def sample(self, done: int, started: float) -> None:
        assert self.distributor is not None and self.node is not None
        info = self.redis.command("INFO", "clients")
        clients = "?"
        if isinstance(info, bytes):
            for line in info.decode().splitlines():
                if line.startswith("connected_clients:"):
                    clients = line.split(":")[1]
        keys = self.redis.command("DBSIZE")
        elapsed = time.monotonic() - started
        distributor_rss = _rss_mib(self.distributor.pid)
        print(
            f"{done:>7} requests {elapsed:7.1f} s  distributor RSS {distributor_rss:6.1f}"
            f" MiB  node RSS {_rss_mib(self.node.pid):6.1f} MiB  redis clients {clients:>3}"
            f"  keys {keys}  statuses {dict(sorted(self.statuses.items()))}",
            flush=True,
        )

    async def fault(self, number: int) -> None:
        """Every so often: kill the Node (SIGKILL) and start another, or restart Redis."""
        if number % 2 == 0:
            assert self.node is not None
            self.node.kill()
            self.node.wait()
            self.start_node()
        else:
            await asyncio.to_thread(self.redis.restart, 0.5)

    async def run(self) -> None:
        total, concurrency = self.args.requests, self.args.concurrency
        kinds = ["/app/hello"] * 14 + ["/app/stream", "/app/error", "/nobody/x", "/unrouted"]
        counter = iter(range(total))
        started = time.monotonic()
        faults = iter(range(1, 100))
        fault_every = max(total // 5, 1)
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{self.port}",
            timeout=30,
            limits=httpx.Limits(max_connections=concurrency),
        ) as client:
            await _wait_ready(client)

            async def worker() -> None:
                for number in counter:
                    path = kinds[number % len(kinds)]
                    try:
                        if number % 25 == 0:
                            response = await client.post("/app/upload", content=b"u" * 200_000)
                        else:
                            response = await client.get(path)
                        self.statuses[str(response.status_code)] += 1
                    except httpx.HTTPError as exc:
                        self.statuses[type(exc).__name__] += 1
                    done = number + 1
                    if done % 5000 == 0:
                        self.sample(done, started)
                    if done % fault_every == 0 and done < total:
                        await self.fault(next(faults))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        await asyncio.sleep(1)
        self.sample(total, started)


async def _wait_ready(client: httpx.AsyncClient) -> None:
    for _ in range(200):
        try:
            if (await client.get("/app/hello")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("the distributor did not answer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="minidasgi-soak-") as tmp:
        Path(tmp, "soak_apps.py").write_text(APPS)
        soak = Soak(args, tmp)
        try:
            soak.start()
            asyncio.run(soak.run())
        finally:
            soak.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
