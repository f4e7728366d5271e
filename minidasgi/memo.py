"""Bounded tables of what the fast readers and writers keep by its key.

Owns one policy: a table holds at most ``bound`` entries, and a full one is emptied before
the next entry is kept. Every entry is what a reader or writer computed from its key alone,
so forgetting them all costs a few recomputations, never a wrong result; and whoever chooses
the keys (a peer publishing on Redis, a client through its path) never makes a table grow
past its bound (each caller bounds the size of its keys too). Must never keep a value a
caller could change.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["BOUND", "keep"]

K = TypeVar("K")
V = TypeVar("V")

BOUND = 256
"""Entries a table keeps at most, by default: many more than the routes and connections of
a process answer alike, few enough to hold no memory worth counting."""


def keep(table: dict[K, V], key: K, value: V, bound: int = BOUND) -> None:
    """Keep ``value`` in ``table`` by ``key``, emptying the table first if it is full."""
    if len(table) >= bound:
        table.clear()
    table[key] = value
