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
(re)made, a Node counts the requests waiting on each of its keys (``LLEN``, before its first
pop there). Lists are first in, first out (``LPUSH``, then pops from the other end), so those
requests are the oldest, and once this Node has popped that many from a key, everyone together
has popped at least that many: the rest are all younger than the connection. The first ``n``
requests it pops from a key with ``n`` waiting are the **recovery window**: for those the Node
asks its distributor before starting the app (``wire``: an ACK asking for a confirmation, then
``CONFIRM`` or ``CANCEL``); every other request runs at once, as before, at no extra cost. The
count relies on no clock.

If the Node's ACL user may not run ``LLEN``, the window falls back to the clocks: a request
queued (the envelope's ``queued``, its distributor's wall clock at the ``LPUSH``) before the
pop connection was made, plus ``CLOCK_MARGIN``, is in it. That assumes no distributor's clock
runs ahead of the Node's by more than the margin (NTP keeps them within milliseconds), and
costs a confirmation for the requests queued in the first ``CLOCK_MARGIN`` after each
(re)connection.

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
    """The requests a Node pops that may predate its pop connection.

    The Node calls ``reconnected`` each time that connection is (re)made, with the requests
    then waiting per key (None when it could not count them) and its wall clock; then
    ``popped`` for every request it pops, in order, whatever becomes of it (decoded or not);
    and ``predates`` for a request whose ``popped`` answered None.
    """

    def __init__(self, margin: float = CLOCK_MARGIN) -> None:
        self.margin = margin
        self._waiting: dict[bytes, int] | None = None
        self._since = float("inf")  # before any connection, every request may be a leftover

    def reconnected(self, waiting: dict[bytes, int] | None, now: float) -> None:
        """A new pop connection: ``waiting`` requests per key (None: unknown), at ``now``."""
        self._waiting = None if waiting is None else {k: n for k, n in waiting.items() if n > 0}
        self._since = now

    def popped(self, key: bytes) -> bool | None:
        """One request popped from ``key``: True if it may predate the connection, False if
        it cannot, None if unknown (then ask ``predates``)."""
        waiting = self._waiting
        if waiting is None:
            return None
        left = waiting.get(key, 0)
        if left <= 0:
            return False
        if left == 1:
            del waiting[key]
        else:
            waiting[key] = left - 1
        return True

    def predates(self, queued: float) -> bool:
        """The clock rule: True if a request queued at ``queued`` (its distributor's clock)
        may have been queued before the connection (this Node's clock) was made."""
        return queued < self._since + self.margin
