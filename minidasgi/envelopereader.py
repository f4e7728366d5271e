"""A reader of format 3 (``jsoncodec``) specialised for the usual request envelope's fields.

Owns one shortcut, the reading twin of ``envelopewriter`` (and the envelope's counterpart of
``responsereader``): the fields of an envelope whose scope is uvicorn's (its keys in the order
of its h11 protocol or of its httptools one, as ``envelopewriter`` writes them) and whose
events are at most one ``http.request``, read with regular expressions over the head instead
of the general scanner, which calls back into Python for every bytes marker and every float
(the texts of the scope and of the fields around the queued time, alike from a request to the
next, are read once and kept by their text, in bounded tables).
The expressions accept only text whose meaning leaves no choice: fixed keys in a fixed order,
strings of printable ASCII without escapes, ints without sign or leading zero of at most 9
digits, plain decimal floats short enough for ``jsoncodec``'s bound on number literals, ``0E0``
markers exactly where bytes go; the prefix, the table of lengths and the markers' count are
checked as ``jsoncodec.decode`` checks them. Anything else, however slightly unusual (an
escape, a space, an exponent, another key or order, a second event), makes ``try_decode``
return None, and the caller uses ``jsoncodec.decode``, which decides. So the value never
depends on which path read it (``tests/test_envelopereader.py`` compares the two, fuzzed). Must
never accept a message the general path would refuse or read differently; what the fields mean
(their ranges) is ``wire.Envelope.decode``'s business, which for a value read here checks only
lengths and ranges: the types the expression admits (a finite float where a number goes, ints,
True flags) are part of this reader's contract.
"""

from __future__ import annotations

import re
import struct
from typing import Any, Final

from . import jsoncodec, memo

__all__ = ["Fields", "try_decode", "try_fields"]

_PREFIX: Final = struct.Struct(">BII")  # as jsoncodec: version, head length, bytes values
_LENGTHS: Final = [struct.Struct(f">{n}I") for n in range(68)]  # the usual tables of lengths
_STRING: Final = rb'"([!#-\[\]-~]*)"'  # what json reads as the text between the quotes, unchanged
_INT: Final = rb"(0|[1-9][0-9]{0,8})"  # what json reads as an int, and int() likewise
# A float json hands to jsoncodec's parse_float, at most 32 characters (its bound): float().
_FLOAT: Final = rb"(-?(?:0|[1-9][0-9]{0,12})\.[0-9]{1,17})"
_ADDRESS: Final = rb"(?:null|\[" + _STRING + rb"," + _INT + rb"\])"
_START: Final = re.compile(rb'\{"deadline":' + _FLOAT + rb',"scope":')
_SCOPE_START: Final = b"".join(
    [
        rb'\{"type":' + _STRING,
        rb',"asgi":\{"version":' + _STRING + rb',"spec_version":' + _STRING + rb"\}",
        rb',"http_version":' + _STRING + rb',"server":' + _ADDRESS,
        rb',"client":' + _ADDRESS + rb',"scheme":' + _STRING,
    ]
)
_HEADERS: Final = rb',"headers":\[((?:\[0E0,0E0\](?:,\[0E0,0E0\])*)?)\]'
_SCOPE: Final = re.compile(
    b"".join(
        [
            _SCOPE_START + rb',"method":' + _STRING,
            rb',"root_path":' + _STRING + rb',"path":' + _STRING,
            rb',"raw_path":0E0,"query_string":0E0' + _HEADERS + rb"\}",
        ]
    )
)
"""Uvicorn's scope (its h11 protocol's key order) as ``envelopewriter`` writes it: groups for
its strings and addresses and the header markers."""
_HTTPTOOLS_SCOPE: Final = re.compile(
    b"".join(
        [
            _SCOPE_START + rb',"root_path":' + _STRING + _HEADERS,
            rb',"method":' + _STRING + rb',"path":' + _STRING,
            rb',"raw_path":0E0,"query_string":0E0\}',
        ]
    )
)
"""The same scope in the key order of uvicorn's httptools protocol: the same groups, the root
path and the header markers before the method."""
_EVENTS: Final = b',"events":['
_QUEUED: Final = b',"queued":'
_BEFORE_QUEUED: Final = re.compile(
    rb',"events":\[(?:\{"type":"http\.request","body":0E0,"more_body":(true|false)\})?\]'
    rb',"window":' + _INT + rb',"liveness":' + _FLOAT
)
"""The fields between the scope and the queued time: groups for the event's ``more_body``,
the window and the liveness."""
_QUEUED_TIME: Final = re.compile(_FLOAT)
_AFTER_QUEUED: Final = re.compile(
    b"".join(
        [
            rb'(?:,"piece":' + _INT + rb")?",
            rb'(,"confirms":true)?',
            rb'(?:,"unit":' + _INT + rb")?",
            rb'(,"ack_send":true)?',
            rb'(?:,"link":' + _STRING + rb")?",
            rb"\}",
        ]
    )
)
"""The fields after the queued time: groups for the optional fields."""
_Before = tuple[bool | None, int, float]
_After = tuple["int | None", bool, "int | None", bool, str]
_BEFORES: Final[dict[bytes, _Before]] = {}
_AFTERS: Final[dict[bytes, _After]] = {}
"""What the texts around the queued time were read as, by the texts: a distributor writes
the same ones for every request but for a body that streams (their expressions bound their
lengths, so a kept key is short)."""
_Scope = tuple[str, str, str, str, Any, Any, str, str, str, str, int, bool]
_SCOPES: Final[dict[bytes, _Scope]] = {}
"""What ``_SCOPE`` read from a scope's text, by the text: a connection's requests to a route
have the same scope but for their bytes values (in the tail)."""
_last_before: tuple[bytes | None, _Before] = (None, (None, 0, 0.0))
_last_after: tuple[bytes | None, _After] = (None, (None, False, None, False, ""))
_last_scope: tuple[bytes | None, _Scope] = (
    None,
    ("", "", "", "", None, None, "", "", "", "", 0, False),
)
"""The last text each table was asked for, with its value: a distributor's requests to a
route come alike one after the other, and comparing a text with the last one is a
``memcmp``, where a table lookup first hashes the fresh slice (siphash, about 6 instructions
a byte). None until a text was read: no text equals it."""
_Layout = tuple[int, int, int, int, int, bytes, bytes, _Before, _After]
_last_layout: _Layout = (
    -1,
    0,
    0,
    0,
    0,
    b"",
    b"",
    (None, 0, 0.0),
    (None, False, None, False, ""),
)
"""Where the last envelope read had its fields: ``(head length, scope start, scope end,
queued time's start, queued time's end, the text from the scope's end to the queued time,
the text after it, what those two texts were read as)``. No head has length -1."""
_MAX_SCOPES: Final = memo.BOUND
_MAX_KEPT: Final = 2048
"""The longest scope text kept: whoever may push on a route's queue chooses these keys, and a
client its path (so a scope with a long path is read each time, never kept)."""
_DEPTH: Final = 4  # the fields, the scope, its headers, a header

Fields = tuple[
    float,
    dict[str, Any],
    list[dict[str, Any]],
    int,
    float,
    float,
    "int | None",
    bool,
    "int | None",
    bool,
    str,
]
"""A usual envelope's fields, in the order they travel, as read: deadline, scope, events,
window, liveness, queued, piece (None: absent), confirms, unit (None: absent), ack_send,
link ("": absent)."""


def try_decode(
    data: bytes | memoryview,
    *,
    max_size: int,
    max_items: int = jsoncodec.DEFAULT_MAX_ITEMS,
    max_depth: int = 32,
) -> dict[str, Any] | None:
    """The value ``jsoncodec.decode`` gives for ``data`` with these bounds, when ``data`` is a
    usual envelope's fields; None when it is not (then only the general path decides: the
    message may still be valid, or not)."""
    fields = try_fields(data, max_size=max_size, max_items=max_items, max_depth=max_depth)
    if fields is None:
        return None
    deadline, scope, events, window, liveness, queued, piece, confirms, unit, ack_send, link = (
        fields
    )
    value: dict[str, Any] = {
        "deadline": deadline,
        "scope": scope,
        "events": events,
        "window": window,
        "liveness": liveness,
        "queued": queued,
    }
    if piece is not None:
        value["piece"] = piece
    if confirms:
        value["confirms"] = True
    if unit is not None:
        value["unit"] = unit
    if ack_send:
        value["ack_send"] = True
    if link:
        value["link"] = link
    return value


def try_fields(
    data: bytes | memoryview,
    *,
    max_size: int,
    max_items: int = jsoncodec.DEFAULT_MAX_ITEMS,
    max_depth: int = 32,
    asgi: bool = False,
) -> Fields | None:
    """``try_decode``'s value as a tuple (``Fields``), for a reader that takes the fields one
    by one (``wire.Envelope.decode``) and so need not look each up in a dict built for it.

    ``asgi``: the scope's header pairs, server and client as tuples, as an ASGI server gives
    them, instead of the lists ``jsoncodec.decode`` gives (the same values otherwise): a
    Node hands the scope to its app, and made each a tuple again."""
    global _last_before, _last_after, _last_scope, _last_layout
    if type(data) is not bytes:
        return None
    size = len(data)
    if size > max_size or size < _PREFIX.size or data[0] != jsoncodec.VERSION:
        return None
    _, head_size, count = _PREFIX.unpack_from(data)
    head_end = _PREFIX.size + head_size
    tail_start = head_end + 4 * count
    if tail_start > size or head_size >= max_items or max_depth < _DEPTH or count > max_items:
        return None
    last_layout = _last_layout  # one read of a global: a consistent entry, whatever the threads
    start: re.Match[bytes] | None = None
    queued: re.Match[bytes] | None = None
    before: _Before
    after: _After
    if head_size == last_layout[0] and data.startswith(last_layout[5], last_layout[2]):
        # Laid out as the last envelope read (a distributor's requests come alike, and at the
        # same positions while the deadline's, the queued time's and the scope's lengths are
        # the same: a connection's, or any other's whose client port has as many digits):
        # the texts between the scope and the queued time and after it are compared where
        # they were, not found again, and only the deadline and the queued time are read.
        scope_start, scope_end, queued_start, queued_end = last_layout[1:5]
        if data.startswith(last_layout[6], queued_end):
            # The deadline's text and the scope's key end exactly where the scope began.
            start = _START.fullmatch(data, _PREFIX.size, scope_start)
            queued = _QUEUED_TIME.fullmatch(data, queued_start, queued_end)
        before, after = last_layout[7], last_layout[8]
    if start is None or queued is None:
        start = _START.match(data, _PREFIX.size, head_end)
        if start is None:
            return None
        scope_start = start.end()
        scope_end = data.find(_EVENTS, scope_start, head_end)
        # After the scope, the texts around the queued time (the only field that changes from
        # a request to the next) are read once, and the queued time by itself: as one
        # expression, the fields cost the regular expression engine a step per character of
        # each request.
        queued_at = data.find(_QUEUED, scope_end, head_end) if scope_end >= 0 else -1
        if queued_at < 0:
            return None
        before_text = data[scope_end:queued_at]
        last_before = _last_before  # one read of a global: a consistent pair, whatever threads
        if before_text == last_before[0]:
            before = last_before[1]
        else:
            read_before = _BEFORES.get(before_text)
            if read_before is None:
                read_before = _before(before_text)
                if read_before is None:
                    return None
                memo.keep(_BEFORES, before_text, read_before, _MAX_SCOPES)
            before = read_before
            _last_before = (before_text, before)
        queued_start = queued_at + len(_QUEUED)
        queued_end = data.find(b",", queued_start, head_end)  # a number holds no comma
        if queued_end < 0:
            queued_end = head_end - 1  # no optional field: only the closing brace may follow
        queued = _QUEUED_TIME.fullmatch(data, queued_start, queued_end)
        if queued is None:
            return None
        after_text = data[queued_end:head_end]
        last_after = _last_after
        if after_text == last_after[0]:
            after = last_after[1]
        else:
            read_after = _AFTERS.get(after_text)
            if read_after is None:
                read_after = _after(after_text)
                if read_after is None:
                    return None
                memo.keep(_AFTERS, after_text, read_after, _MAX_SCOPES)
            after = read_after
            _last_after = (after_text, after)
        _last_layout = (
            head_size,
            scope_start,
            scope_end,
            queued_start,
            queued_end,
            data[scope_end:queued_start],
            after_text,
            before,
            after,
        )
    text = data[scope_start:scope_end]
    last_scope = _last_scope
    template: _Scope | None
    if text == last_scope[0]:
        template = last_scope[1]
    else:
        template = _SCOPES.get(text)
        if template is None:
            template = _scope(text)
            if template is None:
                return None
            if len(text) <= _MAX_KEPT:
                memo.keep(_SCOPES, text, template, _MAX_SCOPES)
        if len(text) <= _MAX_KEPT:
            _last_scope = (text, template)
    (
        kind,
        version,
        spec_version,
        http_version,
        server,
        client,
        scheme,
        method,
        root_path,
        path,
        headers_count,
        httptools,
    ) = template
    more, window, liveness = before
    piece, confirms, unit, ack_send, link = after
    # Two markers for the paths, two per header, one for the event's body.
    markers = 2 + 2 * headers_count + (more is not None)
    if count != markers:
        return None
    layout = _LENGTHS[count] if count < len(_LENGTHS) else struct.Struct(f">{count}I")
    lengths = layout.unpack_from(data, head_end)
    if sum(lengths) != size - tail_start:
        return None
    # The tail holds the paths' values then the headers' in h11's key order, the headers'
    # then the paths' in httptools', then the body's.
    position = tail_start
    first = 0
    if not httptools:
        position += lengths[0] + lengths[1]
        first = 2
    headers: list[Any] = []
    if asgi:
        for index in range(first, first + 2 * headers_count, 2):
            middle = position + lengths[index]
            end = middle + lengths[index + 1]
            headers.append((data[position:middle], data[middle:end]))
            position = end
        server_value, client_value = server, client  # the template's tuples: immutable
    else:
        for index in range(first, first + 2 * headers_count, 2):
            middle = position + lengths[index]
            end = middle + lengths[index + 1]
            headers.append([data[position:middle], data[middle:end]])
            position = end
        server_value = None if server is None else list(server)
        client_value = None if client is None else list(client)
    paths = position if httptools else tail_start
    index = first + 2 * headers_count if httptools else 0
    middle = paths + lengths[index]
    end = middle + lengths[index + 1]
    raw_path = data[paths:middle]
    query_string = data[middle:end]
    events = []
    if more is not None:
        body = data[end if httptools else position :]
        events.append({"type": "http.request", "body": body, "more_body": more})
    versions = {"version": version, "spec_version": spec_version}
    if httptools:
        scope = {
            "type": kind,
            "asgi": versions,
            "http_version": http_version,
            "server": server_value,
            "client": client_value,
            "scheme": scheme,
            "root_path": root_path,
            "headers": headers,
            "method": method,
            "path": path,
            "raw_path": raw_path,
            "query_string": query_string,
        }
    else:
        scope = {
            "type": kind,
            "asgi": versions,
            "http_version": http_version,
            "server": server_value,
            "client": client_value,
            "scheme": scheme,
            "method": method,
            "root_path": root_path,
            "path": path,
            "raw_path": raw_path,
            "query_string": query_string,
            "headers": headers,
        }
    return (
        float(start[1]),
        scope,
        events,
        window,
        liveness,
        float(queued[0]),
        piece,
        confirms,
        unit,
        ack_send,
        link,
    )


def _before(text: bytes) -> _Before | None:
    """The event's ``more_body`` (None: no event), the window and the liveness the fields
    between the scope and the queued time hold, or None if they are not the usual ones."""
    match = _BEFORE_QUEUED.fullmatch(text)
    if match is None:
        return None
    more, window, liveness = match.groups()
    return None if more is None else more == b"true", int(window), float(liveness)


def _after(text: bytes) -> _After | None:
    """The optional fields after the queued time (piece, confirms, unit, ack_send), or None
    if they are not the usual ones."""
    match = _AFTER_QUEUED.fullmatch(text)
    if match is None:
        return None
    piece, confirms, unit, ack_send, link = match.groups()
    return (
        None if piece is None else int(piece),
        confirms is not None,
        None if unit is None else int(unit),
        ack_send is not None,
        "" if link is None else link.decode("ascii"),
    )


def _scope(text: bytes) -> _Scope | None:
    """The strings, addresses, header count and key order (httptools' or not) of a scope's
    text, or None if it is not uvicorn's scope as ``envelopewriter`` writes it."""
    match = _SCOPE.fullmatch(text)
    httptools = match is None
    if match is None:
        match = _HTTPTOOLS_SCOPE.fullmatch(text)
        if match is None:
            return None
    groups = match.groups()
    (
        kind,
        version,
        spec_version,
        http_version,
        server_host,
        server_port,
        client_host,
        client_port,
        scheme,
    ) = groups[:9]
    if httptools:
        root_path, pairs, method, path = groups[9:]
    else:
        method, root_path, path, pairs = groups[9:]
    return (
        kind.decode("ascii"),
        version.decode("ascii"),
        spec_version.decode("ascii"),
        http_version.decode("ascii"),
        None if server_host is None else (server_host.decode("ascii"), int(server_port)),
        None if client_host is None else (client_host.decode("ascii"), int(client_port)),
        scheme.decode("ascii"),
        method.decode("ascii"),
        root_path.decode("ascii"),
        path.decode("ascii"),
        (len(pairs) + 1) // 10,  # "[0E0,0E0]" and a comma per header but the last
        httptools,
    )
