"""Inbox: a FIFO with one consumer, safe to cancel."""

from __future__ import annotations

import asyncio

import pytest

from minidasgi.inbox import Inbox


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
