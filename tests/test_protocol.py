"""Unit tests for ``minidasgi.resp.protocol``: command packing and both reply parsers.

Every parser test runs against the pure-Python parser and hiredis through the ``parser_kind``
fixture. Each reply is fed whole, one byte at a time, in seeded random pieces and as part of a
pipeline, and must come out the same every time.
"""

from __future__ import annotations

import array
import itertools
import math
import random
import subprocess
import sys
import tracemalloc
from typing import Any

import pytest

from minidasgi.resp import protocol
from minidasgi.resp.protocol import (
    NEED_DATA,
    HiredisParser,
    ProtocolError,
    PythonParser,
    ReplyError,
    make_parser,
    pack_arguments,
    pack_command,
    pack_command_from,
    pack_command_parts,
    pack_gathering,
)

# -- pack_command --------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [("LPUSH", "k"), ("LPUSH", "é" * 600), ("PING",)])
@pytest.mark.parametrize("values", [[b""], [b"v"], [b"x" * 5000], [b"a", b"", b"c" * 2000]])
def test_a_command_from_its_packed_first_arguments_is_the_same_bytes(
    first: tuple[str, ...], values: list[bytes]
) -> None:
    assert pack_command_from(pack_arguments(*first), len(first), values) == pack_command(
        *first, *values
    )


def test_pack_command_encodes_bytes_and_str_as_bulk_strings() -> None:
    assert pack_command("LPUSH", "k", b"v") == b"*3\r\n$5\r\nLPUSH\r\n$1\r\nk\r\n$1\r\nv\r\n"


def test_pack_command_encodes_str_as_utf8() -> None:
    assert pack_command("SET", "é") == b"*2\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n"


def test_pack_command_keeps_binary_bytes_with_crlf_intact() -> None:
    payload = b"a\r\nb\x00\xff"
    assert pack_command(b"SET", payload) == b"*2\r\n$3\r\nSET\r\n$6\r\n" + payload + b"\r\n"


def test_pack_command_encodes_empty_bytes_as_empty_bulk() -> None:
    assert pack_command("GET", b"") == b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n"


@pytest.mark.parametrize(
    ("number", "encoded"),
    [(0, b"0"), (42, b"42"), (-7, b"-7"), (2**70, str(2**70).encode())],
)
def test_pack_command_encodes_int_as_decimal(number: int, encoded: bytes) -> None:
    assert pack_command("X", number) == b"*2\r\n$1\r\nX\r\n$%d\r\n%s\r\n" % (len(encoded), encoded)


@pytest.mark.parametrize(
    ("number", "encoded"),
    [(1.5, b"1.5"), (-0.25, b"-0.25"), (0.1, b"0.1"), (1e100, b"1e+100"), (math.inf, b"inf")],
)
def test_pack_command_encodes_float_with_repr(number: float, encoded: bytes) -> None:
    assert pack_command("X", number) == b"*2\r\n$1\r\nX\r\n$%d\r\n%s\r\n" % (len(encoded), encoded)


def test_pack_command_accepts_memoryview_and_bytearray() -> None:
    expected = pack_command("SET", b"key", b"value")
    assert pack_command("SET", memoryview(b"key"), bytearray(b"value")) == expected


def test_pack_command_accepts_a_sliced_memoryview() -> None:
    view = memoryview(b"xxvaluexx")[2:7]
    assert pack_command("SET", view) == pack_command("SET", b"value")


@pytest.mark.parametrize("flag", [True, False])
def test_pack_command_refuses_bool(flag: bool) -> None:
    with pytest.raises(TypeError, match="bool"):
        pack_command("SET", "k", flag)


@pytest.mark.parametrize("value", [None, [b"a"], {"a": 1}, object(), 1j])
def test_pack_command_refuses_unsupported_types(value: object) -> None:
    with pytest.raises(TypeError, match="cannot send"):
        pack_command("SET", "k", value)


def test_pack_command_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        pack_command("SET", "k", math.nan)


def test_pack_command_refuses_no_arguments() -> None:
    with pytest.raises(ValueError):
        pack_command()


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(params=["python", "hiredis"])
def parser_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


def assert_reply_equal(actual: Any, expected: Any) -> None:
    """Compare replies strictly: same types (so True is not 1), NaN equals NaN, errors by text."""
    if isinstance(expected, ReplyError):
        assert type(actual) is type(expected), f"{actual!r} is not a {type(expected).__name__}"
        assert str(actual) == str(expected)
        return
    if isinstance(expected, list):
        # hiredis returns a push as ``hiredis.PushNotification``, a subclass of list.
        assert isinstance(actual, list), f"{actual!r} is not a list"
    else:
        assert type(actual) is type(expected), f"{actual!r} is not a {type(expected).__name__}"
    if isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual)
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{actual!r} != {expected!r}"
        for actual_item, expected_item in zip(actual, expected, strict=True):
            assert_reply_equal(actual_item, expected_item)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_reply_equal(actual[key], expected[key])
    else:
        assert actual == expected


def random_pieces(data: bytes, rng: random.Random) -> list[bytes]:
    """Cut ``data`` at a random number of random places."""
    if len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, min(len(data) - 1, 8))))
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def feed_in_pieces(parser: Any, pieces: list[bytes]) -> Any:
    """Feed the pieces, checking that no reply is complete before the last one, and return it."""
    for piece in pieces[:-1]:
        parser.feed(piece)
        assert parser.gets() is NEED_DATA
    parser.feed(pieces[-1])
    reply = parser.gets()
    assert reply is not NEED_DATA
    assert parser.gets() is NEED_DATA
    return reply


# -- the corpus ----------------------------------------------------------------------------------

BINARY = b"a\r\nb\r\n\x00\xff\r"
BIG_NUMBER = 3492890328409238509324850943850943825024385

CORPUS: list[tuple[bytes, Any]] = [
    # RESP2 simple strings and errors.
    (b"+OK\r\n", b"OK"),
    (b"+\r\n", b""),
    (b"+hello world\r\n", b"hello world"),
    (b"-ERR unknown command 'FOO'\r\n", ReplyError("ERR unknown command 'FOO'")),
    (b"-WRONGTYPE Operation against a key\r\n", ReplyError("WRONGTYPE Operation against a key")),
    # Integers.
    (b":0\r\n", 0),
    (b":1000\r\n", 1000),
    (b":-42\r\n", -42),
    (b":9223372036854775807\r\n", 9223372036854775807),
    (b":-9223372036854775808\r\n", -9223372036854775808),
    # Bulk strings.
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$%d\r\n%s\r\n" % (len(BINARY), BINARY), BINARY),
    (b"$2\r\n\r\n\r\n", b"\r\n"),
    # Arrays.
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
    (b"*2\r\n$3\r\nfoo\r\n$3\r\nbar\r\n", [b"foo", b"bar"]),
    (b"*3\r\n:1\r\n:-2\r\n+three\r\n", [1, -2, b"three"]),
    (
        b"*3\r\n*2\r\n:1\r\n*1\r\n$1\r\nx\r\n*0\r\n*2\r\n+a\r\n*-1\r\n",
        [[1, [b"x"]], [], [b"a", None]],
    ),
    (
        b"*5\r\n-ERR first\r\n$-1\r\n*-1\r\n:5\r\n-NOSCRIPT none\r\n",
        [ReplyError("ERR first"), None, None, 5, ReplyError("NOSCRIPT none")],
    ),
    (b"*2\r\n$4\r\n\r\n\r\n\r\n$0\r\n\r\n", [b"\r\n\r\n", b""]),
    # RESP3 null and booleans.
    (b"_\r\n", None),
    (b"#t\r\n", True),
    (b"#f\r\n", False),
    # Doubles.
    (b",1.5\r\n", 1.5),
    (b",-0.25\r\n", -0.25),
    (b",10\r\n", 10.0),
    (b",-1e3\r\n", -1000.0),
    (b",1.5E-3\r\n", 0.0015),
    (b",inf\r\n", math.inf),
    (b",-inf\r\n", -math.inf),
    (b",nan\r\n", math.nan),
    # Verbatim strings lose their format prefix.
    (b"=15\r\ntxt:Some string\r\n", b"Some string"),
    (b"=4\r\nmkd:\r\n", b""),
    (b"=9\r\ntxt:a\r\nbc\r\n", b"a\r\nbc"),
    # Maps, sets and pushes.
    (b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n", {b"first": 1, b"second": 2}),
    (b"%0\r\n", {}),
    (b"%1\r\n$1\r\nk\r\n*2\r\n#t\r\n_\r\n", {b"k": [True, None]}),
    (b"*2\r\n%1\r\n:1\r\n,2.5\r\n~1\r\n:3\r\n", [{1: 2.5}, [3]]),
    (b"~3\r\n+a\r\n+b\r\n:1\r\n", [b"a", b"b", 1]),
    (b"~0\r\n", []),
    (
        b">3\r\n$7\r\nmessage\r\n$7\r\nchannel\r\n$5\r\nhello\r\n",
        [b"message", b"channel", b"hello"],
    ),
    (b">2\r\n+pong\r\n*1\r\n,nan\r\n", [b"pong", [math.nan]]),
]

# The corners where hiredis behaves differently (see the module docstring and the comments):
# only the pure-Python behaviour is pinned down here.
PURE_ONLY_CORPUS: list[tuple[bytes, Any]] = [
    # Big numbers: hiredis returns the digits as bytes.
    (b"(%d\r\n" % BIG_NUMBER, BIG_NUMBER),
    (b"(%d\r\n" % -BIG_NUMBER, -BIG_NUMBER),
    (b"(0\r\n", 0),
    # Attributes: hiredis returns the attribute as a reply of its own.
    (
        b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n"
        b"*2\r\n:2039123\r\n:9543892\r\n",
        [2039123, 9543892],
    ),
    (b"*2\r\n|1\r\n+ttl\r\n:3600\r\n:1\r\n:2\r\n", [1, 2]),
    (b"|0\r\n+OK\r\n", b"OK"),
    # Bulk errors: hiredis 3.5 refuses the '!' type byte with a ProtocolError.
    (b"!21\r\nSYNTAX invalid syntax\r\n", ReplyError("SYNTAX invalid syntax")),
    (b"*2\r\n!3\r\nERR\r\n:1\r\n", [ReplyError("ERR"), 1]),
]


def corpus_id(item: tuple[bytes, Any]) -> str:
    raw = item[0]
    return repr(raw if len(raw) <= 30 else raw[:27] + b"...")[2:-1]


def corpus_for(kind: str) -> list[tuple[bytes, Any]]:
    return CORPUS + PURE_ONLY_CORPUS if kind == "python" else CORPUS


@pytest.fixture(params=CORPUS, ids=[corpus_id(item) for item in CORPUS])
def shared_case(request: pytest.FixtureRequest) -> tuple[bytes, Any]:
    case: tuple[bytes, Any] = request.param
    return case


@pytest.fixture(params=PURE_ONLY_CORPUS, ids=[corpus_id(item) for item in PURE_ONLY_CORPUS])
def pure_only_case(request: pytest.FixtureRequest) -> tuple[bytes, Any]:
    case: tuple[bytes, Any] = request.param
    return case


def check_every_way_of_feeding(kind: str, raw: bytes, expected: Any) -> None:
    # (a) whole
    assert_reply_equal(feed_in_pieces(make_parser(kind), [raw]), expected)
    # (b) one byte at a time
    one_by_one = [raw[i : i + 1] for i in range(len(raw))]
    assert_reply_equal(feed_in_pieces(make_parser(kind), one_by_one), expected)
    # (c) seeded random splits
    rng = random.Random(1234)
    for _ in range(20):
        assert_reply_equal(feed_in_pieces(make_parser(kind), random_pieces(raw, rng)), expected)


def test_corpus_reply_parses_however_it_is_split(
    parser_kind: str, shared_case: tuple[bytes, Any]
) -> None:
    raw, expected = shared_case
    check_every_way_of_feeding(parser_kind, raw, expected)


def test_pure_parser_handles_big_numbers_attributes_and_bulk_errors(
    pure_only_case: tuple[bytes, Any],
) -> None:
    raw, expected = pure_only_case
    check_every_way_of_feeding("python", raw, expected)


def test_whole_corpus_fed_at_once_yields_every_reply_in_order(parser_kind: str) -> None:
    corpus = corpus_for(parser_kind)
    parser = make_parser(parser_kind)
    parser.feed(b"".join(raw for raw, _ in corpus))
    for _, expected in corpus:
        assert_reply_equal(parser.gets(), expected)
    assert parser.gets() is NEED_DATA


def test_whole_corpus_fed_in_random_pieces_yields_every_reply_in_order(parser_kind: str) -> None:
    corpus = corpus_for(parser_kind)
    stream = b"".join(raw for raw, _ in corpus)
    rng = random.Random(1234)
    for _ in range(5):
        parser = make_parser(parser_kind)
        replies = []
        for start in range(0, len(stream), step := rng.randint(1, 64)):
            parser.feed(stream[start : start + step])
            while (reply := parser.gets()) is not NEED_DATA:
                replies.append(reply)
        assert len(replies) == len(corpus)
        for reply, (_, expected) in zip(replies, corpus, strict=True):
            assert_reply_equal(reply, expected)


def test_feed_gets_yields_what_feed_then_gets_yields(parser_kind: str) -> None:
    # A read's first step in one call (``feed_gets``), then ``gets`` until NEED_DATA, as the
    # connection and the subscriber read: every reply, in order, however the stream is cut.
    corpus = corpus_for(parser_kind)
    stream = b"".join(raw for raw, _ in corpus)
    rng = random.Random(4321)
    for _ in range(5):
        parser = make_parser(parser_kind)
        replies = []
        for start in range(0, len(stream), step := rng.randint(1, 64)):
            reply = parser.feed_gets(stream[start : start + step])
            while reply is not NEED_DATA:
                replies.append(reply)
                reply = parser.gets()
        assert len(replies) == len(corpus)
        for reply, (_, expected) in zip(replies, corpus, strict=True):
            assert_reply_equal(reply, expected)
    assert make_parser(parser_kind).feed_gets(b"") is NEED_DATA


def test_error_replies_are_returned_not_raised(parser_kind: str) -> None:
    parser = make_parser(parser_kind)
    parser.feed(b"-ERR boom\r\n+OK\r\n")
    error = parser.gets()
    assert isinstance(error, ReplyError)
    assert str(error) == "ERR boom"
    assert parser.gets() == b"OK"


def test_gets_on_an_empty_parser_needs_data(parser_kind: str) -> None:
    parser = make_parser(parser_kind)
    assert parser.gets() is NEED_DATA
    parser.feed(b"")
    assert parser.gets() is NEED_DATA


def test_need_data_is_a_falsy_singleton() -> None:
    assert not NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
    assert type(NEED_DATA)() is NEED_DATA


# -- malformed input -----------------------------------------------------------------------------

MALFORMED: list[bytes] = [
    b"?x\r\n",  # unknown type prefix
    b"*1\r\n?x\r\n",  # unknown type prefix inside an array
    b"\r\n",  # no type prefix at all
    b"$abc\r\n",
    b"$1x\r\n",
    b"$\r\n",
    b"$+3\r\nabc\r\n",
    b"$ 3\r\nabc\r\n",
    b"$-2\r\n",
    b"*-5\r\n",
    b"*abc\r\n",
    b"*\r\n",
    b"*2\r\n:1\r\n$-2\r\n",
    b":12a\r\n",
    b":+1\r\n",
    b":\r\n",
    b":-\r\n",
    b":1.5\r\n",
    b":\xff\r\n",
    b":" + b"1" * 5000 + b"\r\n",  # more digits than int() converts
    b"$" + b"1" * 5000 + b"\r\n",
    b"*" + b"0" * 5000 + b"\r\n",
    b"#x\r\n",
    b"#tt\r\n",
    b"#\r\n",
    b",abc\r\n",
    b",1e\r\n",
    b",\r\n",
    b"_x\r\n",
    b"=3\r\nabc\r\n",  # verbatim string without its 'txt:' prefix
    b"$-1\r\n:1\r\n?\r\n",  # valid replies first, then garbage
    # A payload not followed by CRLF: hiredis skips those two bytes unchecked, HiredisParser's
    # framing walk refuses them (or the next header could start anywhere: see below).
    b"$3\r\nabcXY",
    b"$3\r\nabc\nX",
    b"$3\r\nabc\rX",
    b"*2\r\n$1\r\na\r\n=5\r\ntxt:bXY",
]

# hiredis accepts these, so they are checked against the pure parser only:
PURE_ONLY_MALFORMED: list[bytes] = [
    b"%-1\r\n",  # hiredis returns None for a map or set of length -1
    b"~-1\r\n",
    b"=-1\r\n",
    b"!-1\r\n",
    b",.5\r\n",  # hiredis reads 0.5
    b"(" + b"1" * 5000 + b"\r\n",  # hiredis returns the digits as bytes
    b"(12a\r\n",
    b"|-1\r\n",
    b"%1\r\n*1\r\n:1\r\n:2\r\n",  # unhashable map key: hiredis raises TypeError
]


def malformed_id(raw: bytes) -> str:
    return repr(raw if len(raw) <= 30 else raw[:27] + b"...")[2:-1]


def assert_refused_however_fed(kind: str, raw: bytes) -> None:
    parser = make_parser(kind)
    parser.feed(raw)
    with pytest.raises(ProtocolError):
        while parser.gets() is not NEED_DATA:
            pass

    parser = make_parser(kind)
    with pytest.raises(ProtocolError):
        for i in range(len(raw)):
            parser.feed(raw[i : i + 1])
            while parser.gets() is not NEED_DATA:
                pass

    # Through feed_gets, a read's first step: refused too, and for good.
    parser = make_parser(kind)
    with pytest.raises(ProtocolError):
        for i in range(len(raw)):
            if parser.feed_gets(raw[i : i + 1]) is not NEED_DATA:
                while parser.gets() is not NEED_DATA:
                    pass
    with pytest.raises(ProtocolError):
        parser.feed_gets(b"+OK\r\n")


@pytest.mark.parametrize("raw", MALFORMED, ids=[malformed_id(raw) for raw in MALFORMED])
def test_malformed_input_raises_protocol_error(parser_kind: str, raw: bytes) -> None:
    assert_refused_however_fed(parser_kind, raw)


@pytest.mark.parametrize(
    "raw", PURE_ONLY_MALFORMED, ids=[malformed_id(raw) for raw in PURE_ONLY_MALFORMED]
)
def test_pure_parser_refuses_input_hiredis_lets_through(raw: bytes) -> None:
    assert_refused_however_fed("python", raw)


def test_pure_parser_keeps_raising_after_a_protocol_error() -> None:
    parser = PythonParser()
    parser.feed(b"?x\r\n")
    with pytest.raises(ProtocolError) as first:
        parser.gets()
    parser.feed(b"+OK\r\n")
    for _ in range(3):
        with pytest.raises(ProtocolError) as again:
            parser.gets()
        # The same failure, a new exception each time: the parser keeps no exception, whose
        # traceback would hold the parser in a cycle.
        assert type(again.value) is ProtocolError
        assert str(again.value) == str(first.value)
        assert again.value is not first.value


def test_pure_parser_keeps_raising_after_a_malformed_map_key() -> None:
    parser = PythonParser()
    parser.feed(b"%1\r\n*1\r\n:1\r\n:2\r\n+OK\r\n")
    with pytest.raises(ProtocolError):
        parser.gets()
    with pytest.raises(ProtocolError):
        parser.gets()


# -- bounds --------------------------------------------------------------------------------------


def test_pure_parser_refuses_an_oversized_bulk_before_its_data_arrives() -> None:
    parser = PythonParser(max_reply_size=1000)
    parser.feed(b"$5000\r\n")
    with pytest.raises(ProtocolError, match="limit"):
        parser.gets()


def test_pure_parser_refuses_an_oversized_aggregate_length_at_once() -> None:
    parser = PythonParser(max_reply_size=1000)
    parser.feed(b"*5000\r\n")
    with pytest.raises(ProtocolError, match="limit"):
        parser.gets()


def bulk(payload: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(payload), payload)


def test_pure_parser_refuses_an_array_whose_elements_exceed_the_bound() -> None:
    raw = b"*3\r\n" + bulk(b"x" * 400) * 3
    assert len(raw) > 1000
    parser = PythonParser(max_reply_size=1000)
    parser.feed(raw)
    with pytest.raises(ProtocolError, match="limit"):
        parser.gets()

    parser = PythonParser(max_reply_size=1000)
    with pytest.raises(ProtocolError, match="limit"):
        for i in range(len(raw)):
            parser.feed(raw[i : i + 1])
            assert parser.gets() is NEED_DATA


def test_pure_parser_refuses_an_array_of_many_small_elements_over_the_bound() -> None:
    raw = b"*400\r\n" + b":1\r\n" * 400
    parser = PythonParser(max_reply_size=1000)
    parser.feed(raw)
    with pytest.raises(ProtocolError, match="limit"):
        parser.gets()


def test_pure_parser_bounds_the_elements_of_a_reply_not_only_its_bytes() -> None:
    """Four bytes (``*0``) build a list of 56: under the size bound alone, a 64 MiB reply of
    empty arrays built 16 million lists, a gigabyte. The elements that a reply's aggregates
    announce, together, are bounded, and refused from the headers, before anything is built."""
    most = 1 << 20  # protocol.DEFAULT_MAX_ITEMS (checked last)
    parser = PythonParser()
    parser.feed(b"*%d\r\n" % (most + 1))
    with pytest.raises(ProtocolError, match="elements"):
        parser.gets()
    # Split over nested aggregates (maps count two per entry), each one under the bound.
    for nested in (b"*2\r\n*%d\r\n" % (most - 1), b"*1\r\n%%%d\r\n" % (most // 2)):
        parser = PythonParser()
        parser.feed(nested)
        with pytest.raises(ProtocolError, match="elements"):
            parser.gets()
    # Up to the bound, and per reply: two replies of max_items each are both fine.
    parser = PythonParser(max_items=4)
    reply = b"*2\r\n*0\r\n%1\r\n:1\r\n:2\r\n"  # 2 + 2 elements
    parser.feed(reply * 2)
    assert parser.gets() == [[], {1: 2}]
    assert parser.gets() == [[], {1: 2}]
    parser.feed(b"*2\r\n*0\r\n*3\r\n")
    with pytest.raises(ProtocolError, match="elements"):
        parser.gets()
    assert most == protocol.DEFAULT_MAX_ITEMS


def test_pure_parser_accepts_an_array_just_under_the_bound() -> None:
    raw = b"*2\r\n" + bulk(b"x" * 400) * 2
    assert len(raw) <= 1000
    assert_reply_equal(feed_in_pieces(PythonParser(max_reply_size=1000), [raw]), [b"x" * 400] * 2)
    one_by_one = [raw[i : i + 1] for i in range(len(raw))]
    parser = PythonParser(max_reply_size=1000)
    assert_reply_equal(feed_in_pieces(parser, one_by_one), [b"x" * 400] * 2)


def test_pure_parser_bound_applies_to_each_reply_not_to_the_whole_buffer() -> None:
    # Many small replies that only add up to more than the bound are all fine, even when
    # they arrive in one read.
    reply = b"*2\r\n" + bulk(b"x" * 100) * 2
    parser = PythonParser(max_reply_size=1000)
    parser.feed(reply * 50)
    for _ in range(50):
        assert parser.gets() == [b"x" * 100] * 2
    assert parser.gets() is NEED_DATA


@pytest.mark.parametrize("size", [900, 992, 993, 995, 1000])
def test_pure_parser_bound_does_not_depend_on_how_the_reply_is_split(size: int) -> None:
    raw = bulk(b"x" * size)
    outcomes = []
    for pieces in ([raw], [raw[i : i + 1] for i in range(len(raw))], [raw[:10], raw[10:]]):
        parser = PythonParser(max_reply_size=1000)
        try:
            outcomes.append(feed_in_pieces(parser, pieces))
        except ProtocolError:
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert outcomes[0] == (b"x" * size if len(raw) <= 1000 else "refused")


def test_hiredis_parser_refuses_an_incomplete_reply_over_the_bound() -> None:
    parser = HiredisParser(max_reply_size=1000)
    parser.feed(b"$5000\r\n" + b"x" * 900)
    assert parser.gets() is NEED_DATA
    parser.feed(b"x" * 200)
    with pytest.raises(ProtocolError, match="limit"):
        parser.gets()


def test_hiredis_parser_refuses_an_incomplete_reply_over_the_bound_through_feed_gets() -> None:
    parser = HiredisParser(max_reply_size=1000)
    assert parser.feed_gets(b"+OK\r\n$5000\r\n" + b"x" * 900) == b"OK"
    assert parser.gets() is NEED_DATA  # the 907 bytes after the reply count, not those before
    with pytest.raises(ProtocolError, match="limit"):
        parser.feed_gets(b"x" * 200)
    with pytest.raises(ProtocolError, match="limit"):
        parser.feed_gets(b"x")  # given up for good


def test_hiredis_parser_refuses_an_incomplete_array_over_the_bound() -> None:
    parser = HiredisParser(max_reply_size=1000)
    parser.feed(b"*1000\r\n")
    assert parser.gets() is NEED_DATA
    with pytest.raises(ProtocolError, match="limit"):
        for _ in range(1000):
            parser.feed(b":1\r\n")
            assert parser.gets() is NEED_DATA


def nested(depth: int) -> bytes:
    return b"*1\r\n" * depth + b":1\r\n"


def nested_value(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("max_depth", [1, 3, protocol.DEFAULT_MAX_DEPTH])
def test_pure_parser_accepts_nesting_up_to_max_depth(max_depth: int) -> None:
    parser = PythonParser(max_depth=max_depth)
    parser.feed(nested(max_depth))
    assert parser.gets() == nested_value(max_depth)


@pytest.mark.parametrize("max_depth", [1, 3, protocol.DEFAULT_MAX_DEPTH])
def test_pure_parser_refuses_nesting_deeper_than_max_depth(max_depth: int) -> None:
    parser = PythonParser(max_depth=max_depth)
    parser.feed(nested(max_depth + 1))
    with pytest.raises(ProtocolError, match="nested"):
        parser.gets()


def test_pure_parser_counts_maps_and_sets_toward_depth() -> None:
    parser = PythonParser(max_depth=2)
    parser.feed(b"%1\r\n+k\r\n~1\r\n*1\r\n:1\r\n")
    with pytest.raises(ProtocolError, match="nested"):
        parser.gets()


def test_hiredis_parser_refuses_absurdly_deep_nesting() -> None:
    # hiredis has its own nesting limit (a few thousand levels); it takes no max_depth.
    parser = HiredisParser()
    parser.feed(nested(100_000))
    with pytest.raises(ProtocolError):
        parser.gets()


# -- hiredis: aggregate headers over max_items, refused before hiredis sizes a list by them -----

# hiredis sizes an aggregate by its announced length on reading the header. Counts just over the
# bound (an 8 or 16 MiB list if hiredis got them) show a refusal happened before hiredis did:
# without the framing walk these are NEED_DATA, not ProtocolError.
JUST_OVER = [
    b"*1048577\r\n",
    b"~1048577\r\n",
    b">1048577\r\n",
    b"%524289\r\n",  # a map's pairs count twice, as in the pure parser
    b"|524289\r\n",
]


def _feed_all(parser: HiredisParser, pieces: list[bytes]) -> list[Any]:
    """Feed the pieces through ``feed_gets``, collecting the replies handed out."""
    replies = []
    for piece in pieces:
        reply = parser.feed_gets(piece)
        while reply is not NEED_DATA:
            replies.append(reply)
            reply = parser.gets()
    # A ReplyError equals only itself: compare errors by their class and text.
    return [(type(r), str(r)) if isinstance(r, ReplyError) else r for r in replies]


@pytest.mark.parametrize("header", JUST_OVER, ids=[h[:1].decode() for h in JUST_OVER])
def test_hiredis_parser_refuses_an_aggregate_header_over_max_items(header: bytes) -> None:
    tracemalloc.start()
    try:
        parser = HiredisParser()
        with pytest.raises(ProtocolError, match="exceeds the limit of 1048576"):
            parser.feed_gets(header)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # hiredis never saw the header: no list was made
    with pytest.raises(ProtocolError):  # given up for good
        parser.feed_gets(b"+OK\r\n")


@pytest.mark.parametrize("header", JUST_OVER, ids=[h[:1].decode() for h in JUST_OVER])
def test_hiredis_parser_refuses_an_aggregate_header_through_feed_then_gets(header: bytes) -> None:
    parser = HiredisParser()
    parser.feed(header)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        parser.gets()


@pytest.mark.parametrize("kind", [b"*", b"~", b"%", b">", b"|"])
def test_hiredis_parser_refuses_a_two_billion_element_header_in_a_small_address_space(
    kind: bytes,
) -> None:
    # The header of the report: hiredis would make a list of 2^31 slots (16 GiB, 32 for an
    # attribute). Run where the address space is capped at 2 GiB, so that the code before the
    # walk fails (MemoryError, reported as "malformed reply") instead of reserving 16 GiB of
    # this shared machine, and the walked code passes without coming near the cap.
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from minidasgi.resp.protocol import HiredisParser, ProtocolError\n"
        "parser = HiredisParser()\n"
        "try:\n"
        f"    parser.feed_gets(b'+OK\\r\\n' + {kind!r} + b'2147483647\\r\\n')\n"
        f"    parser.gets()\n"
        "except ProtocolError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('accepted')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "exceeds the limit of 1048576" in result.stdout


@pytest.mark.parametrize("header", JUST_OVER, ids=[h[:1].decode() for h in JUST_OVER])
def test_hiredis_parser_refuses_an_aggregate_header_split_anywhere(header: bytes) -> None:
    raw = b"+OK\r\n" + header
    for cut in range(1, len(raw)):
        for pieces in ([raw[:cut], raw[cut:]], [raw[i : i + 1] for i in range(len(raw))]):
            parser = HiredisParser()
            replies: list[Any] = []
            with pytest.raises(ProtocolError, match="exceeds the limit"):
                for piece in pieces:
                    reply = parser.feed_gets(piece)
                    while reply is not NEED_DATA:
                        replies.append(reply)
                        reply = parser.gets()
            assert replies == [b"OK"]  # the reply before it is handed out first


def test_hiredis_parser_refuses_an_aggregate_header_split_at_its_line_end() -> None:
    for before in (b"+OK\r\n", b"*2\r\n:1\r\n", b"*2\r\n$2\r\nab\r\n"):
        raw = before + b"*1048577\r\n"
        for cut in (len(before) - 1, len(before), len(before) + 1):
            parser = HiredisParser()
            with pytest.raises(ProtocolError, match="exceeds the limit"):
                _feed_all(parser, [raw[:cut], raw[cut:]])


@pytest.mark.parametrize(
    "raw",
    [
        b"*1\r\n*1048577\r\n",
        b"*2\r\n:1\r\n~1\r\n%1\r\n+k\r\n>1048577\r\n",
        b"*3\r\n$3\r\nabc\r\n+x\r\n|524289\r\n",
        b"%1\r\n+key\r\n*1048577\r\n",
    ],
)
def test_hiredis_parser_refuses_a_nested_aggregate_header_over_max_items(raw: bytes) -> None:
    for step in (len(raw), 1, 3):
        parser = HiredisParser()
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            _feed_all(parser, [raw[i : i + step] for i in range(0, len(raw), step)])


def test_hiredis_parser_pipelined_replies_come_before_the_refusal() -> None:
    parser = HiredisParser()
    parser.feed(b"+a\r\n:1\r\n$3\r\nx\r\n\r\n*1048577\r\n+never\r\n")
    assert parser.gets() == b"a"
    assert parser.gets() == 1
    assert parser.gets() == b"x\r\n"
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        parser.gets()
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        parser.gets()


# Payloads holding what looks like a huge header: never refused, whole or split anywhere.
LOOKALIKES = [
    pack_command("SET", b"\r\n*99999999\r\n"),
    pack_command("SET", b"x\n~2147483647\r\n", b"\r\n%1048577"),
    b"$11\r\n\n>123456789\r\n",
    b"*2\r\n$13\r\nab\r\n*99999999\r\n+OK\r\n",
    b"=15\r\ntxt:\r\n|99999999\r\n",
    b"+*12345678\r\n",  # a simple string: its line starts after the type byte
    b"-*12345678 not a header\r\n",
    b"*2\r\n$8\r\n\r\n*12345\r\n:5\r\n",  # a payload ending in a short header-like run
    b"*1048576\r\n",  # at the bound: accepted (only its header here)
    b"%524288\r\n",
]


@pytest.mark.parametrize("raw", LOOKALIKES, ids=[repr(raw)[2:32] for raw in LOOKALIKES])
def test_hiredis_parser_passes_lookalike_headers_intact(raw: bytes) -> None:
    expected = _feed_all(PythonParser(), [raw])
    for step in range(1, len(raw) + 1):
        pieces = [raw[i : i + step] for i in range(0, len(raw), step)]
        assert _feed_all(HiredisParser(), pieces) == expected
    for cut in range(1, len(raw)):
        assert _feed_all(HiredisParser(), [raw[:cut], raw[cut:]]) == expected
    assert _feed_all(HiredisParser(), [memoryview(raw)]) == expected


# hiredis skips the two bytes after a bulk payload without looking at them, so a header may
# follow a payload with no line feed before it (review of the regex screen, M1). Each of these
# ends in an aggregate over the bound that hiredis would size (8 MiB for 1048577 slots) if the
# bytes reached it: the framing walk refuses the payload's terminator first.
TERMINATOR_BYPASSES = [
    b"$1\r\naXY*1048577\r\n",
    b"$1\r\naXY~1048577\r\n",
    b"$1\r\naXY>1048577\r\n",
    b"$1\r\naXY%524289\r\n",
    b"=5\r\ntxt:aXY*1048577\r\n",
    b"*2\r\n$1\r\naXY*1048577\r\n",
    b"*1\r\n*2\r\n:1\r\n$2\r\nabXY*1048577\r\n",
]


@pytest.mark.parametrize(
    "raw", TERMINATOR_BYPASSES, ids=[malformed_id(raw) for raw in TERMINATOR_BYPASSES]
)
def test_hiredis_parser_refuses_a_header_hidden_behind_a_bulk_terminator(raw: bytes) -> None:
    feeds: list[list[Any]] = [[raw], [memoryview(raw)], [raw[i : i + 1] for i in range(len(raw))]]
    feeds += [[raw[:cut], raw[cut:]] for cut in range(1, len(raw))]
    feeds += [[memoryview(raw)[:cut], memoryview(raw)[cut:]] for cut in range(1, len(raw))]
    for pieces in feeds:
        tracemalloc.start()
        try:
            parser = HiredisParser()
            with pytest.raises(ProtocolError, match="not terminated by CRLF"):
                _feed_all(parser, pieces)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, pieces  # hiredis never sized the list


def test_hiredis_parser_hands_out_replies_before_a_bad_bulk_terminator() -> None:
    raw = b"+OK\r\n:7\r\n$1\r\naXY*1048577\r\n"
    for pieces in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
        parser = HiredisParser()
        replies: list[Any] = []
        with pytest.raises(ProtocolError, match="not terminated by CRLF"):
            for piece in pieces:
                reply = parser.feed_gets(piece)
                while reply is not NEED_DATA:
                    replies.append(reply)
                    reply = parser.gets()
        assert replies == [b"OK", 7]


def test_hiredis_parser_refuses_a_negative_count_as_invalid_not_over_the_limit() -> None:
    # The regex screen held '*-' and its digits and called them over the limit.
    for raw in (b"*-12345678901234567890\r\n", b"*-2\r\n", b"$-2\r\n", b"%-3\r\n"):
        parser = HiredisParser()
        with pytest.raises(ProtocolError, match=r"invalid (aggregate|bulk) length"):
            parser.feed_gets(raw)


class _CountingReader:
    """A hiredis reader that counts the chunks fed to it."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.feeds = 0

    def feed(self, data: bytes) -> None:
        self.feeds += 1
        self.reader.feed(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


def test_hiredis_parser_work_does_not_grow_with_lookalikes_in_a_payload() -> None:
    # A request body travels raw inside the envelope a Node pops: any HTTP client picks these
    # bytes. 1 MiB of look-alike headers inside one bulk string must cost what any 1 MiB bulk
    # costs: one hiredis feed per chunk and one header line for the bulk, not one per look-alike
    # (the regex screen fed hiredis and ran Python for each: 104857 of them here).
    payload = b"\n*123456\r\n" * ((1 << 20) // 10)
    assert len(payload) > 1_000_000
    stream = bytearray(b"$%d\r\n%s\r\n" % (len(payload), payload))
    chunk = 64 * 1024
    parser = HiredisParser()
    counting = _CountingReader(parser._reader)
    parser._reader = counting
    view = memoryview(stream)
    reply: Any = NEED_DATA
    for start in range(0, len(stream), chunk):
        reply = parser.feed_gets(view[start : start + chunk])
        if start + chunk < len(stream):
            assert reply is NEED_DATA
    assert reply == payload
    pieces = -(-len(stream) // chunk)
    assert counting.feeds == pieces
    assert parser._framing.steps == 1  # the bulk's own header, nothing inside it


def test_framing_walk_reads_header_lines_and_jumps_over_payloads() -> None:
    # Items: *3, $6 (jumped over), %1, +k, ~2, :1, $0 (jumped over), -E, _, ,1.5, #t, (9, =7
    # (jumped over).
    stream = (
        b"*3\r\n$6\r\n\r\n*9\r\n\r\n%1\r\n+k\r\n~2\r\n:1\r\n$0\r\n\r\n-E\r\n_\r\n,1.5\r\n#t\r\n(9\r\n"
        b"=7\r\ntxt:abc\r\n"
    )
    for step in range(1, len(stream) + 1):
        walk = protocol._Framing()
        for start in range(0, len(stream), step):
            assert walk.walk(memoryview(stream)[start : start + step]) == -1
        assert walk._skip == 0
        assert not walk._line
    # Whole, no item looked at in Python: the run takes it all in C (bulk strings under 1000
    # bytes too).
    walk = protocol._Framing()
    assert walk.walk(stream) == -1
    assert walk.steps == 0
    # A bulk string of 1000 bytes or more is jumped over in Python: one step.
    big = b"\n*123456\r\n" * 100
    stream = b"*3\r\n:1\r\n$%d\r\n%s\r\n+OK\r\n" % (len(big), big)
    walk = protocol._Framing()
    assert walk.walk(memoryview(stream)) == -1
    assert walk.steps == 1


@pytest.mark.parametrize(
    ("raw", "at", "error"),
    [
        (b"+OK\r\n*1048577\r\n", 5, "exceeds the limit"),
        (b"+OK\r\n%524289\r\n", 5, "524289 pairs exceeds"),
        (b"$2\r\nab\r\n|524289\r\n", 8, "exceeds the limit"),
        (b"$2\r\nabXY", 4, "not terminated by CRLF"),
        (b"$2\r\nab\rY", 4, "not terminated by CRLF"),
        (b"*?\r\n", 0, "invalid aggregate length"),  # streamed aggregates: hiredis refuses them
        (b"$?\r\n", 0, "invalid bulk length"),
        (b":1\r\n;3\r\n", 4, "unknown type"),
        (b":1\r\n\r\n", 4, "unknown type"),
    ],
)
def test_framing_walk_refuses_at_the_item_it_cannot_frame(raw: bytes, at: int, error: str) -> None:
    walk = protocol._Framing()
    assert walk.walk(raw) == at
    assert error in walk.error


def test_hiredis_parser_holds_a_bounded_header_start() -> None:
    # A header line cut by the end of a feed waits for its end in the parser, up to the
    # header-line bound the pure parser has: leading zeros do not let it grow without bound.
    parser = HiredisParser()
    assert parser.feed_gets(b"+OK\r\n*") == b"OK"
    parser.feed(b"0" * (64 * 1024 - 2))
    with pytest.raises(ProtocolError, match="line longer than"):
        parser.feed_gets(b"00")
    assert not parser._framing._line


def test_pure_parser_refuses_a_header_line_longer_than_64_kib() -> None:
    parser = PythonParser()
    parser.feed(b"+" + b"a" * (64 * 1024 + 1))
    with pytest.raises(ProtocolError, match="line"):
        parser.gets()


def test_pure_parser_refuses_a_long_header_line_fed_in_pieces() -> None:
    parser = PythonParser()
    parser.feed(b":")
    with pytest.raises(ProtocolError, match="line"):
        for _ in range(100):
            parser.feed(b"1" * 1024)
            assert parser.gets() is NEED_DATA


def test_pure_parser_accepts_a_long_simple_string_under_the_line_limit() -> None:
    text = b"a" * (60 * 1024)
    parser = PythonParser()
    parser.feed(b"+")
    for start in range(0, len(text), 1000):
        parser.feed(text[start : start + 1000])
        assert parser.gets() is NEED_DATA
    parser.feed(b"\r\n")
    assert parser.gets() == text


def test_hiredis_parser_bounds_a_long_header_line_by_the_reply_size() -> None:
    # hiredis itself has no line-length limit: the reply-size bound is what stops it.
    parser = HiredisParser(max_reply_size=64 * 1024)
    parser.feed(b"+" + b"a" * (64 * 1024 + 1))
    with pytest.raises(ProtocolError):
        parser.gets()


def test_large_array_fed_in_small_pieces_parses(parser_kind: str) -> None:
    count = 200_000
    raw = b"*%d\r\n" % count + b":1\r\n" * count
    parser = make_parser(parser_kind)
    replies = []
    for start in range(0, len(raw), 7):
        parser.feed(raw[start : start + 7])
        while (reply := parser.gets()) is not NEED_DATA:
            replies.append(reply)
    assert len(replies) == 1
    assert replies[0] == [1] * count


# -- make_parser and ReplyError ------------------------------------------------------------------


def test_make_parser_builds_the_kind_asked_for() -> None:
    assert isinstance(make_parser("python"), PythonParser)
    assert isinstance(make_parser("hiredis"), HiredisParser)


def test_make_parser_honours_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIDASGI_RESP_PARSER", "python")
    assert isinstance(make_parser(), PythonParser)
    monkeypatch.setenv("MINIDASGI_RESP_PARSER", "hiredis")
    assert isinstance(make_parser(), HiredisParser)


def test_make_parser_argument_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIDASGI_RESP_PARSER", "hiredis")
    assert isinstance(make_parser("python"), PythonParser)


def test_make_parser_defaults_to_hiredis_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINIDASGI_RESP_PARSER", raising=False)
    assert isinstance(make_parser(), HiredisParser)
    monkeypatch.setattr(protocol, "hiredis_available", lambda: False)
    assert isinstance(make_parser(), PythonParser)


def test_make_parser_passes_the_size_bound_on() -> None:
    for kind in ("python", "hiredis"):
        parser = make_parser(kind, max_reply_size=10)
        parser.feed(b"$100\r\n" + b"x" * 50)
        with pytest.raises(ProtocolError):
            parser.gets()


def test_make_parser_refuses_an_unknown_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown RESP parser"):
        make_parser("fast")
    monkeypatch.setenv("MINIDASGI_RESP_PARSER", "fast")
    with pytest.raises(ValueError, match="unknown RESP parser"):
        make_parser()


def test_reply_error_code_is_the_first_word() -> None:
    assert ReplyError("WRONGPASS invalid username-password pair").code == "WRONGPASS"
    assert ReplyError("NOAUTH").code == "NOAUTH"
    assert ReplyError("").code == ""


def test_protocol_errors_and_reply_errors_share_a_base() -> None:
    assert issubclass(ProtocolError, protocol.RespError)
    assert issubclass(ReplyError, protocol.RespError)
    assert issubclass(protocol.AuthenticationError, ReplyError)
    assert issubclass(protocol.RedisConnectionError, ConnectionError)


@pytest.mark.parametrize(
    "args",
    [
        ("PUBLISH", "c", b"small"),
        ("PUBLISH", "c", b"x" * 20_000),
        ("SET", b"k" * 20_000, 12, b"v" * 30_000),
        ("PUBLISH", "c", [b"head", memoryview(b"y" * 70_000)[5:], b"", b"tail"]),
        ("PUBLISH", "c", [memoryview(b"z" * 17_000)]),
    ],
)
def test_pack_command_parts_concatenate_to_pack_command(args: tuple[object, ...]) -> None:
    parts = pack_command_parts(*args)
    flat = [b"".join(a) if isinstance(a, list) else a for a in args]  # type: ignore[arg-type]
    assert b"".join(parts) == pack_command(*flat)
    # Large values are parts of their own, not copied into the command's head.
    for arg in args:
        pieces = arg if isinstance(arg, list) else [arg]
        for piece in pieces:
            if isinstance(piece, (bytes, memoryview)) and len(piece) >= 16 * 1024:
                assert any(part is piece for part in parts)


def test_pack_command_parts_refuse_what_is_not_bytes_in_a_gathered_value() -> None:
    with pytest.raises(TypeError, match="gathered"):
        pack_command_parts("PUBLISH", "c", [b"a", "text"])
    with pytest.raises(TypeError, match="gathered"):
        pack_command_parts("PUBLISH", "c", [memoryview(array.array("i", [1]))])


def test_pack_gathering_packs_bytes_unless_a_value_is_gathered() -> None:
    assert pack_gathering("PUBLISH", "c", b"m") == pack_command("PUBLISH", "c", b"m")
    assert isinstance(pack_gathering("PUBLISH", "c", [b"m"]), list)


def test_pure_parser_copies_a_large_bulk_string_once() -> None:
    # Slicing the bytearray buffer copies, and bytes() of that slice copies again: a body
    # piece of a PUBLISH was copied twice on its way out of the parser.
    size = 300_000
    payload = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
    parser = PythonParser()
    parser.feed(b"*2\r\n$%d\r\n%b\r\n$5\r\nsmall\r\n" % (size, payload))
    tracemalloc.start()
    try:
        reply = parser.gets()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reply == [payload, b"small"]
    assert size <= peak < 1.5 * size  # the value itself, and no second copy of it
