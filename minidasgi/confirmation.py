"""Which popped requests a Node must have confirmed by their distributor before running them.

A Redis server restarted from its persistence files (AOF, RDB), or a replica that Sentinel
promoted, holds the envelopes that were queued on the server before. Their distributors lost
their connections meanwhile: they answered those clients already (502, or 503) and could not
take the envelopes back. And a Node on the old master may have popped and run some of them
before the switch (the replica never saw that pop). Run at once, such a request would run after
its client was answered, or twice.

Only a request that was in a list when the Node's pop connection was made can be such a
leftover: the server that connection reaches has held the list since, and a request pushed
later came from a distributor connected to that very server. So each time its pop connection is
(re)made (on a Cluster, one per slot its keys fall in), a Node counts the requests waiting on
each key it pops there (``LLEN``, before its first pop there). Lists are first in, first out
(``LPUSH``, then pops from the other end), so those requests are the oldest, and once this Node
has popped that many from a key, everyone together has popped at least that many: the rest are
all younger than the connection. The first ``n`` requests it pops from a key with ``n`` waiting
are the **recovery window**: for those the Node asks its distributor before starting the app
(``wire``: an ACK asking for a confirmation, then ``CONFIRM`` or ``CANCEL``); every other
request runs at once, as before, at no extra cost. The count relies on no clock.

If the Node's ACL user may not run ``LLEN``, the window falls back to the clocks: a request
queued (the envelope's ``queued``, its distributor's wall clock at the ``LPUSH``) before the
pop connection was made, plus ``CLOCK_MARGIN``, is in it. That assumes no distributor's clock
runs ahead of the Node's by more than the margin (NTP keeps them within milliseconds), and
costs a confirmation for the requests queued in the first ``CLOCK_MARGIN`` after each
(re)connection.

The distributor closes the other way in: an envelope it answered for but could not take back
(its own link to Redis failed, Redis stayed up: no Node reconnects) it takes back once it
reaches Redis again (``Distributor.take_back_later``).

This module is pure bookkeeping: it owns ``RecoveryWindow``; it does no I/O and reads no clock
of its own (the caller gives the time).
"""

from __future__ import annotations

from typing import Final

__all__ = ["CLOCK_MARGIN", "RecoveryWindow"]

CLOCK_MARGIN: Final = 1.0
"""Seconds by which a distributor's clock may run ahead of a Node's, when the recovery window
is told by the clocks (no ``LLEN``)."""


class RecoveryWindow:
    """The requests a Node pops that may predate its pop connection, per key.

    The Node calls ``reconnected`` each time a pop connection is (re)made, with the keys it
    pops, the requests then waiting per key (None when it could not count them) and its wall
    clock; then ``popped`` for every request it pops, in order, whatever becomes of it
    (decoded or not); and ``predates`` for a request whose ``popped`` answered None.
    """

    def __init__(self, margin: float = CLOCK_MARGIN) -> None:
        self.margin = margin
        self._waiting: dict[bytes, int | None] = {}  # None: not counted, the clocks tell
        self._since: dict[bytes, float] = {}  # when each key's pop connection was made

    def reconnected(self, keys: list[str], waiting: dict[str, int] | None, now: float) -> None:
        """A new pop connection for ``keys``: ``waiting`` requests per key (None: unknown),
        at ``now`` (this Node's wall clock)."""
        for key in keys:
            name = key.encode()
            self._since[name] = now
            self._waiting[name] = None if waiting is None else max(waiting.get(key, 0), 0)

    def popped(self, key: bytes) -> bool | None:
        """One request popped from ``key``: True if it may predate the connection, False if
        it cannot, None if unknown (then ask ``predates``)."""
        left = self._waiting.get(key)
        if left is None:
            return None
        if left <= 0:
            return False
        self._waiting[key] = left - 1
        return True

    def predates(self, key: bytes, queued: float) -> bool:
        """The clock rule: True if a request popped from ``key`` and queued at ``queued`` (its
        distributor's clock) may have been queued before the connection (this Node's clock)
        was made; before any connection, every request may."""
        return queued < self._since.get(key, float("inf")) + self.margin
