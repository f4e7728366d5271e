"""A direct Node -> distributor TCP connection for the rest of a large response body.

Owns the link: its offer text (``host:port:token``, the envelope's optional ``link`` field),
its handshake and frames (sans-I/O helpers, each bounded), the distributor's listener
(``LinkListener``) and reader of one link (``LinkReader``), and the Node's writer
(``LinkWriter``, opened by ``open_link``). Redis stays the rendezvous: the headers and the
first body piece go through it, then the Node opens a link, publishes a marker event through
Redis ("the body continues on the link") and writes every later body chunk, the last one
included, as frames on the link. One link per response, closed after its last frame: the
marker and the frames never race, and nothing after the marker needs Redis.

The request body goes the other way on an upload link (``UPLOAD_MAGIC``, ``open_upload``,
``UploadSender``, ``UploadReceiver``): a connection of its own, opened by the Node too (the side
that can connect) at its app's first ``receive()`` when the body has more to come. The listener
gives it at once to its exchange (``on_upload``), which writes frames on it; the Node reads
none until a marker through Redis says so. The distributor's pump sends that marker at a piece
boundary once the link is taken, under credit and behind every piece sent through Redis before
it, then every later piece, the last included, as frames: the Node reads its inbox in order,
so nothing is lost, repeated or reordered. A link refused, not opened, or lost before the
marker leaves the body on Redis; one lost after it fails the request (it cannot be sent
again). A separate connection rather than the download's: each direction keeps its own
simple state machine (and a request may use both), and an older distributor refuses the
upload's magic as any unknown handshake, so an upload never rides on one that cannot read it.

Theory of operation, and what it must never do:

- The link is untrusted input, as Redis is. A connection must send a fixed-size handshake
  (``HANDSHAKE_SIZE``) within ``HANDSHAKE_TIMEOUT``, naming the distributor's token (compared
  in constant time) and a request id the distributor relays now; else it is closed. At most
  ``MAX_HANDSHAKING`` handshakes are read at once and ``MAX_WAITING`` links wait for their
  request's marker: beyond, a connection is closed at once (logged at most once per
  ``_REFUSAL_LOG_INTERVAL``). Frames are bounded (``MAX_FRAME``).
- Never hang: the Node's connect and handshake are bounded (``CONNECT_TIMEOUT``); both ends set
  TCP keepalive, the reading end ``TCP_USER_TIMEOUT`` too (never the writing end, the Node's
  on a download link, the distributor's on an upload link: Linux applies it to the zero
  window a slow client or a pausing app causes; liveness through Redis bounds it while the
  job and the exchange run, and after a download's job ``TAIL_STALL`` without progress drops
  what is left to write); the
  Node writes heartbeat frames while the body is idle, and the reader has a silence
  watchdog (one timer per half ``peer_timeout``), paused while the reader itself holds back
  reading for a slow client.
- Memory is bounded: a reader stops reading at ``READ_HIGH`` bytes handed on and not yet
  consumed, a frame is handed on in pieces of at most ``PIECE`` (the reader's only buffer),
  and the writer awaits ``drain()``. All the links of a listener share ``READ_BUDGET``, each
  with a share of its own, so that slow clients holding what their links handed on can never
  starve another link: with ``n`` links taken, a link that holds less than ``PIECE`` always
  reads on (its share: every link, a new one too, gets at least a piece at a time); one that
  holds more reads on, up to ``READ_HIGH``, only while the listener's total is below
  ``READ_BUDGET - n * PIECE`` (``LinkListener.high``), room kept for every link's share.
  Bound: the total unread is below ``READ_BUDGET + PIECE + 2 * n * PIECE`` (a link reads on
  past its share only below that mark, by a piece at most; else only from below a piece, to
  below two), plus one ``PIECE`` buffer per link. An accepted link waits for its exchange
  at most ``WAIT_TIMEOUT``.
- After its last frame the Node's job waits (``LinkWriter.linger``, at most ``LINGER``) for
  the distributor to close the link: a graceful stop waits for the response's tail.
- An upload link's flow control is TCP's: the distributor awaits room (its transport below
  ``_WRITE_HIGH``) after each frame, before reading more from its client; the Node reads a
  frame, in pieces of at most ``PIECE``, only when its app asks, so its buffer is a piece at
  most. The distributor writes a heartbeat when it wrote nothing for its liveness interval (a
  slow client); the Node times silence only while its app waits for the body. The Node
  writes nothing after its handshake but ``UPLOAD_DONE`` (its app ended before the body's
  end: not a break); anything else breaks the link. At most ``MAX_UPLOADS`` per listener.
- It never imports the distributor or the Node: each side passes it plain callbacks.
- The token is a secret: never logged, never in a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

__all__ = [
    "CONNECT_TIMEOUT",
    "FRAME_HEADER",
    "HANDSHAKE_SIZE",
    "HANDSHAKE_TIMEOUT",
    "HEARTBEAT",
    "LAST",
    "LINGER",
    "MAX_FRAME",
    "MAX_HANDSHAKING",
    "MAX_UPLOADS",
    "MAX_WAITING",
    "MORE",
    "PIECE",
    "READ_BUDGET",
    "READ_HIGH",
    "TAIL_STALL",
    "TOKEN_SIZE",
    "UPLOAD_FROM",
    "UPLOAD_MAGIC",
    "WAIT_TIMEOUT",
    "LinkError",
    "LinkListener",
    "LinkReader",
    "LinkRefused",
    "LinkWriter",
    "UploadReceiver",
    "UploadSender",
    "open_link",
    "open_upload",
    "pack_frame_header",
    "pack_handshake",
    "parse_frame_header",
    "parse_handshake",
    "parse_offer",
]

logger = logging.getLogger("minidasgi.link")

MAGIC: Final = b"MDL1"
UPLOAD_MAGIC: Final = b"MDU1"
"""An upload link's handshake starts so (the same size and fields as a download's): a
distributor that takes none refuses it as "not a link handshake", and the Node uses Redis."""
TOKEN_SIZE: Final = 32
_ID_FIELD: Final = 64  # a request id is at most 64 ASCII characters (``wire.Envelope``)
HANDSHAKE_SIZE: Final = len(MAGIC) + TOKEN_SIZE + 1 + _ID_FIELD  # 101
FRAME_HEADER: Final = struct.Struct(">IB")  # the body's length, then its kind
LAST: Final = 0  # the response's last body
MORE: Final = 1  # a body, more to come
HEARTBEAT: Final = 2  # nothing: the Node is there (length 0)
ACCEPTED: Final = b"\x01"
"""The listener's one byte back once a handshake is taken: a Node that does not get it
(refused: too many links, a request not relayed there) sends its body through Redis."""
MAX_FRAME: Final = 16 * 1024 * 1024
HANDSHAKE_TIMEOUT: Final = 2.0
CONNECT_TIMEOUT: Final = 2.0
MAX_HANDSHAKING: Final = 64
MAX_WAITING: Final = 256
READ_HIGH: Final = 4 * 1024 * 1024
READ_BUDGET: Final = 64 * 1024 * 1024
"""Bytes handed on and not yet consumed across all the links of one listener, each link's
share kept (``PIECE`` each): a link holding a piece or more pauses its reading (and its
watchdog) once the total reaches the budget less every link's share, until it is below again
(as the credit pool bounds what comes through Redis); a link holding less always reads on."""
PIECE: Final = 1024 * 1024
"""A frame's body is handed on in pieces of at most this size: the reader's buffer (kept from
frame to frame) never exceeds it, whatever a frame's size (up to ``MAX_FRAME``)."""
WAIT_TIMEOUT: Final = 10.0
"""Seconds at most an accepted link waits for its exchange to take it (its marker, published
by the Node right after the handshake's answer, one Redis round trip later): then closed, its
slot freed (a Node that died in between, a marker lost, an exchange that ended first)."""
LINGER: Final = 10.0
"""Seconds at most the Node's job waits, after its last frame, for the distributor to close
the link (it does once it has read that frame): the job, and so a graceful stop, waits."""
TAIL_STALL: Final = 30.0
"""Seconds the Node keeps a link whose job ended with frames still to write (``linger`` ran
out: a slow client) while none of them leaves: then dropped (a distributor frozen or gone).
The distributor's end of an upload link likewise, once its exchange ended (a Node frozen)."""
UNREACHABLE_FOR: Final = 30.0
"""Seconds a Node remembers an offered address it could not reach (it uses Redis meanwhile)."""
UPLOAD_DONE: Final = b"\x02"
"""The one byte a Node ever writes on an upload link after its handshake: its app ended
before the body's end (its answer comes through Redis). Anything else breaks the link."""
FINISH_TIMEOUT: Final = 2.0
"""Seconds at most a Node waits, after ``UPLOAD_DONE``, for the distributor to drop the link."""
UPLOAD_FROM: Final = 2 * 1024 * 1024
"""A request body that declares fewer bytes (``content-length``) never takes an upload link:
it would cost a connection to spare a few PUBLISHes (a chunked one, of unknown size, does)."""
MAX_UPLOADS: Final = 256
"""Upload links open at most on one listener: beyond, a Node's is refused (Redis then)."""
_REFUSAL_LOG_INTERVAL: Final = 10.0
_WRITE_HIGH: Final = 1024 * 1024  # the Node's transport buffer before ``drain`` waits
_KEEPIDLE, _KEEPINTVL, _KEEPCNT = 5, 2, 3
_USER_TIMEOUT_MS: Final = (_KEEPIDLE + _KEEPINTVL * _KEEPCNT) * 1000


class LinkError(ValueError):
    """A handshake, frame or offer that breaks the link's format."""


class LinkRefused(ConnectionError):
    """The listener was reached but closed the link without taking it (its limits, a
    request it does not relay, a reset): the address works, only this link is refused."""


def make_offer(host: str, port: int, token: bytes) -> str:
    """The envelope's ``link`` text for a listener at ``host:port`` with ``token``."""
    return f"{host}:{port}:{token.hex()}"


def parse_offer(text: Any) -> tuple[str, int, bytes] | None:
    """``(host, port, token)`` of an offer, or None if it is not one (untrusted input)."""
    if type(text) is not str or len(text) > 400:
        return None
    host, sep, rest = text.rpartition(":")
    host, sep2, port_text = host.rpartition(":")
    if not (sep and sep2 and host and port_text.isdigit() and len(port_text) <= 5):
        return None
    port = int(port_text)
    if not 0 < port < 65536 or len(rest) != 2 * TOKEN_SIZE:
        return None
    try:
        token = bytes.fromhex(rest)
    except ValueError:
        return None
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address in brackets
        host = host[1:-1]
    return host, port, token


def pack_handshake(token: bytes, request_id: str, magic: bytes = MAGIC) -> bytes:
    """The Node's first bytes on a link: magic (``UPLOAD_MAGIC`` for an upload link), token,
    the request id's length and the id, padded to ``HANDSHAKE_SIZE``."""
    raw = request_id.encode("ascii")
    if len(token) != TOKEN_SIZE or not 0 < len(raw) <= _ID_FIELD:
        raise LinkError("a link handshake needs a 32-byte token and an id of 1-64 characters")
    return magic + token + bytes([len(raw)]) + raw.ljust(_ID_FIELD, b"\0")


def parse_handshake(data: bytes, token: bytes, magic: bytes = MAGIC) -> str:
    """The request id of a handshake carrying ``token`` (and ``magic``: ``UPLOAD_MAGIC`` for
    an upload link's); ``LinkError`` otherwise."""
    if len(data) != HANDSHAKE_SIZE or not data.startswith(magic):
        raise LinkError("not a link handshake")
    start = len(MAGIC)
    if not hmac.compare_digest(data[start : start + TOKEN_SIZE], token):
        raise LinkError("wrong link token")
    start += TOKEN_SIZE
    size = data[start]
    raw = data[start + 1 : start + 1 + size]
    if not 0 < size <= _ID_FIELD or data[start + 1 + size :].strip(b"\0"):
        raise LinkError("malformed request id in a link handshake")
    try:
        request_id = raw.decode("ascii")
    except UnicodeDecodeError:
        raise LinkError("malformed request id in a link handshake") from None
    if not request_id.isprintable():
        raise LinkError("malformed request id in a link handshake")
    return request_id


def pack_frame_header(size: int, kind: int) -> bytes:
    return FRAME_HEADER.pack(size, kind)


def parse_frame_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(size, kind)`` of a frame's header; ``LinkError`` for an unknown kind or a size over
    ``MAX_FRAME`` (or a heartbeat with a body)."""
    size, kind = FRAME_HEADER.unpack(data)
    if kind not in (LAST, MORE, HEARTBEAT) or size > MAX_FRAME or (kind == HEARTBEAT and size):
        raise LinkError(f"malformed link frame header (kind {kind}, size {size})")
    return size, kind


def tune_socket(sock: Any, *, user_timeout: bool = True) -> None:
    """TCP_NODELAY, keepalive in seconds and (``user_timeout``) TCP_USER_TIMEOUT where the
    platform has them. Never TCP_USER_TIMEOUT on the Node's writing end: Linux (5.11 on)
    applies it to a zero receive window too, and the distributor's reader holds the window
    shut for as long as a slow client reads nothing (the Node's kernel would then reset a
    healthy link after 11 s). The Node's liveness checks through Redis bound that end."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = [
        ("TCP_KEEPIDLE", _KEEPIDLE),
        ("TCP_KEEPINTVL", _KEEPINTVL),
        ("TCP_KEEPCNT", _KEEPCNT),
    ]
    if user_timeout:
        options.append(("TCP_USER_TIMEOUT", _USER_TIMEOUT_MS))
    for name, value in options:
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def clear_user_timeout(sock: Any) -> None:
    """Take TCP_USER_TIMEOUT off a socket ``tune_socket`` set it on: an end that writes to a
    peer which may rightly read nothing for a while (a zero window, which Linux times out by
    TCP_USER_TIMEOUT too) is bounded otherwise. Keepalive stays."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is not None and option is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, 0)


OnFrame = Callable[[bytes, bool], None]
OnEnd = Callable[[str], None]


class LinkReader(asyncio.BufferedProtocol):
    """One accepted link, on the distributor: reads the handshake, then, once its exchange
    takes it (``LinkListener.take``), body frames handed to ``on_frame(body, more)``. A link
    that breaks, or a malformed frame, calls ``on_lost(why)``; silence past the watchdog,
    ``on_silent(why)``. Neither is called after the last frame, nor after ``close``."""

    def __init__(self, listener: LinkListener) -> None:
        self._listener = listener
        self.transport: asyncio.Transport | None = None
        self.request_id = ""
        self._state = "handshake"  # handshake, waiting, header, body, done, closed
        # What is being read: ``_view`` (the handshake, a header, or a body within
        # ``_bodies``, kept from frame to frame: a fresh buffer per frame is a fresh mapping,
        # and page faults, for each), ``_filled`` bytes of it so far.
        self._view = memoryview(bytearray(HANDSHAKE_SIZE))
        self._header_view = memoryview(bytearray(FRAME_HEADER.size))
        self._bodies = memoryview(bytearray(0))
        self._filled = 0
        self._kind = MORE
        self._remaining = 0  # of the frame's body, not yet handed on
        self._timer: asyncio.TimerHandle | None = None
        self._on_frame: OnFrame | None = None
        self._on_lost: OnEnd | None = None
        self._on_silent: OnEnd | None = None
        self._unread = 0  # bytes handed on, not yet consumed by the exchange
        self._paused = False
        self._heard = True
        self.bytes = 0

    def __repr__(self) -> str:
        return f"<LinkReader {self.request_id or '?'} {self._state}>"

    # -- asyncio's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an ``isinstance`` check: uvloop's transports are not ``asyncio.Transport``s.
        self.transport = cast(asyncio.Transport, transport)
        if self._state == "closed":  # refused as it was accepted (``LinkListener._accept``)
            self.transport.abort()
            return
        tune_socket(transport.get_extra_info("socket"))
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_late)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._heard = True
        self._filled += nbytes
        if self._filled < len(self._view):
            return
        state = self._state
        if state == "handshake":
            self._handshake_done()
        elif state == "header":
            try:
                size, kind = parse_frame_header(self._view)
            except LinkError as exc:
                self._lost(str(exc))
                return
            if kind == HEARTBEAT:
                self._filled = 0
                return
            self._kind = kind
            if size == 0:  # an empty body (the app may send one): the next header follows
                self._header()
                self._frame(b"", kind == MORE)
                return
            self._state = "body"
            self._remaining = size
            self._body_view()
        elif state == "body":
            body = bytes(self._view)
            self._remaining -= len(body)
            if self._remaining:  # a piece of a frame over ``PIECE``: more of it follows
                self._body_view()
                self._frame(body, True)
                return
            self._header()
            self._frame(body, self._kind == MORE)

    def eof_received(self) -> bool | None:
        return False  # close: whatever the state, a link ends by its last frame

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self._listener
        listener.forget(self)
        if self._state in ("done", "closed"):
            self._state = "closed"
            self._stop_timer()
            return
        if self._state in ("header", "body"):
            self._lost("the worker's link broke" + (f" ({exc})" if exc else ""))
        else:
            self._state = "closed"
            self._stop_timer()

    # -- the handshake
    def _handshake_late(self) -> None:
        self._timer = None
        if self._state == "handshake":
            self._listener.refused("a link handshake did not come in time")
            self.close()

    def _handshake_done(self) -> None:
        self._stop_timer()
        self._listener.handshaken(self)
        if bytes(self._view[: len(UPLOAD_MAGIC)]) == UPLOAD_MAGIC:  # the other direction
            self._listener.upload_arrived(self, bytes(self._view))
            return
        try:
            request_id = parse_handshake(bytes(self._view), self._listener.token)
        except LinkError as exc:
            self._listener.refused(str(exc))
            self.close()
            return
        self.request_id = request_id
        self._state = "waiting"
        assert self.transport is not None
        self.transport.pause_reading()  # nothing is read before the exchange takes it
        self._listener.arrived(self)

    def accepted(self) -> None:
        """Tell the Node its handshake was taken."""
        if self.transport is not None:
            self.transport.write(ACCEPTED)

    def wait_for_take(self, timeout: float) -> None:
        """Held until its exchange takes it: closed if that does not happen in ``timeout``
        seconds (its reading is paused, so a Node's FIN is not seen meanwhile)."""
        self._stop_timer()
        self._timer = asyncio.get_running_loop().call_later(timeout, self._not_taken)

    def _not_taken(self) -> None:
        self._timer = None
        if self._state == "waiting":
            self._listener.refused("a link's request did not take it in time")
            self._listener.forget(self)
            self.close()

    # -- the exchange's side
    def attach(
        self,
        on_frame: OnFrame,
        on_lost: OnEnd,
        on_silent: OnEnd,
        peer_timeout: float,
        heartbeat: float = 0.0,
    ) -> None:
        """Hand the frames to their exchange from now on. The watchdog ticks every half
        ``peer_timeout``, or every two ``heartbeat`` intervals (the Node's, the distributor's
        ``liveness_interval``) if longer: a tick always spans a heartbeat, so settings the
        liveness checks take never make it kill a healthy link whose app pauses."""
        self._on_frame, self._on_lost, self._on_silent = on_frame, on_lost, on_silent
        if self._state != "waiting":
            return
        self._stop_timer()
        self._header()
        self._watch_every = max(peer_timeout / 2, 2 * heartbeat, 0.05)
        self._heard = True
        self._timer = asyncio.get_running_loop().call_later(self._watch_every, self._watch)
        assert self.transport is not None
        self.transport.resume_reading()

    def consumed(self, size: int) -> None:
        """The exchange sent ``size`` bytes of what it was handed: read on if held back."""
        if self._state == "closed":  # its unread was given back to the listener then
            return
        self._unread -= size
        self._listener.consumed(size)
        self.resume()

    def resume(self) -> None:
        """Read on if held back and both this link's bound and its share of the listener's
        budget allow."""
        if not self._paused or self._unread >= READ_HIGH or self.transport is None:
            return
        listener = self._listener
        if self._unread >= PIECE and listener.unread >= listener.high:
            listener.starved.add(self)  # resumed by whichever link brings the total below
            return
        self._paused = False
        listener.starved.discard(self)
        self._heard = True  # the pause's silence is the client's, not the Node's
        if self._state in ("header", "body"):
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the link (its exchange ended, or the link broke); no callback after this."""
        if self._state != "done":
            self._state = "closed"
        self._on_frame = self._on_lost = self._on_silent = None
        self._stop_timer()
        if self._unread:  # what its exchange will never consume: back to the budget
            self._listener.consumed(self._unread)
            self._unread = 0
        self._listener.starved.discard(self)
        if self.transport is not None:
            self.transport.abort()

    # -- frames
    def _header(self) -> None:
        self._state = "header"
        self._view = self._header_view
        self._filled = 0

    def _body_view(self) -> None:
        size = min(self._remaining, PIECE)
        if len(self._bodies) < size:
            self._bodies = memoryview(bytearray(size))
        self._view = self._bodies[:size]
        self._filled = 0

    def _frame(self, body: bytes, more: bool) -> None:
        size = len(body)
        self.bytes += size
        listener = self._listener
        listener.count_bytes(size)
        self._unread += size
        listener.unread += size
        on_frame = self._on_frame
        if not more:
            self._state = "done"
            self._stop_timer()
            if self.transport is not None:
                self.transport.close()
        elif (
            (
                self._unread >= READ_HIGH
                or (self._unread >= PIECE and listener.unread >= listener.high)
            )
            and not self._paused
            and self.transport is not None
        ):
            self._paused = True
            if self._unread < READ_HIGH:  # held back by the budget: resumed by any link
                listener.starved.add(self)
            self.transport.pause_reading()
        if on_frame is not None:
            on_frame(body, more)

    def _lost(self, why: str) -> None:
        on_lost = self._on_lost
        self.close()
        if on_lost is not None:
            on_lost(why)

    def _watch(self) -> None:
        self._timer = None
        if self._state not in ("header", "body"):
            return
        if not self._heard and not self._paused:
            on_silent = self._on_silent
            self.close()
            if on_silent is not None:
                on_silent(f"nothing heard on the worker's link for {self._watch_every:g} s")
            return
        self._heard = False
        self._timer = asyncio.get_running_loop().call_later(self._watch_every, self._watch)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LinkListener:
    """The distributor's listener: accepts links, checks their handshakes, holds each until
    its exchange takes it (``take``) or ends (``discard``). ``known(request_id)`` says
    whether a request id is one this distributor relays now."""

    def __init__(
        self,
        host: str,
        port: int,
        token: bytes,
        known: Callable[[str], bool],
        *,
        on_bytes: Callable[[int], None] | None = None,
        on_upload: Callable[[str, UploadSender], bool] | None = None,
        upload_heartbeat: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self._known = known
        self._on_bytes = on_bytes
        self._server: asyncio.AbstractServer | None = None
        self._handshaking: set[LinkReader] = set()
        self._waiting: dict[str, LinkReader] = {}  # handshaken, not yet taken
        self._taken: dict[str, LinkReader] = {}
        self._expected: dict[
            str, tuple[OnFrame, OnEnd, OnEnd, float, float, asyncio.TimerHandle]
        ] = {}
        self._refusal_logged = -_REFUSAL_LOG_INTERVAL
        self.refusals = 0
        self.budget = READ_BUDGET
        self.unread = 0  # handed on by all its links, not yet consumed (``READ_BUDGET``)
        # A link holding a piece or more reads on only while ``unread`` is below this: the
        # budget less a share (``PIECE``) for every link taken (``_share``).
        self.high = READ_BUDGET
        self.starved: set[LinkReader] = set()  # paused by the budget alone
        self.wait_timeout = WAIT_TIMEOUT
        # Upload links (``UPLOAD_MAGIC``): ``on_upload(request_id, sender)`` gives one to its
        # exchange (False: refused), taken at once or never; none without it.
        self._on_upload = on_upload
        self._uploads: set[UploadSender] = set()
        self.max_uploads = MAX_UPLOADS
        self.upload_heartbeat = upload_heartbeat

    def __repr__(self) -> str:
        return f"<LinkListener {self.host}:{self.port} waiting={len(self._waiting)}>"

    async def start(self) -> None:
        """Bind and listen (``port`` 0: an ephemeral one, then known as ``port``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, self.host, self.port, backlog=128)
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening and close every link."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for reader in [*self._handshaking, *self._waiting.values(), *self._taken.values()]:
            reader.close()
        for expected in self._expected.values():
            expected[-1].cancel()
        for sender in list(self._uploads):
            sender.abort()
        self._uploads.clear()
        self._handshaking.clear()
        self._waiting.clear()
        self._taken.clear()
        self._expected.clear()

    def _accept(self) -> LinkReader:
        reader = LinkReader(self)
        if len(self._handshaking) >= MAX_HANDSHAKING:
            reader._state = "closed"  # closed as soon as connected
            self.refused(f"more than {MAX_HANDSHAKING} link handshakes in progress")
            return reader
        self._handshaking.add(reader)
        return reader

    def handshaken(self, reader: LinkReader) -> None:
        self._handshaking.discard(reader)

    def upload_arrived(self, reader: LinkReader, handshake: bytes) -> None:
        """An upload link's handshake came on ``reader``'s connection: its exchange takes it
        now (``on_upload``), the connection then an ``UploadSender``'s, or it is refused
        (closed unanswered: the Node's body goes on through Redis)."""
        try:
            request_id = parse_handshake(handshake, self.token, UPLOAD_MAGIC)
        except LinkError as exc:
            self.refused(str(exc))
            reader.close()
            return
        if self._on_upload is None:
            self.refused("an upload link, which this listener does not take")
            reader.close()
            return
        if len(self._uploads) >= self.max_uploads:
            self.refused(f"more than {self.max_uploads} upload links")
            reader.close()
            return
        sender = UploadSender(self, request_id, self.upload_heartbeat)
        if reader.transport is None or not self._on_upload(request_id, sender):
            self.refused("an upload link for a request not relayed here, or not streaming")
            reader.close()
            return
        reader._state = "closed"  # no longer its protocol: ``adopt`` swaps it out
        self._uploads.add(sender)
        sender.adopt(reader.transport)

    def upload_gone(self, sender: UploadSender) -> None:
        self._uploads.discard(sender)

    def arrived(self, reader: LinkReader) -> None:
        """A handshake named ``reader.request_id``: give it to its exchange, or hold it."""
        request_id = reader.request_id
        if not self._known(request_id):
            self.refused("a link for a request not relayed here")
            reader.close()
            return
        if request_id in self._waiting or request_id in self._taken:
            self.refused("a second link for one request")
            reader.close()
            return
        expected = self._expected.pop(request_id, None)
        if expected is not None:
            expected[-1].cancel()
            self._taken[request_id] = reader
            self._share()
            reader.accepted()
            reader.attach(*expected[:-1])
            return
        if len(self._waiting) >= MAX_WAITING:
            self.refused(f"more than {MAX_WAITING} links waiting for their requests")
            reader.close()
            return
        self._waiting[request_id] = reader
        reader.accepted()
        reader.wait_for_take(self.wait_timeout)

    def take(
        self,
        request_id: str,
        on_frame: OnFrame,
        on_lost: OnEnd,
        on_silent: OnEnd,
        peer_timeout: float,
        heartbeat: float = 0.0,
    ) -> bool:
        """The exchange ``request_id`` reached its marker: its link's frames go to these
        callbacks, now if it came, else once it does (``LinkReader.attach``). True if it had
        come."""
        reader = self._waiting.pop(request_id, None)
        if reader is None:
            # The Node connected before it sent the marker: its handshake is on its way,
            # bounded all the same.
            timer = asyncio.get_running_loop().call_later(
                peer_timeout, self._never_came, request_id
            )
            self._expected[request_id] = (
                on_frame,
                on_lost,
                on_silent,
                peer_timeout,
                heartbeat,
                timer,
            )
            return False
        self._taken[request_id] = reader
        self._share()
        reader.attach(on_frame, on_lost, on_silent, peer_timeout, heartbeat)
        return True

    def _never_came(self, request_id: str) -> None:
        expected = self._expected.pop(request_id, None)
        if expected is not None:
            expected[1]("the worker's link never came")

    def reader(self, request_id: str) -> LinkReader | None:
        return self._taken.get(request_id)

    def discard(self, request_id: str) -> None:
        """The exchange ended: close its link, whatever its state."""
        expected = self._expected.pop(request_id, None)
        if expected is not None:
            expected[-1].cancel()
        reader = self._waiting.pop(request_id, None)
        if reader is not None:
            reader.close()
        reader = self._taken.pop(request_id, None)
        if reader is not None:
            reader.close()  # gives its unread back (``consumed``)
            self._share()
            self.consumed(0)  # one share less kept: links held back may read on

    def forget(self, reader: LinkReader) -> None:
        """``reader``'s connection is gone."""
        self._handshaking.discard(reader)
        request_id = reader.request_id
        if request_id and self._waiting.get(request_id) is reader:
            del self._waiting[request_id]

    def _share(self) -> None:
        """The mark links past their share read below: every taken link's share kept."""
        self.high = self.budget - PIECE * len(self._taken)

    def consumed(self, size: int) -> None:
        """``size`` bytes handed on were consumed (or dropped): resume links held back by
        the budget once below its mark."""
        self.unread -= size
        if self.starved and self.unread < self.high:
            for reader in list(self.starved):
                reader.resume()
                if self.unread >= self.high:
                    break

    def count_bytes(self, size: int) -> None:
        if self._on_bytes is not None:
            self._on_bytes(size)

    def refused(self, why: str) -> None:
        """Count a refusal, and log it at most once per ``_REFUSAL_LOG_INTERVAL``."""
        self.refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged >= _REFUSAL_LOG_INTERVAL:
            self._refusal_logged = now
            logger.warning("refused a link: %s (%d refusals so far)", why, self.refusals)


class UploadSender(asyncio.Protocol):
    """The distributor's side of one upload link: the rest of a request's body written as
    frames (``send``, awaiting room: TCP's flow control, the Node reading only as its app
    consumes), a heartbeat while nothing was written for ``heartbeat`` seconds (a client
    that uploads slowly), ``close`` after the last frame (its tail still leaves), ``abort``
    otherwise. ``on_lost(why)`` once, if the link breaks before its last frame is written
    (never after ``close`` or ``abort``); the Node sends nothing on it but its handshake."""

    def __init__(self, listener: LinkListener, request_id: str, heartbeat: float) -> None:
        self._listener = listener
        self.request_id = request_id
        self.transport: asyncio.Transport | None = None
        self._heartbeat = max(heartbeat, 0.05)
        self._written = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._room: asyncio.Future[None] | None = None
        self._paused = False
        self.on_lost: OnEnd | None = None
        self.closed = False  # closed, aborted or lost: nothing more is written
        self.ended = False  # its last frame is written
        self._tail_checked = False  # ``release`` watches what is left to write
        self.bytes = 0

    def __repr__(self) -> str:
        return f"<UploadSender {self.request_id} closed={self.closed} ended={self.ended}>"

    def adopt(self, transport: asyncio.Transport) -> None:
        """Take over an accepted connection whose handshake was just read, and answer it.
        Its socket loses TCP_USER_TIMEOUT: the Node reads only as its app consumes, and an
        app that pauses longer would have the link reset under it (Linux applies it to the
        zero window); the Node's liveness through Redis bounds this end, as for a body
        through Redis, and keepalive a vanished host."""
        self.transport = transport
        clear_user_timeout(transport.get_extra_info("socket"))
        transport.set_protocol(self)
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        transport.write(ACCEPTED)
        self._written = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self._heartbeat, self._beat)

    # -- asyncio's side
    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if data == UPLOAD_DONE and not self.closed:
            # The app ended without reading the body to the end: its response (or its
            # failure) comes through Redis; the pump just stops.
            self.abort()
            return
        self._lost("the worker wrote on its upload link")

    def eof_received(self) -> bool | None:
        return False  # close: the Node closes its side once it read the last frame

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.upload_gone(self)
        if not self.closed:
            self._lost("the worker's upload link broke" + (f" ({exc})" if exc else ""))
        self._wake()

    # -- the exchange's side
    async def send(self, parts: Sequence[bytes | memoryview], more: bool) -> None:
        """Write ``parts`` (at most ``MAX_FRAME`` bytes in all) as one frame, ``LAST`` unless
        ``more``, then wait for room (the transport's buffer below ``_WRITE_HIGH``):
        ``ConnectionError`` if the link is closed or breaks meanwhile. After the last frame
        the link closes (what is buffered still leaves)."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the upload link is closed")
        size = sum(map(len, parts))
        if size > MAX_FRAME:
            raise LinkError(f"an upload frame of {size} bytes, over {MAX_FRAME}")
        transport.writelines([FRAME_HEADER.pack(size, MORE if more else LAST), *parts])
        self._written = time.monotonic()
        self.bytes += size
        if not more:
            self.ended = self.closed = True
            self._stop_timer()
            transport.close()  # what is buffered still leaves
            return
        while self._paused and not self.closed:
            self._room = asyncio.get_running_loop().create_future()
            try:
                await self._room
            finally:
                self._room = None
        if self.closed:
            raise ConnectionResetError("the upload link broke")

    def abort(self) -> None:
        """Drop the link now, unless its last frame was written (then it closes by itself)."""
        if self.closed:
            return
        self.closed = True
        self._stop_timer()
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def release(self) -> None:
        """Its exchange ended: drop the link, or, its last frame written, let what is left of
        it leave as the Node reads, but drop it once none leaves for ``TAIL_STALL``. Nothing
        else watches the socket then: no exchange, no liveness check, and no
        ``TCP_USER_TIMEOUT`` on this end (``adopt``), so a Node frozen kept it for good."""
        if not self.closed:
            self.abort()
            return
        transport = self.transport
        if self.ended and transport is not None and not self._tail_checked:
            left = transport.get_write_buffer_size()
            if left:
                self._tail_checked = True
                asyncio.get_running_loop().call_later(TAIL_STALL, self._check_tail, left)

    def _check_tail(self, before: int) -> None:
        transport = self.transport
        assert transport is not None
        left = transport.get_write_buffer_size()
        if not left:
            return
        if left >= before:
            logger.info("an upload link's tail made no progress for %.0f s: dropped", TAIL_STALL)
            transport.abort()
            return
        asyncio.get_running_loop().call_later(TAIL_STALL, self._check_tail, left)

    def _lost(self, why: str) -> None:
        on_lost, self.on_lost = self.on_lost, None
        self.abort()
        if on_lost is not None:
            on_lost(why)

    def _wake(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    def _beat(self) -> None:
        self._timer = None
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return
        idle = time.monotonic() - self._written
        if idle >= self._heartbeat * 0.9:
            # Only onto an empty buffer: bytes still queued reach the Node first, or it is
            # not reading (its app holds back), and a heartbeat would only pile up.
            if not transport.get_write_buffer_size():
                transport.write(FRAME_HEADER.pack(0, HEARTBEAT))
            self._written = time.monotonic()
            idle = 0.0
        self._timer = asyncio.get_running_loop().call_later(
            max(self._heartbeat - idle, 0.01), self._beat
        )

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class UploadReceiver(asyncio.BufferedProtocol):
    """The Node's side of one upload link (made by ``open_upload``): ``read`` returns the
    body's next piece (at most ``PIECE`` bytes of a frame), and the socket is read only while
    a ``read`` wants one: TCP holds the rest back, and this side's buffer (kept from piece to
    piece) is a piece at most. A ``read`` cancelled midway loses nothing: the reading goes on
    to the piece's end, which the next ``read`` returns."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._state = "answer"  # answer, header, body, discard, closed
        self._header = memoryview(bytearray(FRAME_HEADER.size))
        self._bodies = memoryview(bytearray(0))
        self._view = memoryview(bytearray(len(ACCEPTED)))  # what is being read
        self._filled = 0
        self._left = 0  # bytes of the current frame's body not yet read
        self._kind = MORE
        self._piece: tuple[bytes, bool] | None = None  # read, not yet returned
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._heard = time.monotonic()
        self.ended = False  # the last frame was read
        self.bytes = 0

    def __repr__(self) -> str:
        return f"<UploadReceiver {self._state} ended={self.ended}>"

    # -- asyncio's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an ``isinstance`` check: uvloop's transports are not ``asyncio.Transport``s.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._heard = time.monotonic()
        if self._state == "discard":
            return  # read again into the same buffer: dropped
        self._filled += nbytes
        if self._filled < len(self._view):
            return
        self._filled = 0
        state = self._state
        if state == "answer":
            if bytes(self._view) != ACCEPTED:
                self._fail(LinkError("the distributor answered the upload link oddly"))
                return
            self._state, self._view = "header", self._header
            self._hold()
        elif state == "header":
            try:
                size, kind = parse_frame_header(self._view)
            except LinkError as exc:
                self._fail(exc)
                return
            if kind == HEARTBEAT:
                return
            if not size:
                self._got(b"", kind == MORE)
                return
            self._left, self._kind = size, kind
            self._next_body()
        elif state == "body":
            body = bytes(self._view)
            self._left -= len(body)
            if self._left:
                self._next_body()
            else:
                self._state, self._view = "header", self._header
            self._got(body, bool(self._left) or self._kind == MORE)

    def eof_received(self) -> bool | None:
        return False  # close: the distributor closes only after the last frame, or to drop it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            self._error = ConnectionResetError(
                "the upload link closed" + (f" ({exc})" if exc else "")
            )
        self._state = "closed"
        self._wake()

    # -- the job's side
    async def read(self, silence: float) -> tuple[bytes, bool]:
        """``(body, more)``: the next piece. ``asyncio.TimeoutError`` when nothing at all came
        for ``silence`` seconds while waiting (the distributor's heartbeats fill its pauses);
        ``ConnectionError`` if the link ended, ``LinkError`` if it sent a malformed frame."""
        while self._piece is None:
            if self._error is not None:
                raise self._error
            assert self.transport is not None
            self.transport.resume_reading()
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                left = self._heard + silence - time.monotonic()
                await asyncio.wait_for(waiter, max(left, 0.001))
            except asyncio.TimeoutError:
                if time.monotonic() - self._heard >= silence:
                    raise
            finally:
                self._waiter = None
        body, more = self._piece
        self._piece = None
        self.bytes += len(body)
        self.ended = not more
        return body, more

    async def answered(self) -> None:
        """Wait for the listener's answer to the handshake: ``LinkRefused`` if it closed the
        connection without one."""
        while self._state == "answer":
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self._state != "closed":
            return
        if isinstance(self._error, LinkError):
            raise self._error
        raise LinkRefused(f"the distributor refused the upload link ({self._error})")

    async def finish(self, timeout: float = FINISH_TIMEOUT) -> None:
        """The app is done before the body's last frame: say so (``UPLOAD_DONE``), then wait,
        at most ``timeout`` seconds, for the distributor to drop the link (what it sent is
        read and discarded meanwhile), and drop it. Closed at once instead, the distributor
        could take it for a link broken by a dead Node, and fail a response the app sent."""
        transport = self.transport
        if transport is None or self._state == "closed":
            return
        transport.write(UPLOAD_DONE)
        self._state, self._filled = "discard", 0
        if len(self._bodies) < PIECE:
            self._bodies = memoryview(bytearray(64 * 1024))
        self._view = self._bodies
        transport.resume_reading()
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiter = None
            transport.abort()

    def close(self) -> None:
        """Close the link (its last frame read, or no longer needed)."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the link now: a ``read`` waiting ends (the distributor sees it break)."""
        if self.transport is not None:
            self.transport.abort()

    def _next_body(self) -> None:
        size = min(self._left, PIECE)
        if len(self._bodies) < size:
            self._bodies = memoryview(bytearray(size))
        self._state, self._view = "body", self._bodies[:size]

    def _got(self, body: bytes, more: bool) -> None:
        self._piece = (body, more)
        self._hold()

    def _hold(self) -> None:
        """Stop reading until the next ``read``, and wake the one waiting."""
        if self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        self._state = "closed"
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class LinkWriter:
    """The Node's side of one link: body frames written in order, each ``send`` awaiting
    room (``drain``); heartbeats while idle. ``close`` after the last frame; ``abort`` when
    the request ends otherwise (it wakes a ``send`` waiting for room)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, heartbeat: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self._transport.set_write_buffer_limits(high=_WRITE_HIGH)
        self._written = time.monotonic()
        self._heartbeat = heartbeat
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_later(heartbeat, self._beat)
        self.closed = False
        self.ended = False  # its last frame is written (``close``)
        self.bytes = 0

    def __repr__(self) -> str:
        return f"<LinkWriter closed={self.closed}>"

    async def send(self, body: bytes, more: bool) -> None:
        """Write ``body`` as frames (the last one ``LAST`` unless ``more``) and wait for room.
        ``ConnectionError`` if the link is closed or breaks."""
        if self.closed or self._transport.is_closing():
            raise ConnectionResetError("the link is closed")
        size = len(body)
        view = memoryview(body) if size > MAX_FRAME else None
        start = 0
        while True:
            end = min(start + MAX_FRAME, size)
            last = end >= size
            part = body if view is None else view[start:end]
            header = FRAME_HEADER.pack(end - start, MORE if more or not last else LAST)
            if end > start:
                self._transport.writelines([header, part])
            else:
                self._transport.write(header)
            start = end
            if last:
                break
        self._written = time.monotonic()
        self.bytes += size
        await self._writer.drain()

    def _beat(self) -> None:
        self._timer = None
        if self.closed or self._transport.is_closing():
            return
        idle = time.monotonic() - self._written
        if idle >= self._heartbeat * 0.9:
            self._transport.write(FRAME_HEADER.pack(0, HEARTBEAT))
            self._written = time.monotonic()
            idle = 0.0
        self._timer = asyncio.get_running_loop().call_later(
            max(self._heartbeat - idle, 0.01), self._beat
        )

    def close(self) -> None:
        """After the last frame: no more heartbeats. The link itself stays open until
        ``linger`` sees the distributor close it (a close from this side first could lose the
        frame's tail in a middlebox that drops what it holds on a FIN)."""
        self._stop()
        self.ended = True

    async def linger(self, timeout: float = LINGER) -> None:
        """Wait, at most ``timeout`` seconds, for the distributor to close the link once it
        read the last frame, then close this side (what is left to write still leaves). The
        Node's job awaits this, so a graceful stop waits for it as for any request."""
        try:
            await asyncio.wait_for(self._reader.read(64), timeout)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self._transport.close()
            left = self._transport.get_write_buffer_size()
            if left:
                self._schedule_tail_check(left)

    def _schedule_tail_check(self, left: int) -> None:
        asyncio.get_running_loop().call_later(TAIL_STALL, self._check_tail, left)

    def _check_tail(self, before: int) -> None:
        """What the link still had to write when the job ended leaves as the distributor
        reads it (a slow client), but nothing else watches this socket any more: no job, no
        liveness check, no ``TCP_USER_TIMEOUT`` (``tune_socket``). Drop it once it makes no
        progress for ``TAIL_STALL`` (a distributor frozen, or its host gone)."""
        left = self._transport.get_write_buffer_size()
        if not left:
            return
        if left >= before:
            logger.info("a link's tail made no progress for %.0f s: dropped", TAIL_STALL)
            self._transport.abort()
            return
        self._schedule_tail_check(left)

    def abort(self) -> None:
        """Drop the link now: the distributor sees it break (nothing after ``close``: what
        it left to write still leaves)."""
        if self.closed:
            return
        self._stop()
        self._transport.abort()

    def _stop(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def open_link(
    host: str,
    port: int,
    token: bytes,
    request_id: str,
    *,
    heartbeat: float = 1.0,
    timeout: float = CONNECT_TIMEOUT,
) -> LinkWriter:
    """Connect to a distributor's listener and send the handshake, within ``timeout``
    seconds; ``LinkRefused`` if the listener closes it unanswered, else ``OSError`` or
    ``asyncio.TimeoutError`` if that fails."""
    handshake = pack_handshake(token, request_id)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, port, limit=64)
        try:
            tune_socket(writer.get_extra_info("socket"), user_timeout=False)
            try:
                writer.write(handshake)
                await writer.drain()
                answer = await reader.readexactly(len(ACCEPTED))
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                # Connected, then closed or reset before the answer: a refusal.
                raise LinkRefused(f"the distributor refused the link ({exc!r})") from None
            if answer != ACCEPTED:
                raise LinkError("the distributor answered the link's handshake oddly")
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer

    reader, writer = await asyncio.wait_for(connect(), timeout)
    return LinkWriter(reader, writer, heartbeat)


async def open_upload(
    host: str, port: int, token: bytes, request_id: str, *, timeout: float = CONNECT_TIMEOUT
) -> UploadReceiver:
    """Connect to a distributor's listener for the rest of ``request_id``'s body and send the
    upload handshake, within ``timeout`` seconds; ``LinkRefused`` if the listener closes it
    unanswered (an older distributor, which takes no upload link, does), else ``OSError`` or
    ``asyncio.TimeoutError``."""
    handshake = pack_handshake(token, request_id, UPLOAD_MAGIC)

    async def connect() -> UploadReceiver:
        loop = asyncio.get_running_loop()
        transport, receiver = await loop.create_connection(UploadReceiver, host, port)
        try:
            tune_socket(transport.get_extra_info("socket"))
            transport.write(handshake)
            await receiver.answered()
        except BaseException:
            transport.abort()
            raise
        return receiver

    return await asyncio.wait_for(connect(), timeout)
