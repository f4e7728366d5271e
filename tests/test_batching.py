"""The Batcher: one command per destination per loop turn, in order, with held items."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from minidasgi import batching
from minidasgi.batching import Batcher, Settlement


class Recorder:
    """A sender that records its batches and keeps each batch's future, for the test to
    settle as a command's reply would."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []
        self.futures: list[asyncio.Future[int]] = []
        self.given: list[Settlement[int] | None] = []  # each batch's, None included

    def __call__(self, destination: str, items: list[Any], future: Settlement[int] | None) -> None:
        self.sent.append((destination, list(items)))
        self.given.append(future)
        if isinstance(future, asyncio.Future):
            self.futures.append(future)


async def test_one_command_per_destination_per_turn_in_order() -> None:
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender)
    a1 = batcher.put("a", 1)
    b1 = batcher.put("b", "x")
    a2 = batcher.put("a", 2)
    assert a1 is a2 and a1 is not b1
    assert sender.sent == []  # nothing leaves before the end of the turn
    await asyncio.sleep(0)
    assert sender.sent == [("a", [1, 2]), ("b", ["x"])]
    sender.futures[0].set_result(3)
    sender.futures[1].set_result(0)
    assert await a1 == 3 and await b1 == 0
    batcher.put("a", 3)
    await asyncio.sleep(0)
    assert sender.sent[-1] == ("a", [3])
    assert (batcher.batches, batcher.items) == (3, 4)


async def test_a_promised_flush_schedules_nothing_until_the_owner_flushes_the_turn() -> None:
    # A Node's pop loop flushes a lone request's turn itself: a flush scheduled meanwhile and
    # called off would still cost the loop an iteration with nothing to do.
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender)
    loop: Any = asyncio.get_running_loop()
    if not hasattr(loop, "_ready"):
        pytest.skip("needs asyncio's own event loop")
    ready = len(loop._ready)
    batcher.promise_flush()
    batcher.put("a", 1)
    batcher.put("a", 2, hold=True)
    assert len(loop._ready) == ready  # no flush scheduled
    batcher.flush_turn()
    assert sender.sent == [("a", [1, 2])]
    assert len(loop._ready) == ready
    batcher.put("a", 3)  # the promise was kept: the next turn's items schedule their flush
    assert len(loop._ready) == ready + 1
    await asyncio.sleep(0)
    assert sender.sent == [("a", [1, 2]), ("a", [3])]
    batcher.promise_flush()
    batcher.flush()  # everything sent (a stop): the promise has nothing left to keep
    batcher.put("a", 4)
    assert len(loop._ready) == ready + 1
    await asyncio.sleep(0)
    assert sender.sent[-1] == ("a", [4])


async def test_a_full_batch_leaves_at_once() -> None:
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender, max_size=100)
    first = batcher.put("a", "big", size=60)
    second = batcher.put("a", "big too", size=40)
    assert sender.sent == [("a", ["big", "big too"])]  # it reached max_size
    third = batcher.put("a", "next", size=1)
    assert third is not first and first is second
    await asyncio.sleep(0)
    assert sender.sent == [("a", ["big", "big too"]), ("a", ["next"])]


async def test_a_batch_that_reaches_max_items_leaves_at_once_the_turn_s_next_in_another() -> None:
    # The distributor's pushes (``admission.PUSH_GROUP``): a Node starts on the first group of
    # a loop turn's requests while the distributor still relays the others.
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender, max_items=3, eager=True)
    futures = []
    for item in range(7):
        futures.append(batcher.put("a", item, more=item < 6))  # one callback puts them all
        if item == 2:
            assert sender.sent == [("a", [0, 1, 2])]  # full: gone before the others came
    assert sender.sent == [("a", [0, 1, 2]), ("a", [3, 4, 5])]
    assert batcher.index == 0  # 6 is the first of the next batch
    assert futures[0] is futures[2] and futures[2] is not futures[3] and futures[3] is futures[5]
    await asyncio.sleep(0)
    assert sender.sent[-1] == ("a", [6])  # the rest at the end of the turn, in order
    assert (batcher.batches, batcher.items) == (3, 7)
    with pytest.raises(ValueError, match="max_items"):
        Batcher(send_into=sender, max_items=0)


async def test_an_eager_batch_leaves_with_the_last_callback_of_its_turn() -> None:
    loop = asyncio.get_running_loop()
    if not hasattr(loop, "_ready"):
        pytest.skip("needs asyncio's own event loop")
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender, eager=True)
    batcher.put("a", 0)  # nothing else ready in this turn: it leaves now, not a turn later
    assert sender.sent == [("a", [0])]
    assert not loop._ready  # type: ignore[attr-defined]  # and no flush was scheduled
    for item in (1, 2, 3):  # three callbacks of one turn, then this task's: they gather
        loop.call_soon(batcher.put, "a", item)
    await asyncio.sleep(0)
    assert sender.sent == [("a", [0])]
    await asyncio.sleep(0)  # the flush
    assert sender.sent == [("a", [0]), ("a", [1, 2, 3])]
    batcher.put("a", 4, hold=True)  # held items still wait for company
    assert sender.sent[-1] == ("a", [1, 2, 3])
    batcher.flush()
    assert (batcher.batches, batcher.items) == (3, 5)


async def test_a_lone_item_that_leaves_at_once_makes_no_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At one request in flight every item is alone in its turn: with no future wanted, it
    # goes straight to the sender, with no batch made and dispatched for it (before: one
    # ``_Batch`` per item); the counts and its index as before, and a sender's failure
    # ignored as ``_dispatch`` ignores it.
    loop = asyncio.get_running_loop()
    if not hasattr(loop, "_ready"):
        pytest.skip("needs asyncio's own event loop")
    made: list[object] = []
    real = batching._Batch.__init__

    def spy(self: Any) -> None:
        made.append(self)
        real(self)

    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender, eager=True)
    batcher.put("a", 0)  # the first put finds the loop, as before
    monkeypatch.setattr(batching._Batch, "__init__", spy)
    for item in (1, 2):
        assert batcher.put("a", item, future=False) is None
        assert batcher.index == 0
    assert sender.sent == [("a", [0]), ("a", [1]), ("a", [2])]
    assert sender.given[1:] == [None, None]
    assert made == []
    assert (batcher.batches, batcher.items) == (3, 3)
    batcher.put("a", 3, future=False, more=True)  # more to come: it waits, in a batch
    assert len(made) == 1 and sender.sent[-1] == ("a", [2])
    await asyncio.sleep(0)
    assert sender.sent[-1] == ("a", [3])

    def failing(destination: str, items: list[Any], future: Any) -> None:
        raise RuntimeError("no connection")

    broken: Batcher[int] = Batcher(send_into=failing, eager=True)
    broken.put("a", 0, future=False, more=True)  # finds the loop
    await asyncio.sleep(0)
    broken.put("a", 1, future=False)  # the sender's failure is not the caller's
    assert (broken.batches, broken.items) == (2, 2)


async def test_an_eager_batch_waits_for_the_items_its_callback_says_are_coming() -> None:
    loop = asyncio.get_running_loop()
    if not hasattr(loop, "_ready"):
        pytest.skip("needs asyncio's own event loop")
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender, eager=True)
    batcher.put("a", 0, more=True)  # the pieces of one large message, say
    batcher.put("a", 1, more=True)
    batcher.put("a", 2)  # the last of them: a flush is pending now, they leave in it
    assert sender.sent == []
    await asyncio.sleep(0)
    assert sender.sent == [("a", [0, 1, 2])]  # together, not one command each
    batcher.put("a", 3)  # a lone item still leaves at once
    assert sender.sent[-1] == ("a", [3])


async def test_a_batch_never_grows_past_max_size() -> None:
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender, max_size=100)
    first = batcher.put("a", "big", size=60)
    assert batcher.index == 0
    second = batcher.put("a", "bigger", size=60)  # would make 120: the first leaves alone
    assert sender.sent == [("a", ["big"])] and first is not second and batcher.index == 0
    batcher.put("a", "small", size=10)
    assert batcher.index == 1
    huge = batcher.put("a", "huge", size=500)  # larger than max_size by itself: alone
    await asyncio.sleep(0)
    assert sender.sent == [("a", ["big"]), ("a", ["bigger", "small"]), ("a", ["huge"])]
    assert all(sum(len(i) for i in items) <= 100 or len(items) == 1 for _, items in sender.sent)
    assert huge is not second


async def test_held_items_wait_for_company_but_not_long() -> None:
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender, hold_time=0.05)
    batcher.put("a", "ack", hold=True)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sender.sent == []
    batcher.put("a", "response")
    await asyncio.sleep(0)
    assert sender.sent == [("a", ["ack", "response"])]
    held = batcher.put("b", "lonely ack", hold=True)
    await asyncio.sleep(0.2)
    assert sender.sent[-1] == ("b", ["lonely ack"])
    sender.futures[-1].set_result(1)
    assert await held == 1


async def test_the_hold_timer_is_cancelled_once_nothing_is_held() -> None:
    # A held item that left with company must not leave its timer to wake the loop later
    # for nothing (a WebSocket's held credit every few messages, an ack per request).
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender, hold_time=60)
    loop = asyncio.get_running_loop()
    timers: list[asyncio.TimerHandle] = []
    call_later = loop.call_later

    def recording(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        timer = call_later(delay, callback, *args)
        timers.append(timer)
        return timer

    loop.call_later = recording  # type: ignore[method-assign]
    try:
        batcher.put("a", "credit", hold=True)
        await asyncio.sleep(0)
        assert len(timers) == 1 and not timers[0].cancelled()
        batcher.put("a", "event")
        await asyncio.sleep(0)
        assert sender.sent == [("a", ["credit", "event"])]
        assert timers[0].cancelled()
        batcher.put("b", "ack", hold=True)
        await asyncio.sleep(0)
        assert len(timers) == 2 and not timers[1].cancelled()
        batcher.flush()
        assert timers[1].cancelled()
        assert sender.sent[-1] == ("b", ["ack"])
    finally:
        del loop.call_later  # type: ignore[method-assign]


async def test_failures_reach_waiters_and_are_never_reported_lost() -> None:
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender)
    waited = batcher.put("a", 1)
    await asyncio.sleep(0)
    sender.futures[0].set_exception(ConnectionError("gone"))
    with pytest.raises(ConnectionError):
        await waited

    def broken(destination: str, items: list[Any], future: asyncio.Future[int]) -> None:
        raise ConnectionError("no connection")

    failing: Batcher[int] = Batcher(send_into=broken)
    ignored = failing.put("a", 1)
    await asyncio.sleep(0)
    assert isinstance(ignored.exception(), ConnectionError)


def _run_on(uvloop: Any, scenario: Coroutine[Any, Any, None]) -> None:
    """Run ``scenario`` on a loop of uvloop's, which does not show its ready handles."""
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario)
    finally:
        loop.close()


def test_an_eager_batch_on_uvloop_leaves_at_once_while_no_other_awaits_its_outcome() -> None:
    # uvloop does not show its ready handles: a batcher with nothing in flight stands in
    # for "the last callback of the turn", so one request at a time costs no loop iteration.
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        sender = Recorder()
        batcher: Batcher[int] = Batcher(send_into=sender, eager=True)
        first = batcher.put("a", 0)
        assert sender.sent == [("a", [0])]  # nothing in flight: at once
        batcher.put("a", 1)  # the first awaits its reply: this one gathers
        batcher.put("b", 2)
        assert sender.sent == [("a", [0])]
        await asyncio.sleep(0)  # the flush
        assert sender.sent == [("a", [0]), ("a", [1]), ("b", [2])]
        for future, outcome in zip(sender.futures, (1, 2, 3), strict=True):
            future.set_result(outcome)
        assert await first == 1
        batcher.put("a", 3)  # all settled: at once again
        assert sender.sent[-1] == ("a", [3])
        lost = sender.futures[-1]
        lost.set_exception(ConnectionError("lost"))  # a failure settles it too
        lost.exception()
        batcher.put("a", 4)
        assert sender.sent[-1] == ("a", [4])
        batcher.put("a", 5, hold=True)  # held items still wait for company
        assert sender.sent[-1] == ("a", [4])
        batcher.flush()

    _run_on(uvloop, scenario())


def test_a_batch_settled_after_a_reset_leaves_the_count_of_batches_in_flight_alone() -> None:
    # A batch sent before a reset (its connection lost, say) may get its outcome after it:
    # counting it out then would leave a count below zero, and eager sends off for good.
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        sender = Recorder()
        batcher: Batcher[int] = Batcher(send_into=sender, eager=True)
        batcher.put("a", 0)
        batcher.reset()
        sender.futures[0].set_result(1)  # the old batch's outcome, after the reset
        batcher.put("a", 1)
        assert sender.sent[-1] == ("a", [1])  # nothing in flight: at once
        batcher.put("a", 2)  # the one just sent awaits its reply: this one gathers
        assert sender.sent[-1] == ("a", [1])
        batcher.flush()

    _run_on(uvloop, scenario())


def test_an_eager_batcher_on_uvloop_gathers_a_turn_once_a_batch_had_company() -> None:
    # With nothing in flight, the first item of a turn left alone and the rest of the turn
    # gathered behind it: under load (several requests read per turn) two LPUSHes per turn,
    # 2.0 envelopes per LPUSH at 8 connections against 6.4 on asyncio's loop. Once a batch
    # carried company, the next turn's items gather until its flush; a lone batch sent
    # makes the batcher eager again (one request in flight: no loop iteration more).
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        sender = Recorder()
        batcher: Batcher[int] = Batcher(send_into=sender, eager=True)
        batcher.put("a", 0, future=False)  # nothing in flight, nothing gathered: at once
        batcher.put("a", 1, future=False)
        batcher.put("a", 2, future=False)
        await asyncio.sleep(0)  # the flush
        assert sender.sent == [("a", [0]), ("a", [1, 2])]
        for settlement in sender.given:
            assert settlement is not None
            settlement.set_result(1)  # nothing in flight any more
        batcher.put("a", 3, future=False)  # the last batch had company: gathers
        batcher.put("a", 4, future=False)
        assert sender.sent[-1] == ("a", [1, 2])
        await asyncio.sleep(0)
        assert sender.sent[-1] == ("a", [3, 4])
        settlement = sender.given[-1]
        assert settlement is not None
        settlement.set_result(1)
        batcher.put("a", 5, future=False)  # gathers, alone: the flush sends a lone batch
        await asyncio.sleep(0)
        assert sender.sent[-1] == ("a", [5])
        settlement = sender.given[-1]
        assert settlement is not None
        settlement.set_result(1)
        batcher.put("a", 6, future=False)  # one at a time again: at once
        assert sender.sent[-1] == ("a", [6])

    _run_on(uvloop, scenario())


async def test_a_batch_whose_callers_want_no_future_has_none() -> None:
    # The distributor learns an LPUSH's outcome from its item's callback: a future made and
    # settled for nobody cost about 4k instructions per batch.
    sender = Recorder()
    batcher: Batcher[int] = Batcher(send_into=sender)
    assert batcher.put("a", 1, future=False) is None
    assert batcher.put("a", 2, future=False) is None
    await asyncio.sleep(0)
    assert sender.sent == [("a", [1, 2])] and sender.given == [None]
    # A caller wanting one gets the batch's, whoever came first.
    assert batcher.put("b", 1, future=False) is None
    b2 = batcher.put("b", 2)
    assert batcher.put("b", 3, future=False) is None
    await asyncio.sleep(0)
    assert sender.sent[-1] == ("b", [1, 2, 3]) and sender.given[-1] is b2


def test_a_batch_counted_in_flight_without_a_future_is_counted_out_by_its_stand_in() -> None:
    # On a loop that hides its ready handles, an eager batcher counts its batches in flight
    # until they are settled: a batch nobody wanted a future for gets a stand-in that counts
    # it out (a _BatchFuture made for nobody cost 11.7k instructions on uvloop).
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        sender = Recorder()
        batcher: Batcher[int] = Batcher(send_into=sender, eager=True)
        assert batcher.put("a", 1, future=False) is None
        assert sender.sent == [("a", [1])]  # nothing in flight: at once
        batcher.put("a", 2, future=False)  # the first awaits its reply: this one gathers
        assert len(sender.sent) == 1
        first = sender.given[0]
        assert first is not None and sender.futures == []  # a stand-in, not a future
        assert not first.done()
        first.set_result(1)  # counted out: the next put sends what gathered
        assert first.done() and first.exception() is None
        first.set_result(1)  # settled once: counted out once
        batcher.put("a", 3, future=False)
        assert sender.sent[-1] == ("a", [2, 3])
        second = sender.given[1]
        assert second is not None
        second.set_exception(ConnectionError("lost"))  # a failure counts it out too
        batcher.put("a", 4, future=False)
        assert sender.sent[-1] == ("a", [2, 3])  # the last batch had company: it gathers
        await asyncio.sleep(0)  # the flush
        assert sender.sent[-1] == ("a", [4])
        # A caller wanting a future gets a real one, counted as before.
        wanted = batcher.put("a", 5)
        assert sender.sent[-1] == ("a", [4])
        given = sender.given[2]
        assert given is not None
        given.set_result(4)
        batcher.put("a", 6)
        assert sender.sent[-1] == ("a", [5, 6]) and sender.futures == [wanted]
        wanted.set_result(5)

    _run_on(uvloop, scenario())
