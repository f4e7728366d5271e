"""Safe, compact encoding of ASGI messages for travel through Redis.

Owns the byte format of every value minidasgi puts into Redis, and which version byte means
which format. Must never use ``pickle`` or ``marshal``: whatever is read back from Redis is
untrusted input, and decoding it can only ever produce None, bool, int, float, str, bytes, list,
tuple and dict (with str keys).

Every encoded message starts with its version byte, the one thing every version shares:

- **1**, the binary format of the first release: tags, below, without ``t`` (tuples are lists).
  Written only for a peer of that release (``encode(value, version=1)``).
- **2**, the binary format with tuples (tag ``t``). Never the first choice: ``encode`` writes
  it only for a value format 3 declines (see ``jsoncodec``: U+E000 in a string, a dict key json
  could have coerced).
- **3**, the fast format (``jsoncodec``): a JSON head read by the C ``json`` module and a binary
  tail for bytes values. What ``encode`` writes by default. Tuples decode as lists.

The rule: a version byte is never reused for another layout; ``decode`` reads every version a
peer of the previous release or of this one may send (1, 2 and 3), and refuses any other with
``UnsupportedVersion``, which names the version so the operator knows what to upgrade. Frames
that are not a codec value (``wire``'s batch frame and envelope preamble) take bytes far from
these (``wire`` owns them).

Binary format (versions 1 and 2): one version byte, then one value. A value is a one-byte tag and
its payload, big-endian: ``N`` None, ``T``/``F`` booleans, ``i`` int64, ``I`` a larger int as
decimal ASCII (u16 length), ``f`` float64, ``s`` UTF-8 str and ``b`` bytes (u32 length), ``l``
list, ``t`` tuple and ``d`` dict (u32 count, then the items; dict keys are str values).
Decoding checks every length against the bytes that remain, so a forged count cannot make it
allocate more than the message holds; depth, total size and the number of items are bounded.

The item bound is what keeps decoding cheap: an empty list costs 5 bytes on the wire and some
60 in memory, so a size bound alone lets a 16 MiB message become hundreds of MiB of objects and
seconds of CPU. Every container's count is charged against ``max_items`` before any of its items
is built, so a forged message is refused after work proportional to the bound, not to its size.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # in annotations only: ``decode`` measures one, ``jsoncodec`` reads it
    from .resp.directread import SplitPayload

__all__ = [
    "BINARY",
    "FAST",
    "RELEASED",
    "VERSION",
    "CodecError",
    "Gathered",
    "UnsupportedVersion",
    "decode",
    "encode",
    "encode_binary",
    "encode_parts",
    "tail_size",
]

RELEASED: Final = 1
"""The binary format of the first release (no tuples)."""
BINARY: Final = 2
"""The binary format with tuples: the fallback for what the fast format declines."""
FAST: Final = 3
"""The fast format (``jsoncodec``)."""
VERSION: Final = FAST
"""What ``encode`` writes by default."""
DECODABLE: Final = frozenset({RELEASED, BINARY, FAST})
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


class UnsupportedVersion(CodecError):
    """A message in a format this side cannot read: a peer of a newer (or much older) release."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"unsupported message version {version} (this side reads "
            f"{', '.join(map(str, sorted(DECODABLE)))}): upgrade the side that sent it, or "
            "have it write an older format"
        )
        self.version = version


class Gathered:
    """A bytes value held as consecutive ``bytes`` parts (a body piece gathered from several
    reads), encoded as their concatenation without joining them first: it travels, and
    decodes, as one bytes value. Only an encoder's input: nothing decodes to it."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes]) -> None:
        for part in parts:
            if type(part) is not bytes:
                raise TypeError(f"a gathered value holds bytes only, not {type(part).__name__}")
        self.parts = parts
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"Gathered({len(self.parts)} parts, {self.size} bytes)"


def encode(value: Any, *, version: int = FAST, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """Encode ``value`` in ``version`` (``FAST`` unless a peer of the first release must read
    it: ``RELEASED``); raise ``CodecError`` for types that cannot travel."""
    if version == FAST:
        data = _jsoncodec.try_encode(value, max_depth=max_depth, max_items=DEFAULT_MAX_ITEMS)
        if data is not None:
            return data
        version = BINARY  # U+E000 in a string, or a dict key json would coerce
    return encode_binary(value, version=version, max_depth=max_depth)


def encode_parts(
    value: Any, *, version: int = FAST, max_depth: int = DEFAULT_MAX_DEPTH
) -> list[bytes | memoryview]:
    """``encode`` as consecutive parts whose concatenation is the message: in the fast format
    the bytes values are parts of their own, not copied (see ``jsoncodec.try_encode_parts``)."""
    if version == FAST:
        parts = _jsoncodec.try_encode_parts(value, max_depth=max_depth, max_items=DEFAULT_MAX_ITEMS)
        if parts is not None:
            return parts
        version = BINARY
    return [encode_binary(value, version=version, max_depth=max_depth)]


def encode_binary(
    value: Any, *, version: int = BINARY, max_depth: int = DEFAULT_MAX_DEPTH
) -> bytes:
    """Encode ``value`` in the binary format: ``BINARY`` (tuples kept) or ``RELEASED``."""
    if version not in (RELEASED, BINARY):
        raise ValueError(f"no binary format has version {version}")
    parts: list[bytes] = [_VERSION_BYTES[version]]
    _encode(value, parts, max_depth, version == BINARY)
    return b"".join(parts)


_VERSION_BYTES: Final = {v: bytes([v]) for v in (RELEASED, BINARY)}


def _encode(value: Any, parts: list[bytes], depth: int, tuples: bool = True) -> None:
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
            _encode(item, parts, depth - 1, tuples)
    elif isinstance(value, (list, tuple)):
        if depth <= 0:
            raise CodecError("value nested too deeply to encode")
        # A tuple subclass (a named tuple) travels as a plain tuple: its class cannot.
        tag = b"t" if tuples and not isinstance(value, list) else b"l"
        parts.append(tag + _U32.pack(len(value)))
        for item in value:
            _encode(item, parts, depth - 1, tuples)
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
    elif type(value) is Gathered:
        parts.append(b"b" + _U32.pack(value.size))
        parts.extend(value.parts)
    elif isinstance(value, (bytearray, memoryview)):
        view = memoryview(value).cast("B")  # joined below without a copy of its own
        parts.append(b"b" + _U32.pack(view.nbytes))
        parts.append(view)  # type: ignore[arg-type]
    else:
        raise CodecError(f"a {type(value).__name__} cannot travel through Redis")


def tail_size(start: bytes | bytearray | memoryview, size: int) -> int:
    """How many bytes at the end of a message of ``size`` bytes, of which ``start`` is the
    beginning, are its last bytes value (to be read apart, and passed to ``decode`` as a
    ``SplitPayload``'s tail), or 0 when ``start`` cannot tell (another format, or too short
    to hold the table of lengths). A hint only, read from untrusted bytes: ``decode`` checks
    it again."""
    return _jsoncodec.tail_size(start, size)


def is_portable(value: Any) -> bool:
    """Tell whether ``value`` can be encoded."""
    try:
        _encode(value, [], DEFAULT_MAX_DEPTH)
    except CodecError:
        return False
    return True


def decode(
    data: bytes | bytearray | memoryview | SplitPayload,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> Any:
    """Decode a message made by ``encode``; raise ``CodecError`` for anything else.

    ``max_size`` bounds the bytes, ``max_depth`` the nesting and ``max_items`` the list
    elements and dict entries over the whole message (see ``DEFAULT_MAX_ITEMS``).

    A ``SplitPayload`` (``resp.directread``) is its head followed by its tail, read apart
    (see ``tail_size``). In the fast format, where the tail must be exactly the message's
    last bytes value, that value is the tail itself, not a copy; a message of another format
    is decoded from the two joined.
    """
    if len(data) > max_size:
        raise CodecError(f"message of {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise CodecError("empty message")
    version = data[0]
    if version == FAST:
        return _jsoncodec.decode(data, max_size=max_size, max_items=max_items, max_depth=max_depth)
    if version not in DECODABLE:
        raise UnsupportedVersion(version)
    if type(data) is not bytes:
        data = bytes(data)
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


# At the end: jsoncodec imports this module's bounds and CodecError.
from . import jsoncodec as _jsoncodec  # noqa: E402
