"""Probe and scrape endpoints: liveness, readiness and metrics, for both sides.

Owns the answers to ``healthz`` (the process and its event loop answer: nothing else is
checked, so a Redis outage never gets a worker restarted), ``readyz`` (503 until the Redis
connections and the subscription are up) and ``metrics`` (Prometheus text), and a minimal
HTTP/1.1 server for a Node's health port. The distributor answers the same paths under its
``ops_prefix`` from inside its ASGI app.

The server reads one bounded request head (``MAX_HEAD`` bytes within ``READ_TIMEOUT``
seconds), answers GET or HEAD, and closes the connection. It must never run application code
or touch Redis: readiness is read from flags the owner keeps up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from . import exposition
from .metrics import Registry

__all__ = ["MAX_HEAD", "READ_TIMEOUT", "HealthServer", "answer", "respond"]

logger = logging.getLogger("minidasgi.health")

MAX_HEAD = 8 * 1024
READ_TIMEOUT = 5.0

Answer = tuple[int, str, bytes]  # status, content type, body
_TEXT = "text/plain; charset=utf-8"


def answer(name: str, *, ready: Callable[[], bool], registry: Registry) -> Answer:
    """The answer for the endpoint ``name`` (``healthz``, ``readyz``, ``metrics``)."""
    if name == "healthz":
        return 200, _TEXT, b"ok\n"
    if name == "readyz":
        if ready():
            return 200, _TEXT, b"ready\n"
        return 503, _TEXT, b"not ready: Redis or the subscription is down\n"
    if name == "metrics":
        return 200, exposition.CONTENT_TYPE, exposition.render(registry).encode()
    return 404, _TEXT, b"not found: try healthz, readyz or metrics\n"


async def respond(
    send: Callable[[dict[str, Any]], Awaitable[None]],
    name: str,
    *,
    ready: Callable[[], bool],
    registry: Registry,
) -> None:
    """Answer the endpoint ``name`` through an ASGI ``send`` (the distributor's ops paths)."""
    status, content_type, body = answer(name, ready=ready, registry=registry)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HealthServer:
    """Serves ``/-/healthz``, ``/-/readyz`` and ``/-/metrics`` (also without the ``/-/``)."""

    def __init__(
        self, host: str, port: int, *, ready: Callable[[], bool], registry: Registry
    ) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._registry = registry
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Listen; raise ``OSError`` if the port cannot be bound."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]  # the real one when 0 was asked for
        logger.info("health and metrics on http://%s:%d/-/", self.host, self.port)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, OSError):
            writer.close()  # silent, too slow, or a head over MAX_HEAD (LimitOverrunError)
            return
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        name = path.removeprefix("/-/").lstrip("/")
        if method not in ("GET", "HEAD"):
            status, kind, body = 405, _TEXT, b"method not allowed\n"
        else:
            status, kind, body = answer(name, ready=self._ready, registry=self._registry)
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Unavailable"}
        writer.write(
            (
                f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
                f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            + (b"" if method == "HEAD" else body)
        )
        try:
            # Bounded: a client that asks and never reads must not hold this task (nor, on
            # Python 3.12+, the server's close, which waits for its connections).
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except asyncio.TimeoutError:
            writer.transport.abort()
            return
        except OSError:
            pass
        writer.close()
