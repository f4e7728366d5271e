"""Unit tests for what ``minidasgi.node`` makes of a decoded scope (no network)."""

from __future__ import annotations

from typing import Any

from minidasgi.node import _local_scope


def test_the_apps_scope_has_tuples_where_asgi_servers_give_tuples() -> None:
    state = {"db": object()}
    scope: dict[str, Any] = {
        "type": "http",
        "headers": [[b"host", b"a"], [b"x", b"1"]],
        "client": ["127.0.0.1", 5000],
        "server": ["127.0.0.1", 8000],
    }
    local = _local_scope(scope, state)
    assert local["headers"] == [(b"host", b"a"), (b"x", b"1")]
    assert all(type(pair) is tuple for pair in local["headers"])
    assert local["client"] == ("127.0.0.1", 5000)
    assert local["server"] == ("127.0.0.1", 8000)
    assert local["state"] == state and local["state"] is not state


def test_headers_not_as_decoded_keep_only_their_pairs() -> None:
    # The general decoder may give anything there: only lists and tuples are kept, as tuples.
    for headers, kept in [
        ([[b"a", b"1"], "junk", (b"b", b"2")], [(b"a", b"1"), (b"b", b"2")]),
        ([("a", "1")], [("a", "1")]),
        ([5, [b"c", b"3"]], [(b"c", b"3")]),
        ([], []),
    ]:
        assert _local_scope({"type": "http", "headers": headers}, {})["headers"] == kept
