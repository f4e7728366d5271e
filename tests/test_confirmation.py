"""RecoveryWindow: which popped requests may predate the Node's pop connection."""

from __future__ import annotations

from minidasgi.confirmation import CLOCK_MARGIN, RecoveryWindow


def test_the_first_n_pops_of_a_key_with_n_waiting_are_in_the_window() -> None:
    window = RecoveryWindow()
    window.reconnected(["a", "b", "c"], {"a": 2, "b": 1, "c": 0}, now=100.0)
    assert [window.popped(b"a") for _ in range(3)] == [True, True, False]
    assert [window.popped(b"b") for _ in range(2)] == [True, False]
    assert window.popped(b"c") is False


def test_a_new_connection_counts_afresh_for_its_own_keys() -> None:
    window = RecoveryWindow()
    window.reconnected(["a"], {"a": 1}, now=100.0)
    window.reconnected(["{x}b"], {"{x}b": 1}, now=100.0)  # another slot, another connection
    assert window.popped(b"a") is True
    assert window.popped(b"a") is False
    window.reconnected(["a"], {"a": 1}, now=200.0)  # Redis restarted, or the master moved
    assert window.popped(b"a") is True
    assert window.popped(b"{x}b") is True  # untouched by the other connection


def test_without_counts_the_clocks_tell_with_a_margin() -> None:
    window = RecoveryWindow()
    window.reconnected(["a"], None, now=100.0)
    assert window.popped(b"a") is None
    assert window.predates(b"a", 50.0)
    # A distributor whose clock runs ahead by less than the margin, pushing just before.
    assert window.predates(b"a", 100.0 + CLOCK_MARGIN / 2)
    assert not window.predates(b"a", 100.0 + CLOCK_MARGIN)


def test_before_any_connection_everything_may_predate_it() -> None:
    window = RecoveryWindow()
    assert window.popped(b"a") is None
    assert window.predates(b"a", 1e12)
