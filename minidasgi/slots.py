"""Slots: how many more requests a Node may run, shared by its pop loops.

Owns a count of free slots, taking as many as are free in one call without waiting, and
waking the pop loops that wait for one. An ``asyncio.Semaphore`` does the same one slot per
``await acquire()`` (a coroutine, and a scan of its waiters in ``locked()``): a pop that takes
up to 32 free slots, and gives back those its pop did not fill, paid for dozens of such calls
per request.

It never lets the count go below zero or above its size: a slot is freed only by whoever took
it. A cancelled ``wait`` loses nothing: waiting takes no slot.
"""

from __future__ import annotations

import asyncio

__all__ = ["Slots"]


class Slots:
    """``size`` slots; ``take`` what is free now, ``release`` it, ``wait`` until one is free."""

    __slots__ = ("_waiters", "free", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a Node needs at least one slot")
        self.size = size
        self.free = size
        self._waiters: list[asyncio.Future[None]] = []

    def take(self, most: int) -> int:
        """Take up to ``most`` of the slots free now, without waiting; return how many."""
        free = self.free
        taken = (free if free < most else most) if most > 0 else 0  # min() costs a call more
        self.free -= taken
        return taken

    def release(self, count: int = 1) -> None:
        """Free ``count`` slots taken earlier, and wake whoever waits for one."""
        if count <= 0:
            return
        if self.free + count > self.size:
            raise RuntimeError("released more slots than were taken")
        self.free += count
        waiters = self._waiters
        if waiters:
            # Every waiter looks again: which of them gets a slot is up to ``take``.
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self) -> None:
        """Return once a slot is free (it is not taken: ``take`` it, it may be gone again)."""
        if self.free > 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:  # cancelled before any release: no stale waiter left
                self._waiters.remove(waiter)
