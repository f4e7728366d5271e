"""RESP, the Redis serialization protocol, as pure functions of bytes and state.

Theory of operation: ``pack_command`` turns a command into the bytes Redis expects (an array of
bulk strings). A reply parser is fed whatever bytes arrived (``feed``) and hands out complete
replies (``gets``), returning the ``NEED_DATA`` sentinel until one is complete. Nothing here
touches a socket, so the parser is tested by feeding it bytes one at a time.

Everything Redis sends is untrusted input: the parser bounds nesting depth, the size of one
reply, the elements one aggregate header announces (both parsers, before anything is built),
the elements of a reply together (the pure-Python parser) and the length of a header line,
checks every length and number strictly, and raises ``ProtocolError`` on anything malformed.
A server error (``-ERR ...``) is not malformed: it is returned as a ``ReplyError`` *value*,
never raised from the parser, so that one failing command in a pipeline cannot desynchronise
the replies of the others.

Two parsers sit behind the same contract: ``PythonParser`` (always available) and
``HiredisParser`` (the C ``hiredis.Reader``, when installed). ``make_parser`` picks one;
``MINIDASGI_RESP_PARSER=python|hiredis`` forces the choice. hiredis is imported only when chosen.

Reply types: simple and bulk strings -> ``bytes``; integer -> ``int``; null -> ``None``;
array, set and push -> ``list``; map -> ``dict``; double -> ``float``; boolean -> ``bool``;
verbatim string -> ``bytes`` without its ``txt:`` prefix; error -> ``ReplyError``. Two RESP3
corners differ between the parsers because hiredis gives no way to tell them apart: a big number
is an ``int`` here and its digits as ``bytes`` under hiredis, and an attribute is dropped here but
returned as a reply of its own by hiredis. This client speaks RESP2 (it never sends ``HELLO 3``),
so Redis sends neither.
"""

from __future__ import annotations

import functools
import os
import re
from collections import deque
from typing import Any, Final, Protocol

__all__ = [
    "NEED_DATA",
    "AuthenticationError",
    "HiredisParser",
    "ProtocolError",
    "PythonParser",
    "RedisConnectionError",
    "ReplyError",
    "ReplyParser",
    "RespError",
    "make_parser",
    "pack_arguments",
    "pack_command",
    "pack_command_from",
    "pack_command_parts",
    "pack_gathering",
]


class RespError(Exception):
    """Base class of every error raised by ``minidasgi.resp``."""


class ProtocolError(RespError):
    """Redis sent bytes that are not valid RESP, or a reply over the configured bounds.

    The connection that received them cannot be trusted any more and is closed.
    """


class ReplyError(RespError):
    """An error reply sent by Redis (``-ERR ...``, ``-WRONGTYPE ...``).

    ``code`` is its first word, the error's kind by Redis convention.
    """

    @property
    def code(self) -> str:
        """The first word of the message, such as ``ERR``, ``WRONGPASS`` or ``NOAUTH``."""
        text = str(self)
        return text.split(" ", 1)[0] if text else ""


class AuthenticationError(ReplyError):
    """Redis refused the credentials (or demanded some) during the connection handshake."""


class RedisConnectionError(RespError, ConnectionError):
    """The connection to Redis could not be made, or was lost or closed."""

    unsent: bool = False
    """True on the error of commands refused before anything was written, the connection
    already closed (``Connection.send_packed_to``): Redis never saw them."""


class _NeedData:
    """Type of the ``NEED_DATA`` sentinel."""

    _instance: _NeedData | None = None

    def __new__(cls) -> _NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __bool__(self) -> bool:
        return False


NEED_DATA: Final = _NeedData()
"""Returned by ``gets()`` while no complete reply is buffered."""

# Defaults for the bounds. Redis' own proto-max-bulk-len is 512 MB; this library never asks for
# values anywhere near that, so a much smaller default keeps a hostile server from making us
# buffer half a gigabyte.
DEFAULT_MAX_REPLY_SIZE: Final = 64 * 1024 * 1024
DEFAULT_MAX_DEPTH: Final = 16
# Elements that the aggregates of one reply may announce, together. The size bound alone let a
# reply of 64 MiB build 16 million objects (``*0`` is four bytes and a list of 56), a gigabyte.
# The largest reply this library asks for is a big cluster's CLUSTER SLOTS, some 300 thousand.
DEFAULT_MAX_ITEMS: Final = 1 << 20
_MAX_LINE: Final = 64 * 1024
_VIEW_FROM: Final = 4096  # bulk strings from this size are copied out through a view


def _encode_arg(arg: object) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, (memoryview, bytearray)):
        return bytes(arg)
    if isinstance(arg, bool):
        # True would silently become b"True": refuse instead of guessing.
        raise TypeError("cannot send a bool to Redis: convert it to int or str first")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        if arg != arg:
            raise ValueError("cannot send NaN to Redis")
        return repr(arg).encode()
    raise TypeError(f"cannot send a {type(arg).__name__} to Redis: use bytes, str, int or float")


def pack_command(*args: object) -> bytes:
    """Encode one command as a RESP array of bulk strings.

    >>> pack_command("LPUSH", "k", b"v")
    b'*3\\r\\n$5\\r\\nLPUSH\\r\\n$1\\r\\nk\\r\\n$1\\r\\nv\\r\\n'
    """
    if not args:
        raise ValueError("a command needs at least its name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            data: bytes = arg  # type: ignore[assignment]
        elif kind is str:
            data = arg.encode()  # type: ignore[attr-defined]
        else:
            data = _encode_arg(arg)
        if len(data) < 1024:
            parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
        else:  # no extra copy of a large value before the final join
            parts.append(b"$%d\r\n" % len(data))
            parts.append(data)
            parts.append(b"\r\n")
    return b"".join(parts)


def pack_arguments(*args: object) -> bytes:
    """The bulk strings of ``args`` with no array header: a command's fixed first arguments
    (its name and a key, say), packed once for many ``pack_command_from`` calls.

    >>> pack_arguments("LPUSH", "k")
    b'$5\\r\\nLPUSH\\r\\n$1\\r\\nk\\r\\n'
    """
    return pack_command(*args).partition(b"\r\n")[2]


def pack_command_from(prefix: bytes, count: int, values: list[bytes]) -> bytes:
    """``pack_command(*first, *values)``, the same bytes, from ``prefix`` =
    ``pack_arguments(*first)`` and ``count`` = ``len(first)``; ``values`` are bytes.

    >>> pack_command_from(pack_arguments("LPUSH", "k"), 2, [b"v"])
    b'*3\\r\\n$5\\r\\nLPUSH\\r\\n$1\\r\\nk\\r\\n$1\\r\\nv\\r\\n'
    """
    if len(values) == 1:  # the usual push: one formatting, one copy
        value = values[0]
        return b"*%d\r\n%b$%d\r\n%b\r\n" % (count + 1, prefix, len(value), value)
    parts = [b"*%d\r\n" % (len(values) + count), prefix]
    for value in values:
        parts += (b"$%d\r\n" % len(value), value, b"\r\n")
    return b"".join(parts)


Parts = list[bytes | memoryview]
"""A command or a value as consecutive buffers (bytes or flat byte memoryviews), to be written
as their concatenation."""
_GATHER_FROM: Final = 16 * 1024  # smaller values are copied into the head: one buffer fewer


def pack_command_parts(*args: object) -> Parts:
    """``pack_command`` without copying large values: the command as consecutive parts, each
    value of 16 KiB or more one part as it is. A value may also be given as a list of buffers
    (bytes or flat byte memoryviews): one bulk string of their concatenation, its buffers
    parts too. ``Connection.send_packed`` gathers parts into its write with one copy.

    >>> b"".join(pack_command_parts("PUBLISH", "c", [b"ab", memoryview(b"cd")]))
    b'*3\\r\\n$7\\r\\nPUBLISH\\r\\n$1\\r\\nc\\r\\n$4\\r\\nabcd\\r\\n'
    """
    if not args:
        raise ValueError("a command needs at least its name")
    parts: Parts = []
    head = b"*%d\r\n" % len(args)
    for arg in args:
        kind = type(arg)
        if kind is list:
            pieces: Parts = arg  # type: ignore[assignment]
            for piece in pieces:
                if not (
                    type(piece) is bytes or (type(piece) is memoryview and piece.itemsize == 1)
                ):
                    raise TypeError("a gathered value holds bytes or byte memoryviews only")
            size = sum(map(len, pieces))
            head += b"$%d\r\n" % size
            for piece in pieces:
                if len(piece) < _GATHER_FROM:
                    head += piece
                else:
                    parts.append(head)
                    parts.append(piece)
                    head = b""
            head += b"\r\n"
            continue
        data: bytes = arg if kind is bytes else _encode_arg(arg)  # type: ignore[assignment]
        if len(data) < _GATHER_FROM:
            head += b"$%d\r\n%b\r\n" % (len(data), data)
        else:
            parts.append(head + b"$%d\r\n" % len(data))
            parts.append(data)
            head = b"\r\n"
    parts.append(head)
    return parts


def pack_gathering(*args: object) -> bytes | Parts:
    """``pack_command_parts`` if a value is given as a list of buffers, else ``pack_command``."""
    for arg in args:
        if type(arg) is list:
            return pack_command_parts(*args)
    return pack_command(*args)


def pack_pair_command(head: bytes, first: object, second: object) -> bytes:
    """``pack_command`` for a command of two arguments whose packed name is ``head``
    (e.g. ``b"*3\\r\\n$7\\r\\nPUBLISH\\r\\n"``): the hot path of LPUSH and PUBLISH,
    formatted in one step."""
    a = first if type(first) is bytes else _encode_arg(first)
    b = second if type(second) is bytes else _encode_arg(second)
    return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n" % (head, len(a), a, len(b), b)


class ReplyParser(Protocol):
    """The contract both parsers meet."""

    def feed(self, data: bytes) -> None:
        """Append bytes received from Redis."""

    def gets(self) -> Any:
        """Return the next complete reply or ``NEED_DATA``; raise ``ProtocolError`` if malformed."""

    def feed_gets(self, data: bytes) -> Any:
        """``feed(data)``, then return what ``gets()`` returns: a read's first step, in one
        call (each read costs the connection a Python call less)."""


_INTEGER = re.compile(rb"-?[0-9]+")
_DOUBLE = re.compile(rb"[+-]?(?:inf|nan|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)")
_SKIP: Final = object()  # the value of an attribute, which is metadata and never delivered


def _to_int(line: bytes) -> int | None:
    """``line`` as an int, or None when it is not one (or has more digits than int() takes)."""
    if not (line.isdigit() or _INTEGER.fullmatch(line)):  # isdigit: the common case, cheaply
        return None
    try:
        return int(line)
    except ValueError:  # over sys.get_int_max_str_digits() digits
        return None


class _Frame:
    """An aggregate whose elements are still arriving."""

    __slots__ = ("items", "kind", "wanted")

    def __init__(self, kind: int, wanted: int) -> None:
        self.kind = kind
        self.wanted = wanted
        self.items: list[Any] = []


class PythonParser:
    """The pure-Python incremental RESP2/RESP3 reply parser.

    Work done on a partial reply is kept: completed elements of an unfinished aggregate stay on
    an explicit stack and the search for a line end resumes where it stopped, so feeding a reply
    one byte at a time costs time linear in its size.
    """

    def __init__(
        self,
        *,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the first byte not yet consumed
        self._searched = 0  # bytes from _pos already known to hold no CRLF
        self._stack: list[_Frame] = []
        self._reply_start = 0  # bytes consumed by the reply in progress, before _pos
        self._consumed = 0
        self._max_reply_size = max_reply_size
        self._max_depth = max_depth
        self._max_items = max_items
        self._items = 0  # elements the aggregates of the reply in progress announced
        # The failure's message, not the exception: raised from a method of ours, its traceback
        # holds this parser, and the cycle would keep the parser (and its buffer) alive until
        # the GC runs.
        self._broken: str | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes received from Redis."""
        self._buf += data

    def feed_gets(self, data: bytes) -> Any:
        """``feed(data)``, then the next complete reply, or ``NEED_DATA`` (``gets`` inlined)."""
        self._buf += data
        if self._broken is not None:
            raise ProtocolError(self._broken)
        try:
            return self._parse()
        except ProtocolError as exc:
            self._broken = str(exc)
            raise

    def gets(self) -> Any:
        """Return the next complete reply, or ``NEED_DATA``."""
        if self._broken is not None:
            raise ProtocolError(self._broken)
        try:
            return self._parse()
        except ProtocolError as exc:
            self._broken = str(exc)
            raise

    def take_rest(self) -> bytes:
        """Remove and return the bytes fed but not yet parsed, between two replies (right
        after ``gets()`` returned one): for a caller that frames what follows itself."""
        if self._stack or self._broken is not None:
            raise RuntimeError("take_rest() amid a reply")
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        self._searched = 0
        return rest

    def _fail(self, message: str) -> ProtocolError:
        return ProtocolError(message)

    def _length(self, line: bytes, what: str, *, allow_null: bool) -> int:
        n = _to_int(line)
        if n is None:
            raise self._fail(f"invalid {what} length {line[:32]!r}")
        if n < 0 and not (allow_null and n == -1):
            raise self._fail(f"negative {what} length {n}")
        if n > self._max_reply_size:
            raise self._fail(f"{what} length {n} exceeds the limit of {self._max_reply_size}")
        return n

    def _parse(self) -> Any:
        buf = self._buf
        while True:
            pos = self._pos
            if len(self._stack) == 0:
                self._reply_start = self._consumed
            elif self._consumed - self._reply_start > self._max_reply_size:
                raise self._fail(f"reply larger than the limit of {self._max_reply_size} bytes")
            nl = buf.find(b"\r\n", pos + self._searched)
            if nl < 0:
                waiting = len(buf) - pos
                if waiting > _MAX_LINE:
                    raise self._fail(f"header line longer than {_MAX_LINE} bytes")
                self._searched = max(0, waiting - 1)
                return self._need_data()
            self._searched = 0
            if nl == pos:
                raise self._fail("empty line where a type prefix was expected")
            prefix = buf[pos]
            line = bytes(buf[pos + 1 : nl])
            after = nl + 2
            value: Any
            if prefix in b"$=!":  # bulk string, verbatim string, bulk error
                n = self._length(line, "bulk", allow_null=prefix == 0x24)
                if n == -1:
                    value = None
                else:
                    end = after + n
                    if self._consumed - self._reply_start + end + 2 - pos > self._max_reply_size:
                        raise self._fail("bulk string larger than the reply limit")
                    if len(buf) < end + 2:
                        return self._need_data()
                    if buf[end : end + 2] != b"\r\n":
                        raise self._fail("bulk string not terminated by CRLF")
                    if n < _VIEW_FROM:
                        value = bytes(buf[after:end])
                    else:  # a bytearray's slice is a copy of its own: copy once, from a view
                        with memoryview(buf) as view:
                            value = bytes(view[after:end])
                    after = end + 2
                    if prefix == 0x3D:  # '='
                        if len(value) < 4 or value[3:4] != b":":
                            raise self._fail("verbatim string without its format prefix")
                        value = value[4:]
                    elif prefix == 0x21:  # '!'
                        value = ReplyError(value.decode("utf-8", "replace"))
            elif prefix == 0x2B:  # '+'
                value = line
            elif prefix == 0x2D:  # '-'
                value = ReplyError(line.decode("utf-8", "replace"))
            elif prefix == 0x3A or prefix == 0x28:  # ':' integer, '(' big number
                value = _to_int(line)
                if value is None:
                    raise self._fail(f"invalid integer {line[:32]!r}")
            elif prefix == 0x5F:  # '_'
                if line:
                    raise self._fail("null with a payload")
                value = None
            elif prefix == 0x2C:  # ','
                if not _DOUBLE.fullmatch(line):
                    raise self._fail(f"invalid double {line[:32]!r}")
                value = float(line)
            elif prefix == 0x23:  # '#'
                if line == b"t":
                    value = True
                elif line == b"f":
                    value = False
                else:
                    raise self._fail(f"invalid boolean {line[:32]!r}")
            elif prefix in b"*~>%|":  # array, set, push, map, attribute
                n = self._length(line, "aggregate", allow_null=prefix in b"*>")
                if n == -1:
                    value = None
                else:
                    if prefix in b"%|":
                        n *= 2
                    if n == 0:
                        value = {} if prefix == 0x25 else _SKIP if prefix == 0x7C else []
                    else:
                        if len(self._stack) >= self._max_depth:
                            raise self._fail(f"replies nested deeper than {self._max_depth}")
                        # Counted from the headers, before anything is built.
                        items = self._items + n if self._stack else n
                        if items > self._max_items:
                            raise self._fail(f"reply of more than {self._max_items} elements")
                        self._items = items
                        self._stack.append(_Frame(prefix, n))
                        self._advance(after)
                        continue
            else:
                raise self._fail(f"unknown type prefix {bytes([prefix])!r}")
            self._advance(after)
            # Deliver the value to the aggregates it completes.
            while self._stack:
                if value is not _SKIP:
                    top = self._stack[-1]
                    top.items.append(value)
                    if len(top.items) < top.wanted:
                        break
                else:
                    break
                self._stack.pop()
                value = self._build(top)
            else:
                if value is not _SKIP:
                    self._compact()
                    return value
                continue

    def _build(self, frame: _Frame) -> Any:
        items = frame.items
        if frame.kind == 0x25:  # '%'
            try:
                return dict(zip(items[0::2], items[1::2], strict=True))
            except TypeError:  # a key that is an aggregate
                raise self._fail("unhashable map key") from None
        if frame.kind == 0x7C:  # '|'
            return _SKIP
        return items

    def _advance(self, new_pos: int) -> None:
        self._consumed += new_pos - self._pos
        self._pos = new_pos

    def _need_data(self) -> _NeedData:
        self._compact()
        return NEED_DATA

    def _compact(self) -> None:
        # Drop consumed bytes once they are a good share of the buffer, so it never grows
        # without bound and the cost of deleting stays amortised.
        pos = self._pos
        if pos and (pos == len(self._buf) or pos > 65536):
            del self._buf[:pos]
            self._pos = 0


_CRLF = re.compile(rb"\r\n").search  # takes a memoryview as it is, where bytes.find does not
_LINE_TYPES: Final = frozenset(b"+-:,_(#")  # one line, nothing follows it
_BULK_TYPES: Final = frozenset(b"$=!")  # a length, then that many bytes and CRLF
_LIST_TYPES: Final = frozenset(b"*~>")  # that many elements
_PAIR_TYPES: Final = frozenset(b"%|")  # that many pairs of elements


_SMALL_BULK_DIGITS: Final = 3  # bulk strings under 1000 bytes are matched whole by the run


def _small_bulks() -> bytes:
    """The rest of a bulk string after its type byte, when its length has at most
    ``_SMALL_BULK_DIGITS`` digits: the length, CRLF, exactly that many payload bytes, CRLF.
    A trie over the digits (no leading zero), each leaf a bounded repeat of ``.`` with DOTALL,
    which ``re`` jumps over in one step, not byte by byte (and ``-1``, a null)."""

    def node(prefix: bytes) -> bytes:
        alternatives = [rb"\r\n(?s:.{%d})\r\n" % int(prefix)]
        if len(prefix) < _SMALL_BULK_DIGITS:
            alternatives += [bytes([d]) + node(prefix + bytes([d])) for d in b"0123456789"]
        return b"(?:" + b"|".join(alternatives) + b")"

    firsts = [bytes([d]) + node(bytes([d])) for d in b"123456789"]
    return b"(?:0\r\n\r\n|-1\r\n|" + b"|".join(firsts) + b")"


@functools.lru_cache(maxsize=4)
def _run_pattern(max_items: int) -> re.Pattern[bytes]:
    """A run of items that need no look in Python, then the header of a bulk string, if one
    comes next (its length in group 1). The items: a bulk string under 1000 bytes, whole and
    ending in CRLF (see ``_small_bulks``); a line of one of ``_LINE_TYPES`` with no CR or LF
    in it; an aggregate header whose count has so few digits that it is within the bound
    whatever they are. Anything else (a larger count, a bulk string cut by the chunk's end or
    not followed by CRLF, a header line cut, anything malformed) ends the run and is looked
    at in Python, one item at a time. A run takes at most 256 items: ``re`` keeps some state
    per repetition until the match ends."""
    lists = len(str(max_items)) - 1
    pairs = len(str(max_items // 2)) - 1
    aggregates = b""
    if lists > 0:
        aggregates += rb"|[*~>](?:-1|[0-9]{1,%d})\r\n" % lists
    if pairs > 0:
        aggregates += rb"|[%%|](?:-1|[0-9]{1,%d})\r\n" % pairs
    return re.compile(
        rb"(?:[$=!]%s%s|[-+:,_(#][^\r\n]{0,%d}\r\n){0,256}(?:[$=!](-?[0-9]{1,19})\r\n)?"
        % (_small_bulks(), aggregates, _MAX_LINE - 1)
    )


class _Refused(Exception):
    """Raised inside ``_Framing`` at an item it refuses, which starts at offset ``at``."""

    def __init__(self, at: int, message: str) -> None:
        super().__init__(message)
        self.at = at


class _Framing:
    """Walks the item framing of a RESP stream, fed in chunks, before hiredis sees it.

    Every element of an aggregate is itself an item, so the stream is a flat sequence of
    items, each a header line (type byte, text, CRLF), plus, after a bulk header ``$N``
    (``=``, ``!``), ``N`` payload bytes and CRLF. The walk reads header lines and jumps over
    each payload by index arithmetic: its cost is per item, never per payload byte, and what a
    payload holds cannot change it. Runs of items are matched in C by one ``re`` match (see
    ``_run_pattern``), bulk strings under 1000 bytes included, so a typical reply costs one
    match, and one Python step more per bulk string of 1000 bytes or more.
    It refuses (see ``walk``) an aggregate header over ``max_items`` (a map's or an
    attribute's pairs count twice, as in ``PythonParser``), a payload not followed by CRLF
    (hiredis skips those two bytes unchecked, so the next header could start anywhere), a
    length that is not an integer or is below -1, an unknown type byte (hiredis knows no
    streamed types, ``;``, ``.``, ``?`` counts), and a header line over ``_MAX_LINE`` bytes.
    What it keeps between chunks: the payload bytes still to jump over and a header line cut
    by a chunk's end (bounded).
    """

    __slots__ = ("_line", "_max_items", "_run", "_skip", "error", "steps")

    def __init__(self, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self._max_items = max_items
        self._run = _run_pattern(max_items).match
        self._skip = 0  # bytes of the current bulk still to pass: its payload's rest and CRLF
        self._line = bytearray()  # the start of a header line cut by the end of the last chunk
        self.error = ""  # why walk refused
        self.steps = 0  # items looked at in Python (bulk strings jumped over, others), for tests

    def walk(self, data: bytes | bytearray | memoryview, pos: int = 0) -> int:
        """Walk ``data``, the next chunk (from ``pos``): -1 when it is well framed (its last
        item may be cut), else the offset in ``data`` of the first item that is not (0 when
        it began in an earlier chunk), the reason in ``error``. Not to be called again after
        a refusal."""
        try:
            if self._line:
                return self._walk_held(data)
            size = len(data)
            skip = self._skip
            run = self._run
            while True:
                if skip:
                    end = pos + skip
                    if end > size:
                        if skip >= 2 and end - 2 < size and data[end - 2] != 13:
                            raise _Refused(end - 2, "bulk string not terminated by CRLF")
                        self._skip = end - size
                        return -1
                    if (skip >= 2 and data[end - 2] != 13) or data[end - 1] != 10:
                        raise _Refused(pos, "bulk string not terminated by CRLF")
                    pos = end
                    skip = 0
                if pos >= size:
                    self._skip = 0
                    return -1
                found = run(data, pos)
                assert found is not None  # it matches an empty run
                pos = found.end()
                if found.lastindex is not None:  # a bulk string's header: jumped over here
                    self.steps += 1
                    n = int(found[1])
                    if n >= 0:
                        skip = n + 2
                    elif n < -1:
                        raise _Refused(found.start(1) - 1, "invalid bulk length")
                elif pos < size:
                    pos, skip = self._item(data, pos, size)
        except _Refused as refused:
            self.error = str(refused)
            self._line = bytearray()  # held no longer: the stream ends here
            return refused.at

    def _walk_held(self, data: bytes | bytearray | memoryview) -> int:
        if not data:
            return -1
        line = self._line
        if line[-1] == 13 and data[0] == 10:
            end = 1
        else:
            found = _CRLF(data)
            if found is None:
                if len(line) + len(data) > _MAX_LINE:
                    raise _Refused(0, f"header line longer than {_MAX_LINE} bytes")
                line += data  # a bytearray: fed a byte at a time, the line costs linear time
                return -1
            end = found.end()
        self._line = bytearray()
        line += data[:end]
        if self.walk(line) >= 0:
            return 0  # refused: the line began in an earlier chunk
        return self.walk(data, end)

    def _item(self, data: bytes | bytearray | memoryview, pos: int, size: int) -> tuple[int, int]:
        """The item at ``pos``, which the run did not take: where the next one starts and the
        bytes to skip before it (``size`` and 0 when its header line is cut, held back)."""
        self.steps += 1
        found = _CRLF(data, pos)
        if found is None:
            if size - pos > _MAX_LINE:
                raise _Refused(pos, f"header line longer than {_MAX_LINE} bytes")
            self._line = bytearray(data[pos:])
            return size, 0
        nl = found.start()
        if nl - pos > _MAX_LINE:
            raise _Refused(pos, f"header line longer than {_MAX_LINE} bytes")
        kind = data[pos]
        if kind in _LINE_TYPES:
            return nl + 2, 0
        if kind in _BULK_TYPES:
            n = _to_int(bytes(data[pos + 1 : nl]))
            if n is None or n < -1:
                raise _Refused(pos, "invalid bulk length")
            return nl + 2, n + 2 if n >= 0 else 0
        if kind in _LIST_TYPES or kind in _PAIR_TYPES:
            n = _to_int(bytes(data[pos + 1 : nl]))
            if n is None or n < -1:
                raise _Refused(pos, "invalid aggregate length")
            if n > (self._max_items if kind in _LIST_TYPES else self._max_items // 2):
                raise _Refused(
                    pos,
                    f"aggregate {chr(kind)!r} of {n} "
                    f"{'pairs' if kind in _PAIR_TYPES else 'elements'} exceeds the limit "
                    f"of {self._max_items} elements",
                )
            return nl + 2, 0
        raise _Refused(pos, f"unknown type prefix {bytes([kind])!r}")


class HiredisParser:
    """The hiredis C reader behind the ``ReplyParser`` contract, with the same bounds.

    hiredis bounds nesting itself. The reply size is bounded here by the bytes fed since the
    last complete reply: hiredis consumes the elements of an unfinished aggregate as they
    arrive, so the bytes it still buffers say nothing about the memory the reply holds.
    Anything hiredis raises besides a protocol error (a map key that is not hashable) is
    turned into ``ProtocolError`` too, and the reader is not trusted again.

    hiredis sizes an aggregate by its announced length the moment it reads the header
    (``*2147483647`` is a list of 2^31 slots, 16 GiB), and hiredis-py offers no setting to
    bound that length (its reader has only ``setmaxbuf``). So every chunk is walked by
    ``_Framing`` before hiredis sees it: header lines read, payloads jumped over by their
    length, at a cost per item, never per payload byte (one ``re`` match for a typical
    reply, one Python step more per bulk string of 1000 bytes or more). An aggregate header
    (``*``, ``~``, ``>``, ``%``, ``|``) announcing more than ``max_items`` elements (a
    map's or an attribute's pairs count twice, as in ``PythonParser``) is refused with
    ``ProtocolError``, and so is anything the walk cannot frame, notably a bulk payload not
    followed by CRLF, which hiredis would skip unchecked.
    The bytes of the chunk before the refused item still reach hiredis, and the replies they
    complete are handed out by ``gets`` before it raises.
    """

    def __init__(
        self, *, max_reply_size: int = DEFAULT_MAX_REPLY_SIZE, max_items: int = DEFAULT_MAX_ITEMS
    ) -> None:
        self._reader = self._new_reader()
        self._max_reply_size = max_reply_size
        self._framing = _Framing(max_items)
        self._walk = self._framing.walk
        self._pending = 0  # bytes received since the last complete reply
        self._broken: str | None = None  # the failure's message: see PythonParser
        self._ready: deque[Any] = deque()  # replies completed before a refused item

    def feed(self, data: bytes) -> None:
        """Append bytes received from Redis."""
        self._pending += len(data)
        if self._broken is None:
            refused = self._walk(data)
            if refused < 0:
                self._reader.feed(data)
            else:
                self._refuse(data, refused)

    def feed_gets(self, data: bytes) -> Any:
        """``feed(data)``, then the next complete reply, or ``NEED_DATA``: ``gets``' usual
        path inlined (a read's first step in one Python call, not two); a broken reader, a
        refused chunk or an incomplete reply past the bound is left to ``gets``, which
        raises as it does."""
        self._pending += len(data)
        if self._broken is None:
            refused = self._walk(data)
            if refused >= 0:
                self._refuse(data, refused)
                return self.gets()
            reader = self._reader
            reader.feed(data)
            try:
                reply = reader.gets()
            except Exception as exc:
                raise self._failed(exc) from None
            if reply is not NEED_DATA:
                self._pending = reader.len()  # what follows belongs to the next replies
                return reply
            if self._pending <= self._max_reply_size:
                return reply
        return self.gets()

    def gets(self) -> Any:
        """Return the next complete reply, or ``NEED_DATA``."""
        if self._broken is not None:
            if self._ready:
                return self._ready.popleft()
            raise ProtocolError(self._broken)
        try:
            reply = self._reader.gets()
        except Exception as exc:
            raise self._failed(exc) from None
        if reply is NEED_DATA:
            if self._pending > self._max_reply_size:
                message = self._give_up(
                    f"reply larger than the limit of {self._max_reply_size} bytes"
                )
                raise ProtocolError(message)
        else:
            # What is still buffered belongs to the replies that follow.
            self._pending = self._reader.len()
        return reply

    def _refuse(self, data: bytes, at: int) -> None:
        """Give up on ``data`` from offset ``at``, where the walk refused an item: the
        replies the bytes before it complete are kept for ``gets``, which then raises."""
        reader = self._reader
        if at:
            reader.feed(data[:at])
        while True:
            try:
                reply = reader.gets()
            except Exception as exc:
                self._failed(exc)  # raised by gets, after the replies taken before it
                return
            if reply is NEED_DATA:
                break
            self._ready.append(reply)
        self._give_up(self._framing.error)

    @staticmethod
    def _new_reader() -> Any:
        import hiredis

        return hiredis.Reader(
            protocolError=ProtocolError, replyError=ReplyError, notEnoughData=NEED_DATA
        )

    def _failed(self, exc: Exception) -> ProtocolError:
        """What to raise for ``exc`` from the reader (given up on: see ``_give_up``)."""
        if isinstance(exc, ProtocolError):
            self._give_up(str(exc))
            return exc
        return ProtocolError(self._give_up(f"malformed reply: {exc}"))

    def _give_up(self, message: str) -> str:
        self._broken = message
        # hiredis sizes an aggregate by its announced length before any element arrives
        # (``*2147483647`` is a 16 GiB list, its pages mapped only as they are touched, but the
        # GC walks every slot: seconds per collection). The reader is not trusted again: let
        # what it holds go now, not when this parser is freed.
        self._reader = self._new_reader()
        return message


def hiredis_available() -> bool:
    """Tell whether the hiredis parser can be used, without importing it."""
    import importlib.util

    return importlib.util.find_spec("hiredis") is not None


def make_parser(kind: str | None = None, *, max_reply_size: int = DEFAULT_MAX_REPLY_SIZE) -> Any:
    """Make a reply parser.

    ``kind`` is ``"python"``, ``"hiredis"`` or ``None`` for the default: the environment
    variable ``MINIDASGI_RESP_PARSER`` when set, else hiredis when it is installed.
    """
    if kind is None:
        kind = os.environ.get("MINIDASGI_RESP_PARSER") or None
    if kind is None:
        kind = "hiredis" if hiredis_available() else "python"
    if kind == "python":
        return PythonParser(max_reply_size=max_reply_size)
    if kind == "hiredis":
        try:
            return HiredisParser(max_reply_size=max_reply_size)
        except ImportError:
            raise ImportError(
                "the hiredis RESP parser was asked for but hiredis is not installed: "
                "pip install 'minidasgi[hiredis]'"
            ) from None
    raise ValueError(f"unknown RESP parser {kind!r}: use 'python' or 'hiredis'")
