"""An inbox: what one request receives, in order, for the task (or tasks) that consume it.

Owns a deque and at most one waiter future: the cheapest way to hand items from callbacks (the
subscriber's dispatch, timers) to a single consuming task; ``SharedInbox`` the same for
consumers that may be several at once (an ASGI app may call ``receive()`` from more than one
task), with a waiter future per consumer waiting, made only when it waits. An
``asyncio.Queue`` does the same with a lock-free but general machinery (getters and putters
deques, an unfinished-task count, an Event for ``join``) that a request, created and dropped
a thousand times a second, pays for and never uses.

An ``Inbox`` must only ever have one consumer at a time (a request's relay); a cancelled ``get``
loses nothing: items stay until taken, and a ``SharedInbox`` consumer cancelled after it was
woken passes the wake-up on to the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Inbox", "SharedInbox"]

T = TypeVar("T")
D = TypeVar("D")


class _Fifo(Generic[T]):
    """What both inboxes share: the items, the owner's loop, and reading without waiting."""

    __slots__ = ("_items", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._items: deque[T] = deque()
        # The owner's loop, if known: asking asyncio for the running loop costs a getpid()
        # system call on Python 3.11.
        self._loop = loop

    def empty(self) -> bool:
        """True when nothing waits to be taken."""
        return not self._items

    def __len__(self) -> int:
        return len(self._items)

    def get_nowait(self) -> T:
        """The oldest item; ``IndexError`` when empty."""
        return self._items.popleft()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop


class Inbox(_Fifo[T]):
    """A FIFO with one consumer: ``put_nowait`` from anywhere in the loop, ``await get()``."""

    __slots__ = ("_waiter",)

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        # _Fifo's attributes set here, not by a call to its __init__: one inbox per request.
        self._items = deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        """Add ``item`` and wake the consumer."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # not cancelled with its consumer
                waiter.set_result(None)

    def get_or(self, default: D) -> T | D:
        """The oldest item, or ``default`` when empty (no coroutine, no exception)."""
        items = self._items
        return items.popleft() if items else default

    def arrival(self) -> asyncio.Future[None]:
        """A future done once an item is put, for the consumer that found the inbox empty
        (``get_or``). Awaited as it is, it spares the coroutine that ``get`` runs, its frame
        made at each call and resumed at each wake-up. A consumer cancelled meanwhile
        cancels it, and the items stay: the next ``arrival`` replaces it."""
        waiter = self._waiter = self._running_loop().create_future()
        return waiter

    async def get(self) -> T:
        """The oldest item, waiting for one."""
        while not self._items:
            await self.arrival()
        return self._items.popleft()


class SharedInbox(_Fifo[T]):
    """A FIFO that several tasks may consume at once: each item goes to one of them, the
    longest waiting first (as ``asyncio.Queue.get``, without its unused machinery)."""

    __slots__ = ("_waiters",)

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        # _Fifo's attributes set here, not by a call to its __init__: one inbox per request.
        self._items = deque()
        self._loop = loop
        self._waiters: deque[asyncio.Future[None]] | None = None  # made at the first wait

    def put_nowait(self, item: T) -> None:
        """Add ``item`` and wake the consumer waiting longest, if any."""
        self._items.append(item)
        if self._waiters:
            self._wake_next()

    def _wake_next(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def get(self) -> T:
        """The oldest item, waiting for one."""
        while not self._items:
            waiters = self._waiters
            if waiters is None:
                waiters = self._waiters = deque()
            waiter = self._running_loop().create_future()
            waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.cancelled():
                    # Cancelled while waiting: still queued (a wake-up pops it), drop it.
                    with contextlib.suppress(ValueError):
                        waiters.remove(waiter)
                elif self._items:
                    # Woken for an item, then cancelled: another consumer must get it.
                    self._wake_next()
                raise
        return self._items.popleft()
