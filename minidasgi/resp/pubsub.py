"""A pub/sub subscriber on a connection of its own, that survives Redis restarts.

Theory of operation: one supervisor task owns the socket. It connects (AUTH only: pub/sub
ignores SELECT's db, so callers namespace their channel names; bounded by ``connect_timeout``),
sends one SUBSCRIBE for every
wanted channel, then reads pushes until the connection ends; then it reconnects with bounded
exponential backoff and starts again. Confirmations are matched by channel name, since a message
may arrive before the confirmation of its own SUBSCRIBE. The subscriber counts as connected only
once Redis confirmed every wanted channel on the current connection. An error reply in subscribe
mode can only answer a SUBSCRIBE (say NOPERM: the ACL user may not use the channel): the
connection is given up and the subscription retried on a new one, with the same backoff, until
Redis accepts it.

Messages are dispatched to the owner the moment their bytes arrive (``ReplyReader``), with no
reader task in between. On a connection that carries only subscriptions Redis sends nothing
while idle, so a dead peer would go unnoticed: after ``health_check_interval`` seconds of
silence the supervisor sends a PING (allowed in subscribe mode) and gives the connection up if
another interval passes silent.

Messages published while the subscriber was disconnected are lost (pub/sub is fire and forget).
The owner learns of each loss through ``on_connection_lost`` and can fail its in-flight work
instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple

from . import sentinel
from .connection import ConnectionParams, ReplyReader, make_params, open_stream, wait_closed
from .directread import DirectReads, TailSize
from .protocol import (
    NEED_DATA,
    AuthenticationError,
    ProtocolError,
    RedisConnectionError,
    ReplyError,
    make_parser,
    pack_command,
)

__all__ = ["Message", "Subscriber"]

logger = logging.getLogger("minidasgi.resp.pubsub")


class Message(NamedTuple):
    """A message received on a subscribed channel."""

    channel: bytes
    data: bytes


def _as_bytes(channel: str | bytes) -> bytes:
    return channel.encode() if isinstance(channel, str) else bytes(channel)


class Subscriber:
    """Subscribes to channels and delivers their messages, reconnecting as needed.

    Give ``on_message(channel, data)`` to have messages delivered to a callback (called in the
    event loop; it must not block); otherwise iterate with ``async for message in subscriber``.
    ``on_connection_lost()`` is called each time an established connection is lost: messages
    may have been missed from then until the resubscription. ``on_connected()`` is called each
    time Redis has confirmed every subscription again.

    ``health_check_interval``: after that many seconds without a byte from Redis the subscriber
    sends a PING, and gives the connection up (then reconnects) if another interval passes
    without an answer: a dead peer is found within about two intervals.

    ``sharded=True`` uses sharded pub/sub (``SSUBSCRIBE``, Redis 7), one command per channel
    since a command's channels must share a slot; a channel Redis unsubscribes by itself (its
    slot moved to another node) is forgotten and reported to ``on_unsubscribed(channel)``, for
    the owner to subscribe it where it lives now (see ``cluster``).

    ``direct_reads=True``: a message whose payload is large (``directread.DIRECT_FROM``, 64 KiB)
    may be read by the socket straight into a buffer of its own, and its ``data`` is then a
    ``memoryview`` of that buffer instead of ``bytes`` (two copies of it fewer). A function
    (``directread.TailSize``) in place of ``True`` also tells where such a payload's last
    bytes start: those are read straight into ``bytes`` of their own, with no copy, and the
    ``data`` is then a ``directread.SplitPayload`` (on the plain asyncio transport only, and
    only in a process that allows it: ``connection.read_tails_apart``; elsewhere such payloads
    are read as with ``True``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        params: ConnectionParams | None = None,
        host: str | None = None,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        unix_socket: str | None = None,
        ssl: Any = None,
        on_message: Callable[[bytes, bytes], None] | None = None,
        on_connection_lost: Callable[[], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        health_check_interval: float = 5.0,
        min_backoff: float = 0.05,
        max_backoff: float = 2.0,
        parser: str | None = None,
        sharded: bool = False,
        on_unsubscribed: Callable[[bytes], None] | None = None,
        direct_reads: bool | TailSize = False,
    ) -> None:
        self.params = params or make_params(
            url,
            host=host,
            port=port,
            username=username,
            password=password,
            unix_socket=unix_socket,
            ssl=ssl,
        )
        self._on_message = on_message
        self._on_connection_lost = on_connection_lost
        self._on_connected = on_connected
        self._sharded = sharded
        self._on_unsubscribed = on_unsubscribed
        self._direct_reads = direct_reads
        prefix = b"s" if sharded else b""
        self._kinds = (prefix + b"message", prefix + b"subscribe", prefix + b"unsubscribe")
        self._health_check_interval = health_check_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._parser_kind = parser
        self._channels: set[bytes] = set()
        self._confirmed: set[bytes] = set()
        self._waiting: dict[bytes, list[asyncio.Future[None]]] = {}
        # Confirmations are matched by channel, so a channel subscribed, unsubscribed and
        # subscribed again before Redis answered would take the first SUBSCRIBE's confirmation
        # for the last one's (and, sharded, our own SUNSUBSCRIBE's for a slot that moved). On
        # the live connection: SUBSCRIBEs sent and not yet confirmed, the confirmations of
        # those sent before an UNSUBSCRIBE (to skip), and UNSUBSCRIBEs not yet answered.
        self._unconfirmed: dict[bytes, int] = {}
        self._stale: dict[bytes, int] = {}
        self._unsubscribing: dict[bytes, int] = {}
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        # The event's state, read without a call (``connected``: twice per request on a
        # distributor); set and cleared with it (``_set_connected``).
        self._is_connected = False
        self._link: Callable[[Exception], None] | None = None  # ends the live connection
        self._closing = False
        self._last_read = 0.0
        self._confirmations = 0  # times every wanted channel was confirmed
        self._reader: ReplyReader | None = None
        self._server = self.params  # the server of the live connection (resolved)
        self.last_error: Exception | None = None

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<Subscriber {self.params.address} {state} channels={len(self._channels)}>"

    @property
    def connected(self) -> bool:
        """True while connected with every wanted channel confirmed by Redis."""
        return self._is_connected

    @property
    def channels(self) -> frozenset[bytes]:
        """The channels this subscriber wants."""
        return frozenset(self._channels)

    def start(self) -> None:
        """Start connecting in the background (idempotent). ``subscribe`` calls it."""
        if self._closing:
            raise RedisConnectionError("subscriber is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected (every wanted channel confirmed); raise ``TimeoutError`` after
        ``timeout`` seconds."""
        self.start()
        await asyncio.wait_for(self._connected.wait(), timeout)

    def hears(self, channel: str | bytes) -> bool:
        """True while ``channel``'s messages reach this subscriber (it is connected, every
        wanted channel confirmed, ``channel`` among them)."""
        # Asked before every pop and every request (the Node's own channel, as bytes): no
        # copy of a bytes name, and the flag read without the property's call.
        name = channel if type(channel) is bytes else _as_bytes(channel)
        return self._is_connected and name in self._channels

    async def wait_hears(self, channel: str | bytes, timeout: float | None = None) -> None:
        """Wait until ``hears(channel)`` (on one connection: until connected); raise
        ``TimeoutError`` after ``timeout`` seconds."""
        await self.wait_connected(timeout)

    async def subscribe(self, *channels: str | bytes) -> None:
        """Subscribe and return once Redis confirmed every channel.

        While Redis is unreachable this waits for the reconnection; wrap it in
        ``asyncio.wait_for`` to bound the wait. Cancelling it keeps the subscriptions.
        """
        self.start()
        names = [_as_bytes(c) for c in channels]
        loop = asyncio.get_running_loop()
        futures = []
        new = []
        for name in names:
            if name in self._confirmed:
                continue
            future: asyncio.Future[None] = loop.create_future()
            self._waiting.setdefault(name, []).append(future)
            futures.append(future)
            if name not in self._channels:
                self._channels.add(name)
                new.append(name)
        if new and self._writer is not None:
            self._set_connected(False)  # until Redis confirms the new channels too
            self._send_subscribe(new)
        if futures:
            await asyncio.gather(*futures)

    async def unsubscribe(self, *channels: str | bytes) -> None:
        """Stop receiving messages from these channels (all when none is named)."""
        names = [_as_bytes(c) for c in channels] if channels else list(self._channels)
        names = [n for n in names if n in self._channels]
        for name in names:
            self._channels.discard(name)
            self._confirmed.discard(name)
            for future in self._waiting.pop(name, []):
                if not future.done():
                    future.cancel()
        if names and self._writer is not None:
            for name in names:
                stale = self._unconfirmed.get(name, 0)
                if stale:
                    self._stale[name] = stale
                self._unsubscribing[name] = self._unsubscribing.get(name, 0) + 1
            if self._sharded:
                for name in names:
                    self._send("SUNSUBSCRIBE", name)
            else:
                self._send("UNSUBSCRIBE", *names)
            self._check_confirmed()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        if self._on_message is not None:
            raise RuntimeError("this Subscriber delivers to its on_message callback")
        self.start()
        while True:
            message = await self._queue.get()
            if message is None:
                return
            yield message

    async def close(self) -> None:
        """Stop and disconnect. Safe to call more than once."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(RedisConnectionError("subscriber closed"))
        self._waiting.clear()
        self._queue.put_nowait(None)

    # Internals.

    def _send(self, *args: object) -> None:
        assert self._writer is not None
        self._writer.write(pack_command(*args))

    def _send_subscribe(self, channels: Iterable[bytes]) -> None:
        channels = list(channels)
        unconfirmed = self._unconfirmed
        for channel in channels:
            unconfirmed[channel] = unconfirmed.get(channel, 0) + 1
        if self._sharded:  # one command per channel: a command's channels share one slot
            for channel in channels:
                self._send("SSUBSCRIBE", channel)
        else:
            self._send("SUBSCRIBE", *channels)

    async def _supervise(self) -> None:
        backoff = self._min_backoff
        while not self._closing:
            try:
                writer, ended, end = await self._open()
            except AuthenticationError as exc:
                self.last_error = exc
                logger.error("%s", exc)
            except (RedisConnectionError, ReplyError, OSError) as exc:
                # OSError as Client._run takes it: no failure to connect may end the supervisor,
                # or the subscriber would never come back.
                self.last_error = exc
                logger.debug("subscriber cannot connect: %s", exc)
            else:
                confirmed_before = self._confirmations
                try:
                    error = await self._serve(writer, ended, end)
                finally:
                    self._writer = None
                    self._link = None
                    self._set_connected(False)
                    self._confirmed.clear()
                    self._unconfirmed.clear()
                    self._stale.clear()
                    self._unsubscribing.clear()
                    writer.close()
                    if self._closing:
                        # close() returns once the transport has finished closing (bounded):
                        # a TLS one left half closed warns when its owner closes the loop.
                        await wait_closed(writer)
                self.last_error = error
                logger.warning(
                    "subscriber lost its connection to Redis at %s: %s",
                    self.params.address,
                    error or type(error).__name__,
                )
                if self._on_connection_lost is not None and not self._closing:
                    self._on_connection_lost()
                if self._confirmations != confirmed_before:
                    # It was fully subscribed: an outage, so reconnect at once.
                    backoff = self._min_backoff
                    continue
                # Never fully subscribed (refused, or lost while subscribing): back off, or a
                # refusing Redis would be asked again and again without a pause.
            # Jitter spreads the reconnects of many processes after a Redis restart.
            delay = backoff * (0.5 + random.random() / 2)
            await sentinel.pause(self.params, delay)  # cut short when the master moves
            backoff = min(backoff * 2, self._max_backoff)

    async def _open(
        self,
    ) -> tuple[asyncio.StreamWriter, asyncio.Future[Exception], Callable[[Exception], None]]:
        """Connect and log in; return the writer, a future for the connection's end, and the
        function that ends it."""
        loop = asyncio.get_running_loop()
        parser: Any = make_parser(self._parser_kind)
        direct = None
        if self._direct_reads:
            tail_size = None if self._direct_reads is True else self._direct_reads
            parser = direct = DirectReads(self._kinds[0], tail_size=tail_size)
        ended: asyncio.Future[Exception] = loop.create_future()
        handshake: list[asyncio.Future[Any]] = []  # waiters for replies before subscribing
        transport: list[asyncio.WriteTransport] = []

        def end(error: Exception) -> None:
            if not ended.done():
                ended.set_result(error)
            for waiter in handshake:
                if not waiter.done():
                    waiter.set_exception(error)
            if transport:
                transport[0].abort()

        def sink(data: bytes) -> None:
            # Messages are dispatched the moment their bytes arrive: no reader task.
            self._last_read = loop.time()
            try:
                reply = parser.feed_gets(data)
                while reply is not NEED_DATA:
                    if handshake:
                        waiter = handshake.pop(0)
                        if not waiter.done():
                            waiter.set_result(reply)
                    else:
                        self._handle(reply)
                    reply = parser.gets()
            except ProtocolError as exc:
                end(exc)
            except Exception as exc:  # never let an error escape into the transport
                end(RedisConnectionError(f"subscriber failed: {exc}"))

        def on_end(error: BaseException | None) -> None:
            if error is None:
                end(RedisConnectionError("Redis closed the connection"))
            elif isinstance(error, ProtocolError):
                # Bytes that broke the protocol where the transport reads (a large payload
                # read into its own buffer, see ``directread``): what ``sink`` ends it with.
                end(error)
            else:
                end(RedisConnectionError(str(error) or type(error).__name__))

        params = self.params
        if params.unresolved:
            params = await sentinel.resolve(params)
        self._server = params
        self._reader = ReplyReader(sink, on_end, direct)  # held: the protocol keeps a weakref
        writer = await open_stream(params, self._reader)
        transport.append(writer.transport)
        if params.password is not None:
            auth: tuple[str, ...] = ("AUTH", params.password)
            if params.username is not None:
                auth = ("AUTH", params.username, params.password)
            waiter: asyncio.Future[Any] = loop.create_future()
            handshake.append(waiter)
            writer.write(pack_command(*auth))
            try:
                reply = await asyncio.wait_for(waiter, params.connect_timeout)
            except asyncio.TimeoutError:
                writer.close()
                raise RedisConnectionError(
                    f"Redis at {params.address} did not answer AUTH"
                ) from None
            except BaseException:
                writer.close()
                raise
            if isinstance(reply, ReplyError):
                writer.close()
                raise AuthenticationError(f"Redis at {params.address} refused AUTH: {reply}")
        if params.sentinel is not None:
            # Subscribed to a replica, this process would miss what is published on the
            # master: check the role as command connections do.
            waiter = loop.create_future()
            handshake.append(waiter)
            writer.write(pack_command("ROLE"))
            try:
                reply = await asyncio.wait_for(waiter, params.connect_timeout)
            except BaseException:
                writer.close()
                raise
            role = reply[0] if isinstance(reply, list) and reply else None
            if role != b"master" and not isinstance(reply, ReplyError):  # ACL: trust
                writer.close()
                sentinel.suspect(params)
                raise RedisConnectionError(f"Redis at {params.address} is not the master")
        return writer, ended, end

    async def _serve(
        self,
        writer: asyncio.StreamWriter,
        ended: asyncio.Future[Exception],
        end: Callable[[Exception], None],
    ) -> Exception:
        """Subscribe everything and wait for the connection to end; return why it ended."""
        self._writer = writer
        self._link = end
        if self._channels:
            self._send_subscribe(self._channels)
        else:
            self._check_confirmed()
        self._last_read = asyncio.get_running_loop().time()
        health = asyncio.ensure_future(self._check_health(end))
        unwatch = None
        if self._server.sentinel is not None:  # drop it the moment the master moves
            unwatch = sentinel.watch(self._server, end)
        try:
            return await ended
        finally:
            health.cancel()
            if unwatch is not None:
                unwatch()

    async def _check_health(self, end: Callable[[Exception], None]) -> None:
        """PING after an idle interval; end the connection if a second one passes silent.

        A timer beside the connection, rather than a timeout on every read, keeps the cost
        per message at zero.
        """
        loop = asyncio.get_running_loop()
        interval = self._health_check_interval
        pinged_at: float | None = None
        paused = 0.0  # of the time since the PING, how long this process did not run
        while True:
            due = loop.time() + interval / 2
            await asyncio.sleep(interval / 2)
            now = loop.time()
            if pinged_at is not None and self._last_read < pinged_at:
                if now > due:
                    # This check comes late: the process did not run meanwhile (stopped, its
                    # loop blocked), so it could not read the answer either; and a process
                    # resumed from a stop runs its due timers before it reads what came.
                    paused += now - due
                if now - pinged_at - paused >= interval:
                    end(RedisConnectionError("no answer to a health-check PING"))
                    return
                continue
            pinged_at = None
            if now - self._last_read >= interval:
                self._send("PING")
                pinged_at = now
                paused = 0.0

    def _set_connected(self, connected: bool) -> None:
        self._is_connected = connected
        if connected:
            self._connected.set()
        else:
            self._connected.clear()

    def _check_confirmed(self) -> None:
        """Mark the subscriber connected once every wanted channel is confirmed."""
        if self._is_connected or self._writer is None:
            return
        if self._channels <= self._confirmed:
            self._set_connected(True)
            self._confirmations += 1
            if self._on_connected is not None:
                self._on_connected()

    @staticmethod
    def _answered(pending: dict[bytes, int], channel: Any) -> bool:
        """Count one of ``channel``'s ``pending`` commands answered; False if none was."""
        count = pending.get(channel, 0)
        if not count:
            return False
        if count == 1:
            del pending[channel]
        else:
            pending[channel] = count - 1
        return True

    def _handle(self, reply: Any) -> None:
        if (
            type(reply) is list
            and len(reply) == 3
            and type(reply[0]) is bytes
            and reply[0] == self._kinds[0]
            and self._on_message is not None
            and reply[1] in self._channels
        ):
            # A message on a channel of ours, what nearly every reply is: what
            # ``_handle_any`` does with it, without its checks for the other kinds first.
            try:
                self._on_message(reply[1], reply[2])
            except Exception:
                logger.exception("on_message callback failed")
            return
        self._handle_any(reply)

    def _handle_any(self, reply: Any) -> None:
        if isinstance(reply, ReplyError):
            if self._is_connected:
                # Every channel is confirmed, so this answers a health-check PING (an ACL user
                # without +ping): an answer all the same, and the peer is alive.
                logger.debug("Redis answered an error to the subscriber: %s", reply)
                return
            # A SUBSCRIBE was refused (NOPERM: the ACL user may not use the channel). Give the
            # connection up and subscribe again on a new one after a backoff: the ACL may be
            # mended, and pretending to be subscribed would lose every message.
            logger.warning("Redis at %s refused to subscribe: %s", self.params.address, reply)
            if self._link is not None:
                self._link(RedisConnectionError(f"Redis refused to subscribe: {reply}"))
            return
        if reply == b"PONG":  # a health-check PING sent while no channel was subscribed
            return
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
            raise ProtocolError("unexpected reply in subscribe mode")
        kind = reply[0]
        message_kind, subscribe_kind, unsubscribe_kind = self._kinds
        if kind != message_kind:
            kind = kind.lower()
        if kind == message_kind and len(reply) == 3:
            channel, data = reply[1], reply[2]
            if channel in self._channels:
                if self._on_message is not None:
                    try:
                        self._on_message(channel, data)
                    except Exception:
                        logger.exception("on_message callback failed")
                else:
                    self._queue.put_nowait(Message(channel, data))
        elif kind == subscribe_kind and len(reply) == 3:
            channel = reply[1]
            if self._answered(self._unconfirmed, channel) and self._answered(self._stale, channel):
                return  # a SUBSCRIBE sent before an UNSUBSCRIBE of the channel: not the latest
            if channel in self._channels:
                self._confirmed.add(channel)
                for future in self._waiting.pop(channel, []):
                    if not future.done():
                        future.set_result(None)
                self._check_confirmed()
        elif kind == unsubscribe_kind and len(reply) == 3:
            channel = reply[1]
            if self._answered(self._unsubscribing, channel):
                return  # the answer to an UNSUBSCRIBE of ours
            if self._sharded and channel in self._channels:
                # Not asked for: the channel's slot moved to another node (a failover, a
                # resharding). Forget it here; the owner subscribes it where it lives now.
                self._channels.discard(channel)
                self._confirmed.discard(channel)
                if self._on_unsubscribed is not None:
                    self._on_unsubscribed(channel)
                self._check_confirmed()
        elif kind == b"pong":
            pass
        else:
            raise ProtocolError(f"unexpected {kind[:32]!r} push in subscribe mode")
