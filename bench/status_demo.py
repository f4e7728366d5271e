"""A queue building up and draining, as ``minidasgi status --watch`` shows it.

Run ``python bench/status_demo.py [--requests 60] [--sleep 0.5]``. It starts a private
redis-server, three Nodes (``minidasgi node``, concurrency 2 each, an app that sleeps
``--sleep`` seconds per request) and a distributor (``minidasgi distributor``), all in child
processes, sends ``--requests`` requests at once, and prints what ``minidasgi status --watch 1``
printed meanwhile: requests waiting, the age of the oldest, Nodes listening, each Node's
in-flight and served counts, the distributor's.
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the stdlib's http package (httpx needs it): this folder goes last
# on sys.path (for measure.py). Last, an installed module named measure would shadow
# bench/measure.py in turn: none is (the venv's `import measure` fails outside bench/).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import asyncio
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from measure import free_port

from minidasgi.testing import RedisServer

APP = """
import asyncio

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await asyncio.sleep(float(scope["query_string"] or b"0.5"))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"slept"})
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--sleep", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis:
        Path(tmp, "demo_app.py").write_text(APP)
        env = dict(os.environ, MINIDASGI_REDIS_URL=redis.url)
        node = ["node", "demo_app:app", "--key", "demo", "--concurrency", "2", "--app-dir", tmp]
        children = [subprocess.Popen([*MINIDASGI, *node], env=env) for _ in range(3)]
        port = free_port()
        distributor = ["distributor", "--key", "demo", "--port", str(port)]
        children.append(subprocess.Popen([*MINIDASGI, *distributor], env=env))
        try:
            asyncio.run(_load(f"http://127.0.0.1:{port}", env, args.requests, args.sleep))
        finally:
            for child in children:
                child.terminate()
            for child in children:
                child.wait(10)


MINIDASGI = [sys.executable, "-m", "minidasgi", "--log-level", "warning"]


async def _load(base: str, env: dict[str, str], requests: int, sleep: float) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        deadline = time.monotonic() + 15
        while True:
            try:
                await client.get("/?0")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        status = ["status", "demo", "--watch", "1", "--timeout", "0.3"]
        watch = await asyncio.create_subprocess_exec(
            *MINIDASGI, *status, env=env, stdout=asyncio.subprocess.PIPE
        )
        await asyncio.sleep(0.5)
        started = time.monotonic()
        responses = await asyncio.gather(*(client.get(f"/?{sleep}") for _ in range(requests)))
        took = time.monotonic() - started
        await asyncio.sleep(1.5)
        watch.send_signal(signal.SIGINT)
        out, _ = await watch.communicate()
    print(out.decode())
    codes = sorted({r.status_code for r in responses})
    print(f"{requests} requests, statuses {codes}, all answered in {took:.1f} s")


if __name__ == "__main__":
    main()
