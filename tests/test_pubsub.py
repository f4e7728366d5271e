"""Unit tests for ``minidasgi.resp.pubsub``: the dispatch of what a subscriber reads."""

from __future__ import annotations

import random
from typing import Any

import pytest

from minidasgi.resp import ReplyError
from minidasgi.resp.pubsub import Subscriber


def _subscriber(sharded: bool, seen: list[Any]) -> Subscriber:
    subscriber = Subscriber(
        "redis://127.0.0.1:1",
        on_message=lambda channel, data: seen.append((channel, data)),
        sharded=sharded,
    )
    subscriber._channels = {b"ours", b"also"}
    return subscriber


def _outcome(handle: Any, reply: Any) -> Any:
    try:
        handle(reply)
    except Exception as exc:
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("sharded", [False, True])
def test_a_message_takes_the_short_way_to_what_the_general_dispatch_does(sharded: bool) -> None:
    """``_handle`` dispatches a message on a channel of ours before checking for the other
    kinds: the same callbacks, in the same order, and the same errors as ``_handle_any``
    alone, for every reply (fuzzed)."""
    rng = random.Random(10)
    kinds: list[Any] = [
        b"message",
        b"smessage",
        b"MESSAGE",
        b"subscribe",
        b"ssubscribe",
        b"unsubscribe",
        b"pong",
        b"other",
        bytearray(b"message"),
        "message",
        None,
    ]
    parts: list[Any] = [b"ours", b"also", b"theirs", bytearray(b"ours"), b"", b"data", 7, None]
    fast_seen: list[Any] = []
    general_seen: list[Any] = []
    fast = _subscriber(sharded, fast_seen)
    general = _subscriber(sharded, general_seen)
    for _ in range(2000):
        shape = rng.random()
        reply: Any
        if shape < 0.05:
            reply = rng.choice([b"PONG", ReplyError("ERR x"), 3, None, [], b"message"])
        else:
            reply = [rng.choice(kinds)]
            reply += [rng.choice(parts) for _ in range(rng.choice((1, 2, 2, 2, 3)))]
            if shape < 0.3:
                reply = tuple(reply)
        assert _outcome(fast._handle, reply) == _outcome(general._handle_any, reply), reply
        assert fast_seen == general_seen
    assert fast_seen  # the fuzz did reach the callback


def test_hears_a_bytes_name_without_converting_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Node asks ``hears`` for its own channel, as bytes, before every pop and every
    request: the name is taken as it is (no call, no copy), a str still converted, and the
    answer is the same."""
    from minidasgi.resp import pubsub

    converted: list[Any] = []
    real = pubsub._as_bytes

    def counting(channel: Any) -> bytes:
        converted.append(channel)
        return real(channel)

    monkeypatch.setattr(pubsub, "_as_bytes", counting)
    subscriber = _subscriber(False, [])
    assert not subscriber.hears(b"ours")  # not connected yet
    subscriber._is_connected = True
    assert subscriber.hears(b"ours")
    assert not subscriber.hears(b"theirs")
    assert converted == []
    assert subscriber.hears("ours")
    assert not subscriber.hears(bytearray(b"theirs"))
    assert converted == ["ours", bytearray(b"theirs")]
