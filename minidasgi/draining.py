"""Reading and discarding a request body nobody read, while the response's end is sent.

A response may end while its client is still uploading: the app answered without reading
the body (or read only part of it), or the distributor refused the request (413, 404, the
no-worker answer). uvicorn discards such a body itself. hypercorn hands the body to the app
through a queue of ``max_app_queue_size`` events (10) and stops reading the socket while it
is full; over HTTP/1.1 it keeps the connection only if the request was read to its end when
the response ends, else it closes it. Its last step, putting ``http.disconnect`` in that
queue, waits for room: with the queue full and nobody reading, the app's last ``send`` (or,
after an app's exception, hypercorn's own clean-up) never returns and the connection is
stuck.

So the response's final message is sent at once, never waiting for the upload, while a
background task reads and discards the body (``send_draining``, ``read_in_background``):
hypercorn's queue always has room, and it closes the connection of a request not read to
its end (a client still uploading may see its response or a reset, never a hang). The
reader stops at the body's end, at ``http.disconnect`` (uvicorn answers that at once once
the response is complete), or after ``DRAIN_TIME`` seconds, whichever is first.
"""

from __future__ import annotations

import asyncio
import logging

from .asgi import Message, Receive, Send

__all__ = ["DRAIN_TIME", "drain", "read_in_background", "send_draining"]

logger = logging.getLogger(__name__)

DRAIN_TIME = 10.0
"""Seconds a background reader reads an unread body at most. A bound in time, not in
bytes: it holds nothing but the reader (never the response), and bytes cost only as fast as
the client sends them."""

# The readers running: the loop keeps only weak references to its tasks.
_readers: set[asyncio.Task[bool]] = set()


async def drain(receive: Receive, seconds: float = DRAIN_TIME) -> bool:
    """Read and discard the request's body until its end or a disconnect (True), or until
    ``seconds`` passed (False)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while True:
        remaining = until - loop.time()
        if remaining <= 0:
            return False
        try:
            event = await asyncio.wait_for(receive(), remaining)
        except asyncio.TimeoutError:
            return False
        if event.get("type") != "http.request" or not event.get("more_body", False):
            return True


def _reader_done(task: asyncio.Task[bool]) -> None:
    _readers.discard(task)
    if not task.cancelled() and task.exception() is not None:  # retrieved: never unlogged
        logger.debug("reading an unread request body failed: %r", task.exception())


def read_in_background(receive: Receive) -> None:
    """Read and discard the rest of the request's body in a task of its own, bounded by
    ``DRAIN_TIME``: nothing waits for it."""
    reader = asyncio.ensure_future(drain(receive))
    _readers.add(reader)
    reader.add_done_callback(_reader_done)


async def send_draining(receive: Receive, send: Send, event: Message) -> None:
    """Send ``event``, the response's final message, at once, for a request whose body was
    not all received: its rest is read and discarded meanwhile (``read_in_background``), so
    that the server's queue of body events never holds the send. The response's start was
    sent before: under uvicorn, a ``receive`` then never says "100 Continue"."""
    read_in_background(receive)
    await send(event)
