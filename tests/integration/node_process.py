"""Run a Node in a child process for tests: ``node_process.py --redis URL --key K --app apps:x``.

Prints ``ready`` on its first line once the Node pops (``ready PORT`` with ``--health-port``:
the port its health server listens on, the one the kernel chose for ``--health-port 0``), then
serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys

from minidasgi import Node
from minidasgi.resp.cluster import key_slot


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--key", action="append", required=True)
    parser.add_argument("--app", default="apps:hello")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    parser.add_argument("--pop-timeout", type=float, default=5.0)
    parser.add_argument("--health-port", type=int, default=None)
    # FIRST-LAST: a Cluster's slots this Node's own channel must not fall in (its name is
    # random: drawn again until it falls elsewhere).
    parser.add_argument("--channel-outside", default=None)
    args = parser.parse_args()
    module, _, attr = args.app.partition(":")
    app = getattr(importlib.import_module(module), attr)
    avoided = range(0)
    if args.channel_outside is not None:
        first, _, last = args.channel_outside.partition("-")
        avoided = range(int(first), int(last) + 1)
    while True:
        node = Node(
            url=args.redis,
            app=app,
            keys=args.key,
            concurrency=args.concurrency,
            shutdown_timeout=args.shutdown_timeout,
            pop_timeout=args.pop_timeout,
            health_port=args.health_port,
        )
        if key_slot(node.channel) not in avoided:
            break
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stop)
    serving = asyncio.ensure_future(node.serve())
    started = asyncio.ensure_future(node.wait_started())
    # A Node that fails to start (its health port refused, say) ends this process: its parent
    # waits for the first line, and would wait for ever.
    await asyncio.wait([serving, started], return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        started.cancel()
        await serving  # raises what stopped it
        raise SystemExit("the node stopped before it started")
    health = node.health_server
    print("ready" if health is None else f"ready {health.port}", flush=True)
    await serving


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    asyncio.run(main())
