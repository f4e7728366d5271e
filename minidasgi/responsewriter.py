"""A writer of format 3 (``jsoncodec``) specialised for the Node's usual HTTP response message.

Owns one shortcut, the writing twin of ``responsereader``: the message a Node sends for a
response, ``[kind, id, [start, body], ...]`` (a ``SEND``, or an ``ACK_SEND`` with the ACK's
scalar arguments after the events), ``start`` an ``http.response.start`` with exactly its
type, an int status and headers as pairs of bytes, and ``body`` the ``http.response.body`` the
Node builds (its type, the body as bytes or a view of bytes, a bool ``more_body``); or the
body alone. It is written straight to the bytes ``jsoncodec.try_encode_parts`` would produce,
without its passes over the text (counting and replacing markers, looking for keys ``json``
may have coerced, bounding depth and ints): the keys are known, the values checked as they
are written, and the one free str (the Node channel) quoted by ``json``'s own C function.
A Node answers a route's requests alike: the head's text around the request id depends only
on the kind, the status, the number of headers, ``more_body`` and the ACK's arguments, so it
is kept by those, with the prefix (which the id's length completes) and the layout of the
table of lengths (a bounded table; their types are part of the key, since ``json`` writes
``1``, ``1.0`` and ``True`` apart, and a zero float, equal to its negative, is never kept),
and the next answer costs a lookup and its checks. ``try_write_body`` takes the same response
as its start, body and flag, for a Node that holds them rather than a body event.
Anything else, however slightly unusual (another key, the keys in another order, a trailers
flag, a status of an int subclass or over 18 digits, a bytearray, a str key or type of a
subclass, U+E000 in a str, a head too long to leave unbounded), makes ``try_write`` return
None, and the caller uses the general path, which decides. So the bytes on the wire never
depend on which path wrote them (``tests/test_responsewriter.py`` compares the two, fuzzed),
and a peer of the previous release reads them as it reads any format-3 message. Decoding is
not its business (``responsereader`` reads the usual ``ACK_SEND``).
"""

from __future__ import annotations

import json.encoder
import struct
from math import isfinite
from typing import Any, Final

from . import jsoncodec, memo

__all__ = ["try_write", "try_write_body"]

_PREFIX: Final = struct.Struct(">BII")  # as jsoncodec: version, head length, bytes values
_quote: Final = json.encoder.encode_basestring  # what jsoncodec's json writer quotes str with
_float_repr: Final = float.__repr__  # what json writes a finite float with
_int_repr: Final = int.__repr__
_INT_BOUND: Final = 10**18  # far below jsoncodec's 128 digits
_MARK: Final = "\ue000"  # the general path's second-pass marker: it decides on values holding it
_MAX_HEAD: Final = jsoncodec.DEFAULT_MAX_ITEMS  # a longer head: the general path bounds it
_GATHER_FROM: Final = 64 * 1024  # as wire.pack_parts: a smaller message travels as one bytes
_START: Final = "http.response.start"
_BODY: Final = "http.response.body"
_PAIR: Final = "[0E0,0E0]"
_PAIR_TYPES: Final = frozenset([tuple, list])
_PAIRS_TEXT: Final = ["[" + ",".join([_PAIR] * n) + "]" for n in range(32)]  # by header count
_MORE: Final = {True: '"more_body":true}]', False: '"more_body":false}]'}
_LENGTHS: Final = [struct.Struct(f">{n}I") for n in range(66)]  # by count: a start's 32 pairs
_TEMPLATES: Final[dict[tuple[Any, ...], tuple[bytes, bytes, struct.Struct]]] = {}
"""The prefix and the head's text around the request id, by what they are written from
(``try_write``): a Node answers a route's requests alike, so only the id and the bytes values
differ."""
_MAX_TEMPLATES: Final = memo.BOUND
_TAIL_TYPES: Final = frozenset([str, bool, int, float])
_last: tuple[Any, ...] = (object(), "", 0, 0, False, 0, (b"", b"", _LENGTHS[0]))
"""The last message's tail (by identity: a Node passes the same ACK arguments for its
usual requests), kind, status, header count, ``more_body``, id length and template, as
``(tail, kind, status, pairs, more, size, template)``: one response after another writes
alike, and comparing these costs less than building the table's key (a tuple of seven,
the tail's types mapped) and hashing it. No tail is the placeholder object until then."""


def try_write(
    kind: str, request_id: str, events: Any, tail: tuple[Any, ...] = ()
) -> bytes | list[bytes | memoryview] | None:
    """``[kind, request_id, events, *tail]`` (``kind`` one of ``wire``'s) as
    ``wire.pack_parts`` writes it in format 3 (bytes, or parts from 64 KiB), when ``events``
    is a response's start and first body, or a body alone, of the usual shape, and ``tail``
    holds only str, bool, small int and finite float values (an ACK's arguments); None for
    anything else (the caller then encodes it the general way). A request id that is not
    plain ASCII letters and digits (every id a distributor makes is hex; a Node's comes from
    an untrusted envelope) gets no shortcut."""
    if type(events) is not list:
        return None
    count = len(events)
    if count == 2:
        start, body_event = events
        if type(start) is not dict:  # (None too, which means no start to try_write_body)
            return None
    elif count == 1:
        start, body_event = None, events[0]
    else:
        return None
    # The few keys are checked one by one: for so few, the maps and sets of a check in C
    # cost more than the Python that does it.
    if type(body_event) is not dict or len(body_event) != 3:
        return None
    first, second, third = body_event
    if not (
        type(first) is str
        and type(second) is str
        and type(third) is str
        and first == "type"
        and second == "body"
        and third == "more_body"
    ):
        return None
    body_kind, body, more = body_event.values()
    if not (type(body_kind) is str and body_kind == _BODY):
        return None
    return try_write_body(kind, request_id, start, body, more, tail)


def try_write_body(
    kind: str,
    request_id: str,
    start: Any,
    body: Any,
    more: Any,
    tail: tuple[Any, ...] = (),
) -> bytes | list[bytes | memoryview] | None:
    """``try_write`` of ``[start, body_event]`` (``[body_event]`` when ``start`` is None),
    ``body_event`` being ``{"type": "http.response.body", "body": body, "more_body": more}``,
    for a caller that holds the body and its flag rather than an event (a Node's usual
    response: no event made for it, nor its keys checked here). The same bytes, or None."""
    if start is not None:
        if type(start) is not dict or len(start) != 3:
            return None
        first, second, third = start
        if not (
            type(first) is str
            and type(second) is str
            and type(third) is str
            and first == "type"
            and second == "status"
            and third == "headers"
        ):
            return None
        start_kind, status, headers = start.values()
        if not (
            type(start_kind) is str
            and start_kind == _START
            and type(status) is int
            and type(headers) in _PAIR_TYPES
        ):
            return None
        parts: list[Any] = []
        for pair in headers:
            if type(pair) not in _PAIR_TYPES or len(pair) != 2:
                return None
            name, value = pair
            if type(name) is not bytes or type(value) is not bytes:
                return None
            parts += pair
        pairs = len(headers)
    else:
        status = pairs = -1  # no start (a status is never written from these)
        parts = []
    if type(more) is not bool:
        return None
    if type(body) is not bytes and not (
        type(body) is memoryview and body.ndim == 1 and body.c_contiguous and body.itemsize == 1
    ):
        return None  # a bytearray (copied by the general path), a strided view, anything else
    if not (type(request_id) is str and request_id.isascii() and request_id.isalnum()):
        return None
    global _last
    size = len(request_id)
    last = _last  # one read of a global: a consistent entry, whatever the threads
    if (
        tail is last[0]
        and kind == last[1]
        and status == last[2]
        and pairs == last[3]
        and more is last[4]
        and size == last[5]
    ):
        template = last[6]  # the last message's: no key to build and hash
    else:
        # Equal keys write the same text: the types are part of the key (True == 1 == 1.0),
        # and a tail with a zero float (0.0 == -0.0) is never kept. With the id's length,
        # the key also tells the head's length, hence the prefix.
        types = tuple(map(type, tail))
        if not _TAIL_TYPES.issuperset(types):
            return None  # (and nothing unhashable in the key)
        key = (kind, status, pairs, more, tail, types, size)
        found = _TEMPLATES.get(key)
        if found is None:
            found = _template(kind, start is not None, status, pairs, more, tail, size)
            if found is None:
                return None
            if not any(value == 0 and type(value) is float for value in tail):
                memo.keep(_TEMPLATES, key, found, _MAX_TEMPLATES)
        template = found
        # By the tail's identity: the same tuple (kept alive here) holds the same values of
        # the same types (immutable, checked above), so its text needs no second look.
        _last = (tail, kind, status, pairs, more, size, template)
    start_text, after, layout = template
    parts.append(body)
    lengths = layout.pack(*map(len, parts))
    if len(body) < _GATHER_FROM:
        # A small body (nearly always): joined with the rest in one step, a message under
        # 64 KiB as one bytes value. Large headers can take it past that: then the head and
        # the body as parts, the body copied a second time (it is small).
        whole = b"".join([start_text, request_id.encode("ascii"), after, lengths, *parts])
        if len(whole) < _GATHER_FROM or (type(body) is memoryview and type(body.obj) is not bytes):
            return whole
        return [whole[: len(whole) - len(body)], body]
    first = b"".join([start_text, request_id.encode("ascii"), after, lengths, *parts[:-1]])
    if type(body) is memoryview and type(body.obj) is not bytes:
        return first + body  # a view of a mutable buffer is copied now, as pack_parts does
    return [first, body]  # the body not copied: it is copied once, into the write


def _template(
    kind: str, started: bool, status: int, pairs: int, more: bool, tail: tuple[Any, ...], size: int
) -> tuple[bytes, bytes, struct.Struct] | None:
    """What a message is written from around its request id of ``size`` characters: the
    prefix and the head's text before the id (its quotes excluded), the head's text after
    it, and the layout of the table of lengths; None if a value is outside what this writer
    writes, or the head is too long to leave unbounded."""
    if started:
        if not -_INT_BOUND < status < _INT_BOUND:
            return None
        pairs_text = (
            _PAIRS_TEXT[pairs]
            if pairs < len(_PAIRS_TEXT)
            else "[" + ",".join([_PAIR] * pairs) + "]"
        )
        status_text = _int_repr(status)
        text = f'[{{"type":"http.response.start","status":{status_text},"headers":{pairs_text}}},'
    else:
        text = "["
    text += '{"type":"http.response.body","body":0E0,' + _MORE[more]
    for value in tail:
        value_type = type(value)
        if value_type is str:
            if _MARK in value:
                return None
            text += "," + _quote(value)
        elif value_type is bool:
            text += ",true" if value else ",false"
        elif value_type is int and -_INT_BOUND < value < _INT_BOUND:
            text += "," + _int_repr(value)
        elif value_type is float and isfinite(value):
            text += "," + _float_repr(value)
        else:
            return None
    before = f'[{_quote(kind)},"'.encode("utf-8", "surrogatepass")
    after = ('",' + text + "]").encode("utf-8", "surrogatepass")
    head_size = len(before) + size + len(after)  # the id is ASCII: a byte per character
    if head_size >= _MAX_HEAD:
        return None
    markers = 2 * pairs + 1 if started else 1  # two values per header, then the body
    prefix = _PREFIX.pack(jsoncodec.VERSION, head_size, markers)
    return prefix + before, after, _lengths(markers)


def _lengths(count: int) -> struct.Struct:
    """The layout of a table of ``count`` lengths (made once for the usual counts)."""
    return _LENGTHS[count] if count < len(_LENGTHS) else struct.Struct(f">{count}I")
