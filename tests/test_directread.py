"""``DirectReads`` fed bytes in every way a socket may deliver them: message pushes are framed
by it, large payloads read straight into their own buffer, every other reply parsed by the
pure-Python parser, and the replies are those of a parser alone, in the same order."""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

import pytest

from minidasgi.resp.directread import _SLICE, DIRECT_FROM, DirectReads, SplitPayload
from minidasgi.resp.protocol import NEED_DATA, ProtocolError, make_parser


def _push(kind: bytes, channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(kind),
        kind,
        len(channel),
        channel,
        len(payload),
        payload,
    )


BIG = bytes(range(256)) * (DIRECT_FROM // 256 + 300)  # over DIRECT_FROM
LARGE = [BIG, BIG[:-1] + b"!", BIG * 3]
STREAM = [
    b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n",
    _push(b"message", b"c", b"small"),
    _push(b"message", b"c", LARGE[0]),
    _push(b"message", b"chan", LARGE[1]),
    _push(b"message", b"c", BIG[: DIRECT_FROM - 1]),  # just under: copied out of the read
    _push(b"pmessage", b"c", BIG),  # another kind: the parser's
    b"+PONG\r\n",
    b"-ERR no\r\n",
    _push(b"message", b"c", b""),
    _push(b"message", b"c", LARGE[2]),
    b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
]


def _counting(reader: DirectReads) -> list[int]:
    """The sizes of what ``reader`` feeds its parser, as it does."""
    fed: list[int] = []
    parser = reader._parser
    feed = parser.feed

    def counted(data: Any) -> None:
        fed.append(len(data))
        feed(data)

    parser.feed = counted  # type: ignore[method-assign]
    return fed


def _drain(reader: Any, out: list[Any], *, let_go: bool = False) -> None:
    while (reply := reader.gets()) is not NEED_DATA:
        if let_go:  # a consumer done with each payload at once: its buffer may be read into
            reply = _plain([reply])[0]
        out.append(reply)


def _read(
    reader: DirectReads,
    data: bytes,
    sizes: list[int],
    *,
    ahead: bool = False,
    let_go: bool = False,
) -> list[Any]:
    """What a socket delivers: each read goes where ``read_into`` says, or (``ahead``) where
    ``read_ahead`` offers, or is fed."""
    out: list[Any] = []
    pos = 0
    turn = 0
    while pos < len(data):
        size = sizes[turn % len(sizes)]
        turn += 1
        target = reader.read_into()
        spare = reader.read_ahead() if ahead and target is None else None
        if target is not None:
            n = min(size, len(target), len(data) - pos)
            target[:n] = data[pos : pos + n]
            reader.filled(n)
        elif spare is not None:
            n = min(size, len(spare), len(data) - pos)
            spare[:n] = data[pos : pos + n]
            del spare  # as the transport's, released once read into
            reader.ahead_filled(n)
        else:
            n = min(size, len(data) - pos)
            reader.feed(memoryview(bytearray(data[pos : pos + n])))  # a view, as the protocol's
        pos += n
        _drain(reader, out, let_go=let_go)
    return out


def _tail_of(start: memoryview, size: int) -> int:
    """A stand-in for ``wire.tail_size``: a payload starting with ``T`` has all its bytes
    after the first 10 as its tail."""
    return size - 10 if len(start) >= 1 and start[0] == ord("T") and size > 10 else 0


def _read_apart(
    reader: DirectReads,
    data: bytes,
    sizes: list[int],
    peek: int = 4096,
    let_go: bool = True,
    race: bool = False,
) -> tuple[list[Any], list[bytes]]:
    """What ``_ReadingProtocol`` does with a socket delivering ``data`` in reads of
    ``sizes``: while ``streaming``, a peek at what the socket holds (``plan_split``), the
    header taken, the tail read by ``recv``, the CRLF read; else the transport's read as in
    ``_read`` (``race``: every other read of a tail is the transport's, as when bytes
    arrive between the ``recv`` and its read). Returns the replies and the tails' parts as
    ``recv`` returned them."""
    out: list[Any] = []
    received: list[bytes] = []
    pos = 0
    turn = 0
    while pos < len(data):
        size = sizes[turn % len(sizes)]
        turn += 1
        available = data[pos : pos + size]  # what the socket holds now
        used = 0
        if reader.streaming and not reader.tail_wanted():
            view = memoryview(bytearray(data[pos : pos + min(peek, len(available))]))
            start = reader.plan_split(view, len(view))
            if start:
                reader.split_taken(view)
                used = start
        if reader.tail_wanted() and used < len(available) and not (race and turn % 2):
            part = available[used : used + reader.tail_wanted()]
            received.append(part)
            reader.tail_read(part)
            used += len(part)
            if not reader.tail_wanted() and used < len(available):  # then the CRLF, alone
                crlf = available[used : used + 2]
                reader.feed(memoryview(bytearray(crlf)))
                used += len(crlf)
        if used:
            pos += used
            continue
        target = reader.read_into()
        if target is not None:
            n = min(size, len(target), len(data) - pos)
            target[:n] = data[pos : pos + n]
            reader.filled(n)
        else:
            n = min(size, len(data) - pos)
            reader.feed(memoryview(bytearray(data[pos : pos + n])))
        pos += n
        _drain(reader, out, let_go=let_go)
    _drain(reader, out, let_go=let_go)
    return out, received


def _plain(replies: list[Any]) -> list[Any]:
    return [
        [bytes(item) if isinstance(item, (memoryview, SplitPayload)) else item for item in reply]
        if isinstance(reply, list)
        else reply
        for reply in replies
    ]


def _comparable(replies: list[Any]) -> list[Any]:
    """``replies`` with their errors as text (a ReplyError compares by identity)."""
    return [f"{type(r).__name__}: {r}" if isinstance(r, Exception) else r for r in replies]


def _expected(data: bytes) -> list[Any]:
    alone = make_parser("python")
    alone.feed(data)
    expected: list[Any] = []
    _drain(alone, expected)
    return expected


def test_replies_are_those_of_a_parser_alone_however_the_bytes_come() -> None:
    data = b"".join(STREAM)
    expected = _expected(data)
    assert len(expected) == len(STREAM)
    rng = random.Random(7)
    patterns = [[len(data)], [1], [2], [7], [65536], [262144]]
    patterns += [[rng.randint(1, 200_000) for _ in range(50)] for _ in range(5)]
    patterns += [[rng.randint(1, 40) for _ in range(50)] for _ in range(2)]
    for sizes in patterns:
        replies = _read(DirectReads(b"message"), data, sizes)
        assert [type(r) for r in replies] == [type(r) for r in expected], sizes
        assert str(_plain(replies)) == str(expected), sizes  # ReplyError compares by identity


def test_feed_gets_yields_what_feed_then_gets_yields() -> None:
    # The subscriber's read: ``feed_gets`` (feed, and the first reply in the same call),
    # then ``gets`` until NEED_DATA.
    data = b"".join(STREAM)
    expected = _expected(data)
    for step in (1, 7, 65536, len(data)):
        reader = DirectReads(b"message")
        replies: list[Any] = []
        for start in range(0, len(data), step):
            reply = reader.feed_gets(memoryview(bytearray(data[start : start + step])))
            while reply is not NEED_DATA:
                replies.append(reply)
                reply = reader.gets()
        assert str(_plain(replies)) == str(expected), step


def test_replies_read_ahead_into_payload_buffers_are_those_of_a_parser_alone() -> None:
    # Reads between payloads go into a free payload buffer whole: pushes whose payloads fit
    # it, or do not, or whose header or payload a read cuts, or several in one read, among
    # the parser's replies; the replies are the same, in the same order.
    rng = random.Random(11)
    pushes = [_push(b"message", b"c", BIG[: rng.randint(DIRECT_FROM, len(BIG))]) for _ in range(6)]
    data = b"".join(pushes[:3] + STREAM + pushes[3:])
    expected = _comparable(_expected(data))
    patterns = [[len(data)], [65536], [len(BIG) + 100]]
    patterns += [[rng.randint(1, 300_000) for _ in range(20)] for _ in range(4)]
    for sizes in patterns:
        reader = DirectReads(b"message")
        replies = _read(reader, data, sizes, ahead=True, let_go=True)
        assert _comparable(replies) == expected, sizes


def test_a_push_read_ahead_whole_is_delivered_from_that_read() -> None:
    # Once a payload was read into its own buffer, the next push that a read holds whole,
    # header and payload, is delivered from where it was read: one read, no copy (before,
    # its header and the start of its payload went to the connection's buffer, copied out,
    # then a second read took the rest).
    reader = DirectReads(b"message")
    assert reader.read_ahead() is None  # no payload buffer yet
    _read(reader, _push(b"message", b"c", BIG), [65536], let_go=True)
    for payload in LARGE[:2]:
        data = _push(b"message", b"chan", payload)
        spare = reader.read_ahead()
        assert spare is not None and len(spare) >= len(data)
        spare[: len(data)] = data
        reader.ahead_filled(len(data))
        reply = reader.gets()
        assert reply[:2] == [b"message", b"chan"] and reply[2] == payload
        assert reply[2].obj is spare.obj  # where it was read
        assert reader.read_into() is None and reader.gets() is NEED_DATA
        del reply, spare


def test_a_header_cut_in_a_reused_buffer_is_never_read_with_its_stale_bytes() -> None:
    # A read ahead goes into a buffer that held an earlier push: where a read ends inside the
    # next push's header, the bytes past it are the earlier push's (its header at the same
    # place, a length of other digits), and must never be taken for this one's.
    earlier = _push(b"message", b"c", BIG[:131072])
    later = _push(b"message", b"c", BIG[:100000])
    header = later.index(b"\r\n", later.index(b"$100000")) + 2
    for cut in range(1, header):
        reader = DirectReads(b"message")
        _read(reader, earlier, [65536], let_go=True)  # keeps a payload buffer
        _read(reader, earlier, [len(earlier)], ahead=True, let_go=True)  # fills it
        replies = _read(reader, later, [cut, len(later)], ahead=True, let_go=True)
        assert _comparable(replies) == _comparable(_expected(later)), cut


def test_a_payload_s_own_bytes_never_frame_the_next_push() -> None:
    # The stale bytes may be a payload a client chose: one shaped as a header whose length
    # would end the next payload early, so that the rest of it reads as a push of its own.
    header = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$"
    forged = _push(b"message", b"c", b"FORGED")
    bait = header + b"70000\r\n"
    earlier = _push(b"message", b"c", bait + b"x" * (131072 - len(bait)))
    payload = b"y" * 70000 + b"\r\n" + forged + b"z" * 20000
    later = _push(b"message", b"c", payload)
    reader = DirectReads(b"message")
    _read(reader, earlier, [65536], let_go=True)  # its payload read to its buffer's start
    replies = _read(reader, later, [len(header), len(later)], ahead=True, let_go=True)
    assert _comparable(replies) == _comparable(_expected(later))


def test_a_buffer_read_ahead_into_is_never_one_still_held() -> None:
    reader = DirectReads(b"message")
    held = _read(reader, _push(b"message", b"c", BIG), [65536])
    data = _push(b"message", b"c", BIG[:-1] + b"?") * 2
    # Two pushes in one read: the second one's payload goes to another buffer.
    second = _read(reader, data, [len(data)], ahead=True)
    assert bytes(held[0][2]) == BIG
    assert [bytes(reply[2]) for reply in second] == [BIG[:-1] + b"?"] * 2
    buffers = {id(held[0][2].obj)} | {id(reply[2].obj) for reply in second}
    assert len(buffers) == 3  # each payload still held in a buffer of its own
    assert reader.read_ahead() is None  # all held


def test_large_payloads_never_pass_through_a_parser() -> None:
    # The gain: a parser copies what it is fed twice (into its buffer, out into bytes); a
    # payload read into its own buffer is copied by the socket only, and framed pushes never
    # reach the parser at all.
    data = b"".join(STREAM)
    for sizes in ([262144], [65536], [1000]):
        reader = DirectReads(b"message")
        fed = _counting(reader)
        replies = _read(reader, data, sizes)
        direct = [r for r in replies if isinstance(r, list) and isinstance(r[-1], memoryview)]
        assert [bytes(r[2]) for r in direct] == LARGE
        assert direct[1][1] == b"chan"
        parsed = [STREAM[0], STREAM[5], STREAM[6], STREAM[7], STREAM[10]]  # not "message"
        # The parser is fed a slice at a time and gives back what follows each reply.
        assert sum(fed) <= sum(map(len, parsed)) + len(parsed) * _SLICE, sizes
    # A stream of message pushes, the traffic of a subscriber, never reaches the parser.
    pushes = [s for s in STREAM if s.startswith(b"*3\r\n$7\r\nmessage")]
    for sizes in ([262144], [65536], [1000], [1]):
        reader = DirectReads(b"message")
        fed = _counting(reader)
        replies = _read(reader, b"".join(pushes), sizes)
        assert len(replies) == len(pushes) and not fed, sizes


def test_a_large_payload_is_read_into_its_own_buffer() -> None:
    reader = DirectReads(b"message")
    data = _push(b"message", b"c", BIG)
    header = len(data) - len(BIG) - 2
    reader.feed(data[: header + 10])
    target = reader.read_into()
    assert target is not None and len(target) == len(BIG) + 2 - 10
    target[:] = data[header + 10 :]
    reader.filled(len(target))
    assert reader.read_into() is None
    reply = reader.gets()
    assert reply[:2] == [b"message", b"c"] and reply[2] == BIG
    assert reader.gets() is NEED_DATA


def test_payloads_are_read_into_one_buffer_while_their_consumer_lets_go_of_each() -> None:
    # A new bytearray per payload costs a fill with zeros, and page faults past the
    # allocator's threshold: the next payload goes into the last one's buffer once no view of
    # it is left.
    reader = DirectReads(b"message")
    buffers = []
    for i in range(16):
        payload = BIG[:-1] + bytes([i])
        (reply,) = _read(reader, _push(b"message", b"c", payload), [65536])
        assert reply[2] == payload
        buffers.append(reply[2].obj)
        del reply  # the consumer is done with it
    assert all(buffer is buffers[0] for buffer in buffers)


def test_a_payload_still_held_is_never_written_over() -> None:
    reader = DirectReads(b"message")
    (held,) = _read(reader, _push(b"message", b"c", LARGE[0]), [65536])
    view = held[2][10:20]  # even a slice of it keeps its buffer
    del held
    (second,) = _read(reader, _push(b"message", b"c", LARGE[1]), [1000, 65536])
    assert bytes(view) == LARGE[0][10:20]
    assert second[2] == LARGE[1] and second[2].obj is not view.obj
    del view, second
    (third,) = _read(reader, _push(b"message", b"c", LARGE[0]), [65536])
    assert third[2] == LARGE[0]  # into a buffer let go of, of its size or larger


def test_a_payload_without_its_crlf_is_refused() -> None:
    for payload in (BIG, b"small"):
        data = _push(b"message", b"c", payload)[:-2] + b"XX"
        with pytest.raises(ProtocolError):
            _read(DirectReads(b"message"), data, [len(data)])


def test_a_payload_over_the_direct_bound_goes_through_the_parser() -> None:
    reader = DirectReads(b"message", direct_max=len(BIG) - 1)
    fed = _counting(reader)
    data = _push(b"message", b"c", BIG)
    assert _plain(_read(reader, data, [len(data)])) == [[b"message", b"c", BIG]]
    assert sum(fed) == len(data)


def test_the_parser_keeps_its_bound_on_a_reply_size() -> None:
    data = _push(b"message", b"c", BIG)
    reader = DirectReads(b"message", direct_max=1000, max_reply_size=10_000)
    with pytest.raises(ProtocolError):
        _read(reader, data, [len(data)])


def test_sharded_messages_use_their_own_kind() -> None:
    data = _push(b"smessage", b"c", BIG) + _push(b"message", b"c", BIG)
    (sharded, plain) = _read(DirectReads(b"smessage"), data, [len(data)])
    assert sharded[0] == b"smessage" and isinstance(sharded[2], memoryview)
    assert plain[0] == b"message" and isinstance(plain[2], bytes)


def test_replies_with_tails_read_apart_are_those_of_a_parser_alone() -> None:
    # After a large payload, a peek finds the next push's header and payload start; its tail
    # is read apart (``recv``, whole or in parts), or by the connection's own read when the
    # peek saw too little; whatever the reads, the replies are the same, in the same order.
    rng = random.Random(5)
    tails = [b"T" + BIG[: rng.randint(DIRECT_FROM + 10, len(BIG))] for _ in range(8)]
    pushes = [_push(b"message", b"c", tail) for tail in tails]
    data = b"".join(pushes[:2] + STREAM + pushes[2:5] + [_push(b"message", b"c", BIG)] + pushes[5:])
    expected = _comparable(_expected(data))
    patterns = [[len(data)], [65536], [len(BIG) + 100], [7, len(BIG)]]
    patterns += [[rng.randint(1, 300_000) for _ in range(20)] for _ in range(6)]
    split = 0
    for sizes in patterns:
        for peek, race in ((4096, False), (40, False), (4096, True)):
            reader = DirectReads(b"message", tail_size=_tail_of)
            replies, received = _read_apart(reader, data, sizes, peek, race=race)
            assert _comparable(replies) == expected, (sizes, peek, race)
            split += len(received)
    assert split  # tails were read apart


def test_a_tail_read_whole_is_delivered_as_the_bytes_read() -> None:
    # The tail the socket handed over in one ``recv`` is the payload's tail itself: no copy.
    reader = DirectReads(b"message", tail_size=_tail_of)
    assert not reader.streaming
    first = _push(b"message", b"c", b"T" + BIG)
    replies, _ = _read_apart(reader, first, [len(first)], let_go=False)
    assert isinstance(replies[0][2], memoryview)  # the first: read as before
    assert reader.streaming
    payloads = [b"T123456789" + BIG, b"T987654321" + BIG[:-7]]
    data = b"".join(_push(b"message", b"ch", p) for p in payloads)
    replies, received = _read_apart(reader, data, [len(data)], let_go=False)
    assert [r[:2] for r in replies] == [[b"message", b"ch"]] * 2
    assert [bytes(r[2]) for r in replies] == payloads
    assert [r[2].head for r in replies] == [p[:10] for p in payloads]
    assert [r[2].tail for r in replies] == received
    assert all(r[2].tail is part for r, part in zip(replies, received, strict=True))
    assert len(replies[0][2]) == len(payloads[0]) and replies[0][2][0] == ord("T")
    assert replies[0][2][-1] == payloads[0][-1] and replies[0][2][10] == BIG[0]


def test_a_tail_trickled_in_tiny_reads_holds_about_its_size() -> None:
    # Redis (untrusted, or a slow link) may hand a tail over a few bytes per read: what is
    # kept meanwhile is one buffer of the tail's size, not an object per read (a ``bytes``
    # of two bytes costs ~35 bytes: 139 KiB in two-byte reads held ~3 MB before).
    reader = DirectReads(b"message", tail_size=_tail_of)
    _read_apart(reader, _push(b"message", b"c", b"T" + BIG), [1 << 20])  # now streaming
    payload = b"T123456789" + BIG
    data = _push(b"message", b"ch", payload)
    view = memoryview(bytearray(data[:4096]))
    start = reader.plan_split(view, len(view))
    assert start
    reader.split_taken(view)
    tail = data[start : start + reader.tail_wanted()]
    assert len(tail) == len(BIG) > DIRECT_FROM
    tracemalloc.start()
    try:
        for i in range(0, len(tail) - 2, 2):
            reader.tail_read(tail[i : i + 2])  # a fresh object per read, as ``recv`` makes
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * len(tail), held
    reader.tail_read(tail[-2:])
    out: list[Any] = []
    reader.feed(memoryview(bytearray(b"\r\n")))
    _drain(reader, out)
    assert bytes(out[0][2]) == payload and type(out[0][2].tail) is bytes


def test_no_peek_while_a_large_payload_is_read_into_its_buffer() -> None:
    # A payload that is not read apart (the connection's first large one) is read into its
    # buffer over many reads: a peek before each would find nothing to plan (a system call
    # for nothing each). The connection peeks once it is read whole.
    reader = DirectReads(b"message", tail_size=_tail_of)
    peeks: list[int] = []
    plan = reader.plan_split

    def counted(data: Any, size: int) -> int:
        peeks.append(size)
        return plan(data, size)

    reader.plan_split = counted  # type: ignore[method-assign]
    data = _push(b"message", b"c", b"T" + BIG)
    replies, _ = _read_apart(reader, data, [8192])
    assert bytes(replies[0][2]) == b"T" + BIG
    assert peeks == []
    assert reader.streaming  # the next read peeks


def test_a_tail_without_its_crlf_is_refused() -> None:
    reader = DirectReads(b"message", tail_size=_tail_of)
    _read_apart(reader, _push(b"message", b"c", b"T" + BIG), [1 << 20])
    bad = _push(b"message", b"c", b"T" + BIG)[:-2] + b"\r!"
    with pytest.raises(ProtocolError, match="CRLF"):
        _read_apart(reader, bad, [1 << 20])


def test_nothing_is_read_apart_without_a_tail_size_or_a_large_tail() -> None:
    reader = DirectReads(b"message")
    data = b"".join(_push(b"message", b"c", b"T" + BIG) for _ in range(3))
    replies, received = _read_apart(reader, data, [len(data)], let_go=False)
    assert not reader.splits and not reader.streaming and not received
    assert [type(r[2]) for r in replies] == [memoryview] * 3
    del replies
    reader = DirectReads(b"message", tail_size=lambda start, size: DIRECT_FROM - 1)
    replies, received = _read_apart(reader, data, [len(data)], let_go=False)
    assert not received and [type(r[2]) for r in replies] == [memoryview] * 3
