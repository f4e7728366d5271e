"""The outbox: every conversation message a process publishes to a peer, coalesced.

Owns the ``Batcher`` of a process' PUBLISHes and how a batch travels: one message as itself,
several as one ``wire.batch_frame`` in one PUBLISH, so under load a peer gets one pub/sub
delivery per loop turn instead of one per message. A batch holding a message in the first
release's format (``codec.RELEASED``: its peer cannot split frames) goes as one PUBLISH per
message instead, all in one write.

It never waits: ``post`` returns the batch's future (the receiver count; 0 when Redis is
unreachable, as ``Client.try_publish``), which the caller awaits or hands a callback, and never
creates a task per message. The client settles that future straight from the PUBLISH's reply
(``publish_into``): one loop turn between the reply and its waiter, not three. A caller that
only needs to know when nobody got a message (``lost``) is told by the code that settles the
batch's future, with the other messages of the batch: no loop callback per message, nor per
batch (a done callback on the future would cost one, and at one request in flight a loop
iteration of its own).

It knows nothing of requests: the callers decide what a count of 0 means for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeAlias

from . import codec, wire
from .batching import Batcher, Settlement
from .resp.topology import CommandClient

__all__ = ["Lost", "Outbox"]

_JOINED_BELOW = 16 * 1024  # a batch frame this small travels as one bytes value

Lost: TypeAlias = Callable[["asyncio.Future[int]"], None]
"""Told, with the batch's future, that a message did not reach its peer (see ``Outbox.post``)."""


class Outbox:
    """Messages for peer channels, one PUBLISH per channel per loop turn.

    ``client`` returns the publishing client, of any topology (None while there is none).
    ``hold_time``: seconds a message posted with ``hold=True`` (an ack) may wait for company.
    ``eager``: a batch leaves as soon as the loop turn has nothing else to run (``Batcher``),
    for a process whose callbacks post one message each, or say ``more``.
    """

    def __init__(
        self,
        client: Callable[[], CommandClient | None],
        *,
        hold_time: float = 0.002,
        eager: bool = False,
    ) -> None:
        self._client = client
        self.batcher: Batcher[int] = Batcher(
            send_into=self._send, max_size=wire.MAX_BATCH_SIZE, hold_time=hold_time, eager=eager
        )
        # Per batch future still unsettled, the distinct ``lost`` callbacks of its messages.
        self._lost: dict[asyncio.Future[int], dict[Lost, None]] = {}

    def post(
        self,
        channel: str,
        message: wire.Packed,
        *,
        hold: bool = False,
        lost: Lost | None = None,
        more: bool = False,
    ) -> asyncio.Future[int]:
        """Queue ``message`` for ``channel``; the future gives the PUBLISH's receiver count.
        A message given as parts (``wire.pack_parts``) is copied once, into the write.

        ``lost`` is called with that future if the batch reached nobody (a count of 0, or an
        error), once per batch however many of its messages name it, straight from the code
        that settles the future (reading the PUBLISH's reply, say): it must be quick, and
        never raise. A batch that failed as it left (no client, Redis unreachable) tells it
        from within ``post`` itself: a caller that changes its state after posting must look
        whether ``lost`` came first. A request streaming many messages in a loop turn costs no
        loop callback for them (``add_done_callback`` on the future would cost one per
        message, or per batch).

        ``more``: the caller posts more in this callback; an eager outbox (``eager``: see
        ``Batcher``) waits for them before the batch leaves."""
        size = len(message) if type(message) is bytes else wire.packed_size(message)
        future = self.batcher.put(channel, message, size=size, hold=hold, more=more)
        if lost is not None:
            watchers = self._lost.get(future)
            if watchers is None:
                watchers = self._lost[future] = {}
            watchers[lost] = None
            if future.done():  # settled as it left (no client, say): tell it now
                self._settled(future)
        return future

    async def publish(self, channel: str, message: wire.Packed) -> int:
        """Post and wait for the receiver count."""
        return await self.post(channel, message)

    def reset(self) -> None:
        """Forget the event loop and whatever is pending (the loop it belonged to is gone)."""
        self.batcher.reset()
        self._lost = {}

    def flush(self) -> None:
        """Send everything now (held messages included)."""
        self.batcher.flush()

    def flush_turn(self) -> None:
        """Send now what would leave at the end of this loop turn (``Batcher.flush_turn``)."""
        self.batcher.flush_turn()

    def promise_flush(self) -> None:
        """The caller calls ``flush_turn`` before this loop turn ends: nothing schedules a
        flush until then (``Batcher.promise_flush``)."""
        self.batcher.promise_flush()

    def _settled(self, future: asyncio.Future[int]) -> None:
        """The batch of ``future`` got its outcome: tell its ``lost`` callbacks if nobody got
        it. Called by whoever settled the future, at once (``_send``)."""
        watchers = self._lost.pop(future, None)
        if watchers and (
            future.cancelled() or future.exception() is not None or future.result() == 0
        ):
            for lost in watchers:
                lost(future)

    def _send(
        self, channel: str, messages: list[wire.Packed], result: Settlement[int] | None
    ) -> None:
        # The batch's future is settled by the client straight from the PUBLISH's reply, which
        # then calls _settled; so does every other way this settles it.
        assert isinstance(result, asyncio.Future)  # every post asks for one
        client = self._client()
        try:
            if client is None:
                if not result.done():
                    result.set_result(0)
                    self._settled(result)
            elif len(messages) == 1:
                client.publish_into(channel, messages[0], result, self._settled)
            elif codec.RELEASED not in map(_version, messages):
                parts = wire.batch_frame_parts(messages)
                # A small frame is joined here (the PUBLISH is then packed in one formatting
                # step) rather than packed part by part; a large one's parts are copied once,
                # into the write.
                frame = b"".join(parts) if wire.packed_size(parts) < _JOINED_BELOW else parts
                client.publish_into(channel, frame, result, self._settled)
            else:
                # A peer of the first release reads single messages only: one PUBLISH each,
                # one write; in order on one connection, so the last tells for all.
                for message in messages[:-1]:
                    client.publish_soon(channel, message)
                client.publish_into(channel, messages[-1], result, self._settled)
        except Exception as exc:  # failed before a command existed (the batcher's case)
            if not result.done():
                result.set_exception(exc)
                result.exception()  # a caller may ignore it: don't report it as lost
                self._settled(result)


def _version(message: wire.Packed) -> int:
    """The format version of an encoded message (its first byte)."""
    return message[0] if isinstance(message, bytes) else message[0][0]
