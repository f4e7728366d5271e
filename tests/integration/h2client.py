"""A minimal HTTP/2 client over cleartext (h2c, prior knowledge) on the ``h2`` library.

httpx speaks HTTP/2 but hides what these tests look at: trailers, 103 informational
responses and whether the stream ended cleanly (END_STREAM) or was reset or left open.
One request per connection; every read is bounded by ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    informational: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    ended: bool = False  # the stream ended cleanly (END_STREAM), not reset, not left open
    reset: bool = False
    headers_after: float = 0.0  # seconds from the request to the response headers


async def h2_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    timeout: float = 10.0,
    headers_seen: asyncio.Event | None = None,
    body: bytes = b"",
) -> H2Response:
    """Send one request with ``te: trailers`` and read the response until its stream ends,
    is reset, or ``timeout`` seconds pass (then ``ended`` stays False). ``headers_seen`` is
    set once the response headers are read. ``body`` is uploaded as the server's flow
    control lets it, while the response is read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    connection.initiate_connection()
    request = [
        (":method", method),
        (":scheme", "http"),
        (":authority", f"127.0.0.1:{port}"),
        (":path", path),
        ("te", "trailers"),
        *(headers or []),
    ]
    stream = connection.get_next_available_stream_id()
    connection.send_headers(stream, request, end_stream=not body)
    to_send = memoryview(body)
    sent_at = time.monotonic()
    writer.write(connection.data_to_send())
    response = H2Response()
    deadline = sent_at + timeout
    try:
        while not (response.ended or response.reset):
            while to_send:  # as much of the body as the server's window takes
                size = min(
                    connection.local_flow_control_window(stream),
                    connection.max_outbound_frame_size,
                    len(to_send),
                )
                if size <= 0:
                    break
                connection.send_data(stream, bytes(to_send[:size]), end_stream=size == len(to_send))
                to_send = to_send[size:]
            writer.write(connection.data_to_send())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), remaining)
            except asyncio.TimeoutError:
                break
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.InformationalResponseReceived):
                    response.informational.append(list(event.headers))
                elif isinstance(event, h2.events.ResponseReceived):
                    response.headers_after = time.monotonic() - sent_at
                    if headers_seen is not None:
                        headers_seen.set()
                    for name, value in event.headers:
                        if name == b":status":
                            response.status = int(value)
                        else:
                            response.headers.append((name, value))
                elif isinstance(event, h2.events.DataReceived):
                    response.body += event.data
                    connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.TrailersReceived):
                    response.trailers.extend(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    response.ended = True
                elif isinstance(event, h2.events.StreamReset):
                    response.reset = True
            writer.write(connection.data_to_send())
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)
    return response
