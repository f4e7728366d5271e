"""The garbage collector of a process the library owns: its start-up heap settled once.

Owns one step, ``settle``: collect the garbage start-up left, then freeze what survives
(``gc.freeze``: modules, functions, the app, long-lived settings) out of the collector's
sight. Every later collection then walks only what was made since: a full one no longer walks
the whole start-up heap (5.6-9.6 ms for the ``node`` command's, 8.4-14 ms for the
``distributor`` command's, against 0.01 and 0.2-0.25 ms once frozen), nor does the first
middle-generation one after start-up. What is frozen and later becomes cyclic garbage (a
connection replaced after a reconnection, say) is never freed: at most the start-up heap,
once, never a growth.

Called only where the library owns the process: ``Node.run`` and the ``minidasgi`` command.
It must never be called for a Node embedded with ``serve()`` nor for a distributor served by
a user's own server: the collector of a process is its owner's to tune. The same holds for
its C allocator, which reading bodies apart tunes (``settle`` turns that on too).
"""

from __future__ import annotations

import gc

from .resp import connection

__all__ = ["settle"]


def settle() -> None:
    """Collect the start-up's garbage, then freeze what is left (``gc.freeze``); and let
    the process's subscribers read large bodies apart (``resp.connection.read_tails_apart``:
    it tunes the C allocator, which is likewise the process owner's to tune)."""
    gc.collect()
    gc.freeze()
    connection.read_tails_apart()
