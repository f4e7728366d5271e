"""collector.settle: the start-up's garbage collected, what is left frozen."""

from __future__ import annotations

import gc
import weakref

from minidasgi import collector


class _Cycle:
    other: _Cycle | None = None


def test_settle_collects_the_garbage_first_then_freezes_the_rest() -> None:
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
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
