"""Coalescing across requests: what a process has for one destination in one event-loop turn
travels to Redis as one command (or one per ``max_items`` items, for a batcher bounded so).

Owns the per-destination lists of pending items and the flush that sends them. A destination is
a peer's channel (the items are conversation messages, sent as one PUBLISH of a batch frame) or
a queue key (the items are envelopes, sent as one multi-value LPUSH). Under load this divides
Redis commands, pub/sub deliveries, parser calls and syscalls by the batch size, in Redis and in
both processes; at one request in flight a batch is one item and leaves at the end of the loop
turn it was put in, so latency is not harmed.

It must never reorder the items of one destination (the conversation and FIFO queues rely on
it), never hold an item past its turn except one put with ``hold=True`` (an ack that may ride
with the response that usually follows within ``hold_time``), and never block: ``put`` returns a
future shared by the whole batch, resolved with the command's outcome, which callers may await
or ignore. It knows nothing of Redis or ASGI: the owner gives it the function that sends a batch
(``send_into``), which settles the batch's future itself, at best straight from the code that
reads the reply (the outbox and admission do: no future nor loop turn between a PUBLISH's or
LPUSH's reply and whoever waits for it). A batch whose callers all put with ``future=False``
(they learn the outcome otherwise, e.g. from a callback in their item) has no future at all:
``send_into`` gets None, and the batch costs no future made and settled for nobody; or, where
the batcher counts its batches in flight (an eager one on uvloop), a ``Settlement`` that only
counts the batch out when settled.

The batch's future is a ``SharedFuture``: a caller's task cancelled while it awaits it does not
cancel it for the other callers of the batch, whose command went through all the same.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sized
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

__all__ = ["Batcher", "Settlement", "SharedFuture"]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Settlement(Protocol[T_contra]):
    """What ``send_into`` settles a batch's outcome into: the batch's future, or a stand-in
    for one (``_Counted``) that nobody awaits."""

    def done(self) -> bool:
        """True once settled."""

    def set_result(self, result: T_contra, /) -> None:
        """Settle with the command's outcome."""

    def set_exception(self, exception: BaseException, /) -> None:
        """Settle with the failure of the command."""

    def exception(self) -> BaseException | None:
        """The failure settled (a future's, marking it retrieved), or None."""


SenderInto = Callable[[str, list[Any], "Settlement[T] | None"], None]


class SharedFuture(asyncio.Future[T]):
    """A batch's future, shared by every caller whose item travels in the batch.

    ``cancel`` is refused: a task awaiting a future asks it to cancel when the task is
    cancelled, which would fail the batch for every caller, though its command went through.
    The cancelled task gets its ``CancelledError`` once the batch's outcome is known (asyncio
    delivers it then), which the command's reply bound keeps short. Its owner settles it
    with a result or an exception, never by cancelling it."""

    def cancel(self, msg: Any = None) -> bool:
        return False


class _BatchFuture(SharedFuture[T]):
    """A batch's future that counts itself out of its batcher's batches in flight when it is
    settled: from the code that settles it, with no callback scheduled on the loop. Only an
    eager batcher on a loop that hides its ready handles uses it (``Batcher._last_of_turn``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._counted: Batcher[T] | None = None  # the batcher that counted it in, once sent
        self._epoch = 0  # the batcher's epoch then: a reset since forgot it

    def set_result(self, result: T) -> None:
        super().set_result(result)  # raises if it was settled already: counted out once
        self._count_out()

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        self._count_out()

    def _count_out(self) -> None:
        batcher = self._counted
        if batcher is not None:
            self._counted = None
            batcher._settled(self._epoch)


class _Counted:
    """Stands for the future of a batch that nobody wanted one for (``put(future=False)``),
    sent by a batcher that counts its batches in flight: settling it counts the batch out,
    as settling a ``_BatchFuture`` does, but no future is made and settled for nobody (a
    ``_BatchFuture`` made, counted in and settled: about 11.7k instructions on uvloop)."""

    __slots__ = ("_batcher", "_epoch")

    def __init__(self, batcher: Batcher[Any], epoch: int) -> None:
        self._batcher: Batcher[Any] | None = batcher  # None once settled
        self._epoch = epoch  # the batcher's epoch when it was sent: a reset since forgot it

    def done(self) -> bool:
        return self._batcher is None

    def set_result(self, result: Any, /) -> None:
        self._count_out()

    def set_exception(self, exception: BaseException, /) -> None:
        self._count_out()

    def exception(self) -> BaseException | None:
        return None  # nobody awaits it: the callers learn the outcome otherwise

    def _count_out(self) -> None:
        batcher = self._batcher
        if batcher is not None:  # settled once: later settlements change nothing
            self._batcher = None
            batcher._settled(self._epoch)


class _Promised:
    """Stands for the flush of a loop turn that the owner promised to do itself
    (``Batcher.promise_flush``): nothing to call off."""

    __slots__ = ()

    def cancel(self) -> None:
        pass


_PROMISED = _Promised()


class _Batch(Generic[T]):
    __slots__ = ("future", "held", "items", "size")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.size = 0
        self.future: asyncio.Future[T] | None = None  # made for the first caller wanting it
        self.held = True  # every item so far may wait for company


class Batcher(Generic[T]):
    """Gathers items per destination and sends each destination's items in one command.

    ``send_into(destination, items, future)`` starts the command and settles ``future`` (the
    batch's) with its outcome, unless it is done already; the future returned by ``put``
    completes with that outcome. ``future`` is None when no caller of the batch wanted one
    (``put(..., future=False)``). ``max_size`` bounds the sum of the size hints in one batch:
    an item that would take a batch past it sends that batch first (so only an item larger than
    ``max_size`` by itself travels in a larger batch, alone), and a batch that reaches it is
    sent at once. ``max_items`` bounds the items of one batch the same way: a batch that
    reaches it is sent at once, in the middle of the loop turn, and the turn's later items
    gather in the next batch (a pipeline: the peer starts on the first items while the callers
    are still putting the others). ``eager``: a batch whose item is put by the last callback of
    its loop turn (nothing else is ready to run in it, and no flush is pending) leaves at once
    rather than in a flush one loop iteration later: at one request in flight that saves the
    loop an iteration per command, and under load, when the turn has more to run, items still
    gather. A loop that does not show what is ready to run (uvloop) gets a stand-in for "the
    last callback of its turn": no command of this batcher awaits its outcome, and the last
    one carried a lone item. At one request in flight that is so at every put, and it saves
    the same loop iteration; under load, once a batch carried company, a turn's items gather
    until its flush (a burst's first item may still leave alone). Only for callers that
    put one item per callback (the distributor's pushes and messages), or say ``more`` on every
    put but the last of a callback: else each would travel in a command of its own. ``index``
    is the position ``put`` gave its item in its batch (an LPUSH's caller works out its own
    list length from it).
    """

    def __init__(
        self,
        *,
        send_into: SenderInto[T],
        max_size: int = 512 * 1024,
        max_items: int | None = None,
        hold_time: float = 0.002,
        eager: bool = False,
    ) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._send_into = send_into
        self._eager = eager
        self._max_size = max_size
        self._max_items = sys.maxsize if max_items is None else max_items
        self._hold_time = hold_time
        self._pending: dict[str, _Batch[T]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # The loop's queue of ready handles (asyncio's own loops), or None (uvloop).
        self._ready: Sized | None = None
        # Batches sent whose future is not settled yet: counted only by an eager batcher on
        # a loop that hides its ready handles (``_counting``), the others never need it.
        self._in_flight = 0
        self._counting = False
        # Whether the last batch sent carried more than one item: a loop turn that put
        # several is likely followed by others like it (load), whose items then gather
        # until the turn's flush rather than the first leaving alone. Counting only.
        self._gathered = False
        self._epoch = 0  # bumped by a reset: batches sent before it are no longer counted
        self._flush_scheduled: asyncio.Handle | _Promised | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self.batches = 0  # commands sent, and the items they carried: the batch sizes seen
        self.items = 0
        self.index = 0

    @overload
    def put(
        self,
        destination: str,
        item: Any,
        *,
        size: int = 0,
        hold: bool = False,
        more: bool = False,
        future: Literal[True] = True,
    ) -> asyncio.Future[T]: ...

    @overload
    def put(
        self,
        destination: str,
        item: Any,
        *,
        size: int = 0,
        hold: bool = False,
        more: bool = False,
        future: Literal[False],
    ) -> None: ...

    def put(
        self,
        destination: str,
        item: Any,
        *,
        size: int = 0,
        hold: bool = False,
        more: bool = False,
        future: bool = True,
    ) -> asyncio.Future[T] | None:
        """Queue ``item`` for ``destination``; return the future of the command carrying it.
        ``more``: the caller puts more items in this callback (an eager batcher then leaves
        the batch to gather them). ``future=False``: the caller learns the outcome otherwise
        (from ``send_into``, through its item): none is returned, nor made for it (a future
        made and settled costs about 4k instructions, as much as the rest of a put)."""
        batch = self._pending.get(destination)
        if (
            batch is None
            and not future
            and not more
            and not hold
            and self._eager
            and self._ready is not None  # asyncio's own loop (never counting), known already
            and not self._ready
        ):
            # A lone item put by the last callback of its turn (one request in flight): it
            # leaves at once, as the general path below would send it, without a batch made,
            # stored and deleted (about 4k instructions per request).
            self.index = 0
            self._dispatch(destination, [item], None)
            return None
        if batch is not None and batch.items and batch.size + size > self._max_size:
            del self._pending[destination]
            self._dispatch(destination, batch.items, batch.future)
            batch = None
        if batch is None:
            if self._loop is None:
                loop = self._loop = asyncio.get_running_loop()
                self._ready = getattr(loop, "_ready", None)
                self._counting = self._eager and self._ready is None
            batch = self._pending[destination] = _Batch()
        wanted = batch.future
        if wanted is None and future:
            assert self._loop is not None
            wanted = batch.future = (
                _BatchFuture(self._loop) if self._counting else SharedFuture(loop=self._loop)
            )
        self.index = len(batch.items)
        batch.items.append(item)
        batch.size += size
        if not hold:
            batch.held = False
        if (
            batch.size >= self._max_size
            or len(batch.items) >= self._max_items
            or (self._eager and not more and not batch.held and self._last_of_turn())
        ):
            del self._pending[destination]
            self._dispatch(destination, batch.items, batch.future)
        elif self._flush_scheduled is None:
            assert self._loop is not None
            self._flush_scheduled = self._loop.call_soon(self._flush)
        return wanted if future else None

    def _settled(self, epoch: int) -> None:
        """A batch counted in flight in ``epoch`` got its outcome."""
        if epoch == self._epoch:
            self._in_flight -= 1

    def _last_of_turn(self) -> bool:
        """True if nothing else is ready to run in the loop's current iteration (a flush
        scheduled is in its queue): then the end of the turn is now. For a loop that does not
        tell, True while no batch of this batcher awaits its outcome and the last one sent
        carried a lone item (else the turns have company: under load, the first item of a
        turn leaving alone doubled the commands per request)."""
        ready = self._ready
        if ready is None:
            return not self._in_flight and not self._gathered
        return not ready

    def reset(self) -> None:
        """Forget the event loop and whatever is pending (the loop it belonged to is gone)."""
        self._pending = {}
        self._loop = None
        self._ready = None
        self._in_flight = 0
        self._counting = False
        self._gathered = False
        self._epoch += 1
        self._flush_scheduled = None
        self._hold_timer = None

    def flush(self) -> None:
        """Send everything pending now, held items included."""
        pending, self._pending = self._pending, {}
        if self._flush_scheduled is _PROMISED:  # nothing left for the promised flush
            self._flush_scheduled = None
        self._disarm()
        for destination, batch in pending.items():
            self._dispatch(destination, batch.items, batch.future)

    def promise_flush(self) -> None:
        """The owner calls ``flush_turn`` before this loop turn ends: until then, ``put``
        schedules no flush. A flush scheduled and then called off by ``flush_turn`` would
        still cost the loop an iteration of its own (asyncio runs the next iteration at once
        for a cancelled handle, finding nothing to do)."""
        if self._flush_scheduled is None:
            self._flush_scheduled = _PROMISED

    def flush_turn(self) -> None:
        """Do now what the flush at the end of this loop turn would do (held items still
        wait for company), for an owner that knows the turn has nothing more to put: its
        items leave a loop iteration sooner, and the scheduled flush is called off."""
        scheduled = self._flush_scheduled
        if scheduled is not None:
            scheduled.cancel()
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = None
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for destination, batch in pending.items():
            if batch.held:
                # Only items that may wait (acks): give the response a moment to join them.
                self._pending[destination] = batch
                continue
            self._dispatch(destination, batch.items, batch.future)
        if not self._pending:
            self._disarm()  # what was held left with company: no wake-up for nothing
        elif self._hold_timer is None:
            assert self._loop is not None
            self._hold_timer = self._loop.call_later(self._hold_time, self._release_held)

    def _disarm(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def _release_held(self) -> None:
        self._hold_timer = None
        self.flush()

    def _dispatch(
        self, destination: str, items: list[Any], future: asyncio.Future[T] | None
    ) -> None:
        """Send ``items`` (a batch's, or a lone item's) to ``destination``, their command's
        outcome to settle ``future`` if any."""
        target: Settlement[T] | None = future
        if self._counting:
            # Counted out when settled: a batch nobody wanted a future for gets a stand-in.
            if target is None:
                target = _Counted(self, self._epoch)
            else:
                assert isinstance(target, _BatchFuture)
                target._counted = self
                target._epoch = self._epoch
            self._in_flight += 1
            self._gathered = len(items) > 1
        self.batches += 1
        self.items += len(items)
        try:
            self._send_into(destination, items, target)
        except Exception as exc:  # the sender failed before a command existed
            if target is not None and not target.done():
                target.set_exception(exc)
                target.exception()  # a caller may ignore it: don't report it as lost
