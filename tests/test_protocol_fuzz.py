"""Seeded, bounded fuzzing of both RESP parsers: random and mutated bytes.

Whatever Redis (or something posing as it) sends, a parser either returns replies, asks for
more data, or raises ``ProtocolError``: no other exception, no hang, and memory bounded by
``max_reply_size``.
"""

from __future__ import annotations

import gc
import random
import weakref
from typing import Any

import pytest

from minidasgi.resp.protocol import (
    NEED_DATA,
    ProtocolError,
    ReplyError,
    make_parser,
    pack_command,
)

VALID = [
    b"+OK\r\n",
    b"-ERR unknown command\r\n",
    b":12345\r\n",
    b"$5\r\nhello\r\n",
    b"$-1\r\n",
    b"*2\r\n$7\r\nmessage\r\n$3\r\nabc\r\n",
    b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
    b"*2\r\n*1\r\n:1\r\n*0\r\n",
    b"%1\r\n+k\r\n:1\r\n",
    b",3.25\r\n",
    b"#t\r\n",
    b"_\r\n",
    b"~2\r\n:1\r\n:2\r\n",
    b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nd\r\n",
    pack_command("LPUSH", "key", b"\x00\xff" * 50),
]
MAX_REPLY = 64 * 1024


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        action = rng.randrange(4)
        if action == 0 and data:  # flip a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif action == 1 and data:  # cut
            del data[rng.randrange(len(data)) :]
        elif action == 2:  # insert a protocol-looking byte
            data.insert(rng.randrange(len(data) + 1), rng.choice(b"$*:+-%~>,#_(=!|\r\n0123456789"))
        else:  # duplicate a slice
            if data:
                start = rng.randrange(len(data))
                data[start:start] = data[start : start + rng.randint(1, 8)]
    return bytes(data)


def _exercise(kind: str, data: bytes, rng: random.Random) -> None:
    parser = make_parser(kind, max_reply_size=MAX_REPLY)
    position = 0
    # Bounded by construction: each gets() either consumes bytes, asks for more or raises.
    try:
        while position < len(data):
            step = rng.randint(1, 64)
            parser.feed(data[position : position + step])
            position += step
            for _ in range(len(data) + 1):
                if parser.gets() is NEED_DATA:
                    break
    except ProtocolError:
        return


@pytest.mark.parametrize("kind", ["python", "hiredis"])
def test_random_bytes_only_raise_protocol_error(kind: str) -> None:
    rng = random.Random(2024)
    for _ in range(2000):
        prefix = rng.choice([b"", rng.choice(b"$*:+-%~>,#_(=!|").to_bytes(1, "big")])
        data = prefix + rng.randbytes(rng.randint(0, 200))
        _exercise(kind, data, rng)


@pytest.mark.parametrize("kind", ["python", "hiredis"])
def test_mutated_replies_only_raise_protocol_error(kind: str) -> None:
    rng = random.Random(77)
    for _ in range(4000):
        base = b"".join(rng.choice(VALID) for _ in range(rng.randint(1, 4)))
        _exercise(kind, _mutate(rng, base), rng)


@pytest.mark.parametrize("kind", ["python", "hiredis"])
def test_huge_announced_sizes_do_not_allocate(kind: str) -> None:
    # Lengths that would need gigabytes: refused at once (pure; hiredis for the aggregates, whose
    # headers are walked before hiredis sizes a list by them) or once the buffered bytes pass
    # the bound (hiredis for the bulk string, which it does not size before its data arrives).
    for header in (b"$2147483647\r\n", b"*2147483647\r\n", b"%1073741823\r\n"):
        parser = make_parser(kind, max_reply_size=MAX_REPLY)
        parser.feed(header)
        with pytest.raises(ProtocolError):
            for _ in range(MAX_REPLY // 1024 + 2):
                if parser.gets() is NEED_DATA:
                    parser.feed(b":1\r\n" * 256)


@pytest.mark.parametrize("kind", ["python", "hiredis"])
def test_a_parser_that_failed_holds_nothing_for_the_gc(kind: str) -> None:
    """A failed parser is freed as soon as it is dropped, and a failed hiredis one drops its
    reader's half-built reply at once: hiredis makes ``*2147483647`` a 16 GiB list (untouched
    pages, so no memory), but a collection walks every slot of it (seconds). Kept in a cycle
    through the stored exception's traceback, such a parser made the next collection, in
    whatever code ran next, take 8-15 s. A 128 MiB list shows the same here, and freeing it
    costs this test milliseconds, not the seconds the test above pays."""
    gc.collect()
    gc.disable()
    try:
        parser = make_parser(kind, max_reply_size=MAX_REPLY)
        parser.feed(b"*%d\r\n" % 2**24)
        with pytest.raises(ProtocolError):
            for _ in range(MAX_REPLY // 1024 + 2):
                if parser.gets() is NEED_DATA:
                    parser.feed(b":1\r\n" * 256)
        with pytest.raises(ProtocolError):  # still refused, as before
            parser.gets()
        huge = [o for o in gc.get_objects() if type(o) is list and len(o) > MAX_REPLY]
        assert not huge  # nothing of the failed reply is left for a collection to walk
        freed = weakref.ref(parser)
        del parser
        assert freed() is None  # by its reference count alone: no cycle left for the GC
    finally:
        gc.enable()


# Payloads that hold what an aggregate header over the bound looks like, after a line feed or
# not (hiredis skips the two bytes after a payload unchecked, so a header need not follow one).
_LOOKALIKE_PAYLOADS = [
    b"\r\n*99999999\r\n",
    b"\n~2147483647",
    b"x\r\n%1048577\r\n|",
    b"\r\n>12345678",
    b"\r\n*1",
    b"\r\n",
    b"XY*1048577\r\n",
    b"\r\n$5\r\nab",
]
_DOUBLES = [b"1.5", b"-0.25", b"3", b"inf", b"-inf", b"1e3"]


def _payload(rng: random.Random) -> bytes:
    payload = rng.choice(_LOOKALIKE_PAYLOADS) + rng.randbytes(rng.randint(0, 6))
    if rng.random() < 0.5:
        payload = rng.randbytes(rng.randint(0, 6)) + payload
    return payload


def _element(rng: random.Random, depth: int) -> bytes:
    """A random valid reply of every type both parsers read alike: not an attribute (``|``,
    which hiredis returns as a reply of its own) nor a bulk error (``!``, which hiredis 3.5
    refuses). A big number (``(``) is an int here and its digits under hiredis: see
    ``_same``."""
    choice = rng.randrange(17 if depth < 3 else 13)
    if choice == 0:
        return b"+%s\r\n" % rng.choice([b"OK", b"*12345678", b">9999999", b""])
    if choice == 1:
        return b"-%s\r\n" % rng.choice([b"ERR x", b"*2147483647", b"WRONGTYPE"])
    if choice == 2:
        return b":%d\r\n" % rng.randint(-5, 10**9)
    if choice == 3:
        return b"(%d\r\n" % rng.randint(-(10**30), 10**30)
    if choice == 4:
        return b",%s\r\n" % rng.choice(_DOUBLES)
    if choice == 5:
        return rng.choice([b"#t\r\n", b"#f\r\n", b"_\r\n", b"$-1\r\n", b"*-1\r\n"])
    if choice in (6, 7, 8, 9):
        payload = _payload(rng)
        return b"$%d\r\n%s\r\n" % (len(payload), payload)
    if choice in (10, 11, 12):
        payload = b"txt:" + _payload(rng)
        return b"=%d\r\n%s\r\n" % (len(payload), payload)
    items = [_element(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if choice == 13:
        return b"*%d\r\n" % len(items) + b"".join(items)
    if choice == 14:
        return b"~%d\r\n" % len(items) + b"".join(items)
    if choice == 15:
        return b">%d\r\n" % len(items) + b"".join(items)
    keys = [b"+k%d\r\n" % i if rng.random() < 0.5 else b":%d\r\n" % i for i in range(len(items))]
    return b"%%%d\r\n" % len(items) + b"".join(k + v for k, v in zip(keys, items, strict=True))


def _same(value: object) -> object:
    """``value`` with what the parsers are documented to return differently made equal: an
    int as its digits (a big number is an int here, bytes under hiredis), an error as its
    class and text (a ReplyError equals only itself), a push as a list."""
    if isinstance(value, bool) or value is None or isinstance(value, (bytes, float)):
        return value
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, ReplyError):
        return (type(value), str(value))
    if isinstance(value, dict):
        return {_same(k): _same(v) for k, v in value.items()}
    assert isinstance(value, list), value
    return [_same(v) for v in value]


def _outcome(kind: str, pieces: list[bytes], *, feed_gets: bool) -> tuple[list[object], bool]:
    parser = make_parser(kind, max_reply_size=MAX_REPLY)
    replies: list[object] = []
    try:
        for piece in pieces:
            if feed_gets:
                reply = parser.feed_gets(piece)
            else:
                parser.feed(piece)
                reply = parser.gets()
            while reply is not NEED_DATA:
                replies.append(_same(reply))
                reply = parser.gets()
    except ProtocolError:
        return replies, True
    return replies, False


def test_both_parsers_agree_on_lookalike_payloads_and_aggregates_over_the_bound() -> None:
    """hiredis' framing walk refuses an aggregate over the bound, or a payload whose CRLF is
    missing, where the pure parser does, after the same replies, and takes the same bytes
    inside bulk strings for payload, however the stream is cut and fed (``feed`` and
    ``gets``, or ``feed_gets``; bytes, or memoryviews of one buffer as the connection
    feeds them)."""
    rng = random.Random(20261203)
    for _ in range(1500):
        stream = b"".join(_element(rng, 0) for _ in range(rng.randint(1, 4)))
        ending = rng.random()
        if ending < 0.4:  # an aggregate over the bound, at an item's start
            kind = rng.choice(b"*~%>|")
            count = rng.choice([1048577, 2147483647, 99999999])
            if kind in b"%|":
                count = max(524289, count // 2)
            opening = rng.choice([b"", b"*2\r\n:1\r\n", b"*1\r\n%1\r\n+k\r\n"])
            stream += opening + bytes([kind]) + b"%d\r\n" % count
        elif ending < 0.6:  # a payload without its CRLF, then such an aggregate right after it
            opening = rng.choice([b"", b"*2\r\n:1\r\n", b"%1\r\n+k\r\n"])
            payload = _payload(rng)
            after = rng.choice([b"XY", b"\rY", b"X\n", b"\n\r"])
            stream += opening + b"$%d\r\n%s%s*1048577\r\n" % (len(payload), payload, after)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6))))
        spans = list(zip([0, *cuts], [*cuts, len(stream)], strict=True))
        view = memoryview(bytearray(stream))
        pieces: list[Any] = [stream[a:b] for a, b in spans]
        views: list[Any] = [view[a:b] for a, b in spans]
        expected = _outcome("python", pieces, feed_gets=False)
        assert expected[1] == (ending < 0.6), stream
        for feed_gets in (False, True):
            assert _outcome("hiredis", pieces, feed_gets=feed_gets) == expected, stream
            assert _outcome("hiredis", views, feed_gets=feed_gets) == expected, stream
