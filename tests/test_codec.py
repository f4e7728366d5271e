"""Unit tests for ``minidasgi.codec``: round trips, refusals, and bounded fuzzing of ``decode``."""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import pytest

from minidasgi import codec
from minidasgi.codec import CodecError, decode, is_portable
from minidasgi.codec import encode_binary as encode  # this file tests the binary format


def round_trip(value: Any) -> Any:
    return decode(encode(value))


def make_nested_lists(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def make_nested_dicts(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"k": value}
    return value


def sample_http_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": "/api/tëst/38",
        "raw_path": b"/api/t%C3%ABst/38",
        "query_string": b"a=1&b=%FF",
        "root_path": "",
        "headers": [
            (b"host", b"example.com"),
            (b"content-type", b"application/json"),
            (b"x-binary", bytes(range(256))),
        ],
        "client": ("127.0.0.1", 54321),
        "server": ("10.0.0.1", 443),
        "extensions": {"http.response.trailers": {}},
    }


def sample_message() -> bytes:
    return encode(
        {
            "type": "http.response.start",
            "status": 200,
            "big": 2**70,
            "ratio": 0.5,
            "flags": [True, False, None],
            "headers": [(b"content-type", b"text/plain")],
            "text": "héllo",
        }
    )


# Round trips


@pytest.mark.parametrize("value", [None, True, False])
def test_singletons_round_trip_as_themselves(value: Any) -> None:
    assert round_trip(value) is value


@pytest.mark.parametrize("value", [0, 1, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, -(2**100)])
def test_ints_round_trip_exactly(value: int) -> None:
    result = round_trip(value)
    assert result == value
    assert type(result) is int


def test_bools_stay_bools_and_ints_stay_ints() -> None:
    assert round_trip([True, 1, False, 0]) == [True, 1, False, 0]
    assert [type(v) for v in round_trip([True, 1, False, 0])] == [bool, int, bool, int]


@pytest.mark.parametrize("value", [0.0, -0.0, 1.5, -2.25, 1e308, 5e-324, math.inf, -math.inf])
def test_floats_round_trip_exactly(value: float) -> None:
    result = round_trip(value)
    assert type(result) is float
    assert result == value
    assert math.copysign(1.0, result) == math.copysign(1.0, value)


def test_nan_round_trips() -> None:
    result = round_trip(math.nan)
    assert isinstance(result, float)
    assert math.isnan(result)


@pytest.mark.parametrize("value", ["", "hello", "héllo wörld", "日本語", "emoji 🎉", "nul\x00in"])
def test_strings_round_trip(value: str) -> None:
    result = round_trip(value)
    assert type(result) is str
    assert result == value


def test_lone_surrogates_round_trip_through_surrogatepass() -> None:
    value = "a\ud800b\udfffc"
    assert round_trip(value) == value
    assert round_trip({value: value}) == {value: value}


@pytest.mark.parametrize("value", [b"", b"\x00\xff\x80binary\r\n", bytes(range(256))])
def test_bytes_round_trip(value: bytes) -> None:
    result = round_trip(value)
    assert type(result) is bytes
    assert result == value


def test_one_mebibyte_of_bytes_round_trips() -> None:
    value = random.Random(1).randbytes(1024 * 1024)
    assert round_trip(value) == value


@pytest.mark.parametrize("value", [bytearray(b"abc\x00"), memoryview(b"xyz\xff")])
def test_bytearray_and_memoryview_decode_as_bytes(value: bytearray | memoryview) -> None:
    result = round_trip(value)
    assert type(result) is bytes
    assert result == bytes(value)


def test_tuples_and_lists_keep_their_shape() -> None:
    result = round_trip((1, ("a", b"b"), (), [("x", [b"y"])]))
    assert result == (1, ("a", b"b"), (), [("x", [b"y"])])
    assert type(result) is tuple and type(result[3]) is list and type(result[3][0]) is tuple


def test_a_named_tuple_travels_as_a_plain_tuple() -> None:
    import collections

    pair = collections.namedtuple("pair", "host port")("h", 1)
    result = round_trip([pair])
    assert result == [("h", 1)] and type(result[0]) is tuple


def test_version_1_messages_still_decode() -> None:
    assert decode(b"\x01l" + struct.pack(">I", 1) + b"N") == [None]
    with pytest.raises(codec.UnsupportedVersion, match="unsupported message version 9"):
        decode(b"\x09N")


def test_nested_dicts_and_lists_round_trip() -> None:
    value = {
        "a": [1, 2, {"b": [None, {"c": []}]}],
        "d": {},
        "e": {"f": {"g": [[[b"deep"]]]}},
        "": "empty key",
    }
    assert round_trip(value) == value


def test_dict_order_is_kept() -> None:
    value = {"z": 1, "a": 2, "m": 3}
    assert list(round_trip(value)) == ["z", "a", "m"]


def test_realistic_http_scope_round_trips_with_its_tuples() -> None:
    scope = sample_http_scope()
    result = round_trip(scope)
    assert result == scope
    assert all(type(pair) is tuple for pair in result["headers"])
    assert result["client"] == ("127.0.0.1", 54321)
    assert result["server"] == ("10.0.0.1", 443)


def test_nesting_exactly_at_max_depth_is_accepted() -> None:
    value = make_nested_lists(codec.DEFAULT_MAX_DEPTH)
    assert round_trip(value) == value


def test_encoding_starts_with_the_version_byte() -> None:
    assert encode(None) == bytes([codec.BINARY]) + b"N"


# Values that cannot travel


class _Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset({1}),
        _Opaque(),
        object(),
        1 + 2j,
        {"ok": [1, {2}]},
        {1: "non-str key"},
        {b"bytes": "key"},
        {("tuple",): "key"},
        {"nested": {None: 1}},
    ],
    ids=[
        "set",
        "frozenset",
        "object",
        "bare-object",
        "complex",
        "set-inside",
        "int-key",
        "bytes-key",
        "tuple-key",
        "nested-none-key",
    ],
)
def test_unencodable_values_raise_codec_error(value: Any) -> None:
    with pytest.raises(CodecError):
        encode(value)


def test_int_with_too_many_digits_cannot_be_encoded() -> None:
    with pytest.raises(CodecError):
        encode(10**200)


@pytest.mark.parametrize("make", [make_nested_lists, make_nested_dicts])
def test_encode_refuses_nesting_deeper_than_max_depth(make: Any) -> None:
    with pytest.raises(CodecError):
        encode(make(codec.DEFAULT_MAX_DEPTH + 1))
    with pytest.raises(CodecError):
        encode(make(4), max_depth=3)
    assert decode(encode(make(3), max_depth=3)) == make(3)


def test_encode_refuses_a_self_referencing_list() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(CodecError):
        encode(loop)


@pytest.mark.parametrize("make", [make_nested_lists, make_nested_dicts])
def test_decode_refuses_nesting_deeper_than_max_depth(make: Any) -> None:
    data = encode(make(10), max_depth=10)
    assert decode(data, max_depth=10) == make(10)
    with pytest.raises(CodecError, match="deep"):
        decode(data, max_depth=9)


def test_decode_refuses_deep_nesting_with_the_default_limit() -> None:
    depth = codec.DEFAULT_MAX_DEPTH + 1
    data = bytes([codec.BINARY]) + (b"l" + struct.pack(">I", 1)) * depth + b"N"
    with pytest.raises(CodecError, match="deep"):
        decode(data)
    # A very deep forgery must not reach Python's recursion limit.
    forged = bytes([codec.BINARY]) + (b"l" + struct.pack(">I", 1)) * 100_000 + b"N"
    with pytest.raises(CodecError):
        decode(forged)


def test_is_portable() -> None:
    assert is_portable(None)
    assert is_portable(sample_http_scope())
    assert is_portable([b"", "", 0, 0.0, True, bytearray(b"x"), memoryview(b"y")])
    assert is_portable(make_nested_lists(codec.DEFAULT_MAX_DEPTH))
    assert not is_portable({1, 2})
    assert not is_portable(object())
    assert not is_portable({1: 2})
    assert not is_portable([{"a": {3.5}}])
    assert not is_portable(make_nested_lists(codec.DEFAULT_MAX_DEPTH + 1))
    assert not is_portable(10**200)


# Malformed input


@pytest.mark.parametrize("version", [0, 4, 255])
def test_wrong_version_byte_is_refused_with_the_version_in_the_message(version: int) -> None:
    data = bytes([version]) + encode("x")[1:]
    with pytest.raises(CodecError, match=f"version {version}"):
        decode(data)


def test_empty_input_is_refused() -> None:
    with pytest.raises(CodecError, match="empty"):
        decode(b"")


def test_every_truncation_of_a_message_raises_codec_error() -> None:
    data = sample_message()
    assert len(data) > 50
    for length in range(len(data)):
        try:
            decode(data[:length])
        except CodecError:
            continue
        except Exception as exc:  # pragma: no cover - the failure being tested for
            pytest.fail(f"prefix of {length} bytes raised {type(exc).__name__}: {exc}")
        pytest.fail(f"prefix of {length} bytes decoded without error")


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(CodecError, match="trailing"):
        decode(encode([1, 2]) + b"N")
    with pytest.raises(CodecError, match="trailing"):
        decode(encode(None) + b"\x00")


@pytest.mark.parametrize("tag", [b"x", b"\x00", b"\xff", b"L", b"n"])
def test_unknown_tag_is_refused(tag: bytes) -> None:
    with pytest.raises(CodecError, match="unknown tag"):
        decode(bytes([codec.BINARY]) + tag)


@pytest.mark.parametrize("tag", [b"l", b"t", b"d"])
def test_forged_huge_count_fails_fast(tag: bytes) -> None:
    data = bytes([codec.BINARY]) + tag + struct.pack(">I", 2**32 - 1) + b"NNNN"
    with pytest.raises(CodecError, match="truncated"):
        decode(data)


@pytest.mark.parametrize("tag", [b"s", b"b"])
def test_forged_huge_length_fails_fast(tag: bytes) -> None:
    data = bytes([codec.BINARY]) + tag + struct.pack(">I", 2**32 - 1) + b"abc"
    with pytest.raises(CodecError, match="truncated"):
        decode(data)


@pytest.mark.parametrize("raw", [b"\xff", b"\xc3", b"\xc3\x28", b"a\x80b", b"\xf8\x88\x80\x80\x80"])
def test_invalid_utf8_in_a_string_is_refused(raw: bytes) -> None:
    data = bytes([codec.BINARY]) + b"s" + struct.pack(">I", len(raw)) + raw
    with pytest.raises(CodecError, match="UTF-8"):
        decode(data)


def test_invalid_utf8_in_a_dict_key_is_refused() -> None:
    data = bytes([codec.BINARY]) + b"d" + struct.pack(">I", 1) + b"s" + struct.pack(">I", 1)
    data += b"\xff" + b"N"
    with pytest.raises(CodecError, match="UTF-8"):
        decode(data)


def test_dict_key_that_is_not_a_string_is_refused() -> None:
    data = bytes([codec.BINARY]) + b"d" + struct.pack(">I", 1) + b"i" + struct.pack(">q", 1)
    data += b"N"
    with pytest.raises(CodecError, match="key"):
        decode(data)


def test_oversized_message_is_refused() -> None:
    data = encode(b"x" * 1000)
    assert decode(data, max_size=len(data)) == b"x" * 1000
    with pytest.raises(CodecError, match="exceeds"):
        decode(data, max_size=len(data) - 1)


def test_message_above_the_default_limit_is_refused() -> None:
    data = bytes([codec.BINARY]) + b"N" + bytes(codec.DEFAULT_MAX_SIZE)
    with pytest.raises(CodecError, match="exceeds"):
        decode(data)


def big_int_message(digits: bytes) -> bytes:
    return bytes([codec.BINARY]) + b"I" + struct.pack(">H", len(digits)) + digits


@pytest.mark.parametrize(
    "digits",
    [
        b"",
        b"-",
        b"--5",
        b"-" * 10 + b"1",
        b"+5",
        b"12a",
        b"1_000",
        b" 12",
        b"12 ",
        b"1.5",
        b"5-",
        b"0x10",
        b"9" * 129,
        b"\xd9\xa1",
    ],
)
def test_invalid_big_int_is_refused(digits: bytes) -> None:
    with pytest.raises(CodecError, match="big int"):
        decode(big_int_message(digits))


def test_valid_big_int_forms_decode() -> None:
    assert decode(big_int_message(b"-" + b"9" * 127)) == -int("9" * 127)
    assert decode(big_int_message(b"9" * 128)) == int("9" * 128)
    assert decode(big_int_message(b"7")) == 7


def test_big_int_length_beyond_the_message_is_truncation() -> None:
    data = bytes([codec.BINARY]) + b"I" + struct.pack(">H", 0xFFFF) + b"123"
    with pytest.raises(CodecError):
        decode(data)


# Bounded fuzz: decode returns a value or raises CodecError, nothing else


def assert_decode_is_total(data: bytes) -> None:
    try:
        decode(data)
    except CodecError:
        pass
    except Exception as exc:
        pytest.fail(f"decode({data!r}) raised {type(exc).__name__}: {exc}")


def test_fuzz_random_bytes() -> None:
    rng = random.Random(7)
    version = bytes([codec.BINARY])
    tags = b"NTFiIfsbltdx"
    for index in range(3000):
        length = rng.randrange(0, 64)
        data = rng.randbytes(length)
        if index % 3 == 1:
            # Past the version check, to exercise the value decoder.
            data = version + data
        elif index % 3 == 2:
            # A valid tag up front, so lengths and counts are random numbers.
            data = version + bytes([rng.choice(tags)]) + data
        assert_decode_is_total(data)


def test_fuzz_mutations_and_truncations_of_valid_encodings() -> None:
    rng = random.Random(7)
    samples = [
        sample_message(),
        encode(sample_http_scope()),
        encode([None, True, False, 0, -1, 2**63, -(2**100), 1.5, math.inf, "s", b"b"]),
        encode({"a": {"b": {"c": [1, [2, [3, "\ud800"]]]}}}),
        encode(make_nested_lists(codec.DEFAULT_MAX_DEPTH)),
    ]
    for _ in range(3000):
        data = bytearray(rng.choice(samples))
        action = rng.randrange(4)
        if action == 0:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif action == 1:
            del data[rng.randrange(len(data)) :]
        elif action == 2:
            del data[rng.randrange(len(data))]
        else:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        assert_decode_is_total(bytes(data))


# --- the bound on items (issue 9, item 6) --------------------------------------------------


def _empty_lists(n: int) -> bytes:
    """An encoded list of ``n`` empty lists, built without building the objects."""
    return b"\x01l" + struct.pack(">I", n) + (b"l" + struct.pack(">I", 0)) * n


def test_a_message_of_millions_of_empty_containers_is_refused_before_building_them() -> None:
    data = _empty_lists(3_000_000)  # 15 MB: under the size bound
    assert len(data) < codec.DEFAULT_MAX_SIZE
    with pytest.raises(CodecError, match="too many items"):
        decode(data)


def test_items_are_counted_over_all_containers_not_per_container() -> None:
    inner = b"l" + struct.pack(">I", 1000) + b"N" * 1000
    data = b"\x01l" + struct.pack(">I", 200) + inner * 200  # 200 + 200,000 items
    with pytest.raises(CodecError, match="too many items"):
        decode(data)
    value = decode(data, max_items=200 + 200 * 1000)
    assert len(value) == 200 and all(len(item) == 1000 for item in value)


def test_dict_entries_count_as_items() -> None:
    data = encode({f"k{i}": None for i in range(10)})
    assert decode(data, max_items=10) == {f"k{i}": None for i in range(10)}
    with pytest.raises(CodecError, match="too many items"):
        decode(data, max_items=9)


def test_the_item_bound_is_exact() -> None:
    data = encode([[], [1, 2], {"a": [3]}])  # 3 + 2 + 1 + 1 items
    assert decode(data, max_items=7) == [[], [1, 2], {"a": [3]}]
    with pytest.raises(CodecError, match="too many items"):
        decode(data, max_items=6)


def test_the_default_item_bound_fits_a_scope_with_thousands_of_headers() -> None:
    headers = [(f"x-header-{i}".encode(), b"v" * 20) for i in range(5000)]
    scope = {"type": "http", "path": "/", "headers": headers, "query_string": b""}
    assert len(decode(encode(scope))["headers"]) == 5000


def test_wire_decoders_use_the_item_bound() -> None:
    from minidasgi import wire

    forged = b"\x01l" + struct.pack(">I", 3) + b"s\x00\x00\x00\x05event" + b"s\x00\x00\x00\x01x"
    flood = b"l" + struct.pack(">I", 150_000) + (b"l" + struct.pack(">I", 0)) * 150_000
    with pytest.raises(CodecError, match="too many items"):
        wire.unpack(forged + flood)
    scope = b"d" + struct.pack(">I", 1) + b"s\x00\x00\x00\x01x" + flood
    envelope = b"\x01d" + struct.pack(">I", 1) + b"s\x00\x00\x00\x05scope" + scope
    with pytest.raises(CodecError, match="too many items"):
        wire.Envelope.decode(envelope)


# The fast format by default, the binary one as fallback, the released one on demand


def test_encode_writes_the_fast_format_and_decode_reads_every_version() -> None:
    value = {"type": "http.response.body", "body": b"x", "more_body": False}
    for version in (codec.RELEASED, codec.BINARY):
        assert decode(encode(value, version=version)) == value
    fast = codec.encode(value)
    assert fast[0] == codec.FAST and decode(fast) == value


def test_what_the_fast_format_declines_travels_in_the_binary_one() -> None:
    value = {"k1": (1, 2)}  # json would write an int key 1 the same way: format 3 declines
    data = codec.encode(value)
    assert data[0] == codec.BINARY and decode(data) == value


def test_the_released_format_writes_tuples_as_lists() -> None:
    data = codec.encode([(b"a", b"b")], version=codec.RELEASED)
    assert data[0] == codec.RELEASED and decode(data) == [[b"a", b"b"]]


@pytest.mark.parametrize("version", [codec.RELEASED, codec.BINARY, codec.FAST])
def test_a_gathered_value_travels_as_the_bytes_of_its_parts(version: int) -> None:
    parts = [b"a" * 70_000, b"", b"b" * 3, b"c" * 100_000]
    joined = b"".join(parts)
    # With a None beside it, format 3 takes its second pass (the one that marks with U+E000).
    for value in ({"body": codec.Gathered(parts)}, [None, codec.Gathered(parts), b"z", "null"]):
        expected = {"body": joined} if isinstance(value, dict) else [None, joined, b"z", "null"]
        data = b"".join(codec.encode_parts(value, version=version))
        assert data == codec.encode(value, version=version)
        assert codec.decode(data) == expected
        assert data == codec.encode(expected, version=version)  # the joined value's bytes


def test_a_gathered_value_holds_bytes_only() -> None:
    with pytest.raises(TypeError):
        codec.Gathered([b"a", bytearray(b"b")])  # type: ignore[list-item]
    assert codec.is_portable([codec.Gathered([b"a", b"b"])])
