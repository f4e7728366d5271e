"""A command connection that reconnects by itself.

Owns the life cycle of one ``Connection``: a supervisor task opens it, waits for it to end,
and opens a new one with bounded, jittered exponential backoff, forever, until ``close()``.
Callers never wait for a Redis that is down: ``connection()`` returns the live connection or
raises ``RedisConnectionError`` at once, so a front process can answer 503 instead of hanging.
It never retries a command: whether a command sent on a lost connection ran is unknowable.

A dead peer is found by the connection's reply watchdog (``ConnectionParams.reply_timeout``);
so that an idle connection is checked too, the supervisor sends a PING every
``health_check_interval`` seconds while no reply is pending, and reconnects once the watchdog
gives the connection up.

A connection Redis closes cleanly (its idle ``timeout``, as managed services set it; ``CLIENT
KILL``) is replaced at once, with no backoff: ``wait_reopened`` lets a caller that finds it
gone wait for that one attempt, at most ``REOPEN_WAIT`` (0.25 s), rather than take Redis for
unreachable. Any other end (a reset, the reply watchdog) is not waited for.

An idle connection Redis closes cleanly and that is replaced at once is what a Redis
``timeout`` below ``health_check_interval`` does every ``timeout`` seconds: expected, not a
fault. The first is logged at INFO, with the advice that stops it; each next one at DEBUG
and, while they go on, their count at INFO once per ``Client.idle_close_repeat`` (10 min) at
most, so that an operator still sees them go on (a ``CLIENT KILL`` loop, a proxy closing idle
connections). Every other end is a warning, and so is an idle one whose replacement fails
(Redis shut down, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from . import sentinel
from .connection import Connection, ConnectionParams, open_connection
from .protocol import (
    AuthenticationError,
    RedisConnectionError,
    RespError,
    pack_command,
    pack_gathering,
    pack_pair_command,
)

__all__ = ["REOPEN_WAIT", "Client"]

logger = logging.getLogger("minidasgi.resp.client")

_PUBLISH = b"*3\r\n$7\r\nPUBLISH\r\n"  # packed once (``pack_pair_command``)

REOPEN_WAIT = 0.25
"""Seconds ``wait_reopened`` waits at most for a connection Redis closed cleanly to be
replaced: a round trip or two on a healthy network, and a small delay on the rare request
that finds Redis gone just after it closed a connection cleanly."""


class Client:
    """One Redis connection kept open across outages. ``start()`` it, then use it."""

    # Seconds: the idle connections Redis keeps closing are counted in one INFO line this
    # often at most, after the first (``_idle_close_replaced``).
    idle_close_repeat = 600.0

    def __init__(
        self,
        params: ConnectionParams,
        *,
        name: str = "client",
        parser: str | None = None,
        min_backoff: float = 0.05,
        max_backoff: float = 2.0,
        health_check_interval: float | None = 5.0,
    ) -> None:
        self.params = params
        self.health_check_interval = health_check_interval
        self.name = name
        self._parser = parser
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._connection: Connection | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._ever_connected = False
        self._refused: AuthenticationError | None = None
        # The attempt under way to replace a connection that just ended (``wait_reopened``),
        # and the connection watched until it ends.
        self._reopening: asyncio.Future[None] | None = None
        self._watched: Connection | None = None
        self.last_error: Exception | None = None
        # When the advice about Redis' idle ``timeout`` was last logged (None: never), and
        # the idle closes replaced since (``_idle_close_replaced``).
        self._idle_told_at: float | None = None
        self._idle_closes = 0

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<Client {self.name} {self.params.address} {state}>"

    @property
    def connected(self) -> bool:
        """True while a live connection is at hand."""
        connection = self._connection
        return connection is not None and not connection.is_closed

    @property
    def ever_connected(self) -> bool:
        """True once a connection was made (False while the first one is being attempted)."""
        return self._ever_connected

    def start(self) -> None:
        """Start the supervisor (idempotent)."""
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_connected(self, timeout: float | None = None) -> Connection:
        """Wait for a live connection, at most ``timeout`` seconds (``TimeoutError``).

        Raise ``AuthenticationError`` if Redis refused the credentials before this client ever
        connected: that is a configuration error, and the client stops trying.
        """
        self.start()
        connection = self._connection
        if connection is not None and not connection.is_closed and self._refused is None:
            return connection  # the usual case (once per pop): no task, no timer
        return await asyncio.wait_for(self._wait_connected(), timeout)

    async def _wait_connected(self) -> Connection:
        while True:
            if self._refused is not None:
                raise self._refused
            connection = self._connection
            if connection is not None and not connection.is_closed:
                return connection
            self._ready.clear()
            await self._ready.wait()

    def connection(self) -> Connection:
        """The live connection; ``RedisConnectionError`` at once when Redis is unreachable."""
        connection = self._connection
        if connection is None or connection.is_closed:
            reason = f": {self.last_error}" if self.last_error is not None else ""
            raise RedisConnectionError(f"Redis at {self.params.address} is unreachable{reason}")
        return connection

    async def wait_reopened(self) -> bool:
        """Whether a live connection is at hand, once a connection Redis closed cleanly is
        replaced: waits for the supervisor's first attempt at that (made at once, with no
        backoff), at most ``REOPEN_WAIT`` seconds.

        Only a clean close (``Connection.closed_by_server``: Redis' idle ``timeout``, ``CLIENT
        KILL``) is waited for: Redis was there to close it, and a request arriving at that
        moment is served rather than answered 503. In every other case the answer is
        immediate: no connection ended, or one ended otherwise (a reset, the reply watchdog,
        a failover: Redis or the path to it may be gone), or that first attempt is over."""
        reopening = self._reopening
        if reopening is None:
            watched = self._watched
            if watched is None or not watched.closed_by_server:
                return self.connected
            # Ended, and its supervisor not resumed yet: opening the next is what it does next.
            reopening = self._reopening = self._loop().create_future()
        # Not awaited directly: a waiter cancelled would cancel it for every other.
        await asyncio.wait((reopening,), timeout=REOPEN_WAIT)
        return self.connected

    async def execute(self, *args: object) -> Any:
        """Run a command on the live connection (see ``Connection.execute``)."""
        return await self.connection().execute(*args)

    async def publish(self, channel: str | bytes, message: object) -> int:
        """PUBLISH on the live connection; returns the number of receivers."""
        return await self.connection().publish(channel, message)

    async def try_publish(self, channel: str | bytes, message: object) -> int:
        """PUBLISH, with Redis unreachable counted (and logged) as 0 receivers: to a sender
        checking that its peer listens, both mean the message reached nobody."""
        try:
            return await self.publish(channel, message)
        except RespError as exc:
            logger.warning("%s cannot publish: %s", self.name, exc)
            return 0

    async def lpush(self, key: str | bytes, *values: object) -> int:
        """LPUSH on the live connection."""
        return await self.connection().lpush(key, *values)

    def publish_soon(self, channel: str | bytes, message: object) -> asyncio.Future[int]:
        """PUBLISH without waiting for the reply: the future gives the receiver count, with
        Redis unreachable or an error reply counted (and logged) as 0, as ``try_publish``."""
        result: asyncio.Future[int] = self._loop().create_future()
        self.publish_into(channel, message, result)
        return result

    def publish_into(
        self,
        channel: str | bytes,
        message: object,
        result: asyncio.Future[int],
        settled: Callable[[asyncio.Future[int]], None] | None = None,
    ) -> None:
        """``publish_soon`` settling the caller's ``result`` straight from the reply (no future
        of its own, no loop turn in between); a ``result`` already done is left alone.
        ``settled``, if given, is called with ``result`` once this settled it, from the same
        code (a done callback would cost a loop callback, and at one request in flight a loop
        iteration of its own)."""
        # A message of one bytes value (nearly all) in one formatting step, not the general
        # packer's loop over the arguments.
        packed = (
            pack_pair_command(_PUBLISH, channel, message)
            if type(message) is bytes
            else pack_gathering("PUBLISH", channel, message)
        )
        try:
            # The reply goes to _settle_count through a partial (made and called in C), not
            # a lambda: a Python call less per PUBLISH (one per request on a Node).
            self.connection().send_packed_to(
                packed, functools.partial(self._settle_count, result, settled)
            )
        except RespError as exc:
            logger.warning("%s cannot publish: %s", self.name, exc)
            if not result.done():
                result.set_result(0)
                if settled is not None:
                    settled(result)

    def lpush_soon(self, key: str | bytes, values: list[Any]) -> asyncio.Future[int]:
        """LPUSH ``values`` (in order: the first is popped first by RPOP) without waiting for
        the reply: the future gives the list's new length, or raises ``RespError``."""
        result: asyncio.Future[int] = self._loop().create_future()
        try:
            self.connection().send_packed_to(
                pack_command("LPUSH", key, *values), lambda reply: settle_reply(result, reply)
            )
        except RespError as exc:
            result.set_exception(exc)
        return result

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The live connection's loop: asking asyncio for the running one costs a getpid()
        on Python 3.11."""
        connection = self._connection
        if connection is None or connection.is_closed:
            return asyncio.get_running_loop()
        return connection.loop

    def _settle_count(
        self,
        result: asyncio.Future[int],
        settled: Callable[[asyncio.Future[int]], None] | None,
        reply: Any,
    ) -> None:
        if result.done():
            return
        if isinstance(reply, BaseException):
            logger.warning("%s cannot publish: %s", self.name, reply)
            result.set_result(0)
        else:
            result.set_result(reply)
        if settled is not None:
            settled(result)

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        reopening, self._reopening = self._reopening, None
        if reopening is not None and not reopening.done():
            reopening.set_result(None)  # its waiters find no connection
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def _supervise(self) -> None:
        backoff = self._min_backoff
        # The end of an idle connection Redis closed cleanly, told once the attempt to replace
        # it is known to have succeeded (expected: ``_idle_close_replaced``) or failed (then a
        # warning, as every other end).
        idle_end: Exception | None = None
        while not self._closing:
            try:
                try:
                    connection = await self._open()
                finally:
                    # Its waiters resume after this turn, which stores a new connection.
                    reopening, self._reopening = self._reopening, None
                    if reopening is not None:
                        reopening.set_result(None)
            except AuthenticationError as exc:
                if idle_end is not None:
                    logger.warning("%s: %s", self.name, idle_end)
                    idle_end = None
                self.last_error = exc
                logger.error("%s: %s", self.name, exc)
                if not self._ever_connected:
                    # Wrong credentials from the start are a configuration error, not an
                    # outage: fail the waiters instead of retrying forever.
                    self._refused = exc
                    self._ready.set()
                    return
            except (RespError, OSError) as exc:
                if idle_end is not None:
                    logger.warning("%s: %s", self.name, idle_end)
                    idle_end = None
                self.last_error = exc
                logger.debug("%s cannot connect: %s", self.name, exc)
            else:
                if self._closing:  # close() came while connecting (wait_for may drop a cancel)
                    await connection.close()
                    return
                if idle_end is not None:
                    self._idle_close_replaced(idle_end)
                    idle_end = None
                if backoff > self._min_backoff:
                    logger.info("%s reconnected to Redis at %s", self.name, self.params.address)
                backoff = self._min_backoff
                self._connection = connection
                self._ever_connected = True
                self._ready.set()
                self._watched = connection
                try:
                    reason = await self._watch(connection)
                finally:
                    self._watched = None
                    if self._closing:
                        await connection.close()
                self.last_error = reason
                if connection.closed_idle and not self._closing:
                    idle_end = reason  # told once the attempt to replace it ends
                else:
                    logger.warning("%s: %s", self.name, reason)
                if self._reopening is None and connection.closed_by_server:
                    self._reopening = asyncio.get_running_loop().create_future()
                continue
            delay = backoff * (0.5 + random.random() / 2)
            await sentinel.pause(self.params, delay)  # cut short when the master moves
            backoff = min(backoff * 2, self._max_backoff)

    def _idle_close_replaced(self, reason: Exception) -> None:
        """An idle connection Redis closed cleanly was replaced at once: its idle ``timeout``
        at or below ``health_check_interval`` (or a ``CLIENT KILL``, client eviction, a proxy
        closing idle connections). Told at once with what stops it; then each at DEBUG (with
        a ``timeout`` of 1 s, a line a second else) and, while they go on, counted at INFO at
        most once per ``idle_close_repeat`` seconds: an operator must see that they go on
        (each costs a reconnection), whatever their cause."""
        now = time.monotonic()
        told = self._idle_told_at
        if told is not None:
            self._idle_closes += 1
            since = now - told
            if since < self.idle_close_repeat:
                logger.debug("%s: %s (idle; replaced)", self.name, reason)
                return
            closes, self._idle_told_at, self._idle_closes = self._idle_closes, now, 0
            logger.info(
                "%s: Redis at %s closed %d more idle connection%s in %.0f s, each replaced at "
                "once. To keep connections open, %s",
                self.name,
                self.params.address,
                closes,
                "" if closes == 1 else "s",
                since,
                self._idle_advice(),
            )
            return
        self._idle_told_at = now
        logger.info(
            "%s: Redis at %s closed an idle connection (its 'timeout' setting, most likely) "
            "and it was replaced at once, as the next ones will be (logged at DEBUG, counted "
            "at INFO every %g s at most). To keep connections open, %s",
            self.name,
            self.params.address,
            self.idle_close_repeat,
            self._idle_advice(),
        )

    def _idle_advice(self) -> str:
        """What stops Redis closing idle connections (its ``timeout``)."""
        interval = self.health_check_interval
        if interval:
            return (
                f"set Redis' timeout above health_check_interval ({interval:g} s), or to 0, or "
                "lower health_check_interval below it"
            )
        return "set Redis' timeout to 0, or turn health_check_interval on below it"

    async def _open(self) -> Connection:
        """Open a connection (a subclass may choose the server each time)."""
        return await open_connection(self.params, parser=self._parser)

    async def _watch(self, connection: Connection) -> Exception:
        """Wait for the connection to end, checking its health while it idles; return why.

        Under Sentinel the connection is also closed the moment the master moves elsewhere.
        """
        unwatch = None
        if connection.params.sentinel is not None:
            unwatch = sentinel.watch(connection.params, connection.fail)
        try:
            return await self._wait_closed(connection)
        finally:
            if unwatch is not None:
                unwatch()

    async def _wait_closed(self, connection: Connection) -> Exception:
        interval = self.health_check_interval
        if not interval:
            return await connection.wait_closed()
        closed = asyncio.ensure_future(connection.wait_closed())
        try:
            while True:
                done, _ = await asyncio.wait((closed,), timeout=interval)
                if done:
                    return closed.result()
                connection.check_health()
        finally:
            closed.cancel()


def copy_outcome(result: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """Copy a finished command's outcome (``done``) to ``result``, unless ``result`` is done
    already. A cancelled command fails ``result`` rather than cancelling it: ``result`` may be
    a future shared by several callers (a batch's), which refuses to be cancelled."""
    if result.done():
        return
    if done.cancelled():
        result.set_exception(RedisConnectionError("the command was cancelled"))
    elif done.exception() is not None:
        result.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        result.set_result(done.result())


def settle_reply(result: asyncio.Future[Any], reply: Any) -> None:
    """Settle ``result`` with a raw reply (``Connection.send_packed_to``'s outcome): an error
    reply or a lost connection raised, anything else its value; a done ``result`` is left."""
    if result.done():
        return
    if isinstance(reply, BaseException):
        result.set_exception(reply)
    else:
        result.set_result(reply)
