"""Format version 3 of the codec: a JSON head parsed by the C ``json`` module, and a binary tail.

Owns the byte layout of format 3 and its safety checks. Must never use ``pickle`` or ``marshal``,
nor let anything but ``CodecError`` escape ``decode``: what is read back from Redis is untrusted
input, and decoding it can only produce None, bool, int, float, str, bytes, list and dict (with
str keys), within bounds on size, nesting depth and the number of values.

Format (version 3), integers big-endian::

    0x03                 the version byte (``codec`` says which byte is which format)
    u32 H                length of the head
    u32 N                number of bytes values
    H bytes              the head: the value as compact UTF-8 JSON, in which every bytes value
                         is replaced by the number literal ``0E0`` (its *marker*)
    N x u32              the lengths of the bytes values, in the order of their markers
    the rest             the bytes values back to back; their lengths add up to exactly the rest

Bodies thus travel once, unescaped; only the head is parsed, and by C code.

Why a marker cannot be confused with data: the head is written by ``json`` with Python's float
``repr``, which never writes an upper-case ``E``, so no float is ever written as ``0E0``, and
the decoder only sees number tokens as numbers (``0E0`` inside a string is a string). To place
the markers, the encoder lets ``json`` hand each object it cannot write to ``list.append`` (C,
no Python call per bytes value), which returns None, so ``json`` writes ``null`` in its place.
If the text holds exactly as many ``null`` as objects were handed over, and all are bytes, no
real None and no string or key containing "null" exists, so every ``null`` is a marker and a
plain ``str.replace`` turns each into ``0E0``. Otherwise (a None, "null" in a string, a
bytearray or memoryview, or an object outside the model) the value is written again with the
one-character string U+E000 (private use) for each bytes-like value and an error for anything
else, and U+E000 is counted the same way. A value with U+E000 in a string on that second pass
(or a key that ``json`` may have coerced, below) makes ``try_encode`` return None: the caller
then uses the binary format (``codec``), which carries anything.

What changes shape: every tuple decodes as a list (``json`` writes tuples as arrays, and a list
cannot be told from a tuple afterwards without a walk of the value). Everything else round
trips exactly: bytes stay bytes (bytearray, memoryview and ``codec.Gathered`` decode as
bytes), str stays str (lone surrogates included: the head is UTF-8 with ``surrogatepass``),
ints up to 128 digits, floats bit for bit (NaN and infinities included, as
``NaN``/``Infinity``), dict order.

``json`` silently turns int, float, bool and None dict keys into strings. Such a key is written
as ``"1":``, ``"1.5":``, ``"true":``, ``"NaN":``...: the encoder declines (returns None) when a
key ends in a digit or is one of those words, so the binary format decides (it refuses
non-str keys).

Bounds, checked on the bytes of the head before ``json`` builds anything: the number of values
(dict keys included) is at most 1 + the number of ``[``, ``{``, ``,`` and ``:`` outside strings,
and the nesting depth at most the number of ``[`` and ``{`` outside strings. Both are first
counted over the whole head (one ``bytes.translate``, an over-estimate since it also counts
inside strings); only when that exceeds a bound are strings cut out and the count redone
exactly. A head longer than ``4 * max_items`` bytes has its start checked first, so a 16 MiB
frame of ``[]`` is refused after passes of C code over 400 KiB, having built nothing. Numbers:
an int of more than 128 digits and a number literal longer than 32 characters are refused as
they are parsed (``parse_int``/``parse_float``), so Python's own limit on int digits is never
what stops them. ``encode`` checks the same bounds, so whatever it produces decodes with the
default bounds.
"""

from __future__ import annotations

import json
import json.encoder
import json.scanner
import struct
import threading
from collections.abc import Callable
from typing import Any, Final

from .codec import DEFAULT_MAX_DEPTH, DEFAULT_MAX_SIZE, CodecError, Gathered
from .resp.directread import SplitPayload

__all__ = [
    "DEFAULT_MAX_ITEMS",
    "VERSION",
    "decode",
    "encode",
    "tail_size",
    "try_encode",
    "try_encode_parts",
]

VERSION: Final = 3
DEFAULT_MAX_ITEMS: Final = 100_000
"""Values (dict keys included) one message may hold: far above any real ASGI message, which
holds hundreds at most, and low enough that a hostile one cannot build millions of objects."""

_MAX_INT_DIGITS: Final = 128  # as the binary format
_MAX_NUMBER_TEXT: Final = 32  # Python's float repr writes at most 24 characters
_PREFIX: Final = struct.Struct(">BII")  # version, head length, number of bytes values
_MARK: Final = "\ue000"
_MARK_JSON: Final = '"\ue000"'
_MARKER: Final = "0E0"
_BYTES: Final = frozenset([bytes])

# Keep only what opens a container or separates values; see the module docstring.
_NOT_STRUCTURE: Final = bytes(set(range(256)) - set(b"[{,:"))
_NOT_BRACKET: Final = bytes(set(range(256)) - set(b"[]{}"))
_AS_PARENS: Final = bytes.maketrans(b"[]{}", b"()()")
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_INT: Final = b"0" * (_MAX_INT_DIGITS + 1)


def encode(
    value: Any, *, max_depth: int = DEFAULT_MAX_DEPTH, max_items: int = DEFAULT_MAX_ITEMS
) -> bytes:
    """Encode ``value`` in format 3; raise ``CodecError`` if it cannot travel in format 3."""
    data = try_encode(value, max_depth=max_depth, max_items=max_items)
    if data is None:
        raise CodecError(
            "value holds U+E000 in a string, or a dict key json may have coerced from a "
            "number, bool or None: format 3 cannot carry it unambiguously (the binary format can)"
        )
    return data


def try_encode(
    value: Any, *, max_depth: int = DEFAULT_MAX_DEPTH, max_items: int = DEFAULT_MAX_ITEMS
) -> bytes | None:
    """Encode ``value`` in format 3, or None where only the binary format carries it exactly.

    Raise ``CodecError`` for a value that cannot travel at all: a type outside the value model,
    nesting deeper than ``max_depth`` (or a cycle), more than ``max_items`` values, an int of
    more than 128 digits.
    """
    parts = try_encode_parts(value, max_depth=max_depth, max_items=max_items)
    if parts is None:
        return None
    return b"".join(parts)  # one part: that one (CPython returns a lone bytes item as is)


def try_encode_parts(
    value: Any, *, max_depth: int = DEFAULT_MAX_DEPTH, max_items: int = DEFAULT_MAX_ITEMS
) -> list[bytes | memoryview] | None:
    """``try_encode`` without the final copy: the message as consecutive parts, the bytes
    values themselves among them (a body piece cut as a memoryview stays one), for a writer
    that gathers them once (``resp``'s packing)."""
    if type(value) is list and _SCALARS.issuperset(map(type, value)):
        # A flat list of scalars (the short conversation messages: an ACK, a CREDIT, a
        # CANCEL): no dict key json could have coerced, no bytes value to mark, one level
        # deep, and a text this short holds no int over the bound on digits.
        text = _scalar_dumps(value)
        if len(text) <= _MAX_INT_DIGITS and len(value) < max_items and max_depth >= 1:
            head = text.encode("utf-8", "surrogatepass")
            return [_PREFIX.pack(VERSION, len(head), 0) + head]
    session = _session()
    # First pass: json's C encoder hands each object it cannot write to list.append, with no
    # Python call per bytes value, and writes the None it returns as null. If there are exactly
    # as many "null" in the text as objects handed over, and all were bytes, each null is one.
    found = session.found
    try:
        text = _dumps(session.dumps_to_null, value)
        blobs: list[bytes | memoryview | Gathered] = found.copy()
    finally:
        found.clear()
    marker = "null"
    if blobs and (
        text.count(marker) != len(blobs)
        or not (_BYTES.issuperset(map(type, blobs)) or _byte_views(blobs))
    ):
        # A real None or "null" in a string, or a bytes-like or foreign object: write again with
        # U+E000 for each bytes-like value, and refuse anything else.
        blobs = session.blobs = []
        try:
            text = _dumps(session.dumps, value)
        finally:
            session.blobs = _NO_BLOBS
        if text.count(_MARK) != len(blobs):
            return None
        marker = _MARK_JSON
    if blobs:
        text = text.replace(marker, _MARKER)
    head = text.encode("utf-8", "surrogatepass")
    # One pass for three checks: digits as 0 (int keys, long ints) and [ { deleted (how many
    # containers open, the bound on depth). Deleting only joins what surrounded a bracket, so
    # a hit below may be false (checked again exactly) but a miss is certain.
    digits = head.translate(_DIGITS_AS_ZERO, b"[{")
    # find() and str's ``in``, not ``in`` on bytes: bytes.__contains__ first tries its operand
    # as an int, and raises and clears a TypeError per call when it is not (thousands of
    # instructions, more than the search itself).
    if (
        digits.find(b'0":') != -1 and head.translate(_DIGITS_AS_ZERO).find(b'0":') != -1
    ) or _has_word_key(text):
        return None
    if not (len(head) < max_items and len(head) - len(digits) <= max_depth):
        _check_shape(head, max_items, max_depth)
    if (
        len(head) > _MAX_INT_DIGITS
        and digits.find(_LONG_INT) != -1
        and _LONG_INT in _outside_strings(head, max_items).translate(_DIGITS_AS_ZERO)
    ):
        raise CodecError(f"int of more than {_MAX_INT_DIGITS} digits cannot be encoded")
    count = len(blobs)
    if not count:
        return [_PREFIX.pack(VERSION, len(head), 0) + head]
    parts: list[bytes | memoryview] = [
        _PREFIX.pack(VERSION, len(head), count)
        + head
        + struct.pack(f">{count}I", *map(len, blobs)),
    ]
    for blob in blobs:
        if isinstance(blob, Gathered):
            parts += blob.parts  # a gathered value is its parts, back to back
        else:
            parts.append(blob)
    return parts


def tail_size(start: bytes | bytearray | memoryview, size: int) -> int:
    """The size of the last bytes value of a format 3 message of ``size`` bytes that begins
    with ``start``, when ``start`` holds the message's table of lengths and that value ends
    the message; else 0 (see ``codec.tail_size``). Nothing here is trusted: ``decode`` of the
    ``SplitPayload`` read so checks the whole message again."""
    if len(start) < _PREFIX.size or start[0] != VERSION:
        return 0
    _, head_size, count = _PREFIX.unpack_from(start)
    table_end = _PREFIX.size + head_size + 4 * count
    if not count or table_end > len(start) or table_end > size:
        return 0
    (last,) = _U32.unpack_from(start, table_end - 4)
    return int(last) if last <= size - table_end else 0


_U32: Final = struct.Struct(">I")


def decode(
    data: bytes | bytearray | memoryview | SplitPayload,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Decode a message made by ``encode``; raise ``CodecError`` for anything else.

    A ``SplitPayload`` (``resp.directread``) is its head followed by its tail
    (``tail_size``), which must be exactly the message's last bytes value: that value is
    then the tail itself, not a copy."""
    tail: bytes | None = None
    if type(data) is not bytes:
        if isinstance(data, SplitPayload):
            tail = data.tail
            data = data.head
        else:
            try:
                data = memoryview(data).cast("B")  # slices below then copy each value once
            except (TypeError, ValueError) as exc:
                raise CodecError(f"cannot decode from this buffer: {exc}") from None
    size = len(data)
    whole = size if tail is None else size + len(tail)
    if whole > max_size:
        raise CodecError(f"message of {whole} bytes exceeds the limit of {max_size}")
    if not size:
        raise CodecError("empty message")
    if data[0] != VERSION:
        raise CodecError(f"unsupported message version {data[0]} (this decoder reads {VERSION})")
    if size < _PREFIX.size:
        raise CodecError("message truncated in its prefix")
    _, head_size, count = _PREFIX.unpack_from(data)
    head_end = _PREFIX.size + head_size
    tail_start = head_end + 4 * count
    if tail_start > size:
        raise CodecError("message truncated: head or length table runs past its end")
    if count > max_items:
        raise CodecError(f"message holds {count} bytes values, over the limit of {max_items}")
    lengths = _lengths_format(count).unpack_from(data, head_end)
    if sum(lengths) != whole - tail_start:
        raise CodecError(
            f"bytes values add up to {sum(lengths)} bytes but the tail holds {whole - tail_start}"
        )
    if tail is not None and (type(tail) is not bytes or not count or lengths[-1] != len(tail)):
        raise CodecError("the bytes read apart are not the message's last bytes value")
    head = data[_PREFIX.size : head_end]
    if type(head) is not bytes:
        head = bytes(head)
    session = _session()
    scan = session.scan
    if len(head) < max_items:
        # One pass, as in the encoder: the length [ and { take is the bound on depth, and
        # without a run of more than 128 digits (deleting brackets only joins runs) no int
        # is too long, so the C scanner parses ints itself, with no call back per int.
        digits = head.translate(_DIGITS_AS_ZERO, b"[{")
        if len(head) - len(digits) > max_depth:
            _check_shape(head, max_items, max_depth)
        if digits.find(_LONG_INT) == -1:
            scan = session.scan_short_ints
    else:
        _check_shape(head, max_items, max_depth)
    try:
        text = head.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise CodecError("head is not valid UTF-8") from None
    session.data = data
    session.lengths = lengths
    session.last = tail
    session.index = 0
    session.position = tail_start  # where the next bytes value starts
    try:
        value, end = scan(text, 0)
    except CodecError:
        raise
    except StopIteration:
        raise CodecError("head is not JSON: no value at its start") from None
    except json.JSONDecodeError as exc:
        raise CodecError(f"head is not valid JSON: {exc}") from None
    except RecursionError:
        raise CodecError("message nested too deeply") from None
    except ValueError as exc:  # e.g. an int conversion limit in a parser we did not expect
        raise CodecError(f"head holds an invalid value: {exc}") from None
    finally:
        used = session.index
        session.data = b""
        session.lengths = ()
        session.last = None
    if end != len(text):
        raise CodecError(f"{len(text) - end} characters after the value in the head")
    if used != count:
        raise CodecError(f"head has {used} bytes markers for {count} bytes values in the tail")
    return value


def _byte_views(blobs: list[Any]) -> bool:
    """Whether every value is bytes, a flat, contiguous memoryview of bytes (a body piece
    cut from a larger body) or ``Gathered`` (a piece gathered from several): those travel as
    they are, joined once into the message."""
    for blob in blobs:
        if (
            type(blob) is not bytes
            and not (
                type(blob) is memoryview
                and blob.ndim == 1
                and blob.c_contiguous
                and blob.itemsize == 1
            )
            and type(blob) is not Gathered
        ):
            return False
    return True


def _has_word_key(head: str) -> bool:
    """Whether ``head`` has a key json may have written for True, False, None or a float.

    (Int keys and finite float keys end in a digit: the caller looks for those.)
    """
    # A chain of ``in`` rather than any() over a tuple: this runs for every message.
    return (
        '"true":' in head
        or '"false":' in head
        or '"null":' in head
        or '"NaN":' in head
        or 'Infinity":' in head
    )


def _dumps(dumps: Callable[[Any], str], value: Any) -> str:
    try:
        return dumps(value)
    except CodecError:
        raise
    except RecursionError:
        raise CodecError("value nested too deeply (or circular) to encode") from None
    except (TypeError, ValueError) as exc:
        raise CodecError(f"value cannot be encoded: {exc}") from None


def _check_shape(head: bytes, max_items: int, max_depth: int) -> None:
    """Refuse a head with more than ``max_items`` values or nested deeper than ``max_depth``."""
    # The common case, in two scans of C code with no table to build: a head shorter than
    # max_items bytes cannot hold max_items values, nor one with few brackets nest deeply.
    if len(head) < max_items and head.count(b"[") + head.count(b"{") <= max_depth:
        return
    ahead = 4 * max_items
    if len(head) > ahead:
        # A flood of values is refused from its start, without passes over all of a huge head:
        # what the start holds outside strings, the whole head holds too.
        start = head[:ahead]
        if len(start.translate(None, _NOT_STRUCTURE)) >= max_items:
            outside = _outside_strings(start, max_items)  # also refuses a flood of strings
            if len(outside.translate(None, _NOT_STRUCTURE)) >= max_items:
                raise CodecError(f"message holds more than {max_items} values")
    marks = head.translate(None, _NOT_STRUCTURE)
    if len(marks) < max_items and marks.count(b"[") + marks.count(b"{") <= max_depth:
        return
    # The counts above include characters inside strings: redo them on the text outside.
    skeleton = _outside_strings(head, max_items)
    marks = skeleton.translate(None, _NOT_STRUCTURE)
    if len(marks) >= max_items:
        raise CodecError(f"message holds more than {max_items} values")
    if marks.count(b"[") + marks.count(b"{") <= max_depth:
        return
    parens = skeleton.translate(_AS_PARENS, _NOT_BRACKET)
    if parens.count(b"(") * 2 != len(parens):
        raise CodecError("message has unbalanced brackets")
    # Each pass removes exactly the innermost containers: one level of nesting.
    for _ in range(max_depth):
        parens = parens.replace(b"()", b"")
        if not parens:
            return
    raise CodecError(f"message nested deeper than {max_depth}")


def _outside_strings(head: bytes, max_items: int) -> bytes:
    """The JSON text ``head`` with its strings cut out (exact when ``head`` is valid JSON).

    Backslashes occur only in strings, in escapes: removing ``\\\\`` pairs from the left, then
    ``\\"``, leaves exactly the quotes that open and close strings. UTF-8 never puts a byte
    below 0x80 inside a multi-byte character, so this works on the encoded text.
    """
    text = head.replace(b"\\\\", b"").replace(b'\\"', b"")
    if text.count(b'"') > 2 * max_items:  # every string is a value or a key
        raise CodecError(f"message holds more than {max_items} values")
    return b"".join(text.split(b'"')[::2])


class _Session:
    """One thread's JSON encoder and scanner, with the state their hooks read.

    Built once per thread so that a call costs no set-up; ``json.scanner.make_scanner`` reads
    its settings from the attributes of this object, as it does from a ``JSONDecoder``.
    """

    strict = True  # control characters inside strings are refused
    object_hook = None
    array_hook = None  # read by Python 3.15's scanner
    object_pairs_hook = None
    parse_constant = float  # called only with "NaN", "Infinity" and "-Infinity"

    def __init__(self) -> None:
        self.blobs: list[bytes | memoryview | Gathered] = _NO_BLOBS
        self.data: bytes | memoryview = b""
        self.lengths: tuple[int, ...] = ()  # of the bytes values of the message decoded
        self.last: bytes | None = None  # the last bytes value, when it was read apart
        self.index = 0  # of the next bytes value
        self.position = 0  # where it starts in ``data``
        self.memo: dict[str, str] = {}  # used by the pure-Python scanner only
        self.parse_float = self._number
        self.parse_int: Callable[[str], int] = int  # parsed in C, no call per int
        self.scan_short_ints: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
            self  # type: ignore[arg-type]
        )
        """The scanner for a head with no run of more than 128 digits."""
        self.parse_int = self._int
        self.scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(self)  # type: ignore[arg-type]
        self.dumps = _make_dumps(self._default)
        self.found: list[Any] = []
        self.dumps_to_null = _make_dumps(self.found.append)

    def _default(self, value: Any) -> str:
        """Called by ``json`` for what it cannot write itself: bytes become a marker."""
        if isinstance(value, bytes) or type(value) is Gathered:
            self.blobs.append(value)
            return _MARK
        if isinstance(value, (bytearray, memoryview)):
            try:
                view = memoryview(value).cast("B")
            except (TypeError, ValueError):
                raise CodecError("a memoryview that is not C-contiguous cannot travel") from None
            self.blobs.append(view)
            return _MARK
        raise CodecError(f"a {type(value).__name__} cannot travel through Redis")

    def _number(self, text: str) -> Any:
        """Called by the scanner for each number with a fraction or exponent."""
        if text == _MARKER:
            index = self.index
            lengths = self.lengths
            if index >= len(lengths):
                raise CodecError("more bytes markers in the head than bytes values in the tail")
            self.index = index + 1
            if index == len(lengths) - 1 and self.last is not None:
                return self.last  # its length was checked against the table
            start = self.position
            end = self.position = start + lengths[index]
            value = self.data[start:end]
            return value if type(value) is bytes else bytes(value)
        if len(text) > _MAX_NUMBER_TEXT:
            raise CodecError(f"number literal of {len(text)} characters")
        return float(text)

    def _int(self, text: str) -> int:
        """Called by the scanner for each integer literal."""
        if len(text) - text.startswith("-") > _MAX_INT_DIGITS:
            raise CodecError(f"int of more than {_MAX_INT_DIGITS} digits")
        return int(text)


_NO_BLOBS: Final[list[bytes | memoryview | Gathered]] = []
_LENGTHS_FORMATS: Final = [struct.Struct(f">{n}I") for n in range(64)]


def _lengths_format(count: int) -> struct.Struct:
    """The layout of a table of ``count`` lengths (made once for the usual counts: building the
    format string and looking it up in ``struct``'s cache cost more than the unpacking)."""
    return _LENGTHS_FORMATS[count] if count < 64 else struct.Struct(f">{count}I")


_local = threading.local()
_SCALARS: Final = frozenset([str, int, float, bool, type(None)])


def _no_default(value: Any) -> Any:  # pragma: no cover - scalars only reach it
    raise CodecError(f"a {type(value).__name__} cannot travel through Redis")


def _session() -> _Session:
    try:
        session: _Session = _local.session
    except AttributeError:
        session = _local.session = _Session()
    return session


def _make_dumps(default: Callable[[Any], Any]) -> Callable[[Any], str]:
    """A compact, non-ASCII-escaping JSON writer calling ``default`` for other types.

    Uses the C encoder directly when there is one, built once: ``JSONEncoder.encode`` would
    build it again on every call. No cycle check: a cycle ends in ``RecursionError``.
    """
    make: Any = getattr(json.encoder, "c_make_encoder", None)
    write = None
    if make is not None:
        try:
            # markers, default, encoder, indent, key_separator, item_separator, sort_keys,
            # skipkeys, allow_nan: the arguments JSONEncoder.iterencode passes.
            write = make(
                None, default, json.encoder.encode_basestring, None, ":", ",", False, False, True
            )
        except TypeError:  # a C encoder that takes other arguments
            write = None
    if write is None:
        return json.JSONEncoder(
            default=default, separators=(",", ":"), ensure_ascii=False, check_circular=False
        ).encode

    def dumps(value: Any) -> str:
        return "".join(write(value, 0))

    return dumps


_scalar_dumps: Final = _make_dumps(_no_default)
"""A writer for flat lists of scalars, which never call back: shared by every thread."""
