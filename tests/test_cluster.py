"""Unit tests for ``minidasgi.resp.cluster``: CRC16 and slots (the test vectors and hash-tag
examples of the Redis cluster specification), the slot-map reader fed hostile replies, and
redirect parsing. Routing against a real cluster: ``tests/integration/test_cluster.py``."""

from __future__ import annotations

import pytest

from minidasgi.resp import parse_url, topology
from minidasgi.resp.cluster import (
    SLOTS,
    ClusterSpec,
    SlotMap,
    _redirect,
    crc16,
    hash_tag,
    key_slot,
)
from minidasgi.resp.protocol import ReplyError


def test_crc16_matches_the_specification() -> None:
    # "The CRC16 ... Output for "123456789": 31C3" (cluster spec, appendix A).
    assert crc16(b"123456789") == 0x31C3
    assert crc16(b"") == 0


@pytest.mark.parametrize(
    ("key", "slot"),
    # Slots as `CLUSTER KEYSLOT` gives them on Redis 7.0.
    [("foo", 12182), ("bar", 5061), ("hello", 866), ("", 0), ("somekey", 11058)],
)
def test_key_slot_agrees_with_redis(key: str, slot: int) -> None:
    assert key_slot(key) == slot


def test_hash_tags_follow_the_specification() -> None:
    # The specification's examples.
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("{user1000}.following") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == crc16(b"foo{}{bar}") % SLOTS  # empty tag: whole key
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")  # the tag is "{bar"
    assert key_slot("foo{bar}{zap}") == key_slot("bar")  # only the first tag counts
    assert key_slot("foo{bar") == crc16(b"foo{bar") % SLOTS  # no closing brace
    assert key_slot(b"\xff{\xfe}") == key_slot(b"\xfe")


def _node(host: bytes, port: int) -> list[object]:
    return [host, port, b"id" * 20]


def test_slot_map_reads_cluster_slots() -> None:
    reply = [
        [0, 5460, _node(b"10.0.0.1", 7000), _node(b"10.0.0.4", 7003)],
        [5461, 16383, _node(b"", 7001)],  # an empty host: the address we asked
    ]
    slots = SlotMap.parse(reply, "10.0.0.9")
    assert slots.owner(0) == ("10.0.0.1", 7000)
    assert slots.owner(5460) == ("10.0.0.1", 7000)
    assert slots.owner(16383) == ("10.0.0.9", 7001)
    assert slots.masters == {("10.0.0.1", 7000), ("10.0.0.9", 7001)}
    assert slots.nodes[-1] == ("10.0.0.4", 7003)  # replicas are asked last


@pytest.mark.parametrize(
    "reply",
    [
        b"nope",
        [[0, 16384, _node(b"h", 1)]],
        [[-1, 5, _node(b"h", 1)]],
        [[5, 4, _node(b"h", 1)]],
        [[0, 5]],
        [[0, 5, [b"h"]]],
        [[0, 5, [b"h", 0]]],
        [[0, 5, [b"h", b"7000"]]],
        [[0, 5, [b"h" * 300, 7000]]],
        [[b"0", 5, _node(b"h", 1)]],
        [[0, 1, _node(b"h", 1)]] * (SLOTS + 1),
    ],
)
def test_slot_map_refuses_malformed_replies(reply: object) -> None:
    with pytest.raises(ValueError):
        SlotMap.parse(reply, "h")


def test_redirects() -> None:
    assert _redirect(ReplyError("MOVED 3999 127.0.0.1:6381")) == (
        "MOVED",
        3999,
        ("127.0.0.1", 6381),
    )
    assert _redirect(ReplyError("ASK 3999 [::1]:6381")) == ("ASK", 3999, ("::1", 6381))
    for text in ("ERR no", "MOVED x h:1", "MOVED 1 h:x", "MOVED 1 h:0", "MOVED 1"):
        assert _redirect(ReplyError(text)) is None


def test_cluster_url() -> None:
    params = parse_url("redis+cluster://:pw@h1:7000,h2:7001")
    assert params.cluster == ClusterSpec((("h1", 7000), ("h2", 7001)))
    assert params.address == "cluster h1:7000,h2:7001"
    assert "pw" not in repr(params)
    with pytest.raises(ValueError, match="only db 0"):
        parse_url("redis+cluster://h1/2")


def test_commands_are_routed_by_their_key() -> None:
    from minidasgi.resp.cluster import _routing_key

    assert _routing_key(("LPUSH", "q", "x")) == "q"
    assert _routing_key((b"lrem", b"q", -1, b"x")) == b"q"
    assert _routing_key(("PUBSUB", "SHARDNUMSUB", "ch")) == "ch"
    assert _routing_key(("SPUBLISH", "ch", "m")) == "ch"
    for keyless in (("CLIENT", "UNBLOCK", 5), ("PING",), ("LPUSH",), (), (1, "x")):
        assert _routing_key(keyless) is None


def test_pop_groups_split_keys_by_slot_on_a_cluster_only() -> None:
    keys = ["a", "{api}:users", "b", "{api}:admin", "a2"]
    single = parse_url("redis://localhost/0")
    assert topology.pop_groups(single, keys) == [keys]  # one BRPOP names them all
    cluster = parse_url("redis+cluster://localhost:7000")
    groups = topology.pop_groups(cluster, keys)
    assert sorted(k for g in groups for k in g) == sorted(keys)
    assert all(len({key_slot(k) for k in group}) == 1 for group in groups)
    assert len({key_slot(group[0]) for group in groups}) == len(groups)
    assert ["{api}:users", "{api}:admin"] in groups  # one tag, one slot, in the given order
    assert hash_tag("{api}:users") == "api" and hash_tag("a{}b") is None
    with pytest.raises(ValueError, match="share a slot"):
        topology.pop_client(cluster, ["a", "b"], name="pop")
