"""Seeded, bounded fuzzing of both RESP parsers: random and mutated bytes.

Whatever Redis (or something posing as it) sends, a parser either returns replies, asks for
more data, or raises ``ProtocolError``: no other exception, no hang, and memory bounded by
``max_reply_size``.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest

from minidasgi.resp.protocol import NEED_DATA, ProtocolError, make_parser, pack_command

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
    # headers are screened before hiredis sizes a list by them) or once the buffered bytes pass
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


# Payloads that hold, after a line feed, what an aggregate header over the bound looks like.
_LOOKALIKE_PAYLOADS = [
    b"\r\n*99999999\r\n",
    b"\n~2147483647",
    b"x\r\n%1048577\r\n|",
    b"\r\n>12345678",
    b"\r\n*1",
    b"\r\n",
]


def _element(rng: random.Random, depth: int) -> bytes:
    choice = rng.randrange(6 if depth < 3 else 4)
    if choice == 0:
        return b"+%s\r\n" % rng.choice([b"OK", b"*12345678", b">9999999"])
    if choice == 1:
        return b":%d\r\n" % rng.randint(-5, 10**9)
    if choice in (2, 3):
        payload = rng.choice(_LOOKALIKE_PAYLOADS) + rng.randbytes(rng.randint(0, 6))
        if rng.random() < 0.5:
            payload = rng.randbytes(rng.randint(0, 6)) + payload
        return b"$%d\r\n%s\r\n" % (len(payload), payload)
    items = [_element(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if choice == 4:
        return b"*%d\r\n" % len(items) + b"".join(items)
    return b"~%d\r\n" % len(items) + b"".join(items)


def _outcome(kind: str, pieces: list[bytes]) -> tuple[list[object], bool]:
    parser = make_parser(kind, max_reply_size=MAX_REPLY)
    replies: list[object] = []
    try:
        for piece in pieces:
            parser.feed(piece)
            while (reply := parser.gets()) is not NEED_DATA:
                replies.append(reply)
    except ProtocolError:
        return replies, True
    return replies, False


def test_both_parsers_agree_on_lookalike_payloads_and_aggregates_over_the_bound() -> None:
    """hiredis screens aggregate headers before it sees them: it refuses one over the bound
    where the pure parser does, after the same replies, and takes the same bytes inside bulk
    strings for payload, however the stream is cut."""
    rng = random.Random(20261203)
    for _ in range(600):
        stream = b"".join(_element(rng, 0) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.5:  # an aggregate over the bound, at an item's start
            kind = rng.choice(b"*~%>|")
            count = rng.choice([1048577, 2147483647, 99999999])
            if kind in b"%|":
                count = max(524289, count // 2)
            opening = rng.choice([b"", b"*2\r\n:1\r\n", b"*1\r\n%1\r\n+k\r\n"])
            stream += opening + bytes([kind]) + b"%d\r\n" % count
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6))))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert _outcome("hiredis", pieces) == _outcome("python", pieces), stream
