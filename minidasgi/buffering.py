"""Request buffering: reading a request's body before the request is queued for a Node.

Owns the per-request buffer bound, the process-wide budget of buffered bytes, and the idle
timeout between two body chunks of a client. A Node slot is taken only by a request that
travels whole, or whose first ``limit`` bytes already arrived: a client that sends its headers
and then trickles or stalls holds memory here, bounded, and never a Node's slot (as nginx's
request buffering spares its upstreams).

The budget bounds the bytes all requests of the process hold while being buffered; a request
that finds it exhausted is queued with what it has and streams the rest (under flow control,
still under the idle timeout), so memory stays bounded whatever the number of uploads.

It must never talk to Redis nor know about Nodes: it only turns what a client's ``receive()``
gives into the events an envelope carries.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from .asgi import Message, Receive

__all__ = [
    "DEFAULT_BODY_IDLE_TIMEOUT",
    "DEFAULT_REQUEST_BUFFER_BUDGET",
    "DEFAULT_REQUEST_BUFFER_SIZE",
    "BodyBuffer",
    "BodyIdle",
    "BufferBudget",
    "receive_within",
]

DEFAULT_REQUEST_BUFFER_SIZE: Final = 1024 * 1024
"""Bytes of a request body read before it is queued: ordinary forms and JSON travel whole."""
DEFAULT_REQUEST_BUFFER_BUDGET: Final = 64 * 1024 * 1024
"""Bytes all requests of one process may hold while being buffered."""
DEFAULT_BODY_IDLE_TIMEOUT: Final = 30.0
"""Seconds a client may let pass between two pieces of its request body."""


class BodyIdle(Exception):
    """The client sent no part of its body for the idle timeout."""


class BufferBudget:
    """The bytes all requests of one process may hold while being buffered."""

    def __init__(self, limit: int = DEFAULT_REQUEST_BUFFER_BUDGET) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, n: int) -> bool:
        """Count ``n`` more bytes held; False once they go over the limit (the bytes are
        already in memory: they are counted all the same, and the holder stops reading)."""
        self.used += n
        return self.used <= self.limit

    def give_back(self, n: int) -> None:
        """Return bytes counted with ``charge``."""
        self.used -= n


class BodyBuffer:
    """The body of one HTTP request as read so far, up to ``limit`` bytes.

    ``add`` each ``http.request`` event; it answers whether to keep reading. ``event()`` then
    gives the one event the envelope carries; ``release()`` gives the bytes back to the budget
    (call it once the event is no longer needed, whatever happened).
    """

    def __init__(self, first: Message, limit: int, budget: BufferBudget) -> None:
        self._limit = limit
        self._budget = budget
        self._chunks: list[bytes] = []
        self._size = 0  # bytes held, all reserved in the budget
        self._more = True
        self._full = False
        self.add(first)

    @property
    def wanted(self) -> bool:
        """True while the body is incomplete and the buffer (and the budget) has room."""
        return self._more and not self._full

    def add(self, event: Message) -> bool:
        """Keep ``event``'s body; return ``wanted``."""
        body = bytes(event.get("body", b""))
        self._more = bool(event.get("more_body", False))
        if body:
            # Over the request's bound, or beyond the process' budget: queue what we have,
            # this chunk included (it is already in memory: dropping it would lose it).
            self._full = self._size + len(body) >= self._limit
            if not self._budget.charge(len(body)):
                self._full = True
            self._chunks.append(body)
            self._size += len(body)
        return self.wanted

    def event(self) -> dict[str, Any]:
        """The ``http.request`` event with all the body read so far."""
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = [body]
        return {"type": "http.request", "body": body, "more_body": self._more}

    def release(self) -> None:
        """Give the buffered bytes back to the budget."""
        self._budget.give_back(self._size)
        self._size = 0
        self._chunks = []


async def receive_within(receive: Receive, timeout: float | None) -> Message:
    """``await receive()``, raising ``BodyIdle`` if nothing came within ``timeout`` seconds.

    A timer rather than ``wait_for()``, which costs a task per call before Python 3.12. The
    timer cancels this task: ASGI servers' ``receive()`` keeps what it has not returned, so
    a cancelled call loses nothing.
    """
    if timeout is None:
        return await receive()
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await receive()
    except asyncio.CancelledError:
        # Ours only if nobody else cancelled the task too (Task.uncancel is 3.11+).
        uncancel = getattr(task, "uncancel", None)
        if expired and (uncancel is None or uncancel() == 0):
            raise BodyIdle(f"no part of the request body came within {timeout:g} seconds") from None
        raise
    finally:
        handle.cancel()
