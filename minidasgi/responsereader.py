"""A reader of format 3 (``jsoncodec``) specialised for the usual response message.

Owns one shortcut: the ``ACK_SEND`` message a Node sends for a small response answered at
once (``[ACK_SEND, id, [start, body], node_channel, window, liveness, ...]``, the start's
headers as pairs of bytes), read with one regular expression over its head instead of the
general scanner, which calls back into Python for every bytes marker. A Node answers the
requests of a route alike: the head after the request id (bytes values are in the tail) is
the same from one answer to the next, so what the expression read from it is kept by that
text (a bounded table). The next answer's id is checked in place where the last one's ended
(ASCII letters and digits, then its quote; any other id takes the expression for its end),
and its rest compared with the last one's: the same Node's next answer costs no look-up,
another Node's (another rest) a look-up in the table. The headers read as tuples (for a
distributor) are kept with their lengths and bytes: an answer whose headers' lengths and bytes
equal them gets those pairs (immutable) in a new list. The expression accepts
only text whose meaning leaves no choice: fixed keys in a fixed order, strings of printable
ASCII without escapes, ints without sign or leading zero of at most 9 digits, a plain decimal
float, ``0E0`` markers exactly where bytes go; the prefix, the table of lengths and the markers'
count are checked as ``jsoncodec.decode`` checks them. Anything else, however slightly unusual
(a trailers flag, a header count the table does not match, an escape, a space), makes
``try_decode`` return None, and the caller uses ``jsoncodec.decode``, which decides. So the
value never depends on which path read it (``tests/test_responsereader.py`` compares the two,
fuzzed). Must never accept a message the general path would refuse or read differently;
encoding is not its business.
"""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING, Any, Final

from . import jsoncodec, memo
from .codec import DEFAULT_MAX_DEPTH, DEFAULT_MAX_SIZE

if TYPE_CHECKING:  # in annotations only: reading one is ``jsoncodec.decode``'s business
    from .resp.directread import SplitPayload

__all__ = ["try_decode", "try_parts"]

_PREFIX: Final = struct.Struct(">BII")  # as jsoncodec: version, head length, bytes values
_LENGTHS: Final = [struct.Struct(f">{n}I") for n in range(65)]  # the tables of lengths read
_DEPTH: Final = 5  # the message's list, its events, an event, the headers, a header
_COPIED: Final = 16 * 1024  # bytes of a memoryview copied whole; larger ones take the usual path
_ID_START: Final = 9 + 13  # after the prefix and the start
_CHANNEL: Final = rb'"([!#-\[\]-~]{1,255})"'  # a Node channel: text json reads unchanged
_INT: Final = rb"(0|[1-9][0-9]{0,8})"  # what json reads as an int, and int() likewise
_START: Final = b'["ack-send","'  # the head's start, then the request id
_QUOTE: Final = ord('"')  # the byte after the request id
_START_AND_ID: Final = re.compile(re.escape(_START) + rb'([!#-\[\]-~]+)"')
"""The head's start and the request id (what json reads as the text between the quotes),
in one match: cheaper than a comparison, a search and a match."""
_REST: Final = re.compile(
    b"".join(
        [
            rb'",\[\{"type":"http\.response\.start","status":' + _INT + rb",",
            # At most 31 headers: with the body's, 63 markers, within the tables read.
            rb'"headers":\[((?:\[0E0,0E0\](?:,\[0E0,0E0\]){0,30})?)\]\},',
            rb'\{"type":"http\.response\.body","body":0E0(,"more_body":(?:true|false))?\}\],',
            _CHANNEL + rb"," + _INT + rb",",
            rb"((?:0|[1-9][0-9]{0,8})\.[0-9]{1,17})",  # the liveness: a float (json calls float())
            # No confirmation asked, then the piece size, and perhaps the credit unit.
            rb"(?:,false," + _INT + rb"(?:," + _INT + rb")?)?",
            rb"\]",
        ]
    )
)
"""The usual ``ACK_SEND``'s head after its request id: groups for the status, the header
markers, the body's ``more_body``, the Node channel, the window, the liveness, the piece and
the unit."""
_TEMPLATES: Final[dict[bytes, tuple[int, int, bool | None, tuple[Any, ...]]]] = {}
"""What ``_REST`` read from a head's rest, by the rest: (markers, status, more_body, the ACK's
arguments). A Node answers a route's requests alike: only the id differs. Whoever may publish
on a distributor's channel chooses these keys: ``_REST`` bounds them (31 headers, a channel of
255 characters: under 1 KiB each), and a head it does not match is never kept."""
_MAX_TEMPLATES: Final = memo.BOUND
_LAST: Final[list[tuple[int, bytes, tuple[int, int, bool | None, tuple[Any, ...]]]]] = [
    (_ID_START, b"", (0, 0, None, ()))  # an empty id, refused: the expression decides
]
"""The last head's rest read (where it starts, its text, its template): the next answer of
the same Node differs from it only by its id; another Node's has an id of the same length.
Replaced whole, in one assignment."""


_HEADERS: Final[list[tuple[tuple[int, ...], bytes, tuple[tuple[bytes, bytes], ...]]]] = [
    ((-1,), b"", ())  # lengths no table has: the first answer's headers are read
]
"""The last headers read as tuples: their lengths, their bytes (from the tail) and their
pairs. The same Node's next answer to the same route has the same ones (a content type, a
length): compared, not cut again. Replaced whole, in one assignment."""
_MAX_KEPT_HEADERS: Final = 4096  # bytes of headers kept at most


def _template(rest: bytes) -> tuple[int, int, bool | None, tuple[Any, ...]] | None:
    match = _REST.fullmatch(rest)
    if match is None:
        return None
    status, pairs, more, channel, window, liveness, piece, unit = match.groups()
    ack: tuple[Any, ...] = (channel.decode("ascii"), int(window), float(liveness))
    if piece is not None:
        ack += (False, int(piece))
        if unit is not None:
            ack += (int(unit),)
    # "[0E0,0E0]" and a comma per header but the last: two markers each, and the body's.
    markers = (len(pairs) + 1) // 5 + 1
    more_body = None if more is None else more == b',"more_body":true'
    return markers, int(status), more_body, ack


def try_decode(
    data: bytes | memoryview | SplitPayload,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_items: int = jsoncodec.DEFAULT_MAX_ITEMS,
    max_depth: int = DEFAULT_MAX_DEPTH,
    tuples: bool = False,
) -> list[Any] | None:
    """The value ``jsoncodec.decode`` gives for ``data`` with these bounds, when ``data`` is
    a usual ``ACK_SEND`` message; None when it is not (then only the general path decides:
    the message may still be valid, or not). With ``tuples``, the same but for the start's
    header pairs, tuples rather than lists (what a distributor hands its server: no pass to
    convert them afterwards)."""
    parts = try_parts(
        data, max_size=max_size, max_items=max_items, max_depth=max_depth, tuples=tuples
    )
    if parts is None:
        return None
    request_id, events, ack = parts
    return ["ack-send", request_id, events, *ack]


def try_parts(
    data: bytes | memoryview | SplitPayload,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_items: int = jsoncodec.DEFAULT_MAX_ITEMS,
    max_depth: int = DEFAULT_MAX_DEPTH,
    tuples: bool = False,
) -> tuple[str, list[Any], tuple[Any, ...]] | None:
    """``try_decode``'s value in its parts, for a reader that takes them apart (a
    distributor): the request id, the list of events, and the ACK's arguments as a tuple
    (the one kept for the head: immutable, never copied). No list made of them, nor sliced
    again into the SEND's and the ACK's arguments."""
    if type(data) is not bytes:
        # A small view (a message of a batch frame) is copied whole, once: slicing bytes then
        # gives the bytes values with no view each. A larger one, or another buffer: as usual.
        if not (type(data) is memoryview and len(data) <= _COPIED and data.format == "B"):
            return None
        data = data.tobytes()
    size = len(data)
    if size > max_size or size < _PREFIX.size or data[0] != jsoncodec.VERSION:
        return None
    _, head_size, count = _PREFIX.unpack_from(data)
    head_end = _PREFIX.size + head_size
    tail_start = head_end + 4 * count
    if tail_start > size or head_size >= max_items or max_depth < _DEPTH:
        return None
    id_end, last_rest, template = _LAST[0]
    request_id = data[_ID_START:id_end]
    if (
        # An id of the last one's length, its quote, and the start, checked in place: the
        # same end as the expression's, without it (about 1.3k instructions). Letters and
        # digits (ASCII: bytes' isalnum) are all in the id's character class, and no quote
        # among them: the expression ends the id at the first quote after them, as here.
        id_end < head_end
        and data[id_end] == _QUOTE
        and request_id.isalnum()
        and data[_PREFIX.size : _ID_START] == _START
    ):
        rest = data[id_end:head_end]
    else:
        start_and_id = _START_AND_ID.match(data, _PREFIX.size, head_end)
        if start_and_id is None:
            return None
        id_end = start_and_id.end(1)
        request_id = data[_ID_START:id_end]
        rest = data[id_end:head_end]
        last_rest = b""  # kept anew below, with this id's end: a rest is never empty
    if rest != last_rest:
        # Another Node's answer (or another route's): its template by the rest, as the
        # same Node's next answer needs no lookup.
        kept = _TEMPLATES.get(rest)
        if kept is None:
            kept = _template(rest)
            if kept is None:
                return None
            memo.keep(_TEMPLATES, rest, kept, _MAX_TEMPLATES)
        template = kept
        _LAST[0] = (id_end, rest, template)
    markers, status, more, ack = template
    if count != markers or count >= len(_LENGTHS):
        return None
    lengths = _LENGTHS[count].unpack_from(data, head_end)
    if sum(lengths) != size - tail_start:
        return None
    position = size - lengths[-1]  # the body's start, after the headers
    kept_lengths, kept_bytes, kept_pairs = _HEADERS[0]
    if tuples and lengths[:-1] == kept_lengths and data[tail_start:position] == kept_bytes:
        # The headers of the last answer read (a Node answers a route's requests alike):
        # its pairs, immutable, in a new list (the server may change the list it is handed).
        headers: list[Any] = [*kept_pairs]
    else:
        headers = []
        index_end = count - 1
        position = tail_start
        # The headers' lengths, then the body's. Two loops: a pair built by its display
        # either way, not by a call.
        if tuples:
            for index in range(0, index_end, 2):
                middle = position + lengths[index]
                end = middle + lengths[index + 1]
                headers.append((data[position:middle], data[middle:end]))
                position = end
            if position - tail_start <= _MAX_KEPT_HEADERS:
                _HEADERS[0] = (lengths[:-1], data[tail_start:position], tuple(headers))
        else:
            for index in range(0, index_end, 2):
                middle = position + lengths[index]
                end = middle + lengths[index + 1]
                headers.append([data[position:middle], data[middle:end]])
                position = end
    body: dict[str, Any] = {"type": "http.response.body", "body": data[position:]}
    if more is not None:
        body["more_body"] = more
    start = {"type": "http.response.start", "status": status, "headers": headers}
    return request_id.decode("ascii"), [start, body], ack
