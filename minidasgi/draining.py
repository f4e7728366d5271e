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
the response is complete), or ``DRAIN_TIME`` seconds after that send returned, whichever is
first. While the send waits (a client that reads nothing: over HTTP/2 its flow-control
window shut) the reader goes on, for as long as the send, as a server waiting on the same
client would: stopped, it let hypercorn's queue fill, hypercorn stopped reading the
connection, never saw the client read again, and the send and the connection were stuck
for good. What bounds that send: for a relayed response, ``response_timeout`` if it is set
(its deadline ends the send, and the reader then goes on for ``DRAIN_TIME``); with it unset,
and for the distributor's own refusals (404, 405, 413, 503...) always, nothing in minidasgi:
the send lasts until the client reads or goes away (hypercorn ends it when the client
closes or resets the stream or the connection), as the same send of a directly served app
would. A client that keeps its window shut and the connection open holds that send, and
the reader, as long as it likes.

Over HTTP/2 a refusal with no ``Content-Length`` starts the reader too (``_may_have_body``
in the distributor): hypercorn gives no sign of a body in the scope, and a stream whose body
the client is still sending fills that queue as over HTTP/1.1; worse, hypercorn's reading of
the whole connection (every stream on it) waits for room there. For a bodiless request the
reader takes the body's end hypercorn has queued already and stops at once.
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


async def drain(
    receive: Receive, seconds: float | None = None, *, sending: asyncio.Future[None] | None = None
) -> bool:
    """Read and discard the request's body until its end or a disconnect (True), or until
    ``seconds`` (``DRAIN_TIME``) passed (False), counted from the end of ``sending`` (the
    response's final send) if one is given."""
    loop = asyncio.get_running_loop()
    while sending is not None and not sending.done():
        # No bound in time while the final send waits (for a client that reads nothing, as
        # long as it does): stopped then, the reader would let hypercorn's queue fill, and
        # hypercorn, reading the connection no more, would never see the client read again
        # (an HTTP/2 WINDOW_UPDATE, a close), nor finish the send. Bounded by the send.
        getter = asyncio.ensure_future(receive())
        try:
            await asyncio.wait((getter, sending), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()  # a queue's get, cancelled, loses nothing
                await asyncio.wait((getter,))
        if getter.cancelled():
            break
        if _last(getter.result()):
            return True
    until = loop.time() + (DRAIN_TIME if seconds is None else seconds)
    while True:
        remaining = until - loop.time()
        if remaining <= 0:
            return False
        try:
            event = await asyncio.wait_for(receive(), remaining)
        except asyncio.TimeoutError:
            return False
        if _last(event):
            return True


def _last(event: Message) -> bool:
    """Whether nothing comes after ``event``: the body's end, or a disconnect."""
    return event.get("type") != "http.request" or not event.get("more_body", False)


def _reader_done(task: asyncio.Task[bool]) -> None:
    _readers.discard(task)
    if not task.cancelled() and task.exception() is not None:  # retrieved: never unlogged
        logger.debug("reading an unread request body failed: %r", task.exception())


def read_in_background(receive: Receive, sending: asyncio.Future[None] | None = None) -> None:
    """Read and discard the rest of the request's body in a task of its own, bounded by
    ``DRAIN_TIME`` (from the end of ``sending``, if given): nothing waits for it."""
    reader = asyncio.ensure_future(drain(receive, sending=sending))
    _readers.add(reader)
    reader.add_done_callback(_reader_done)


async def send_draining(receive: Receive, send: Send, event: Message) -> None:
    """Send ``event``, the response's final message, at once, for a request whose body was
    not all received: its rest is read and discarded meanwhile (``read_in_background``), so
    that the server's queue of body events never holds the send. The response's start was
    sent before: under uvicorn, a ``receive`` then never says "100 Continue"."""
    sending = asyncio.get_running_loop().create_future()
    read_in_background(receive, sending)
    try:
        await send(event)
    finally:
        sending.set_result(None)
