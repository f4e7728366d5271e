"""Admission: whether a request may wait in a queue, decided in the LPUSH's round trip.

Owns the distributor's three early refusals and the commands that decide them:

- ``max_in_flight``: a process relaying that many requests refuses more before touching Redis;
- ``fail_fast``: ``PUBSUB NUMSUB`` on the key's presence channel (``wire.presence_channel``,
  which every Node popping the key subscribes to) goes out in the same write as the LPUSH,
  so knowing that no Node listens costs no extra round trip; the request is then taken back;
- ``max_queue``: LPUSH returns the list's length; over the bound the request is taken back.

The envelopes pushed onto one key in one loop turn go in one ``LPUSH key e1 e2 ...`` (a
``Batcher``; FIFO kept: RPOP takes e1 first) of up to ``PUSH_GROUP`` envelopes, with one NUMSUB
pipelined per batch for fail-fast. A turn with more (under load, all the requests an ASGI
server read in its previous turn) sends its first group as soon as it is full: a Node starts on
those while this process still relays the others, and answers them while it relays the rest,
instead of the whole turn's requests travelling as one convoy through the Node and back, which
left this process idle while the Node ran them. Each request works out the list length its own
push made from its place in the batch, so ``max_queue`` refuses exactly the requests past the
bound. A caller may hand ``put`` a callback instead of awaiting: the code that reads the
LPUSH's reply tells the batch's callbacks in order, with no loop handle per request.

The caller takes a refused request back (LREM) and answers it; this module never answers a
client, never retries, and keeps no state per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import memo, metrics, wire
from .batching import Batcher, Settlement
from .resp import ReplyError
from .resp.client import copy_outcome
from .resp.connection import Connection
from .resp.protocol import pack_arguments, pack_command, pack_command_from
from .resp.topology import Commands

__all__ = ["PUSH_GROUP", "Admission"]

logger = logging.getLogger("minidasgi.admission")


class Admission:
    """The admission policy of one distributor.

    ``max_queue``: the longest a queue may grow by this distributor's pushes, for every key
    (an int), or per key (a mapping from key to bound; ``"*"`` for the others; None: no
    bound). ``fail_fast``: refuse at once when no Node listens on the key. ``cluster``: the
    Nodes' presence channels are named for a Redis Cluster (``wire.presence_channel``).
    """

    def __init__(
        self,
        *,
        channel_prefix: str,
        db: int,
        cluster: bool = False,
        fail_fast: bool = False,
        max_queue: int | Mapping[str, int | None] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.channel_prefix = channel_prefix
        self.db = db
        self.cluster = cluster  # presence channels are named for a Redis Cluster
        self.fail_fast = fail_fast
        if isinstance(max_queue, Mapping):
            self._bounds: dict[str, int | None] = dict(max_queue)
            self._default_bound = self._bounds.pop("*", None)
        else:
            self._bounds = {}
            self._default_bound = max_queue
        for bound in (*self._bounds.values(), self._default_bound, max_in_flight):
            if bound is not None and (type(bound) is not int or bound < 1):
                raise ValueError(f"queue and in-flight bounds must be integers >= 1, not {bound!r}")
        self.max_in_flight = max_in_flight
        self._unbounded = not self._bounds and self._default_bound is None  # no queue bound
        self._channels: dict[str, bytes] = {}  # key -> packed PUBSUB NUMSUB command
        self._lpush_heads: dict[str, bytes] = {}  # key -> LPUSH's name and key, packed
        self._numsub_refused = False  # the ACL user may not run PUBSUB: fail-fast is off
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last line, unlogged)
        self._connection: Commands | None = None  # where the next batch of pushes goes
        # One LPUSH per key per loop turn and group; its future gives (listeners, length,
        # batch size).
        self.pushes: Batcher[tuple[Any, Any, int]] = Batcher(
            send_into=self._send, max_size=_MAX_PUSH, max_items=PUSH_GROUP, eager=True
        )

    def bound(self, key: str) -> int | None:
        """The queue bound for ``key`` (None: unbounded)."""
        return self._bounds.get(key, self._default_bound)

    def over_capacity(self, in_flight: int) -> bool:
        """True when a process relaying ``in_flight`` requests must refuse another."""
        limit = self.max_in_flight
        return limit is not None and in_flight >= limit

    def log_refusal(self, reason: str, key: str) -> None:
        """Log a refusal: a line per reason per second at most, with the count left out,
        so that a flood of refused requests does not flood the log."""
        now = time.monotonic()
        last, unlogged = self._logged.get(reason, (0.0, 0))
        if now - last < 1.0:
            self._logged[reason] = (last, unlogged + 1)
            return
        self._logged[reason] = (now, 0)
        more = f" (and {unlogged} more since the last line)" if unlogged else ""
        logger.warning("refused a request on %r: %s%s", key, _REASONS.get(reason, reason), more)

    async def push(self, connection: Commands, key: str, data: bytes) -> str | None:
        """LPUSH ``data`` (with the other pushes onto ``key`` of this loop turn); return None
        if it may wait, else the refusal reason (``metrics.NO_NODE`` or
        ``metrics.QUEUE_FULL``), the request then being in the list still, for the caller to
        take back. Raise ``RespError`` when the LPUSH failed."""
        pushed, index = self.put(connection, key, data)
        return self.verdict(key, index, await pushed)

    def put(
        self,
        connection: Commands,
        key: str,
        data: bytes,
        then: Callable[[Any, int], None] | None = None,
    ) -> tuple[asyncio.Future[tuple[Any, Any, int]], int]:
        """``push`` without the wait: the batch's future and this request's place in the batch,
        for ``verdict`` once the future is done. A caller with something else to wait for (a
        distributor waits for the ack) need not wake for the LPUSH's reply.

        ``then(outcome, index)``, if given, gets the batch's outcome (or the exception that
        failed it) and the request's place in the batch directly from the code that reads the
        reply, the batch's requests in order: no loop handle per request, as a done callback
        on the future would cost. It must be quick and not raise. On a connection (not a
        Cluster's router) it is not called for an LPUSH that went through when the verdict
        can only be None (no fail-fast answer, no queue bound): nothing to tell then."""
        self._connection = connection
        pushed = self.pushes.put(key, (data, then), size=len(data))
        return pushed, self.pushes.index

    def send(
        self, connection: Commands, key: str, data: bytes, then: Callable[[Any, int], None]
    ) -> None:
        """``put`` for a caller told by ``then`` alone (the distributor): no future is made
        for the batch unless another caller of it wants one (about 4k instructions per
        batch, made and settled for nobody)."""
        self._connection = connection
        self.pushes.put(key, (data, then), size=len(data), future=False)

    def verdict(self, key: str, index: int, outcome: tuple[Any, Any, int]) -> str | None:
        """What ``push`` returns, from the outcome of the batch at ``index`` in it: None, or
        the refusal reason; raise ``RespError`` when the LPUSH failed."""
        listeners, length, count = outcome
        if listeners is None and self._unbounded and type(length) is int:
            return None  # no fail-fast nor bound: an LPUSH that went through is all it takes
        if isinstance(length, ReplyError):
            raise length
        if listeners is not None:
            if isinstance(listeners, ReplyError):
                if not self._numsub_refused:
                    logger.warning("fail-fast is off: Redis refused PUBSUB NUMSUB (%s)", listeners)
                self._numsub_refused = True
            elif _count(listeners) == 0:
                return metrics.NO_NODE
        bound = self.bound(key)
        # The length right after this request's own push: later ones in the batch follow.
        if bound is not None and type(length) is int and length - (count - 1 - index) > bound:
            return metrics.QUEUE_FULL
        return None

    def _send(
        self,
        key: str,
        items: list[tuple[bytes, Callable[[Any, int], None] | None]],
        result: Settlement[tuple[Any, Any, int]] | None,
    ) -> None:
        try:
            self._send_items(key, items, result)
        except BaseException as exc:  # no command went out: the batcher fails the future
            _tell(items, exc)
            raise

    def _send_items(
        self,
        key: str,
        items: list[tuple[bytes, Callable[[Any, int], None] | None]],
        result: Settlement[tuple[Any, Any, int]] | None,
    ) -> None:
        connection = self._connection
        assert connection is not None
        packed: bytes | None = None
        if self.fail_fast and not self._numsub_refused:
            packed = self._channels.get(key)
            if packed is None:
                channel = wire.presence_channel(
                    self.channel_prefix, self.db, key, cluster=self.cluster
                )
                packed = pack_command("PUBSUB", "NUMSUB", channel)
                if len(self._channels) < metrics.MAX_SERIES:  # keys can come from paths
                    self._channels[key] = packed
        # One envelope at one request in flight: no comprehension (a call of its own) for it.
        values = [items[0][0]] if len(items) == 1 else [item[0] for item in items]
        pushing = self._pack_lpush(key, values)
        if not isinstance(connection, Connection):
            # A Cluster's router: the two commands may live on different masters.
            routed = asyncio.ensure_future(self._send_routed(connection, packed, pushing, values))
            # The outcome is worked out in a future even if the batch has none to settle.
            settled: asyncio.Future[tuple[Any, Any, int]] = (
                result if isinstance(result, asyncio.Future) else routed.get_loop().create_future()
            )

            def routed_done(done: asyncio.Future[tuple[Any, Any, int]]) -> None:
                copy_outcome(settled, done)  # a cancelled command fails it: not cancelled
                error = settled.exception()
                if result is not None and result is not settled:  # a stand-in: counted out
                    if error is None:
                        result.set_result(settled.result())
                    else:
                        result.set_exception(error)
                _tell(items, error or settled.result())

            routed.add_done_callback(routed_done)
            return
        # One write, one round trip: the NUMSUB's answer comes with the LPUSH's. Both replies
        # go straight to callbacks, the LPUSH's settling the batch's future and telling the
        # requests given a callback: no future of their own, no loop turn between the reply
        # and the requests waiting for it.
        listeners: list[Any] = []  # the NUMSUB's reply, read before the LPUSH's
        count = len(values)

        def settle(reply: Any) -> None:
            if result is not None and result.done():
                return
            if isinstance(reply, BaseException):  # the connection was lost
                if result is not None:
                    result.set_exception(reply)
                    # Its requests are told below: no one need await it to have seen it.
                    result.exception()
                outcome: Any = reply
            else:
                outcome = (listeners[0] if listeners else None, reply, count)
                if result is not None:
                    result.set_result(outcome)
                if not listeners and self._unbounded and type(reply) is int:
                    # ``verdict``'s first test, once for the batch: None for every request
                    # (the usual distributor's), so no call per request to learn it.
                    return
            _tell(items, outcome)

        if packed is None:
            connection.send_packed_to(pushing, settle)
        else:  # both in one write, even when not the first of the loop turn's commands
            connection.send_packed_to([packed, pushing], listeners.append, settle)

    def _pack_lpush(self, key: str, values: list[bytes]) -> bytes:
        """``pack_command("LPUSH", key, *values)``, the same bytes, with the command's name
        and key packed once per key (kept in a bounded table: keys can come from paths)
        rather than once per push."""
        for value in values:
            if type(value) is not bytes:  # not what a distributor pushes: the general packing
                return pack_command("LPUSH", key, *values)
        head = self._lpush_heads.get(key)
        if head is None:
            head = pack_arguments("LPUSH", key)
            if len(head) <= _MAX_KEPT_KEY:
                memo.keep(self._lpush_heads, key, head)
        return pack_command_from(head, 2, values)

    async def _send_routed(
        self, connection: Commands, numsub: bytes | None, lpush: bytes, values: list[bytes]
    ) -> tuple[Any, Any, int]:
        if numsub is None:
            (length,) = await connection.pipeline(lpush)
            return None, length, len(values)
        listeners, length = await connection.pipeline(numsub, lpush)
        return listeners, length, len(values)


_MAX_PUSH = 1024 * 1024  # bytes of envelopes in one LPUSH (a larger one travels alone)

PUSH_GROUP = 16
"""Envelopes in one LPUSH at most. Measured at 32 connections (hello world, h11, wrk): with a whole
loop turn's requests in one LPUSH (17 on average, from 6 to 26) the distributor sat idle 17-23%
of the time, its requests all at the Node or in Redis; in groups of 16 it idles 5-11% (busy
0.89-0.95 in pairs). Groups of 8 did as well there, and a little better at 16 connections, but
cost twice the Redis commands (0.40 per request against 0.21 for 16 and 0.16 before; 4 us of
Redis CPU per request more, 1-2 us for 16). At a request or a few in flight nothing changes."""
_MAX_KEPT_KEY = 1024  # bytes of a packed LPUSH head kept per key (a longer key is rare)

_REASONS = {
    metrics.NO_NODE: "no Node listens on that key",
    metrics.QUEUE_FULL: "the queue is full",
    metrics.NO_ACK: "no Node took it in time",
    metrics.IN_FLIGHT: "too many requests in flight in this process",
}


def _tell(items: list[tuple[bytes, Callable[[Any, int], None] | None]], outcome: Any) -> None:
    """Give a batch's outcome (or the exception that failed it) to the callbacks of its
    requests, in the batch's order; one that raises is logged, the others still told."""
    for index, (_, then) in enumerate(items):
        if then is not None:
            try:
                then(outcome, index)
            except Exception:
                logger.exception("a request's LPUSH callback failed")


def _count(reply: object) -> int | None:
    """The count in a ``PUBSUB NUMSUB`` reply for one channel (None if malformed)."""
    if isinstance(reply, list) and len(reply) == 2 and type(reply[1]) is int:
        return reply[1]
    return None
