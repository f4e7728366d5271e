"""Unit tests for ``minidasgi.jsoncodec`` (format 2): round trips, markers, bounds, hostility."""

from __future__ import annotations

import array
import json.encoder
import math
import random
import struct
import sys
import threading
import tracemalloc
from typing import Any

import pytest

from minidasgi import codec, jsoncodec
from minidasgi.codec import CodecError
from minidasgi.jsoncodec import decode, encode, try_encode
from minidasgi.resp.directread import SplitPayload


def round_trip(value: Any) -> Any:
    return decode(encode(value))


def as_lists(value: Any) -> Any:
    """``value`` as format 2 gives it back: tuples become lists, bytes-likes become bytes."""
    if isinstance(value, (list, tuple)):
        return [as_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: as_lists(item) for key, item in value.items()}
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def same(a: Any, b: Any) -> bool:
    """Equality that also tells bool from int, bytes from str and NaN from NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


def assert_in_model(value: Any, depth: int = codec.DEFAULT_MAX_DEPTH) -> None:
    """A decoded value holds only the model's types, nested no deeper than ``depth``."""
    if isinstance(value, (list, dict)):
        assert depth > 0, "decoded value nested too deeply"
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict):
            assert all(type(key) is str for key in value)
        for item in items:
            assert_in_model(item, depth - 1)
    else:
        assert value is None or type(value) in (bool, int, float, str, bytes)


def nested_lists(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def nested_dicts(depth: int) -> Any:
    value: Any = b"leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


def uvicorn_scope(headers: int = 10) -> dict[str, Any]:
    names = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
        (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        (b"accept-language", b"en-US,en;q=0.5"),
        (b"accept-encoding", b"gzip, deflate, br"),
        (b"connection", b"keep-alive"),
        (b"cookie", b"session=0123456789abcdef; theme=dark"),
        (b"upgrade-insecure-requests", b"1"),
        (b"content-type", b"application/json"),
        (b"content-length", b"27"),
    ]
    pairs = [names[i % len(names)] for i in range(headers)]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51234),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": "/api/tëst/38",
        "raw_path": b"/api/t%C3%ABst/38",
        "query_string": b"a=1&b=%FF",
        "headers": pairs,
        "extensions": {"http.response.trailers": {}},
    }


def envelope(body: bytes = b'{"name": "x", "count": 27}') -> dict[str, Any]:
    return {
        "id": "0123456789abcdef01234567",
        "reply": "minidasgi:0:distributor:0123456789abcdef01234567",
        "deadline": 1764441093.123456,
        "scope": uvicorn_scope(),
        "events": [{"type": "http.request", "body": body, "more_body": False}],
        "window": 8,
    }


def frame(head: bytes, blobs: list[bytes] = []) -> bytes:  # noqa: B006 - never mutated
    """A format 3 frame assembled by hand, to forge what ``encode`` would never write."""
    lengths = struct.pack(f">{len(blobs)}I", *map(len, blobs))
    return struct.pack(">BII", 3, len(head), len(blobs)) + head + lengths + b"".join(blobs)


# Round trips of the value model


@pytest.mark.parametrize("value", [None, True, False])
def test_singletons_round_trip_as_themselves(value: Any) -> None:
    assert round_trip(value) is value


@pytest.mark.parametrize(
    "value",
    [0, 1, -1, 2**63 - 1, -(2**63), 2**63, -(2**100), int("9" * 128), -int("9" * 128)],
)
def test_ints_round_trip_exactly(value: int) -> None:
    result = round_trip(value)
    assert type(result) is int
    assert result == value


def test_bools_stay_bools_and_ints_stay_ints() -> None:
    assert same(round_trip([True, 1, False, 0]), [True, 1, False, 0])


@pytest.mark.parametrize(
    "value",
    [
        0.0,
        -0.0,
        1.5,
        -2.25,
        0.1,
        1e16,
        1e308,
        5e-324,
        -1.2345678901234567e-308,
        math.inf,
        -math.inf,
    ],
)
def test_floats_round_trip_bit_for_bit(value: float) -> None:
    assert same(round_trip(value), value)
    assert same(round_trip([value]), [value])


def test_nan_round_trips() -> None:
    assert math.isnan(round_trip(math.nan))
    assert math.isnan(round_trip({"x": [math.nan]})["x"][0])


@pytest.mark.parametrize(
    "value",
    [
        "",
        "hello",
        "héllo wörld",
        "日本語",
        "emoji 🎉",
        "nul\x00in",
        'quote " and backslash \\ and \\"',
        "controls \x01\x1f\t\r\n\x7f",
        "0E0",
        '"0E0"',
        "\\ue000",
        '{"\\ue000":0}',
    ],
)
def test_strings_round_trip(value: str) -> None:
    assert same(round_trip(value), value)
    key = value + "k"  # a key ending in a digit is declined (see the coerced-key tests)
    assert same(round_trip({key: [value]}), {key: [value]})


def test_lone_surrogates_round_trip() -> None:
    value = "a\ud800b\udfffc\udbff"
    assert same(round_trip(value), value)
    assert same(round_trip({value: value}), {value: value})


@pytest.mark.parametrize("value", [b"", b"\x00\xff\x80binary\r\n", bytes(range(256)), b"0E0"])
def test_bytes_round_trip(value: bytes) -> None:
    assert same(round_trip(value), value)
    assert same(round_trip([value, value, {"b": value}]), [value, value, {"b": value}])


@pytest.mark.parametrize(
    "value",
    [
        bytearray(b"abc\x00"),
        memoryview(b"xyz\xff"),
        memoryview(b"0123456789")[2:7],
        memoryview(array.array("H", [1, 2, 513])),
    ],
    ids=["bytearray", "memoryview", "memoryview-slice", "memoryview-of-shorts"],
)
def test_bytearray_and_memoryview_decode_as_bytes(value: bytearray | memoryview) -> None:
    result = round_trip({"body": value})["body"]
    assert type(result) is bytes
    assert result == bytes(value)


def test_a_body_piece_cut_as_a_memoryview_is_written_in_one_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Node cuts large bodies into memoryview pieces: those must not take the second pass
    # (its Python callback per value), which cost every streamed piece until this release.
    body = random.Random(2).randbytes(3000)
    piece = {"type": "http.response.body", "body": memoryview(body)[1000:2000], "more_body": True}
    jsoncodec._session()  # built before the pass below is replaced
    second_pass: list[Any] = []
    monkeypatch.setattr(jsoncodec._local.session, "dumps", second_pass.append)
    data = encode(piece)
    assert second_pass == []
    assert data == encode(dict(piece, body=body[1000:2000]))
    assert decode(data)["body"] == body[1000:2000]


def test_tuples_decode_as_lists() -> None:
    assert same(round_trip((1, ("a", b"b"), ())), [1, ["a", b"b"], []])
    assert same(round_trip({"pair": (b"k", b"v")}), {"pair": [b"k", b"v"]})


def test_nested_values_and_dict_order_round_trip() -> None:
    value = {
        "z": [1, 2, {"b": [None, {"c": []}]}],
        "a": {},
        "m": {"f": {"g": [[[b"deep"]]]}},
        "": "empty key",
    }
    result = round_trip(value)
    assert same(result, value)
    assert list(result) == ["z", "a", "m", ""]


def test_nesting_exactly_at_max_depth_round_trips() -> None:
    for make in (nested_lists, nested_dicts):
        value = make(codec.DEFAULT_MAX_DEPTH)
        assert same(round_trip(value), value)
        assert same(decode(encode(make(3), max_depth=3), max_depth=3), make(3))


# Real ASGI shapes


def test_envelope_with_a_uvicorn_scope_round_trips_with_tuples_as_lists() -> None:
    value = envelope()
    assert same(round_trip(value), as_lists(value))


def test_envelope_with_many_headers_round_trips() -> None:
    # More containers than the depth bound: the exact depth check runs, and passes.
    value = envelope()
    value["scope"] = uvicorn_scope(headers=120)
    assert same(round_trip(value), as_lists(value))


def test_response_start_and_body_round_trip() -> None:
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"12")],
        "trailers": False,
    }
    body = {"type": "http.response.body", "body": b"Hello World!", "more_body": False}
    message = ["send", "0123456789abcdef01234567", [start, body]]
    assert same(round_trip(message), as_lists(message))


@pytest.mark.parametrize(
    "event",
    [
        {"type": "websocket.receive", "text": "héllo 🎉 \ue000 \x00"},
        {"type": "websocket.receive", "bytes": b"\x00\xff" * 100},
        {"type": "websocket.send", "text": "x" * 32768, "minidasgi.more": True},
        {"type": "websocket.send", "bytes": None, "text": '["json", {"in": "text"}]'},
        {"type": "websocket.close", "code": 1000, "reason": ""},
    ],
)
def test_websocket_messages_round_trip(event: dict[str, Any]) -> None:
    message = ["event", "id", event]
    data = try_encode(message)
    if data is None:  # U+E000 in the text: format 1 carries it
        assert "\ue000" in event.get("text", "")
        assert same(codec.decode(codec.encode(message)), message)
        return
    assert same(decode(data), message)


def test_a_one_mebibyte_body_travels_verbatim_in_the_tail() -> None:
    body = random.Random(1).randbytes(1024 * 1024)
    value = envelope(body)
    data = encode(value)
    assert same(decode(data)["events"][0]["body"], body)
    # Never escaped: the frame is the body plus a head of about a kilobyte.
    assert data.endswith(body)
    assert len(data) < len(body) + 2048
    assert decode(memoryview(data)) == decode(bytearray(data)) == decode(data)


def test_the_frame_layout_is_as_documented() -> None:
    data = encode({"a": b"xy", "b": [b"", 1.5]})
    head = b'{"a":0E0,"b":[0E0,1.5]}'
    assert data == (
        b"\x03" + struct.pack(">II", len(head), 2) + head + struct.pack(">II", 2, 0) + b"xy"
    )
    assert encode(None) == b"\x03" + struct.pack(">II", 4, 0) + b"null"


# Comparison with format 1


COMPARED = [
    None,
    [True, False, 0, -1, 2**63, -(2**100), 1.5, -0.0, math.inf, "s", b"b", "\ud800"],
    envelope(),
    {"type": "websocket.send", "text": "日本語 " * 100},
    nested_dicts(codec.DEFAULT_MAX_DEPTH),
    {"pairs": [(b"a", b"b")] * 50, "empty": [[], {}, "", b""]},
]


@pytest.mark.parametrize("value", COMPARED, ids=range(len(COMPARED)))
def test_decodes_to_what_format_1_decodes_to(value: Any) -> None:
    # Compared with tuples as lists, whatever format 1 does with them.
    assert same(as_lists(round_trip(value)), as_lists(codec.decode(codec.encode(value))))


def test_formats_tell_each_other_apart_by_their_first_byte() -> None:
    with pytest.raises(CodecError, match="version 1"):
        decode(codec.encode_binary({"a": b"b"}, version=codec.RELEASED))
    with pytest.raises(CodecError, match="version 2"):
        decode(codec.encode_binary({"a": b"b"}))
    assert codec.decode(encode({"a": b"b"})) == {"a": b"b"}  # codec reads every version


# Markers cannot be confused with data


@pytest.mark.parametrize(
    "value",
    [
        "\ue000",
        "text with \ue000 inside",
        {"\ue000": 0},
        {"\ue000": b"x"},
        [b"a", "\ue000", b"b"],
        {"key\ue000": "value"},
    ],
    ids=["string", "in-text", "marker-shaped-dict", "dict-with-bytes", "between-bytes", "key"],
)
def test_a_value_holding_the_marker_character_is_carried_or_declined_never_misread(
    value: Any,
) -> None:
    # Where null stands for each bytes value (no None, no "null" text), U+E000 is plain data.
    assert same(round_trip(value), as_lists(value))
    assert same(round_trip([value, b"bytes"]), as_lists([value, b"bytes"]))
    # With a None, U+E000 stands for each bytes value: a real one makes format 2 decline.
    value = [None, b"bytes", value]
    assert try_encode(value) is None
    with pytest.raises(CodecError, match="binary format"):
        encode(value)
    # The caller's fallback, format 1, carries it.
    assert same(as_lists(codec.decode(codec.encode(value))), as_lists(value))


@pytest.mark.parametrize(
    "value",
    [
        [None, b"x"],
        {"a": None, "b": [b"", None, b"y"]},
        ["null", b"x"],
        {"nullable": b"x", "k": "null null"},
        [b"x", "null", None],
        [bytearray(b"a"), b"b", memoryview(b"c")],
        [bytearray(b"a"), None, "null"],
        {"null": b"x"},
    ],
)
def test_none_and_null_text_next_to_bytes_round_trip(value: Any) -> None:
    # Each forces the second writing pass (U+E000 placeholders), or is declined for a key.
    data = try_encode(value)
    if data is None:
        # Only a dict with the key "null" (json's writing of a None key) may be declined.
        assert isinstance(value, dict) and "null" in value
        return
    assert same(decode(data), as_lists(value))


@pytest.mark.parametrize(
    "value",
    [
        {1: "int key"},
        {-7: "negative int key"},
        {1.5: "float key"},
        {math.inf: "inf key"},
        {-math.inf: "-inf key"},
        {math.nan: "nan key"},
        {True: "true key"},
        {False: "false key"},
        {None: "none key"},
        {"ok": [{"nested": {2: "deep int key"}}]},
    ],
    ids=["int", "neg-int", "float", "inf", "-inf", "nan", "true", "false", "none", "nested"],
)
def test_keys_json_would_coerce_to_str_are_declined(value: Any) -> None:
    # json writes {1: x} as {"1": x}: format 2 must not hand back a str key.
    assert try_encode(value) is None
    with pytest.raises(CodecError):
        codec.encode(value)  # and format 1 refuses it, as it should


@pytest.mark.parametrize("key", ["1", "200", "x9", "true", "null", "NaN", "-Infinity", "\x10"])
def test_str_keys_that_look_coerced_are_declined_and_format_1_carries_them(key: str) -> None:
    assert try_encode({key: 1}) is None
    assert codec.decode(codec.encode({key: 1})) == {key: 1}


@pytest.mark.parametrize("key", ["type", "1a", "true ", "nullable", "e", "NaNa", "infinity"])
def test_ordinary_keys_are_not_declined(key: str) -> None:
    assert try_encode({key: 1}) is not None


def _looks_coerced(key: Any) -> bool:
    """What the encoder declines a dict key for, told from the key itself (the encoder looks
    at its JSON text, without a walk of the value)."""
    if type(key) is not str:
        return True
    text = json.dumps(key, ensure_ascii=False)[:-1]  # without the closing quote
    words = ('"true', '"false', '"null', '"NaN', "Infinity")
    return text[-1] in "0123456789" or text.endswith(words)


def test_coerced_key_check_matches_the_keys_themselves_on_fuzzed_values() -> None:
    # The check runs on the text (str ``in`` and bytes.find, cheaper than ``in`` on bytes):
    # its decisions must be exactly those a walk over the keys would make.
    rng = random.Random(1792)
    pieces = [
        "true",
        "false",
        "null",
        "NaN",
        "Infinity",
        "-",
        "1",
        "9",
        "0E0",
        "a",
        '"',
        ":",
        "\\",
        "é",
        "\x10",
        " ",
        "e",
        "y",
        "[",
        "{",
        "0[",
    ]
    long_digits = "9" * 70 + "[{" + "9" * 70  # a string: 140 digits once the brackets go
    keys: list[Any] = [1, 2.5, True, None, math.inf]
    for _ in range(600):
        key = "".join(rng.choice(pieces) for _ in range(rng.randrange(4)))
        item = rng.choice([1, b"x", "true", '"null":', None, [b"y"], long_digits, [[{}]]])
        value: Any = {key: item}
        if rng.random() < 0.1:
            key = rng.choice(keys)
            value = {key: 1}
        for _ in range(rng.randrange(3)):  # nested inside ordinary containers
            value = rng.choice([[value], {"scope": value, "k": '1":'}])
        declined = try_encode(value) is None
        assert declined == _looks_coerced(key), (key, value)
        if not declined:
            assert decode(encode(value)) == value


def test_an_int_of_too_many_digits_is_refused_however_brackets_surround_it() -> None:
    big = 10**140
    for value in ([big], [[big]], {"a": [{"b": big}]}, ["[" * 3, big, "{"]):
        with pytest.raises(CodecError, match="digits"):
            try_encode(value)
    assert decode(encode(["1" * 70 + "[" + "1" * 70, [1] * 3])) == [
        "1" * 70 + "[" + "1" * 70,
        [1] * 3,
    ]


def _random_string(rng: random.Random) -> str:
    alphabet = ["a", "0", "E", '"', "\\", ":", ",", "[", "{", "}", "\ue000", "\ud800", "é", "0E0"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(12 if depth > 0 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 7, 2**64, -(10**100), rng.randrange(-(10**9), 10**9)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1.5, 1e300, math.inf, -math.inf, math.nan, rng.random()])
    if kind in (4, 5):
        return _random_string(rng)
    if kind in (6, 7):
        return rng.randbytes(rng.randrange(5))
    if kind == 8:
        return rng.choice([bytearray(b"ba"), memoryview(b"mv")])
    if kind == 9:
        return [_random_value(rng, depth - 1) for _ in range(rng.randrange(4))]
    if kind == 10:
        return tuple(_random_value(rng, depth - 1) for _ in range(rng.randrange(4)))
    return {_random_string(rng): _random_value(rng, depth - 1) for _ in range(rng.randrange(4))}


def test_random_values_either_round_trip_exactly_or_are_declined() -> None:
    rng = random.Random(10)
    declined = 0
    for _ in range(3000):
        value = _random_value(rng, 4)
        data = try_encode(value)
        if data is None:
            declined += 1
            continue
        assert same(decode(data), as_lists(value)), value
    # The alphabet makes U+E000 common: both outcomes are exercised.
    assert 0 < declined < 3000


# Values that cannot travel


class _Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [{1, 2}, frozenset({1}), _Opaque(), object(), 1 + 2j, {"ok": [1, {2}]}, [b"x", range(3)]],
    ids=["set", "frozenset", "object", "bare-object", "complex", "set-inside", "range"],
)
def test_types_outside_the_model_raise_codec_error(value: Any) -> None:
    with pytest.raises(CodecError, match="cannot travel"):
        try_encode(value)


def test_a_key_of_a_type_json_refuses_raises_codec_error() -> None:
    with pytest.raises(CodecError):
        try_encode({(1, 2): "tuple key"})
    with pytest.raises(CodecError):
        try_encode({b"bytes": "key"})


def test_a_non_contiguous_memoryview_raises_codec_error() -> None:
    with pytest.raises(CodecError, match="contiguous"):
        encode(memoryview(b"abcdef")[::2])


def test_an_int_of_more_than_128_digits_cannot_be_encoded() -> None:
    with pytest.raises(CodecError, match="digits"):
        encode(10**128)
    with pytest.raises(CodecError, match="digits"):
        encode({"x": [-(10**200)]})
    # A long run of digits inside a string is not an int.
    assert round_trip({"x": "7" * 500}) == {"x": "7" * 500}


@pytest.mark.parametrize("make", [nested_lists, nested_dicts])
def test_encode_refuses_nesting_deeper_than_max_depth(make: Any) -> None:
    with pytest.raises(CodecError, match="deep"):
        encode(make(codec.DEFAULT_MAX_DEPTH + 1))
    with pytest.raises(CodecError, match="deep"):
        encode(make(4), max_depth=3)
    with pytest.raises(CodecError, match="deep"):
        encode(make(5000))


def test_encode_refuses_a_cycle() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(CodecError, match="circular"):
        encode(loop)


def test_encode_refuses_more_than_max_items_values() -> None:
    assert round_trip(list(range(9))) == list(range(9))
    assert decode(encode(list(range(9)), max_items=10), max_items=10) == list(range(9))
    with pytest.raises(CodecError, match="values"):
        encode(list(range(10)), max_items=10)
    with pytest.raises(CodecError, match="values"):
        encode({f"k{i}x": i for i in range(5)}, max_items=10)


def test_what_encode_accepts_decode_accepts_with_the_same_bounds() -> None:
    value = [[b"x"] * 3, {"k": "a,b:c[{"}, nested_lists(5)]
    data = encode(value, max_items=20, max_depth=6)
    assert same(decode(data, max_items=20, max_depth=6), as_lists(value))
    with pytest.raises(CodecError):
        encode(value, max_items=20, max_depth=5)


# Malformed input


@pytest.mark.parametrize("version", [0, 1, 2, 255])
def test_a_wrong_first_byte_is_refused_with_the_version_in_the_message(version: int) -> None:
    data = bytes([version]) + encode("x")[1:]
    with pytest.raises(CodecError, match=f"version {version}"):
        decode(data)


def test_empty_input_is_refused() -> None:
    with pytest.raises(CodecError, match="empty"):
        decode(b"")


def test_every_truncation_of_a_frame_raises_codec_error() -> None:
    data = encode({"a": [b"xyz", 1.5, "s\ud800", None, True, 2**70], "b": b"", "c": {"d": b"e"}})
    assert len(data) > 60
    for length in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:length])


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(CodecError, match="tail"):
        decode(encode([b"a", 1]) + b"x")
    with pytest.raises(CodecError, match="tail"):
        decode(encode(None) + b"\x00")


def test_a_head_length_past_the_end_is_refused() -> None:
    data = bytearray(encode([1, 2]))
    data[1:5] = struct.pack(">I", 2**32 - 1)
    with pytest.raises(CodecError, match="truncated"):
        decode(bytes(data))


def test_a_forged_huge_count_of_bytes_values_fails_fast() -> None:
    data = bytearray(encode([b"a"]))
    data[5:9] = struct.pack(">I", 2**32 - 1)
    with pytest.raises(CodecError, match="truncated"):
        decode(bytes(data))
    with pytest.raises(CodecError, match="bytes values"):
        decode(frame(b"[0E0,0E0,0E0]", [b"a", b"b", b"c"]), max_items=2)


def test_more_markers_than_bytes_values_is_refused() -> None:
    with pytest.raises(CodecError, match="markers"):
        decode(frame(b"[0E0,0E0]", [b"x"]))
    with pytest.raises(CodecError, match="markers"):
        decode(frame(b"0E0"))


def test_fewer_markers_than_bytes_values_is_refused() -> None:
    with pytest.raises(CodecError, match="markers"):
        decode(frame(b"[0E0]", [b"x", b"y"]))
    with pytest.raises(CodecError, match="markers"):
        decode(frame(b'"0E0"', [b"x"]))  # a string, not a marker


def test_a_marker_resolves_to_its_own_slice_of_the_tail() -> None:
    assert decode(frame(b'[0E0,"0E0",0e0,0E0]', [b"ab", b"cde"])) == [b"ab", "0E0", 0.0, b"cde"]


def test_lengths_that_overrun_the_tail_are_refused() -> None:
    data = frame(b"[0E0]", [b"xy"])
    forged = data[:-6] + struct.pack(">I", 3) + b"xy"  # claims 3 bytes where 2 follow
    with pytest.raises(CodecError, match="tail"):
        decode(forged)


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"[",
        b"]",
        b"[1,]",
        b"{1:2}",
        b"{'a':1}",
        b"nul",
        b"[1] [2]",
        b" [1]",
        b"[1] ",
        b"01",
        b'"unterminated',
        b'"bad escape \\x"',
        b'"control \x01 char"',
        b"\x00",
    ],
)
def test_heads_that_are_not_one_json_value_are_refused(head: bytes) -> None:
    with pytest.raises(CodecError):
        decode(frame(head))


@pytest.mark.parametrize("raw", [b"\xff", b"\xc3", b"\xc3\x28", b"a\x80b", b"\xf8\x88\x80\x80\x80"])
def test_invalid_utf8_in_the_head_is_refused(raw: bytes) -> None:
    with pytest.raises(CodecError, match="UTF-8"):
        decode(frame(b'"' + raw + b'"'))


def test_an_escaped_lone_surrogate_in_the_head_is_a_str() -> None:
    assert decode(frame(b'"\\ud800"')) == "\ud800"
    assert decode(frame(b'{"\\ue000":1}')) == {"\ue000": 1}  # data: only 0E0 is a marker


@pytest.mark.parametrize("digits", [129, 500, 4301, 50_000])
def test_ints_of_more_than_128_digits_are_refused(digits: int) -> None:
    with pytest.raises(CodecError, match="digits"):
        decode(frame(b"9" * digits))
    with pytest.raises(CodecError, match="digits"):
        decode(frame(b"[-" + b"9" * digits + b"]"))
    assert decode(frame(b"-" + b"9" * 128)) == -int("9" * 128)


def _outcome(data: bytes, **bounds: Any) -> tuple[str, Any]:
    try:
        return "value", decode(data, **bounds)
    except CodecError as exc:
        return "error", str(exc)


def test_the_scanner_parsing_ints_in_c_decides_as_the_strict_one_on_fuzzed_heads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A head with no run of more than 128 digits is parsed with ints converted in C (no call
    # back per int): on hostile heads its values and refusals must be the strict scanner's.
    rng = random.Random(4242)
    tokens = [
        b"[", b"]", b"{", b"}", b",", b":", b"-", b'"', b'"k"', b"0E0", b"1.5", b"1e5", b"NaN",
        b"9" * 60, b"9" * 64, b"9" * 70, b"0", b"007", b"-0", b"true", b"null", b" ", b"\\",
    ]  # fmt: skip
    seen = set()
    for _ in range(500):
        head = b"".join(rng.choice(tokens) for _ in range(rng.randrange(1, 12)))
        if rng.random() < 0.5:  # most such heads are not JSON: make some of them valid
            head = (
                b"["
                + b",".join(
                    rng.choice([b"9" * 64, b"-" + b"9" * 70, b"[1]", b'"x"'])
                    for _ in range(rng.randrange(1, 5))
                )
                + b"]"
            )
        blobs = [b"ab"] * head.count(b"0E0")
        data = frame(head, blobs)
        bounds = rng.choice([{}, {"max_depth": 2}, {"max_items": 3}])
        fast = _outcome(data, **bounds)
        with monkeypatch.context() as patch:
            session = jsoncodec._session()
            patch.setattr(session, "scan_short_ints", session.scan)
            strict = _outcome(data, **bounds)
        assert repr(fast) == repr(strict), head  # repr: NaN is not equal to itself
        seen.add(fast[0])
    assert seen == {"value", "error"}


def _python_calls(name: str, call: Any) -> int:
    """How many times a Python function called ``name`` runs during ``call()``."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event == "call" and frame.f_code.co_name == name:
            count += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return count


def test_a_head_of_ints_decodes_with_no_call_back_per_int() -> None:
    data = encode({"window": 8, "piece": 1 << 20, "server": ["h", 80], "n": -(10**127)})
    assert _python_calls("_int", lambda: decode(data)) == 0
    long_int = frame(b"[1," + b"9" * 129 + b"]")
    assert _python_calls("_int", lambda: _outcome(long_int)) == 2  # the strict scanner's


def test_the_int_bound_does_not_depend_on_pythons_own_limit() -> None:
    set_limit = getattr(sys, "set_int_max_str_digits", None)
    if set_limit is None:  # pragma: no cover - Python before 3.10.7 has no limit to lift
        pytest.skip("no int digit limit in this Python")
    previous = sys.get_int_max_str_digits()
    set_limit(0)
    try:
        with pytest.raises(CodecError, match="digits"):
            decode(frame(b"9" * 100_000))
    finally:
        set_limit(previous)


def test_long_number_literals_are_refused() -> None:
    with pytest.raises(CodecError, match="number"):
        decode(frame(b"1." + b"0" * 1000))
    with pytest.raises(CodecError, match="number"):
        decode(frame(b"1e" + b"0" * 1000))
    assert decode(frame(b"[1e999,-1E-999,NaN,Infinity,-Infinity]"))[:2] == [math.inf, -0.0]


def test_decode_refuses_nesting_deeper_than_max_depth() -> None:
    data = encode(nested_lists(10))
    assert decode(data, max_depth=10) == nested_lists(10)
    with pytest.raises(CodecError, match="deep"):
        decode(data, max_depth=9)
    deep = b"[" * 33 + b"]" * 33
    with pytest.raises(CodecError, match="deep"):
        decode(frame(deep))
    # Brackets inside strings do not count toward depth (or values).
    text = b'["' + b"[{" * 100 + b'"]'
    assert decode(frame(text), max_depth=1, max_items=3) == ["[{" * 100]


def test_a_very_deep_forgery_is_refused_without_recursion() -> None:
    for head in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        with pytest.raises(CodecError):
            decode(frame(head), max_items=1_000_000)
        with pytest.raises(CodecError):
            decode(frame(head))


def test_unbalanced_brackets_are_refused() -> None:
    with pytest.raises(CodecError, match="unbalanced"):
        decode(frame(b"[" * 40 + b"]" * 39))


def test_the_number_of_values_is_bounded() -> None:
    ten = frame(b"[" + b",".join([b"0"] * 9) + b"]")
    assert decode(ten, max_items=10) == [0] * 9
    with pytest.raises(CodecError, match="values"):
        decode(ten, max_items=9)
    with pytest.raises(CodecError, match="values"):
        decode(frame(b'{"a":1,"b":2,"c":3,"d":4,"e":5}'), max_items=10)
    # Commas and colons inside strings are not values.
    assert decode(frame(b'["' + b",:" * 1000 + b'"]'), max_items=3) == [",:" * 1000]


@pytest.mark.parametrize(
    "unit",
    [b"[],", b"{},", b"[[]],", b"0,", b'"",', b'"a",', b'{"":0},'],
    ids=["lists", "dicts", "nested", "ints", "empty-strs", "strs", "small-dicts"],
)
def test_a_16_mib_frame_of_small_values_is_refused_before_building_them(unit: bytes) -> None:
    count = (16 * 1024 * 1024 - 64) // len(unit)
    data = frame(b"[" + unit * count + b"0]")
    assert len(data) <= codec.DEFAULT_MAX_SIZE
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="values"):
            decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Millions of Python objects would take hundreds of MiB; the checks take a few copies of
    # the head at most, and build no object per value.
    assert peak < 3 * len(data)


def test_a_16_mib_frame_of_quotes_is_refused_before_splitting_it() -> None:
    # Many commas inside strings force the exact count, which must not split millions of strings.
    data = frame(b"[" + b'",",' * (4 * 1024 * 1024 - 16) + b"0]")
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="values"):
            decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(data)


def test_oversized_message_is_refused() -> None:
    data = encode(b"x" * 1000)
    assert decode(data, max_size=len(data)) == b"x" * 1000
    with pytest.raises(CodecError, match="exceeds"):
        decode(data, max_size=len(data) - 1)


# Threads: each has its own encoder and scanner


def test_threads_encode_and_decode_concurrently() -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                value = {"n": seed, "body": rng.randbytes(rng.randrange(50)), "l": [b"a", seed]}
                assert same(decode(encode(value)), value)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors


# Bounded fuzz: decode returns a value within the model or raises CodecError, nothing else


def assert_decode_is_total(data: bytes) -> None:
    try:
        value = decode(data)
    except CodecError:
        return
    except Exception as exc:
        pytest.fail(f"decode({data!r}) raised {type(exc).__name__}: {exc}")
    assert_in_model(value)


def test_fuzz_random_bytes() -> None:
    rng = random.Random(7)
    for index in range(3000):
        body = rng.randbytes(rng.randrange(0, 64))
        if index % 3 == 0:
            data = body
        elif index % 3 == 1:  # a plausible prefix, random rest
            data = struct.pack(">BII", 2, rng.randrange(len(body) + 2), rng.randrange(3)) + body
        else:  # a random head made of JSON-looking characters
            head = bytes(rng.choice(b'[]{},:"0123456789E.-\\uetrufalsnNI ') for _ in body)
            data = frame(head, [b"x"] * rng.randrange(3))
        assert_decode_is_total(data)


def test_fuzz_mutations_and_truncations_of_valid_frames() -> None:
    rng = random.Random(7)
    samples = [
        encode(envelope()),
        encode(["send", "id", [{"type": "http.response.body", "body": b"Hello", "more": True}]]),
        encode([None, True, False, 0, -1, 2**63, -(2**100), 1.5, math.inf, "s\ud800", b"b"]),
        encode({"a": {"b": {"c": [1, [2, [3, "\\\"'"]]]}}}),
        encode(nested_lists(codec.DEFAULT_MAX_DEPTH)),
    ]
    for _ in range(4000):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 3)):
            action = rng.randrange(5)
            position = rng.randrange(len(data) + 1)
            if action == 0 and position < len(data):
                data[position] = rng.randrange(256)
            elif action == 1:
                del data[position:]
            elif action == 2 and position < len(data):
                del data[position]
            elif action == 3:
                data.insert(position, rng.choice(b'[]{},:"0E\\'))
            else:
                data[position:position] = data[position : position + rng.randint(1, 8)]
            if not data:
                break
        assert_decode_is_total(bytes(data))


def test_the_default_item_bound_is_generous_for_real_messages() -> None:
    assert jsoncodec.DEFAULT_MAX_ITEMS >= 100_000
    value = envelope()
    value["scope"] = uvicorn_scope(headers=500)
    assert same(round_trip(value), as_lists(value))


def test_the_pure_python_json_encoder_writes_the_same_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Where the C encoder is missing (or takes other arguments), JSONEncoder does the writing.
    value = [envelope(), {"nan": math.nan, "text": "\ud800é"}]
    expected = encode(value)
    monkeypatch.setattr(json.encoder, "c_make_encoder", None)
    frames: list[bytes] = []
    thread = threading.Thread(target=lambda: frames.append(encode(value)))  # a fresh session
    thread.start()
    thread.join(timeout=60)
    assert frames == [expected]


def test_decode_refuses_a_buffer_it_cannot_read_as_bytes() -> None:
    with pytest.raises(CodecError, match="buffer"):
        decode(memoryview(encode([1]) * 2)[::2])


def test_a_flood_after_a_long_string_is_refused_and_a_long_text_is_not() -> None:
    # The first 4 * max_items bytes are checked first: a flood further on is still refused...
    flood = frame(b'["' + b"x" * 10_000 + b'",' + b"[]," * 2000 + b"0]")
    with pytest.raises(CodecError, match="values"):
        decode(flood, max_items=1000)
    # ...and separators inside a long string, there or anywhere, are not values.
    text = b",:[{" * 5000
    head = b'["' + text + b'",{"k":"' + text + b'"}]'
    assert decode(frame(head), max_items=10) == [text.decode(), {"k": text.decode()}]


# A flat list of scalars (an ACK, a CREDIT, a CANCEL) takes a short path: the same bytes as
# the general one, which a tuple of the same items takes.
FLAT_MESSAGES = [
    ["ack", "0123456789abcdef01234567", "minidasgi:0:node:0123456789abcdef", 8, 1.0, False, 2**20],
    ["credit", "0123456789abcdef01234567", 4],
    ["gone", "x", "expired"],
    [],
    [None, True, 1, 1.0, -0.0, "", "é\ue000", "\ud800", 'null":', '1":'],
    [math.nan, math.inf, -math.inf, 10**40, -(10**40)],
]


@pytest.mark.parametrize("value", FLAT_MESSAGES)
def test_a_flat_list_of_scalars_round_trips_exactly(value: list[Any]) -> None:
    data = encode(value)
    assert same(decode(data), value)
    general = try_encode(tuple(value))  # the general path
    if general is not None:  # it declines strings that look like coerced keys
        assert data == general


def test_random_flat_lists_of_scalars_round_trip_exactly() -> None:
    rng = random.Random(10)
    pool: list[Any] = [None, True, False, 0, -1, 2**63, 0.5, -0.0, math.nan, "", "a", "\ue000"]
    for _ in range(500):
        value = [rng.choice(pool) for _ in range(rng.randrange(8))]
        assert same(decode(encode(value)), value)


def test_a_flat_list_keeps_the_bounds() -> None:
    with pytest.raises(CodecError, match="digits"):
        encode([10**128])
    with pytest.raises(CodecError, match="values"):
        encode(list(range(10)), max_items=5)
    assert decode(encode(["x" * 1000, 10**127])) == ["x" * 1000, 10**127]


# -- a last bytes value read apart (a ``SplitPayload``'s tail) -------------------------------


def _split(message: bytes) -> SplitPayload:
    """``message`` cut where ``tail_size`` says its last bytes value starts."""
    tail = jsoncodec.tail_size(message, len(message))
    assert tail
    return SplitPayload(message[:-tail], message[-tail:])


def test_a_tail_read_apart_is_the_last_bytes_value_itself() -> None:
    body = bytes(range(256)) * 1024
    value = ["send", "r1", [{"type": "http.response.body", "body": body, "more_body": True}]]
    split = _split(encode(value))
    assert split.tail == body
    decoded = decode(split)
    assert decoded == value
    assert decoded[2][0]["body"] is split.tail  # no copy of it
    assert codec.decode(split)[2][0]["body"] is split.tail
    # With other bytes values before it: those come from the head, the last is the tail.
    value = {"headers": [[b"a", b"bc"]], "body": body}
    split = _split(encode(value))
    decoded = decode(split)
    assert decoded == value and decoded["body"] is split.tail


def test_tail_size_tells_only_what_the_start_holds() -> None:
    message = encode(["x", b"ab", b"cdef"])
    assert jsoncodec.tail_size(message, len(message)) == 4
    assert codec.tail_size(memoryview(message), len(message)) == 4
    cut = message.index(b"cdef") - 1  # the table of lengths not all there
    assert jsoncodec.tail_size(message[: cut - 4], len(message)) == 0
    assert jsoncodec.tail_size(encode(["x"]), 20) == 0  # no bytes value
    assert jsoncodec.tail_size(codec.encode_binary([b"ab"]), 20) == 0  # another format
    assert jsoncodec.tail_size(b"", 0) == 0
    # A forged last length larger than what follows the table: nothing to read apart.
    forged = bytearray(message)
    struct.pack_into(">I", forged, message.index(b"cdef") - 4, 1 << 20)
    assert jsoncodec.tail_size(forged, len(message)) == 0


def test_a_tail_that_is_not_the_last_bytes_value_is_refused() -> None:
    message = encode(["x", b"ab", b"cdef"])
    split = _split(message)
    head, tail = split.head, split.tail
    with pytest.raises(CodecError, match="last bytes value"):
        decode(SplitPayload(head[:-1], head[-1:] + tail))  # the sizes add up, the last not
    with pytest.raises(CodecError):
        decode(SplitPayload(head, tail + b"!"))  # more than the table says
    with pytest.raises(CodecError):
        decode(SplitPayload(head + b"c", tail[1:]))
    with pytest.raises(CodecError, match="last bytes value"):
        decode(SplitPayload(head, bytearray(tail)))  # type: ignore[arg-type]  # bytes only
    no_bytes = encode(["x", 1])
    with pytest.raises(CodecError):
        decode(SplitPayload(no_bytes, b""))
    with pytest.raises(CodecError, match="exceeds"):
        decode(split, max_size=len(message) - 1)
    with pytest.raises(CodecError, match="exceeds"):
        codec.decode(split, max_size=len(message) - 1)


def test_a_tail_after_a_binary_message_is_decoded_joined() -> None:
    message = codec.encode_binary(["x", b"abcdef"])
    assert codec.decode(SplitPayload(message[:-3], message[-3:])) == ["x", b"abcdef"]
