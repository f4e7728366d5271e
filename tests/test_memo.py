"""Unit tests for ``minidasgi.memo``: a table kept within its bound."""

from __future__ import annotations

from minidasgi import memo


def test_a_table_keeps_what_it_is_given_up_to_its_bound() -> None:
    table: dict[int, str] = {}
    for key in range(3):
        memo.keep(table, key, str(key), bound=3)
    assert table == {0: "0", 1: "1", 2: "2"}


def test_a_full_table_is_emptied_before_the_next_entry() -> None:
    table: dict[int, str] = {}
    for key in range(3 * memo.BOUND + 1):
        memo.keep(table, key, str(key))
        assert len(table) <= memo.BOUND
    assert table == {3 * memo.BOUND: str(3 * memo.BOUND)}
