"""Admission bounds and the refusal log, without Redis (the LPUSH path is integration-tested)."""

from __future__ import annotations

import logging
import random

import pytest

from minidasgi import admission as admission_module
from minidasgi import memo, metrics
from minidasgi.admission import Admission
from minidasgi.resp import ReplyError
from minidasgi.resp.protocol import pack_command


def test_bounds_per_key_with_a_default() -> None:
    admission = Admission(channel_prefix="p", db=0, max_queue={"a": 5, "*": 2, "b": None})
    assert (admission.bound("a"), admission.bound("b"), admission.bound("c")) == (5, None, 2)
    assert Admission(channel_prefix="p", db=0, max_queue=3).bound("x") == 3
    assert Admission(channel_prefix="p", db=0).bound("x") is None


def test_in_flight_bound() -> None:
    admission = Admission(channel_prefix="p", db=0, max_in_flight=2)
    assert not admission.over_capacity(1)
    assert admission.over_capacity(2)
    assert not Admission(channel_prefix="p", db=0).over_capacity(10**6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_bounds_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="bounds"):
        Admission(channel_prefix="p", db=0, max_queue=bad)  # type: ignore[arg-type]


def test_refusals_are_logged_at_most_once_a_second_per_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admission = Admission(channel_prefix="p", db=0)
    caplog.set_level(logging.WARNING, logger="minidasgi.admission")
    for _ in range(100):
        admission.log_refusal(metrics.NO_NODE, "k")
    admission.log_refusal(metrics.QUEUE_FULL, "k")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "no Node listens" in messages[0] and "queue is full" in messages[1]


def test_lpush_is_packed_as_pack_command_packs_it_its_head_once_per_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pushes' own packing gives ``pack_command``'s bytes (fuzzed: keys of any text,
    one envelope or many, small and large, empty), and packs a key's head once."""
    admission = Admission(channel_prefix="p", db=0)
    rng = random.Random(10)
    alphabet = "ab:{}-é\u2603 \r\n$*0"
    for _ in range(400):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        values = [
            rng.randbytes(rng.choice((0, 1, 9, 10, 1023, 1024, 5000)))
            for _ in range(rng.choice((1, 1, 2, 3, 7)))
        ]
        assert admission._pack_lpush(key, values) == pack_command("LPUSH", key, *values)
    packed: list[tuple[object, ...]] = []
    monkeypatch.setattr(admission_module, "pack_command", lambda *a: packed.append(a) or b"")
    admission._pack_lpush("k", [b"x"])
    admission._pack_lpush("k", [b"y", b"z"])
    assert packed == []  # neither packed the general way
    assert "k" in admission._lpush_heads and len(admission._lpush_heads) <= memo.BOUND


def test_the_verdict_of_an_lpush_by_bounds_and_listeners() -> None:
    error = ReplyError("OOM command not allowed")
    plain = Admission(channel_prefix="p", db=0)
    assert plain.verdict("k", 0, (None, 10**6, 1)) is None  # no bound: any length
    with pytest.raises(ReplyError):
        plain.verdict("k", 0, (None, error, 1))
    bounded = Admission(channel_prefix="p", db=0, max_queue={"a": 2, "b": None})
    assert bounded.verdict("b", 0, (None, 10**6, 1)) is None
    assert bounded.verdict("a", 0, (None, 3, 2)) is None  # the second of the batch made it 3
    assert bounded.verdict("a", 1, (None, 3, 2)) == metrics.QUEUE_FULL
    fail_fast = Admission(channel_prefix="p", db=0, fail_fast=True)
    assert fail_fast.verdict("k", 0, ([b"chan", 0], 1, 1)) == metrics.NO_NODE
    assert fail_fast.verdict("k", 0, ([b"chan", 1], 1, 1)) is None
    with pytest.raises(ReplyError):
        fail_fast.verdict("k", 0, ([b"chan", 1], error, 1))
