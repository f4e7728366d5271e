"""The stats payload: what a process tells, and what a status command accepts back."""

from __future__ import annotations

import time

from minidasgi import stats


def test_node_payload_round_trips_through_check() -> None:
    payload = stats.node_payload(
        channel="p:0:node:x",
        keys=["a", "b"],
        concurrency=4,
        in_flight=1,
        served=10,
        failed=2,
        started=time.time() - 5,
        stopping=False,
    )
    checked = stats.check(payload)
    assert checked is not None
    assert checked["keys"] == ["a", "b"] and checked["served"] == 10 and checked["failed"] == 2
    assert checked["uptime"] >= 5 and checked["stopping"] is False


def test_check_drops_what_it_does_not_know_or_trust() -> None:
    assert stats.check(["not", "a", "dict"]) is None
    assert stats.check({"role": "admin"}) is None
    checked = stats.check(
        {
            "role": "node",
            "channel": 5,
            "served": -1,
            "in_flight": True,
            "keys": ["k", 3, "x" * 1000],
            "uptime": "long",
            "extra": object(),
        }
    )
    assert checked == {"role": "node", "channel": "?", "host": "?", "keys": ["k", "x" * 256]}


def test_reply_channel_must_be_a_status_channel_of_the_same_namespace() -> None:
    good = stats.status_channel("p", 0)
    assert stats.reply_channel("p", 0, [good]) == good
    assert stats.reply_channel("p", 1, [good]) is None
    assert stats.reply_channel("p", 0, ["p:0:dist:abc"]) is None  # never a peer's channel
    assert stats.reply_channel("p", 0, [good, "more"]) is None
    assert stats.reply_channel("p", 0, [b"bytes"]) is None
