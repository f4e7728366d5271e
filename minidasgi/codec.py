"""Safe, compact encoding of ASGI messages for travel through Redis.

Owns the byte format of every value minidasgi puts into Redis. Must never use ``pickle`` or
``marshal``: whatever is read back from Redis is untrusted input, and decoding it can only ever
produce None, bool, int, float, str, bytes, list and dict (with str keys).

Format (version 2): one version byte, then one value. A value is a one-byte tag and its payload,
big-endian: ``N`` None, ``T``/``F`` booleans, ``i`` int64, ``I`` a larger int as decimal
ASCII (u16 length), ``f`` float64, ``s`` UTF-8 str and ``b`` bytes (u32 length), ``l`` list,
``t`` tuple and ``d`` dict (u32 count, then the items; dict keys are str values). Tuples keep
their shape (version 1 sent them as lists, and still decodes): an app's ``(name, value)``
header pairs reach the ASGI server as the app sent them, as they would served directly.
Decoding checks every length against the bytes that remain, so a forged count cannot make it
allocate more than the message holds; depth, total size and the number of items are bounded.

The item bound is what keeps decoding cheap: an empty list costs 5 bytes on the wire and some
60 in memory, so a size bound alone lets a 16 MiB message become hundreds of MiB of objects and
seconds of CPU. Every container's count is charged against ``max_items`` before any of its items
is built, so a forged message is refused after work proportional to the bound, not to its size.
"""

from __future__ import annotations

import struct
from typing import Any, Final

__all__ = ["VERSION", "CodecError", "decode", "encode"]

VERSION: Final = 2
_DECODABLE_VERSIONS: Final = frozenset({1, VERSION})  # version 1 is version 2 without tuples
_VERSION_BYTE: Final = bytes([VERSION])
DEFAULT_MAX_SIZE: Final = 16 * 1024 * 1024
DEFAULT_MAX_DEPTH: Final = 32
DEFAULT_MAX_ITEMS: Final = 100_000
"""Items (list elements and dict entries, over all containers) one decode builds at most. The
largest real messages hold a few thousand (a scope with hundreds of headers is ~3 per header);
100,000 empty containers are ~6 MiB of objects and a few tens of milliseconds of decoding."""
_MAX_BIGINT_DIGITS: Final = 128

_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class CodecError(ValueError):
    """A value cannot be encoded, or bytes are not a valid encoded message."""


def encode(value: Any, *, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """Encode ``value``; raise ``CodecError`` for types that cannot travel."""
    parts: list[bytes] = [_VERSION_BYTE]
    _encode(value, parts, max_depth)
    return b"".join(parts)


def _encode(value: Any, parts: list[bytes], depth: int) -> None:
    # Ordered by how often each type occurs in ASGI messages.
    if isinstance(value, bytes):
        parts.append(b"b" + _U32.pack(len(value)))
        parts.append(value)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        parts.append(b"s" + _U32.pack(len(data)))
        parts.append(data)
    elif isinstance(value, dict):
        if depth <= 0:
            raise CodecError("value nested too deeply to encode")
        parts.append(b"d" + _U32.pack(len(value)))
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(f"dict keys must be str, not {type(key).__name__}")
            data = key.encode("utf-8", "surrogatepass")
            parts.append(b"s" + _U32.pack(len(data)))
            parts.append(data)
            _encode(item, parts, depth - 1)
    elif isinstance(value, (list, tuple)):
        if depth <= 0:
            raise CodecError("value nested too deeply to encode")
        # A tuple subclass (a named tuple) travels as a plain tuple: its class cannot.
        parts.append((b"l" if isinstance(value, list) else b"t") + _U32.pack(len(value)))
        for item in value:
            _encode(item, parts, depth - 1)
    elif value is None:
        parts.append(b"N")
    elif value is True:
        parts.append(b"T")
    elif value is False:
        parts.append(b"F")
    elif isinstance(value, int):
        if _I64_MIN <= value <= _I64_MAX:
            parts.append(b"i" + _I64.pack(value))
        else:
            digits = str(value).encode()
            if len(digits) > _MAX_BIGINT_DIGITS:
                raise CodecError("int too large to encode")
            parts.append(b"I" + _U16.pack(len(digits)) + digits)
    elif isinstance(value, float):
        parts.append(b"f" + _F64.pack(value))
    elif isinstance(value, (bytearray, memoryview)):
        view = memoryview(value).cast("B")  # joined below without a copy of its own
        parts.append(b"b" + _U32.pack(view.nbytes))
        parts.append(view)  # type: ignore[arg-type]
    else:
        raise CodecError(f"a {type(value).__name__} cannot travel through Redis")


def is_portable(value: Any) -> bool:
    """Tell whether ``value`` can be encoded."""
    try:
        _encode(value, [], DEFAULT_MAX_DEPTH)
    except CodecError:
        return False
    return True


def decode(
    data: bytes,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> Any:
    """Decode a message made by ``encode``; raise ``CodecError`` for anything else.

    ``max_size`` bounds the bytes, ``max_depth`` the nesting and ``max_items`` the list
    elements and dict entries over the whole message (see ``DEFAULT_MAX_ITEMS``).
    """
    if len(data) > max_size:
        raise CodecError(f"message of {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise CodecError("empty message")
    if data[0] not in _DECODABLE_VERSIONS:
        raise CodecError(f"unsupported message version {data[0]} (this side speaks {VERSION})")
    decoder = _Decoder(data, max_items)
    value = decoder.value(max_depth)
    if decoder.pos != len(data):
        raise CodecError(f"{len(data) - decoder.pos} trailing bytes after the message")
    return value


class _Decoder:
    __slots__ = ("data", "items", "pos")

    def __init__(self, data: bytes, max_items: int) -> None:
        self.data = data
        self.pos = 1
        self.items = max_items  # items this decode may still build

    def _take(self, n: int) -> bytes:
        start = self.pos
        end = start + n
        if end > len(self.data):
            raise CodecError("message truncated")
        self.pos = end
        return self.data[start:end]

    def _u32(self) -> int:
        try:
            (n,) = _U32.unpack_from(self.data, self.pos)
        except struct.error:
            raise CodecError("message truncated") from None
        self.pos += 4
        return int(n)

    def _str(self) -> str:
        raw = self._take(self._u32())
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise CodecError("invalid UTF-8 in a string") from None

    def value(self, depth: int) -> Any:
        data = self.data
        if self.pos >= len(data):
            raise CodecError("message truncated")
        tag = data[self.pos]
        self.pos += 1
        if tag == 0x62:  # b
            return self._take(self._u32())
        if tag == 0x73:  # s
            return self._str()
        if tag == 0x64 or tag == 0x6C or tag == 0x74:  # d, l, t
            if depth <= 0:
                raise CodecError("message nested too deeply")
            count = self._u32()
            # Each item takes at least one byte: a forged count fails here, before allocating.
            if count > len(data) - self.pos:
                raise CodecError("message truncated")
            # Charged before building: a container of a million empty ones costs nothing.
            self.items -= count
            if self.items < 0:
                raise CodecError("message holds too many items")
            if tag == 0x6C:
                return [self.value(depth - 1) for _ in range(count)]
            if tag == 0x74:
                return tuple([self.value(depth - 1) for _ in range(count)])
            result: dict[str, Any] = {}
            for _ in range(count):
                if self.pos >= len(data) or data[self.pos] != 0x73:
                    raise CodecError("dict key is not a string")
                self.pos += 1
                key = self._str()
                result[key] = self.value(depth - 1)
            return result
        if tag == 0x4E:  # N
            return None
        if tag == 0x54:  # T
            return True
        if tag == 0x46:  # F
            return False
        if tag == 0x69:  # i
            return _I64.unpack(self._take(8))[0]
        if tag == 0x66:  # f
            return _F64.unpack(self._take(8))[0]
        if tag == 0x49:  # I
            (n,) = _U16.unpack(self._take(2))
            digits = self._take(n)
            # One optional minus sign only: int() refuses b"--5", and must never see it.
            unsigned = digits[1:] if digits[:1] == b"-" else digits
            if n > _MAX_BIGINT_DIGITS or not unsigned.isdigit():
                raise CodecError("invalid big int")
            return int(digits)
        raise CodecError(f"unknown tag {bytes([tag])!r}")
