"""An inbox: what one request receives, in order, for the one task that consumes it.

Owns a deque and at most one waiter future: the cheapest way to hand items from callbacks (the
subscriber's dispatch, timers) to a single consuming task. An ``asyncio.Queue`` does the same
with a lock-free but general machinery (getters and putters deques, an unfinished-task count,
an Event for ``join``) that a request, created and dropped a thousand times a second, pays for
and never uses.

It must only ever have one consumer at a time (a request's relay or its app's ``receive``); a
cancelled ``get`` loses nothing: items stay until taken.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Inbox"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """A FIFO with one consumer: ``put_nowait`` from anywhere in the loop, ``await get()``."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # The owner's loop, if known: asking asyncio for the running loop costs a getpid()
        # system call on Python 3.11.
        self._loop = loop

    def put_nowait(self, item: T) -> None:
        """Add ``item`` and wake the consumer."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        """True when nothing waits to be taken."""
        return not self._items

    def __len__(self) -> int:
        return len(self._items)

    def get_nowait(self) -> T:
        """The oldest item; ``IndexError`` when empty."""
        return self._items.popleft()

    async def get(self) -> T:
        """The oldest item, waiting for one."""
        while not self._items:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._items.popleft()
