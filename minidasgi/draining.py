"""Reading and discarding a request body nobody read, so that the server can reuse the
connection.

A response may end while its client is still uploading: the app answered without reading
the body (or read only part of it), or the distributor refused the request (413, 404, the
no-worker answer). uvicorn drops such a body itself. hypercorn hands the body to the app
through a queue of ``max_app_queue_size`` events (10) and stops reading the socket while it
is full; and over HTTP/1.1 it keeps the connection only if the request was read to its end
when the response ends, else it closes it (a reset, which can take the response with it,
for a client still uploading). Its last step, putting ``http.disconnect`` in that queue,
waits for room: with the queue full and nobody reading, the app's last ``send`` never
returns and the connection is stuck.

So the response's final message is sent only once the body was read to its end (``drain``),
within ``DRAIN_TIME`` seconds; past that bound, or for a ``100-continue`` request whose body
nobody asked for, it is sent while the body is read, which can never hold the send (the
server closes the connection then). This module never sends anything but the message it is
given, and never calls ``receive`` once that message is sent.
"""

from __future__ import annotations

import asyncio

from .asgi import Message, Receive, Send

__all__ = ["DRAIN_TIME", "drain", "send_draining"]

DRAIN_TIME = 10.0
"""Seconds an unread body is read for before the response's end is sent anyway. A bound in
time, not in bytes: bytes cost only as fast as the client sends them, and a bound in bytes
would cut a large upload refused at once (a 413 for a 100 MiB body, say) that a fast client
finishes well within it."""


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


async def send_draining(
    receive: Receive, send: Send, event: Message, *, asked: bool = True
) -> None:
    """Send ``event``, the response's final message, for a request whose body was not all
    received: once the body was read to its end, so that the server may keep the connection.

    ``asked``: False for a request that expects ``100 Continue`` and whose body nobody
    asked for: it is not waited for (the client may be waiting for the 100, which a server
    must not send once the response started; uvicorn answers a ``receive`` then with
    ``http.disconnect`` at once). Then, as past ``DRAIN_TIME``, ``event`` is sent while the
    body is read (hypercorn sent the 100 itself as the request came: the client uploads),
    and the reading stops once it is sent."""
    if asked and await drain(receive):
        await send(event)
        return
    reading = asyncio.ensure_future(drain(receive))
    try:
        await send(event)
    finally:
        reading.cancel()  # done with it at its next step: nothing awaits it
