"""Inbox: a FIFO with one consumer, safe to cancel; SharedInbox: the same for several."""

from __future__ import annotations

import asyncio

import pytest

from minidasgi.inbox import Inbox, SharedInbox


async def test_items_come_out_in_order_and_wake_the_consumer() -> None:
    inbox: Inbox[int] = Inbox()
    inbox.put_nowait(1)
    assert not inbox.empty() and await inbox.get() == 1
    getting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not getting.done()
    inbox.put_nowait(2)
    inbox.put_nowait(3)
    assert await getting == 2 and inbox.get_nowait() == 3 and inbox.empty()
    with pytest.raises(IndexError):
        inbox.get_nowait()


async def test_a_cancelled_get_loses_nothing() -> None:
    inbox: Inbox[str] = Inbox()
    getting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    getting.cancel()
    inbox.put_nowait("kept")  # while the cancellation is pending
    with pytest.raises(asyncio.CancelledError):
        await getting
    assert await asyncio.wait_for(inbox.get(), 1) == "kept"


async def test_a_shared_inbox_gives_each_item_to_one_consumer_longest_waiting_first() -> None:
    inbox: SharedInbox[int] = SharedInbox()
    first = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    second = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(1)
    await asyncio.sleep(0)
    assert first.done() and first.result() == 1 and not second.done()
    inbox.put_nowait(2)
    inbox.put_nowait(3)
    assert await second == 2 and len(inbox) == 1 and inbox.get_nowait() == 3 and inbox.empty()
    with pytest.raises(IndexError):
        inbox.get_nowait()


async def test_a_shared_inbox_consumer_cancelled_once_woken_passes_the_item_on() -> None:
    inbox: SharedInbox[str] = SharedInbox()
    woken = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    other = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("kept")  # wakes the first consumer...
    woken.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await woken
    assert await asyncio.wait_for(other, 1) == "kept"


async def test_a_shared_inbox_consumer_cancelled_while_waiting_loses_nothing() -> None:
    inbox: SharedInbox[str] = SharedInbox()
    getting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    getting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getting
    assert not inbox._waiters  # no stale waiter to swallow the next wake-up
    inbox.put_nowait("kept")
    assert await asyncio.wait_for(inbox.get(), 1) == "kept"


async def test_get_or_and_arrival_wait_with_no_coroutine_and_lose_nothing_when_cancelled() -> None:
    inbox: Inbox[str] = Inbox()
    assert inbox.get_or(None) is None
    arrival = inbox.arrival()
    assert not arrival.done()
    inbox.put_nowait("first")
    assert arrival.done() and inbox.get_or(None) == "first"
    waiting = asyncio.ensure_future(_wait(inbox))
    await asyncio.sleep(0)
    waiting.cancel()  # the consumer cancelled while it waits: its arrival with it
    with pytest.raises(asyncio.CancelledError):
        await waiting
    inbox.put_nowait("kept")  # a cancelled arrival is not set, nor does it swallow the item
    assert inbox.get_or(None) == "kept"
    later = inbox.arrival()
    inbox.put_nowait("next")
    assert later.done() and await inbox.get() == "next"


async def _wait(inbox: Inbox[str]) -> None:
    await inbox.arrival()
