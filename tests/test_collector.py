"""collector.settle: the start-up's garbage collected, what is left frozen."""

from __future__ import annotations

import gc
import weakref

import pytest

from minidasgi import collector
from minidasgi.resp import connection as resp_connection


class _Cycle:
    other: _Cycle | None = None


def test_settle_collects_the_garbage_first_then_freezes_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resp_connection, "_tails_apart", False)  # settle's, undone after
    garbage = _Cycle()
    garbage.other = garbage  # freed only by a collection
    dead = weakref.ref(garbage)
    kept = _Cycle()
    del garbage
    try:
        collector.settle()
        assert dead() is None  # collected, not frozen for good
        assert gc.get_freeze_count() > 1000  # the modules, their functions, ``kept``
        assert not any(o is kept for o in gc.get_objects())  # out of the collector's sight
        assert resp_connection._tails_apart  # a process of the library's: bodies read apart
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
