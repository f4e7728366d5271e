"""One connection to Redis over asyncio streams, and how to reach Redis (URLs).

Theory of operation: any number of tasks may call ``execute`` at once. Each call appends a
future to a first-in-first-out queue of waiters and its packed command to a write buffer; the
first command of an event-loop turn is written at once and the ones that follow in the same turn
are flushed together, so commands issued together travel in one write (auto-pipelining).
Replies are parsed the moment bytes arrive (``ReplyReader``, a StreamReader that hands its data
to the parser instead of buffering it), which saves a task wake-up per read, and the waiters
are resolved in order. A caller cancelled while waiting leaves its future in the queue: its reply is
still read and dropped there, so the next caller can never receive someone else's reply (the
bug class of redis-py's CVE-2023-28858/28859).

A blocking command (BRPOP, BLPOP) blocks the *whole* connection on the server: every command
queued behind it waits until it returns. Run blocking commands on a connection of their own.
If a blocking call is cancelled, the connection is closed, because Redis may still hand it an
item that nobody would read.

Dead peers: a link can die without a FIN or RST (a NAT entry dropped, a stalled path), and
then nothing ever arrives. Every TCP socket gets keepalive tuned to seconds (and
TCP_USER_TIMEOUT on Linux, so unacknowledged data is bounded too), and every command has a
client-side bound on its reply, ``ConnectionParams.reply_timeout``. One watchdog timer per
connection, armed only while replies are pending, looks at the head of the FIFO: if the same
waiter has been at the head for longer than its bound, no reply is coming, and the connection is
closed with ``RedisConnectionError`` failing every waiter. Replies arrive in order, so "the head
has not moved" is exactly "the server said nothing". A blocking pop's bound is its server
timeout plus ``reply_timeout``; a blocking pop with timeout 0 has no client bound at all (this
library never sends one). Nothing is timed per command: the cost is one attribute test when the
FIFO goes from empty to non-empty.

Losing the connection fails every waiter at once with ``RedisConnectionError``; a malformed
reply closes the connection and fails the waiters with ``ProtocolError``. This module never
logs or formats a password: ``ConnectionParams`` hides it from ``repr`` and every message names
the server by address only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import re
import socket
import ssl as _ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from .directread import DIRECT_MAX
from .protocol import (
    NEED_DATA,
    AuthenticationError,
    Parts,
    ProtocolError,
    RedisConnectionError,
    ReplyError,
    make_parser,
    pack_command,
    pack_pair_command,
)

if TYPE_CHECKING:
    from .cluster import ClusterSpec
    from .directread import DirectReads
    from .sentinel import SentinelSpec

__all__ = ["Connection", "ConnectionParams", "connect", "parse_url"]

logger = logging.getLogger("minidasgi.resp.connection")

_READ_SIZE = 256 * 1024
_DIRECT_GAP_READ = 64 * 1024  # a read between payloads read into their own buffer
# Where a subscriber's read goes (``_ReadingProtocol``): the connection's own buffer, the
# payload being read (``DirectReads.read_into``), a free payload buffer (``read_ahead``).
_OWN, _PAYLOAD, _AHEAD = "own", "payload", "ahead"
_PEEK = 4096  # what a subscriber peeks at for a push whose payload's tail it reads apart
_APART_PUSHES = 4  # pushes read apart at most per read of the transport
_WRITE_HIGH_WATER = 256 * 1024  # buffered bytes past which callers wait for the socket
_SCRATCH_FROM = 64 * 1024  # writes from this size are gathered into a reused buffer
_SCRATCH_MAX = 2 * 1024 * 1024  # a larger one (a rare huge command) is not kept
_MAX_VECTOR = 512  # parts per writev (IOV_MAX is 1024 on Linux and macOS; past it, EINVAL: joined)
# The send buffer asked for on a unix socket to Redis. The default (``net.core.wmem_default``,
# 208 KiB on Linux) holds a fifth of a large command, a PUBLISH of a 1 MiB body piece: the rest
# waited in asyncio's buffer, copied there, and went out in four more sends as Redis read (a
# download's Node spent twice the CPU per MiB it spends over TCP, whose autotuning grows a
# loopback connection's buffer to megabytes by itself). It holds no more than TCP's may: what is
# sent stays bounded by flow control's windows.
_UNIX_SEND_BUFFER = 2 * 1024 * 1024
# TCP keepalive in seconds, not the kernel's two hours: a silent peer is found within about
# KEEPIDLE + KEEPINTVL * KEEPCNT seconds of idleness. TCP_USER_TIMEOUT bounds how long sent data
# may stay unacknowledged (a stalled link with commands in flight) to the same order.
_KEEPIDLE = 5
_KEEPINTVL = 2
_KEEPCNT = 3
_USER_TIMEOUT_MS = (_KEEPIDLE + _KEEPINTVL * _KEEPCNT) * 1000
# The reply watchdog looks at the FIFO this many times per reply_timeout: a dead peer is
# declared between 1 and 1.25 bounds after the head command stopped moving.
_WATCHDOG_CHECKS = 4
_CLOSE_GRACE = 2.0  # seconds close() lets buffered bytes drain before dropping them
# The packed heads of the two hot commands (see pack_pair_command).
_LPUSH = b"*3\r\n$5\r\nLPUSH\r\n"
_PUBLISH = b"*3\r\n$7\r\nPUBLISH\r\n"
_PING = b"*1\r\n$4\r\nPING\r\n"


@dataclass(frozen=True)
class ConnectionParams:
    """Where Redis is and how to log in. ``repr`` never shows the password."""

    host: str = "localhost"
    port: int = 6379
    unix_socket: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: _ssl.SSLContext | bool | None = None
    connect_timeout: float = 5.0
    #: Seconds a command may wait for its reply before the peer is taken for dead and the
    #: connection closed (``None`` or 0: no bound). Blocking pops get their server timeout on top.
    reply_timeout: float | None = 10.0
    #: Find the master through these sentinels (``host`` empty until it is resolved, then the
    #: master's): see ``sentinel``.
    sentinel: SentinelSpec | None = None
    #: A Redis Cluster reached through these nodes (``host`` empty): see ``cluster``.
    cluster: ClusterSpec | None = None

    @property
    def unresolved(self) -> bool:
        """True while the server is still to be found (through sentinels)."""
        return self.sentinel is not None and not self.host

    @property
    def address(self) -> str:
        """The server's address for messages: ``host:port`` or ``unix:/path``."""
        if self.sentinel is not None and not self.host:
            return self.sentinel.address
        if self.cluster is not None:
            return self.cluster.address
        if self.unix_socket is not None:
            return f"unix:{self.unix_socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __repr__(self) -> str:
        secret = ", password='***'" if self.password is not None else ""
        shown = _shown_username(self.username)
        user = f", username={shown!r}" if shown is not None else ""
        tls = ", ssl=True" if self.ssl else ""
        return f"ConnectionParams({self.address!r}, db={self.db}{user}{secret}{tls})"


_SHOWN_USERNAME = re.compile(r"[A-Za-z0-9_.+-]*\Z")
"""A username shown in messages; anything else may be a misplaced password, so it is hidden."""


def _split_credentials(scheme: str, rest: str) -> tuple[str | None, str]:
    """Split what follows ``scheme://`` into ``(credentials or None, the rest)``.

    The credentials run up to the *last* ``@``, so a password holding ``@``, ``/``, ``?``,
    ``#`` or ``%`` unencoded still works: no character of it is taken for a delimiter. A
    ``unix:///path`` without credentials may hold ``@`` in its path; with credentials, write
    an ``@`` of the path as ``%40``.
    """
    if scheme == "unix" and rest.startswith("/"):
        return None, rest
    at = rest.rfind("@")
    if at < 0:
        return None, rest
    return rest[:at], rest[at + 1 :]


def _shown_username(username: str | None) -> str | None:
    """``username`` if it is fit for a message, else ``"***"`` (it may hold a secret)."""
    if username is None or _SHOWN_USERNAME.match(username):
        return username
    return "***"


def _redact(url: str) -> str:
    """The URL with its credentials hidden, fit for a message: ``scheme://user:***@host...``.

    Credentials are split off as ``parse_url`` does (up to the last ``@`` before the host); a
    username that does not look like one is hidden too, since hiding too much is the safe
    mistake.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<unparseable URL>"
    credentials, hostpart = _split_credentials(scheme, rest)
    if credentials is None:
        return url
    user, colon, _ = credentials.partition(":")
    shown = user if user and _shown_username(unquote(user)) != "***" else ""
    if not colon:  # a lone name: shown if it looks like one
        return f"{scheme}://{shown or '***'}@{hostpart}"
    return f"{scheme}://{shown}:***@{hostpart}"


class _URLError(ValueError):
    """Raised inside ``parse_url``; carries only text free of credentials."""


def parse_url(url: str) -> ConnectionParams:
    """Parse ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
    ``unix://[[user]:password@]/path.sock[?db=N]`` or
    ``redis+sentinel://[[user]:password@]host1[:26379],host2[:26379]/MASTERNAME[/db]``
    (``rediss+sentinel://`` for TLS to the master; the credentials are the master's, the
    sentinels are reached without any) or ``redis+cluster://[[user]:password@]host:port[,...]``
    (``rediss+cluster://``; any of the cluster's nodes). User and password are percent-decoded.

    The credentials run up to the last ``@`` before the host, so a password may hold ``@``,
    ``/``, ``?``, ``#`` or ``%`` without percent-encoding them (``%`` followed by two hex
    digits is decoded: encode a literal one as ``%25``). A ``ValueError`` names the problem
    and the URL with its credentials hidden; neither it nor its ``__context__`` holds them.
    The query may also set ``connect_timeout`` and ``reply_timeout`` in seconds
    (``?reply_timeout=3``; ``reply_timeout=0`` disables the reply bound).
    """
    try:
        return _parse_url(url)
    except _URLError as exc:
        problem = str(exc)
    # Raised outside the except block: no exception that saw the credentials is chained.
    raise ValueError(f"invalid Redis URL {_redact(url)}: {problem}")


def _parse_url(url: str) -> ConnectionParams:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise _URLError(
            "the scheme must be redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://"
        )
    credentials, hostpart = _split_credentials(scheme, rest)
    username = password = None
    if credentials is not None:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) if user else None
        password = unquote(secret) if colon else None
    # What is left holds no credentials: the standard parser may quote it in its errors.
    sentinels: str | None = None
    if scheme.endswith(("+sentinel", "+cluster")):  # several hosts: the parser takes one
        end = min((i for i in (hostpart.find("/"), hostpart.find("?")) if i >= 0), default=None)
        sentinels = hostpart[:end]
        hostpart = "localhost" + ("" if end is None else hostpart[end:])
    try:
        parts = urlsplit(f"{scheme}://{hostpart}")
        port = parts.port
    except ValueError as exc:
        raise _URLError(str(exc)) from None
    query = parse_qs(parts.query)
    db_text: str | None = query["db"][-1] if "db" in query else None
    if sentinels is not None and scheme.endswith("+cluster"):
        base = _cluster_base(scheme, sentinels, parts.path)
    elif sentinels is not None:
        base, db_text = _sentinel_base(scheme, sentinels, parts.path, db_text)
    elif scheme == "unix":
        path = parts.netloc + parts.path  # unix:///p has an empty netloc; unix://:pw@/p none
        if not path:
            raise _URLError("no socket path")
        if not path.startswith("/"):
            raise _URLError(
                "the socket path must be absolute (unix:///path.sock; after credentials, "
                "write an '@' in the path as %40)"
            )
        base = ConnectionParams(unix_socket=unquote(path))
    else:
        path = parts.path.strip("/")
        if path and db_text is None:
            db_text = path
        base = ConnectionParams(
            host=parts.hostname or "localhost",
            port=port if port is not None else 6379,
            ssl=True if scheme == "rediss" else None,
        )
    db = 0
    if db_text is not None:
        if not db_text.isdigit():
            raise _URLError("db must be a number")
        db = int(db_text)
    timeouts: dict[str, Any] = {}
    for name in ("connect_timeout", "reply_timeout"):
        if name in query:
            text = query[name][-1]
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value >= 0) or (
                value == 0 and name == "connect_timeout"
            ):
                raise ValueError(
                    f"invalid Redis URL {_redact(url)}: {name} must be a number of seconds"
                )
            timeouts[name] = value or None
    return replace(base, db=db, username=username, password=password, **timeouts)


_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)


def _cluster_base(scheme: str, hosts: str, path: str) -> ConnectionParams:
    """``host1:port,host2:port`` as the nodes to ask for the slot map (a cluster has db 0)."""
    from .cluster import ClusterSpec
    from .sentinel import parse_hosts

    if path.strip("/") not in ("", "0"):
        raise _URLError("a cluster has only db 0")
    try:
        spec = ClusterSpec(startup_nodes=parse_hosts(hosts, default_port=6379))
    except ValueError as exc:
        raise _URLError(str(exc)) from None
    ssl = True if scheme.startswith("rediss") else None
    return ConnectionParams(host="", cluster=spec, ssl=ssl)


def _sentinel_base(
    scheme: str, hosts: str, path: str, db_text: str | None
) -> tuple[ConnectionParams, str | None]:
    """``host1:26379,host2`` and ``/NAME[/db]`` as params still to resolve."""
    from .sentinel import SentinelSpec, parse_hosts

    name, _, db_path = path.strip("/").partition("/")
    if not name:
        raise _URLError("a sentinel URL names the master: redis+sentinel://host:26379/NAME")
    try:
        spec = SentinelSpec(service_name=unquote(name), sentinels=parse_hosts(hosts))
    except ValueError as exc:
        raise _URLError(str(exc)) from None
    if db_path and db_text is None:
        db_text = db_path.strip("/")
    ssl = True if scheme.startswith("rediss") else None
    return ConnectionParams(host="", sentinel=spec, ssl=ssl), db_text


class _ReplyCallback:
    """A reply's waiter that is a plain callback (``Connection.send_packed_to``): it answers
    ``done`` / ``set_result`` / ``set_exception`` as the connection asks a future, and calls
    the callback at once, exactly once."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[Any], None]) -> None:
        self._callback: Callable[[Any], None] | None = callback

    def done(self) -> bool:
        return self._callback is None

    def set_result(self, outcome: Any) -> None:
        callback = self._callback
        if callback is None:
            return
        self._callback = None
        try:
            callback(outcome)
        except Exception:  # never let a caller's error end the connection
            logger.exception("a reply callback failed")

    set_exception = set_result


class _ReplyHook:
    """A reply's waiter that hands the reply to ``hook`` straight from the code that reads it,
    then settles the caller's future with what ``hook`` returned (``brpop_many``'s
    ``popped``): what the reply asks for starts in the loop pass it was read in, not one pass
    later when the caller wakes. An exception from ``hook`` goes to the caller and up to the
    reading code, which closes the connection (``hook`` raises only for a malformed reply)."""

    __slots__ = ("_hook", "future")

    def __init__(self, future: asyncio.Future[Any], hook: Callable[[Any], Any]) -> None:
        self.future = future
        self._hook = hook

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, reply: Any) -> None:
        future = self.future
        if future.done():
            return
        try:
            value = self._hook(reply)
        except Exception as exc:
            future.set_exception(exc)
            raise
        future.set_result(value)

    def set_exception(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


_Waiter = asyncio.Future[Any] | _ReplyCallback | _ReplyHook


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a future nobody awaits (no 'never retrieved' warning)."""
    if not future.cancelled():
        future.exception()


def _ssl_context(option: _ssl.SSLContext | bool | None) -> _ssl.SSLContext | None:
    if isinstance(option, _ssl.SSLContext):
        return option
    if option:
        return _ssl.create_default_context()
    return None


class ReplyReader(asyncio.StreamReader):
    """A StreamReader that hands every chunk of bytes to ``sink`` instead of buffering it
    (from ``open_stream``: a view valid during the call only, which ``sink`` must copy).

    The stream's end (EOF or an error) is reported to ``on_end`` once.
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        on_end: Callable[[BaseException | None], None],
        direct: DirectReads | None = None,
    ) -> None:
        super().__init__(limit=_READ_SIZE)
        self._sink = sink
        self._on_end = on_end
        self.direct = direct
        """Where large payloads are read straight into (see ``directread``), if anywhere."""

    def filled(self, nbytes: int) -> None:
        """``nbytes`` were read into ``direct.read_into()``: hand over what that completed."""
        assert self.direct is not None
        self.direct.filled(nbytes)
        self._sink(b"")

    def ahead_filled(self, nbytes: int) -> None:
        """``nbytes`` were read into ``direct.read_ahead()``: hand over what that completed."""
        assert self.direct is not None
        self.direct.ahead_filled(nbytes)
        self._sink(b"")

    def feed_data(self, data: Any) -> None:  # bytes, from the transport
        if data:
            self._sink(data)

    def feed_eof(self) -> None:
        super().feed_eof()
        self._on_end(None)

    def set_exception(self, exc: Exception) -> None:
        super().set_exception(exc)
        self._on_end(exc)


class _ReadingProtocol(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """A StreamReaderProtocol that reads into one buffer kept for the connection's life.

    A plain protocol makes the transport allocate a fresh ``_READ_SIZE`` bytes object for each
    read, which glibc serves (above its mmap threshold) with an ``mmap``, a ``mremap`` and a
    ``munmap``: three system calls per read beside the ``recv``. Here the transport reads
    with ``recv_into``, and the reader gets a view of the bytes read, valid only during the
    call: its sink must copy what it keeps (both reply parsers append it to their own buffer).
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._view = memoryview(bytearray(_READ_SIZE))
        # A reader whose large payloads are read into their own buffer.
        self._direct: ReplyReader | None = None
        if isinstance(reader, ReplyReader) and reader.direct is not None:
            self._direct = reader
        self._into = _OWN  # where the last buffer handed out was: ours, a payload's, ahead
        # What a read of ours is handed to: a ReplyReader's sink itself (a read is never
        # empty), rather than through ``data_received``, the weak reference to the reader and
        # its ``feed_data``: three calls fewer per read. The sink is held here as the reader
        # holds it, for the connection's life; another reader gets its ``feed_data``.
        self._feed: Callable[[Any], None] = (
            reader._sink if isinstance(reader, ReplyReader) else reader.feed_data
        )
        # The socket, for a reader whose payloads' tails are read apart (``directread``, in
        # a process that allows it: ``read_tails_apart``): a duplicate of the transport's
        # descriptor, made at the first large payload, read only where the transport's own
        # read would come next, on the plain selector transport only (see _vectored_fileno).
        self._sock: socket.socket | None = None
        self._fileno = -1  # the transport's descriptor, where tails may be read apart

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        direct = self._direct.direct if self._direct is not None else None
        if direct is not None and direct.splits:
            self._fileno = _vectored_fileno(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fileno = -1
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # the duplicate only: the transport closes its own
        super().connection_lost(exc)

    def _read_apart(self, direct: DirectReads, sock: socket.socket) -> None:
        """Before the transport's read: large payloads' tails straight into ``bytes`` of their
        own (``directread``), each push's header and start first when a peek finds them
        whole, up to ``_APART_PUSHES`` pushes (else the transport's read, which comes next,
        would take the next push whole into a buffer). An ``OSError`` ends the reading apart:
        the transport's read that follows meets it again or, for one the socket reports only
        once (a reset), the end of the stream; the connection is lost either way.

        Bytes read here and not handed over yet (a tail under way) are reported to the reader
        all the same, as an empty read: its owner counts every read as a sign of life (a
        subscriber's health check), and a tail on a slow link may take many intervals."""
        if self._read_pushes_apart(direct, sock):
            self._feed(b"")

    def _read_pushes_apart(self, direct: DirectReads, sock: socket.socket) -> bool:
        """``_read_apart``'s reads; return whether they read bytes not handed over."""
        view = self._view
        unreported = False
        for _ in range(_APART_PUSHES):
            if not direct.tail_wanted():
                if not direct.streaming:
                    return unreported
                try:
                    size = sock.recv_into(view, _PEEK, socket.MSG_PEEK)
                except OSError:
                    return unreported
                start = direct.plan_split(view, size) if size else 0
                if not start:
                    return unreported
                try:
                    size = sock.recv_into(view, start)
                except OSError:
                    return unreported
                if size != start:  # cannot happen (the bytes were there): read as usual
                    if size:
                        self._feed(view[:size])
                    return False
                direct.split_taken(view)
                unreported = True
            while True:
                wanted = direct.tail_wanted()
                if not wanted:
                    break
                try:
                    part = sock.recv(wanted)
                except OSError:
                    return unreported
                if not part:  # the end of the stream: the transport's read finds it too
                    return unreported
                direct.tail_read(part)
                unreported = True
            # The CRLF after the tail, which hands the push over, then perhaps the next push.
            try:
                size = sock.recv_into(view, 2)
            except OSError:
                return unreported
            if not size:
                return unreported
            self._feed(view[:size])
            unreported = False
        return unreported

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            direct = self._direct.direct
            assert direct is not None
            if direct.streaming and self._fileno >= 0 and _tails_apart:
                sock = self._sock
                if sock is None:
                    try:
                        sock = self._sock = _duplicate(self._fileno)
                    except OSError:  # out of descriptors, say: read as usual on this one
                        self._fileno = -1
                if sock is not None:
                    try:
                        self._read_apart(direct, sock)
                    except Exception as exc:  # never into the transport: end the stream
                        self._direct.set_exception(exc)
            target = direct.read_into()
            if target is not None:
                self._into = _PAYLOAD
                return target
            target = direct.read_ahead()
            if target is not None:
                self._into = _AHEAD
                return target
            # Reads between payloads end soon after a large payload's header, so that little
            # of it is read here (and copied): most of it goes to its own buffer.
            self._into = _OWN
            return self._view[:_DIRECT_GAP_READ]
        return self._view

    def data_received(self, data: bytes) -> None:
        # A transport that does not read into ``get_buffer`` (uvloop's: it takes a protocol
        # that is an ``asyncio.Protocol``, as a StreamReaderProtocol is, for a plain one)
        # hands each read over as fresh bytes: to the sink at once, as ``buffer_updated``
        # does, not through StreamReaderProtocol's ``data_received``, its weak reference to
        # the reader and the reader's ``feed_data`` (three calls per read, two reads per
        # request on each side).
        if data:
            self._feed(data)

    def buffer_updated(self, nbytes: int) -> None:
        into = self._into
        if into is not _OWN:
            assert self._direct is not None
            self._into = _OWN
            try:
                if into is _PAYLOAD:
                    self._direct.filled(nbytes)
                else:
                    self._direct.ahead_filled(nbytes)
            except Exception as exc:  # never into the transport: end the stream instead
                self._direct.set_exception(exc)
            return
        if nbytes:  # as feed_data: an empty read hands nothing over
            self._feed(self._view[:nbytes])


def _vectored_fileno(transport: asyncio.BaseTransport) -> int:
    """The file descriptor of ``transport``'s socket if it is the standard library's plain
    (not TLS) selector socket transport, whose ``write()`` sends at once whenever nothing is
    buffered: writing to its socket then is what it would do itself. Else -1 (TLS, uvloop,
    a proactor: each keeps its own order of writes)."""
    kind = type(transport)
    if not (
        hasattr(os, "writev")
        and kind.__name__ == "_SelectorSocketTransport"
        and kind.__module__ == "asyncio.selector_events"
        and transport.get_extra_info("sslcontext") is None
    ):
        return -1
    sock = transport.get_extra_info("socket")
    return -1 if sock is None else int(sock.fileno())


_tails_apart = False  # whether this process lets subscribers read tails apart


def read_tails_apart() -> None:
    """Let this process's subscribers read large payloads' tails apart (``directread``:
    a body reaches its consumer as the ``bytes`` the socket read, with no copy of its own),
    and have the C allocator keep freed tails for the next ones (``_keep_freed_tails``).

    Process-wide: glibc then serves blocks of up to ``DIRECT_MAX`` from its heap and keeps up
    to twice that free at its top rather than giving it back, for the whole process. Call it
    only for a process the library owns (``collector.settle``), never for a distributor or a
    Node embedded in an application's own server: there, tails are read as before (one copy
    of each body), and the allocator is left as its owner set it."""
    global _tails_apart
    if not _tails_apart:
        _tails_apart = True
        _keep_freed_tails()


def _keep_freed_tails() -> None:
    """Have the C allocator keep the memory of freed tails for the next ones.

    Tails read apart (``directread``) are a fresh ``bytes`` object each, a megabyte for a
    body piece, several alive at once while the relay catches up. glibc serves such sizes
    from its heap once a freed ``mmap``'d block raised its threshold (to about a megabyte
    here), but gives the top of the heap back to the system whenever more than twice that
    is free there: each tail was then written into freshly mapped pages, a page fault per
    4 KiB (95 per MiB, more system time than the copy it spared). Freeing one block of
    ``DIRECT_MAX`` bytes once raises both thresholds past what a window of tails holds
    (glibc's documented dynamic thresholds; other allocators ignore it). Costs an
    ``mmap`` and a ``munmap``; nothing is written to the block.
    """
    block = bytes(DIRECT_MAX)  # calloc'd: mapped zero pages, never touched
    del block


def _duplicate(fileno: int) -> socket.socket:
    """A non-blocking socket object on a duplicate of ``fileno`` (closing it leaves
    ``fileno`` open)."""
    sock = socket.socket(fileno=os.dup(fileno))
    sock.setblocking(False)
    return sock


def _rest(parts: Parts, sent: int) -> bytes:
    """What remains of ``parts`` after their first ``sent`` bytes, as one bytes object (a
    copy: the transport may keep what it is given until it is sent)."""
    for index, part in enumerate(parts):
        if sent < len(part):
            return b"".join([memoryview(part)[sent:], *parts[index + 1 :]])
        sent -= len(part)
    return b""


async def open_stream(
    params: ConnectionParams, reader: asyncio.StreamReader
) -> asyncio.StreamWriter:
    """Connect to ``params`` (TCP with TCP_NODELAY, TLS or a unix socket) feeding ``reader``.

    Raise ``RedisConnectionError`` with the address (never the password) on failure.
    """
    loop = asyncio.get_running_loop()
    sslctx = _ssl_context(params.ssl)
    protocol = _ReadingProtocol(reader)
    try:
        if params.unix_socket is not None:
            opening = loop.create_unix_connection(
                lambda: protocol,
                params.unix_socket,
                ssl=sslctx,
                server_hostname=None if sslctx is None else "localhost",
            )
        else:
            opening = loop.create_connection(
                lambda: protocol,
                params.host,
                params.port,
                ssl=sslctx,
                server_hostname=params.host if sslctx is not None else None,
            )
        transport, _ = await asyncio.wait_for(opening, params.connect_timeout)
    except asyncio.TimeoutError:
        raise RedisConnectionError(
            f"cannot connect to Redis at {params.address}: timed out after "
            f"{params.connect_timeout} s"
        ) from None
    except (OSError, _ssl.SSLError) as exc:
        raise RedisConnectionError(f"cannot connect to Redis at {params.address}: {exc}") from None
    sock = transport.get_extra_info("socket")
    try:
        if sock is not None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                _tune_tcp(sock)
            elif sock.family == getattr(socket, "AF_UNIX", None):
                _tune_unix(sock)
    except OSError as exc:
        # A connection reset just after its accept can end before this: the transport then
        # closed the socket already (EBADF). It failed to connect, as for the caller's retries.
        transport.close()
        raise RedisConnectionError(f"cannot connect to Redis at {params.address}: {exc}") from None
    return asyncio.StreamWriter(transport, protocol, reader, loop)


def _tune_unix(sock: socket.socket) -> None:
    """A unix socket's send buffer raised to ``_UNIX_SEND_BUFFER`` (within what the system
    allows: Linux caps it at ``net.core.wmem_max``; an option refused is skipped)."""
    with contextlib.suppress(OSError):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _UNIX_SEND_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_SEND_BUFFER)


def _tune_tcp(sock: socket.socket) -> None:
    """TCP_NODELAY, and keepalive tuned to find a silent peer in seconds where the platform
    lets us (each option is skipped where it does not exist)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", _KEEPIDLE),
        ("TCP_KEEPALIVE", _KEEPIDLE),  # macOS' name for KEEPIDLE
        ("TCP_KEEPINTVL", _KEEPINTVL),
        ("TCP_KEEPCNT", _KEEPCNT),
        ("TCP_USER_TIMEOUT", _USER_TIMEOUT_MS),
    ):
        option = getattr(socket, name, None)
        if option is None:
            continue
        with contextlib.suppress(OSError):  # an option the running kernel refuses
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class Connection:
    """A connection to Redis shared by any number of tasks. Make one with ``connect()``."""

    def __init__(self, params: ConnectionParams, *, parser: str | None = None) -> None:
        self.params = params
        self._parser = make_parser(parser)
        self._reader = ReplyReader(self._on_data, self._on_end)  # held: the protocol won't
        self._writer: asyncio.StreamWriter | None = None
        # The writer's transport, written to directly (``_write``): ``StreamWriter.write``
        # only passes its bytes on, and ``.transport`` is a property, two Python calls per
        # write (one or two writes per request on each side).
        self._transport: asyncio.WriteTransport | None = None
        # Reply futures, or callbacks (``send_packed_to``), in the order of their commands.
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._wbuf: Parts = []
        self._wbuf_size = 0
        self._scratch: bytearray | None = None  # see _write_gathered
        self._fileno = -1  # the socket, if large writes may go straight to it (_open)
        self._flush_scheduled = False
        self._backlogged = False  # the socket is not keeping up: callers wait for it
        self._drain_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._error: Exception | None = None
        # True once the connection is closed or lost (``_error`` set); it never reopens. An
        # attribute, not a property: read before every command a distributor sends.
        self.is_closed = False
        # True once Redis closed the connection cleanly (EOF: its idle ``timeout``, ``CLIENT
        # KILL``, a shutdown) while nothing on this side had ended it: Redis was there to close
        # it. A reset, the reply watchdog or ``fail()`` leave it False.
        self.closed_by_server = False
        # True if it was so closed with no reply pending: idle, as Redis' ``timeout`` closes.
        self.closed_idle = False
        self._closed = self._loop.create_future()
        timeout = params.reply_timeout
        self._reply_timeout = timeout if timeout else math.inf
        self._watchdog: asyncio.TimerHandle | None = None
        self._watched: _Waiter | None = None  # the head seen at the last check
        self._watched_since = 0.0
        self._blocking_bounds: dict[_Waiter, float] = {}
        # Error codes that end the connection: the server no longer serves what this
        # connection is for (Sentinel: demoted; Cluster: the slot moved). See ``leave_on``.
        self._leave_codes: frozenset[str] = frozenset()
        # The last BLMPOP packed, by its arguments: a pop loop repeats the same one.
        self._last_pop: tuple[tuple[Any, ...], bytes] | None = None
        self._on_leave: Callable[[], None] | None = None
        if params.sentinel is not None:
            from . import sentinel

            self.leave_on(sentinel.DEMOTION_CODES, lambda: sentinel.suspect(params))

    async def _open(self) -> None:
        self._writer = await open_stream(self.params, self._reader)
        self._transport = self._writer.transport
        if self._error is not None:  # it failed before open_stream returned the writer
            self._writer.close()
        self._fileno = _vectored_fileno(self._writer.transport)

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<Connection {self.params.address} db={self.params.db} {state}>"

    @property
    def awaiting_replies(self) -> int:
        """How many replies this connection still waits for (its commands sent, or queued
        to be, and not yet answered)."""
        return len(self._waiters)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this connection lives in."""
        return self._loop

    async def wait_closed(self) -> Exception:
        """Wait until the connection is closed or lost; return why."""
        return await asyncio.shield(self._closed)

    def execute(
        self, *args: object, blocking: bool = False, server_timeout: float | None = None
    ) -> Coroutine[Any, Any, Any]:
        """Send one command and return its reply; raise ``ReplyError`` for an error reply.

        The reply is awaited at most ``params.reply_timeout`` seconds after the command before
        it reached the head of the queue; past that the connection is closed and every
        pending command fails with ``RedisConnectionError``.

        ``blocking=True`` marks a command that may block the connection (BRPOP): if the caller
        is cancelled while waiting, the connection is closed. Its reply bound is
        ``server_timeout`` (the timeout it gave Redis; 0 or None: no bound) plus
        ``reply_timeout``.

        Like the typed helpers below, not a coroutine function: the command is packed at
        once (a malformed one raises from the call) and ``execute_packed``'s coroutine is
        returned to be awaited, nothing sent before, cancelled as that one is. A coroutine
        of its own cost each command ~1.2k instructions more.
        """
        return self.execute_packed(
            pack_command(*args), blocking=blocking, server_timeout=server_timeout
        )

    def send_packed(self, data: bytes | Parts) -> asyncio.Future[Any]:
        """Send one packed command without waiting: return the future of its reply. ``data``
        is ``pack_command``'s bytes, or ``pack_command_parts``' parts (copied once, into the
        write: a large value is never copied on its way here).

        The reply is the raw value: an error reply is a ``ReplyError`` *value*, not raised.
        Meant for commands whose outcome is handled by a callback (coalesced PUBLISH and
        LPUSH); nothing waits for the socket to drain, so the caller bounds what it sends (the
        conversation's credit windows do). Dropping the future is safe: its reply is still
        read in order.
        """
        waiter = self._new_waiter()
        self._buffer(data)
        return waiter

    def send_packed_to(self, data: bytes | Parts, *callbacks: Callable[[Any], None]) -> None:
        """Send packed commands without waiting, as ``send_packed``, and hand each one's
        outcome to its callback directly from the code that reads it: the raw reply (an error
        reply as a ``ReplyError`` value), or the ``RedisConnectionError`` / ``ProtocolError``
        that ends the connection. No future, and no loop turn between a reply and its callback.
        ``data`` holds one command per callback, in their order (several travel in one write).

        A callback runs inside the connection's reading (or closing) code: it must be quick,
        must not raise (an exception is logged and dropped) and should only settle futures or
        record the outcome. It is called exactly once, in reply order; if the connection is
        already closed this raises at once and calls none.

        Its callers gather a loop turn's commands themselves (the batchers, which flush at the
        end of a turn): the commands are written at once, with no flush scheduled for others
        of the turn (a loop iteration more), unless commands are buffered already (then they
        join them, in order)."""
        if self._error is not None:
            error = self._closed_error()
            if isinstance(error, RedisConnectionError):
                error.unsent = True
            raise error
        waiters = self._waiters
        if not waiters and self._watchdog is None and self._reply_timeout != math.inf:
            self._arm_watchdog()
        for callback in callbacks:  # _queue_waiter's work, once for all (no call each)
            waiters.append(_ReplyCallback(callback))
        if self._flush_scheduled:
            self._buffer(data)
        elif isinstance(data, list):
            self._write_gathered(data, sum(map(len, data)))
        else:
            self._write(data)

    def _new_waiter(self) -> asyncio.Future[Any]:
        """A future for the next reply, queued behind those already awaited (the watchdog
        armed if it is the first); raise if the connection is closed."""
        waiter: asyncio.Future[Any] = self._loop.create_future()
        self._queue_waiter(waiter)
        return waiter

    def _queue_waiter(self, waiter: _Waiter) -> None:
        """Queue the waiter of the next reply (the watchdog armed if it is the first); raise
        if the connection is closed."""
        if self._error is not None:
            raise self._closed_error()
        if not self._waiters and self._watchdog is None and self._reply_timeout != math.inf:
            self._arm_watchdog()
        self._waiters.append(waiter)

    async def execute_packed(
        self,
        data: bytes,
        *,
        blocking: bool = False,
        server_timeout: float | None = None,
        on_reply: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Like ``execute`` for one command already packed with ``pack_command``.

        ``on_reply``, if given, is called with the raw reply (an error reply as a
        ``ReplyError`` value) by the code that reads it, before the caller wakes, and what it
        returns is the reply (raised if a ``ReplyError``); it must be quick, and may raise
        ``ProtocolError`` only, for a reply of the wrong shape, which closes the connection.
        It is not called for a caller cancelled meanwhile."""
        if on_reply is None:
            waiter = self._new_waiter()
            hook = None
        else:
            waiter = self._loop.create_future()
            hook = _ReplyHook(waiter, on_reply)
            self._queue_waiter(hook)
        if blocking:
            # Only blocking commands pay for a bound of their own (rare: one per pop).
            self._blocking_bounds[waiter if hook is None else hook] = (
                server_timeout + self._reply_timeout if server_timeout else math.inf
            )
        if blocking and not self._flush_scheduled:
            # Written at once with no flush scheduled: nothing sent behind a blocking command
            # on its connection would be served before it ends, so there is nothing to gather
            # it with, and a flush would cost every pop a loop callback (and, at one request
            # in flight, a loop iteration of its own).
            self._write(data)
        else:
            self._buffer(data)
        try:
            if self._backlogged:
                try:
                    async with self._drain_lock:
                        await self._drain()
                except BaseException:
                    # Nobody will await the waiter: keep its outcome from being reported as
                    # never retrieved (its reply, if any, is still read and dropped in order).
                    if not waiter.done():
                        waiter.cancel()
                    elif not waiter.cancelled():
                        waiter.exception()
                    raise
            reply = await waiter
        except asyncio.CancelledError:
            # Cancelled while its write waited for the socket or while it waited for its
            # reply: either way the command is on its way and may hold the connection for its
            # whole server timeout, with every later command queued behind it.
            if blocking:
                self._abort(RedisConnectionError("a blocking command was cancelled"))
            raise
        finally:
            if blocking:
                self._blocking_bounds.pop(waiter if hook is None else hook, None)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def check_health(self) -> None:
        """Send a PING nobody awaits if no reply is pending, so the reply watchdog finds a dead
        peer on an idle connection too (a busy connection proves itself with every reply).

        Any answer, even an error reply from an ACL user without +ping, shows the peer alive.
        """
        if self._error is not None or self._waiters:
            return
        waiter: asyncio.Future[Any] = self._loop.create_future()
        waiter.add_done_callback(_consume)
        if self._watchdog is None and self._reply_timeout != math.inf:
            self._arm_watchdog()
        self._waiters.append(waiter)
        self._buffer(_PING)

    # Typed helpers for the commands this library uses.

    # Each returns the coroutine that does the work (``execute_packed``'s, or
    # ``_blocking_pop``'s) for its caller to await, as ``execute`` does: no coroutine of its
    # own for the command to pass through.

    def ping(self) -> Coroutine[Any, Any, bytes]:
        """PING; returns ``b"PONG"``."""
        return self.execute("PING")

    def lpush(self, key: str | bytes, *values: object) -> Coroutine[Any, Any, int]:
        """LPUSH: prepend values to a list; returns its new length."""
        if len(values) == 1:
            data = pack_pair_command(_LPUSH, key, values[0])
        else:
            data = pack_command("LPUSH", key, *values)
        return self.execute_packed(data)

    def rpush(self, key: str | bytes, *values: object) -> Coroutine[Any, Any, int]:
        """RPUSH: append values to a list; returns its new length."""
        return self.execute("RPUSH", key, *values)

    def brpop(
        self, *keys: str | bytes, timeout: float = 0
    ) -> Coroutine[Any, Any, tuple[bytes, bytes] | None]:
        """BRPOP: pop from the tail of the first non-empty list, waiting up to ``timeout``
        seconds (0 waits forever). Returns ``(key, value)`` or ``None`` on timeout.

        Blocks this whole connection while it waits. Its reply is awaited at most ``timeout``
        plus ``params.reply_timeout`` seconds; with ``timeout=0`` there is no client-side bound
        and a dead peer goes unnoticed until TCP keepalive finds it: give a timeout.
        """
        return self._blocking_pop("BRPOP", keys, timeout)

    def blpop(
        self, *keys: str | bytes, timeout: float = 0
    ) -> Coroutine[Any, Any, tuple[bytes, bytes] | None]:
        """BLPOP: like ``brpop`` from the head of the list."""
        return self._blocking_pop("BLPOP", keys, timeout)

    def brpop_many(
        self,
        *keys: str | bytes,
        count: int,
        timeout: float = 0,
        popped: Callable[[bytes, list[bytes]], None] | None = None,
    ) -> Coroutine[Any, Any, tuple[bytes, list[bytes]] | None]:
        """``BLMPOP timeout numkeys key... RIGHT COUNT count`` (Redis 7.0): pop up to ``count``
        values from the tail of the first non-empty list, oldest first, waiting up to
        ``timeout`` seconds. Await it for ``(key, values)``, or ``None`` on timeout: one round
        trip where ``brpop`` and an ``RPOP`` with a count take two. Bounded and blocking as
        ``brpop``; a reply of another shape, or with more than ``count`` values, closes the
        connection (``ProtocolError``).

        ``popped``, if given, is called with ``(key, values)`` straight from the code that
        reads the reply, checked, before the caller wakes (a loop pass earlier: a task it
        creates runs its first step before the caller resumes). It must be quick; an
        exception it raises is logged and dropped, never the connection's.

        Not a coroutine function: it checks its arguments at once (a ``ValueError`` comes
        from the call) and returns ``execute_packed``'s coroutine itself, nothing sent until
        it is awaited, and cancelled as that one is (the connection closed). A coroutine of
        its own for each pop to pass through cost ~1.2k instructions, in its creation and
        at its resumption."""
        if not keys:
            raise ValueError("BLMPOP needs at least one key")
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        if count < 1:
            raise ValueError("count must be at least 1")
        arguments = (type(timeout), timeout, count, *keys)  # 5 and 5.0 pack apart
        last = self._last_pop
        if last is not None and last[0] == arguments:
            packed = last[1]
        else:
            packed = pack_command("BLMPOP", timeout, len(keys), *keys, "RIGHT", "COUNT", count)
            self._last_pop = (arguments, packed)

        def checked(reply: Any) -> Any:
            # Exact types, as the parsers build them, checked one by one: a builtin called
            # over the values (``all(map(isinstance, ...))``) cost each pop ~1.5k
            # instructions more, at one request a pop.
            if type(reply) is not list:
                if reply is None or isinstance(reply, ReplyError):
                    return reply
                raise ProtocolError("unexpected BLMPOP reply")
            if len(reply) != 2:
                raise ProtocolError("unexpected BLMPOP reply")
            key, values = reply
            if not (type(key) is bytes and type(values) is list and 0 < len(values) <= count):
                raise ProtocolError("unexpected BLMPOP reply")
            for value in values:
                if type(value) is not bytes:
                    raise ProtocolError("unexpected BLMPOP reply")
            if popped is not None:
                try:
                    popped(key, values)
                except Exception:  # never the connection's error: the values are taken
                    logger.exception("handling a BLMPOP reply failed")
            return key, values

        return self.execute_packed(
            packed, blocking=True, server_timeout=float(timeout), on_reply=checked
        )

    async def _blocking_pop(
        self, command: str, keys: tuple[str | bytes, ...], timeout: float
    ) -> tuple[bytes, bytes] | None:
        if not keys:
            raise ValueError(f"{command} needs at least one key")
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        reply = await self.execute(
            command, *keys, timeout, blocking=True, server_timeout=float(timeout)
        )
        if reply is None:
            return None
        if not (isinstance(reply, list) and len(reply) == 2):
            self._abort(ProtocolError(f"unexpected {command} reply"))
            raise self._closed_error()
        return reply[0], reply[1]

    def publish(self, channel: str | bytes, message: object) -> Coroutine[Any, Any, int]:
        """PUBLISH; returns how many subscribers received the message."""
        return self.execute_packed(pack_pair_command(_PUBLISH, channel, message))

    async def pipeline(self, *commands: bytes) -> list[Any]:
        """Send commands packed with ``pack_command`` in one write and return their replies in
        order; an error reply is returned in its place (a ``ReplyError``), not raised, since the
        other commands ran. A cancelled caller's replies are read and dropped in order."""
        if self._error is not None:
            raise self._closed_error()
        waiters: list[asyncio.Future[Any]] = [self._loop.create_future() for _ in commands]
        if not self._waiters and self._watchdog is None and self._reply_timeout != math.inf:
            self._arm_watchdog()  # bounded like any command: a silent link must not hang it
        self._waiters.extend(waiters)
        self._buffer(b"".join(commands))
        try:
            if self._backlogged:
                async with self._drain_lock:
                    await self._drain()
            return [await waiter for waiter in waiters]
        except BaseException:
            for waiter in waiters:  # nobody will await them: no "never retrieved" reports
                if not waiter.done():
                    waiter.cancel()
                elif not waiter.cancelled():
                    waiter.exception()
            raise

    async def close(self) -> None:
        """Close the connection; pending commands fail. Safe to call more than once."""
        self._abort(self._lost(None))
        await self._wait_transport_closed()

    # The reply watchdog (see the module docstring).

    def _arm_watchdog(self) -> None:
        self._watchdog = self._loop.call_later(
            self._reply_timeout / _WATCHDOG_CHECKS, self._check_replies
        )

    def _check_replies(self) -> None:
        look, self._watchdog = self._watchdog, None
        if self._error is not None:
            return
        if not self._waiters:
            self._watched = None
            return  # disarmed until the next command
        head = self._waiters[0]
        now = self._loop.time()
        if head is not self._watched:
            # The head moved since the last look (or the FIFO was refilled): the peer answers.
            self._watched = head
            self._watched_since = now
        else:
            # A look that comes late is one this process did not run for (stopped, its loop
            # blocked): it read nothing meanwhile either, and a process resumed from a stop
            # runs its due timers before it reads what came. That time is not the peer's.
            if look is not None and now > look.when():
                self._watched_since += now - look.when()
            bound = self._blocking_bounds.get(head, self._reply_timeout)
            # The head was sent up to a period before the look that started watching it, and
            # it has waited at least this long; half a period of slack rounds the looks.
            if now - self._watched_since >= bound - self._reply_timeout / (2 * _WATCHDOG_CHECKS):
                error = RedisConnectionError(
                    f"no reply from Redis at {self.params.address} within {bound:g} s"
                )
                logger.warning("%s", error)
                self._abort(error, force=True)
                return
        self._arm_watchdog()

    # Internals.

    def _lost(self, cause: BaseException | None) -> RedisConnectionError:
        where = f"connection to Redis at {self.params.address}"
        if cause is None:
            return RedisConnectionError(f"{where} closed")
        return RedisConnectionError(f"lost {where}: {cause or type(cause).__name__}")

    def _closed_error(self) -> Exception:
        error = self._error
        assert error is not None
        if isinstance(error, ProtocolError):
            return ProtocolError(str(error))
        return RedisConnectionError(str(error))

    def _buffer(self, data: bytes | Parts) -> None:
        if not self._flush_scheduled:
            # The first command of a loop turn goes out at once (no added latency); those
            # issued later in the same turn are gathered into one write by _flush.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
            if isinstance(data, list):
                self._write_gathered(data, sum(map(len, data)))
            else:
                self._write(data)
            return
        if isinstance(data, list):
            self._wbuf.extend(data)
            self._wbuf_size += sum(map(len, data))
        else:
            self._wbuf.append(data)
            self._wbuf_size += len(data)
        if self._wbuf_size >= _WRITE_HIGH_WATER:
            self._flush_buffer()

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._flush_buffer()

    def _flush_buffer(self) -> None:
        if not self._wbuf:
            return
        parts, size = self._wbuf, self._wbuf_size
        self._wbuf = []
        self._wbuf_size = 0
        self._write_gathered(parts, size)

    def _write_gathered(self, parts: Parts, size: int) -> None:
        """Write ``parts`` as one buffer, copied once. A large one is copied into a scratch
        buffer this connection reuses: a fresh allocation of that size per write costs more
        than the copy (the allocator hands large blocks back to the system once freed, and
        every reuse faults its pages in again). The scratch is kept only if the transport
        kept nothing of it (all sent at once, or copied: otherwise it may hold a view)."""
        if size < _SCRATCH_FROM or self._writer is None or len(parts) == 1:
            self._write(b"".join(parts))  # a lone bytes part is written as it is
            return
        if self._fileno >= 0 and len(parts) <= _MAX_VECTOR and self._error is None:
            transport = self._writer.transport
            if not transport.get_write_buffer_size() and not transport.is_closing():
                # Nothing is buffered, so the transport's write() would send at once itself:
                # one writev straight from the parts, no copy (asyncio 3.12's writelines does
                # the same with sendmsg). What the socket does not take, or an error, goes to
                # the transport, which copies it, or meets the error again and closes.
                try:
                    sent = os.writev(self._fileno, parts)
                except OSError:
                    sent = 0
                if sent < size:
                    self._write(_rest(parts, sent))
                else:
                    self._backlogged = False
                return
        scratch = self._scratch
        self._scratch = None
        if scratch is None or len(scratch) < size:
            scratch = bytearray(size)
        # Through a memoryview: a bytearray's own slice assignment first copies a value that
        # is not a bytearray into a temporary one (CPython up to 3.12), two copies per byte.
        view = memoryview(scratch)
        position = 0
        for part in parts:
            end = position + len(part)
            if type(part) is memoryview and part.format != "B":
                part = part.cast("B")  # the same structure on both sides of the assignment
            view[position:end] = part
            position = end
        self._write(view[:size])
        if len(scratch) <= _SCRATCH_MAX and self._writer.transport.get_write_buffer_size() == 0:
            self._scratch = scratch

    def _write(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            return
        transport = self._transport
        assert transport is not None
        try:
            transport.write(data)
        except Exception as exc:  # the transport is already gone
            self._abort(self._lost(exc))
            return
        self._backlogged = transport.get_write_buffer_size() > _WRITE_HIGH_WATER

    async def _drain(self) -> None:
        assert self._writer is not None
        try:
            await self._writer.drain()
            self._backlogged = self._writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER
        except Exception as exc:
            self._abort(
                RedisConnectionError(f"lost connection to Redis at {self.params.address}: {exc}")
            )
            raise self._closed_error() from None

    def _on_data(self, data: bytes) -> None:
        parser = self._parser
        waiters = self._waiters
        try:
            reply = parser.feed_gets(data)
            while reply is not NEED_DATA:
                if not waiters:
                    raise ProtocolError("Redis sent a reply nobody asked for")
                waiter = waiters.popleft()
                if type(waiter) is _ReplyCallback:
                    # A callback (the PUBLISH or LPUSH of a batch, one per request on each
                    # side): called here, once, as its set_result would, without the two
                    # calls of its done and set_result.
                    callback = waiter._callback
                    if callback is not None:
                        waiter._callback = None
                        try:
                            callback(reply)
                        except Exception:  # never let a caller's error end the connection
                            logger.exception("a reply callback failed")
                        if self._error is not None:  # the callback closed the connection
                            return
                elif not waiter.done():  # a cancelled caller's reply is dropped here
                    waiter.set_result(reply)
                    if self._error is not None:  # a reply callback closed the connection
                        return
                if self._leave_codes and isinstance(reply, ReplyError) and self._left(reply):
                    return
                reply = parser.gets()
        except ProtocolError as exc:
            logger.warning("malformed reply from Redis at %s: %s", self.params.address, exc)
            self._abort(exc)
        except Exception as exc:  # never let an error escape into the transport
            self._abort(self._lost(exc))

    def leave_on(self, codes: frozenset[str], callback: Callable[[], None] | None) -> None:
        """Close this connection when an error reply has one of ``codes`` (after handing the
        reply to its caller), and call ``callback``: the server no longer serves what the
        connection is for (demoted to replica, slot moved)."""
        self._leave_codes = codes
        self._on_leave = callback

    def _left(self, reply: ReplyError) -> bool:
        """End the connection if ``reply`` has a code of ``leave_on``; say if so."""
        code = reply.code
        if code not in self._leave_codes:
            return False
        if self._on_leave is not None:
            self._on_leave()
        self._abort(
            RedisConnectionError(
                f"Redis at {self.params.address} no longer serves this connection ({code})"
            )
        )
        return True

    def fail(self, error: Exception) -> None:
        """Close the connection at once, failing every pending command with ``error``'s
        message (``RedisConnectionError``); buffered commands are dropped."""
        self._abort(RedisConnectionError(str(error)), force=True)

    def _on_end(self, error: BaseException | None) -> None:
        if error is None:
            if self._error is None:  # not a second report, after the EOF, of the same end
                self.closed_by_server = True
                self.closed_idle = not self._waiters
            self._abort(
                RedisConnectionError(f"Redis at {self.params.address} closed the connection")
            )
        else:
            self._abort(self._lost(error))

    def _abort(self, error: Exception, *, force: bool = False) -> None:
        if self._error is not None:
            return
        self._error = error
        self.is_closed = True
        self._closed.set_result(error)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._writer is not None:
            if force:  # a dead peer: do not wait for buffered bytes it will never take
                self._writer.transport.abort()
            else:
                self._writer.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._closed_error())

    async def _wait_transport_closed(self) -> None:
        if self._writer is not None:
            await wait_closed(self._writer)


async def wait_closed(writer: asyncio.StreamWriter) -> None:
    """Wait until ``writer``, already told to close, has finished closing (a TLS transport
    shuts its session down first), at most ``_CLOSE_GRACE`` seconds; then drop it. An owner
    that closes its event loop next leaves no transport half closed."""
    try:
        # A graceful close first sends what is buffered, which a dead peer never takes.
        await asyncio.wait_for(asyncio.shield(writer.wait_closed()), _CLOSE_GRACE)
    except asyncio.TimeoutError:
        writer.transport.abort()
    except Exception:  # the connection's end is reported where it is read
        pass


async def open_connection(params: ConnectionParams, *, parser: str | None = None) -> Connection:
    """Open a connection with ``params`` and perform the AUTH/SELECT handshake, both bounded
    by ``params.connect_timeout`` (a server that accepts TCP but never answers is an error)."""
    if params.cluster is not None and not params.host:
        raise RedisConnectionError(
            f"{params.address}: a Redis Cluster has no single connection to open (use "
            "resp.topology's clients, which route by key, or one node's redis:// URL)"
        )
    if params.unresolved:
        from . import sentinel

        params = await sentinel.resolve(params)
    connection = Connection(params, parser=parser)
    await connection._open()
    try:
        if params.password is not None or params.db or params.sentinel is not None:
            try:
                await asyncio.wait_for(_handshake(connection), params.connect_timeout)
            except asyncio.TimeoutError:
                raise RedisConnectionError(
                    f"Redis at {params.address} did not answer the handshake within "
                    f"{params.connect_timeout:g} s"
                ) from None
    except BaseException:
        await connection.close()
        raise
    return connection


async def _handshake(connection: Connection) -> None:
    params = connection.params
    if params.password is not None:
        auth: tuple[str, ...] = ("AUTH", params.password)
        if params.username is not None:
            auth = ("AUTH", params.username, params.password)
        try:
            await connection.execute(*auth)
        except ReplyError as exc:
            shown = _shown_username(params.username)
            who = f" for user {shown!r}" if shown is not None else ""
            raise AuthenticationError(
                f"Redis at {params.address} refused AUTH{who}: {exc}"
            ) from None
    if params.db:
        try:
            await connection.execute("SELECT", params.db)
        except ReplyError as exc:
            if exc.code in ("NOAUTH", "WRONGPASS", "NOPERM"):
                raise AuthenticationError(
                    f"Redis at {params.address} needs credentials: {exc}"
                ) from None
            raise ReplyError(
                f"Redis at {params.address} refused SELECT {params.db}: {exc}"
            ) from None
    if params.sentinel is not None:
        from . import sentinel

        await sentinel.check_role(connection)


def make_params(
    url: str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    db: int | None = None,
    username: str | None = None,
    password: str | None = None,
    unix_socket: str | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
    connect_timeout: float | None = None,
    reply_timeout: float | None = None,
    sentinel: SentinelSpec | None = None,
) -> ConnectionParams:
    """Build ``ConnectionParams`` from a URL and/or keywords; keywords override the URL.

    ``sentinel`` finds the master through sentinels (``host`` and ``port`` are then
    ignored): ``SentinelSpec("mymaster", (("10.0.0.1", 26379), ("10.0.0.2", 26379)))``.
    """
    params = parse_url(url) if url else ConnectionParams()
    changes: dict[str, Any] = {}
    if host is not None:
        changes["host"] = host or "localhost"  # the seed's examples pass host=""
    for name, value in (
        ("port", port),
        ("db", db),
        ("username", username),
        ("password", password),
        ("unix_socket", unix_socket),
        ("connect_timeout", connect_timeout),
        ("reply_timeout", reply_timeout),
    ):
        if value is not None:
            changes[name] = value
    if ssl is not None:
        changes["ssl"] = ssl
    if sentinel is not None:
        changes.update(sentinel=sentinel, host="", unix_socket=None)
    elif params.sentinel is not None and changes.get("host"):
        changes["sentinel"] = None  # an explicit host wins over the URL's sentinels
    return replace(params, **changes)


async def connect(
    url: str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    db: int | None = None,
    username: str | None = None,
    password: str | None = None,
    unix_socket: str | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
    connect_timeout: float | None = None,
    reply_timeout: float | None = None,
    parser: str | None = None,
) -> Connection:
    """Connect to Redis and return a ready ``Connection``.

    ``url`` is ``redis://``, ``rediss://`` or ``unix://``; keywords override its parts.
    ``ssl`` takes an ``ssl.SSLContext`` (or True for the system's default trust).
    ``parser`` is ``"python"`` or ``"hiredis"`` (default: see ``make_parser``).
    ``connect_timeout`` bounds the connection and its handshake; ``reply_timeout`` bounds
    each reply (see ``ConnectionParams``).
    """
    params = make_params(
        url,
        host=host,
        port=port,
        db=db,
        username=username,
        password=password,
        unix_socket=unix_socket,
        ssl=ssl,
        connect_timeout=connect_timeout,
        reply_timeout=reply_timeout,
    )
    return await open_connection(params, parser=parser)
