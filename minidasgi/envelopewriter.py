"""A writer of format 3 (``jsoncodec``) specialised for the usual request envelope.

Owns one shortcut: the fields of an ``Envelope`` whose scope has the shape ASGI servers give
(known keys; str, bytes, small int and None values; headers as pairs of bytes) and whose events
are plain ``http.request`` events, written straight to the bytes ``jsoncodec.try_encode_parts``
would produce, without its passes over the text (counting and replacing markers, looking for
keys ``json`` may have coerced, bounding depth and ints): here the keys are known and the
values checked as they are written. Anything else, however slightly unusual (a str key outside
the known ones, a bytearray, a float in the scope, U+E000 anywhere, an int of 19 digits), makes
``try_encode_parts`` return None, and the caller uses the general path, which decides. So the
bytes on the wire never depend on which path wrote them (``tests/test_envelopewriter.py``
compares the two, fuzzed). Uvicorn's scope (its keys in the order of its h11 protocol or of its
httptools one) is written in one expression, and the text of its start (type, ASGI versions,
HTTP version, the address pairs, scheme), the same for every request of a connection, is kept
by the client pair's id (a small cache holding the pairs: their ids cannot be reused while
they are in it), with the connection's last request: a request equal to it in all the rest
is written from its kept text (its values checked of the exact types first, as the writer
checks them, headers included, and compared by ``==`` against private copies of those types,
never by identity: a list may change after it was written; so a value of another type that
compares equal, a memoryview or a subclass, is declined as it is with nothing kept). The
settings a distributor writes into every envelope (window, liveness, piece, unit, flags) are
kept as text with the very objects they came from, and a float of whole milliseconds (the
distributor's timestamps) is written from ints. Must never accept a value the general path
would refuse or write differently; decoding is not its business (the Node decodes with
``jsoncodec.decode``).
"""

from __future__ import annotations

import json.encoder
import struct
from math import isfinite
from typing import Any, Final

from . import jsoncodec, memo

__all__ = ["PLAIN_SCOPE_KEYS", "try_encode_parts"]

_PREFIX: Final = struct.Struct(">BII")  # as jsoncodec: version, head length, bytes values
_quote: Final = json.encoder.encode_basestring  # what jsoncodec's json writer quotes str with
_float_repr: Final = float.__repr__  # what json writes a finite float with
_int_repr: Final = int.__repr__
_FRACTIONS: Final = tuple(f".{n:03d}".rstrip("0") if n else ".0" for n in range(1000))
"""The text after a float's whole part, by its thousandths, as repr writes it."""
_LENGTHS: Final = [struct.Struct(f">{n}I") for n in range(65)]  # the tail's tables of lengths
_INT_BOUND: Final = 10**18  # far below jsoncodec's 128 digits
_MAX_MILLIS: Final = 10**15  # milliseconds written from ints: at most 15 significant digits
_SECONDS: Final[list[tuple[int, str, int, str]]] = [(-1000, "", -1000, "")]
"""The whole seconds of the last envelope's queued time and deadline, each as its first
millisecond and its text, for the next envelopes of those seconds (``try_encode_parts``);
replaced whole, in one assignment. Its start matches no time (they are never negative)."""
_MARK: Final = "\ue000"  # the general path's second-pass marker: it decides on values holding it

PLAIN_SCOPE_KEYS: Final = frozenset(
    {
        "type",
        "asgi",
        "http_version",
        "method",
        "scheme",
        "path",
        "raw_path",
        "query_string",
        "root_path",
        "headers",
        "client",
        "server",
        "subprotocols",
    }
)
"""Scope keys whose values an ASGI server gives as str, bytes, int, lists and tuples of those,
or the small "asgi" dict (the distributor lets them travel unchecked one by one; this writer
writes them, or declines a value of another shape)."""
# Keys are written as they are: none ends in a digit nor is a word json writes for a coerced
# key, so the general path would not decline them either.
_SCOPE_KEYS: Final = {name: f'"{name}":' for name in PLAIN_SCOPE_KEYS}
"""The scope keys written, each to its text (a str key of a subclass is written as the
constant it equals)."""
_ASGI_KEYS: Final = {name: f'"{name}":' for name in ("version", "spec_version")}
"""The keys of ``scope["asgi"]``, each to its text: written as constants, like the scope's
keys, never formatted from the key itself (a str subclass formats as its ``__str__`` says)."""
_REQUEST_EVENT_KEYS: Final = ("type", "body", "more_body")
_ONE_REQUEST: Final = {
    more: f'[{{"type":"http.request","body":0E0,"more_body":{"true" if more else "false"}}}]'
    for more in (False, True)
}
"""The events' text when they are one ``http.request`` event, by its ``more_body``."""
_PAIR: Final = "[0E0,0E0]"
_PAIR_TYPES: Final = frozenset([tuple, list])
_PAIRS_TEXT: Final = ["[" + ",".join([_PAIR] * n) + "]" for n in range(32)]  # by header count
_UVICORN_KEYS: Final = (
    "type",
    "asgi",
    "http_version",
    "server",
    "client",
    "scheme",
    "method",
    "root_path",
    "path",
    "raw_path",
    "query_string",
    "headers",
)
"""The scope's keys as uvicorn's h11 protocol gives them, in its order (``_uvicorn_scope``)."""
_HTTPTOOLS_KEYS: Final = (
    "type",
    "asgi",
    "http_version",
    "server",
    "client",
    "scheme",
    "root_path",
    "headers",
    "method",
    "path",
    "raw_path",
    "query_string",
)
"""The same keys as uvicorn's httptools protocol gives them: it makes the scope when the
request line starts and adds the method and the paths when the URL is parsed."""
_UVICORN_STATE_KEYS: Final = (*_UVICORN_KEYS, "state")
"""Uvicorn's h11 scope as it gives it, with the copy of its lifespan's ``state`` last."""
_HTTPTOOLS_STATE_KEYS: Final = (*_HTTPTOOLS_KEYS[:8], "state", *_HTTPTOOLS_KEYS[8:])
"""Uvicorn's httptools scope as it gives it: ``state`` after the headers, before the method
and the paths."""
_UVICORN_ASGI_KEYS: Final = ("version", "spec_version")
_STARTS: Final[dict[int, tuple[Any, ...]]] = {}
"""The text of a uvicorn scope's start (its type, ASGI versions, HTTP version, addresses and
scheme) by the client pair's id: a server gives the same pairs to every request of a
connection (uvicorn does), and a connection makes many requests, alike in these. With it,
the connection's last request (its method, path, root path, headers, the scope's whole text
and the header bytes): a keep-alive connection's requests mostly repeat them (a client
polling, a browser fetching one page's parts), and an equal request's scope is written by
comparing instead of checking and formatting. Each entry replaced whole, in one assignment
(another thread's distributor may be writing too)."""
_MAX_STARTS: Final = memo.BOUND
_SKIP: Final = 8
"""Requests of a connection not kept after one that differed from the last one kept: where a
connection's requests differ (a per-request id, another path each time), keeping each one
and comparing the next with it costs more than the general path alone (``bench/README.md``,
``--vary``); where they repeat, a change costs at most these few written anew."""
_MAX_KEPT_VALUES: Final = 64
"""Header names and values at most (32 headers) of a request kept with its start."""
_MAX_KEPT_SIZE: Final = 4096
"""The scope's text (ASCII only: a byte a character) and header bytes, at most, of a request
kept with its start. An entry holds more than that (the text, the start's text again, the
method and paths again as strs, the values, the tuples and the list): about 9 KiB at most
(tracemalloc: 8.8 KiB an entry for the longest ASCII path kept, less for 32 headers or a path
the text escapes), so ``_STARTS`` stays under about 2.5 MiB whatever the requests."""


def try_encode_parts(
    deadline: Any,
    scope: Any,
    events: Any,
    window: Any,
    liveness: Any,
    queued: Any,
    piece: Any,
    usual_piece: int,
    confirms: bool = False,
    unit: Any = 0,
    ack_send: bool = False,
    drop_state: bool = False,
    millis: bool = False,
    link: Any = "",
) -> list[bytes] | None:
    """The format-3 message of an envelope's fields as ``jsoncodec.try_encode_parts`` writes
    the dict ``Envelope.fields`` builds of them (with the default bounds): keys in that order,
    ``piece`` only when it differs from ``usual_piece``, ``confirms``, ``unit`` and
    ``ack_send`` only when true. None when they are not of the usual shape. With
    ``drop_state``, a scope of uvicorn's keys and its ``state`` is written as if it had no
    ``state`` (the distributor's portable scope, without the copy that makes it). With
    ``millis``, ``deadline`` and ``queued`` are whole milliseconds, ints (the distributor
    takes its times so), and the envelope's times the floats they make over 1000: written
    from the ints, with no float taken apart (``_number``)."""
    if type(scope) is not dict or type(events) is not list:
        return None
    blobs: list[bytes] = []
    scope_text = _scope(scope, blobs, drop_state)
    if scope_text is None:
        return None
    events_text = _events(events, blobs)
    if not millis:
        deadline_text = _number(deadline)
        queued_text = _number(queued)
    elif type(deadline) is int and type(queued) is int and 0 <= queued <= deadline < _MAX_MILLIS:
        # The floats nearest decimals of at most 15 significant digits: ``_number``'s text
        # for them, written from the ints. The whole seconds' text is the last envelope's
        # while both times stay in the seconds it wrote (a second's requests): a subtraction
        # instead of a divmod and a str each (about 2k instructions per envelope).
        queued_start, queued_whole, deadline_start, deadline_whole = _SECONDS[0]
        queued_fraction = queued - queued_start
        deadline_fraction = deadline - deadline_start
        if not (0 <= queued_fraction < 1000 and 0 <= deadline_fraction < 1000):
            seconds, queued_fraction = divmod(queued, 1000)
            queued_whole = str(seconds)
            seconds, deadline_fraction = divmod(deadline, 1000)
            deadline_whole = str(seconds)
            _SECONDS[0] = (
                queued - queued_fraction,
                queued_whole,
                deadline - deadline_fraction,
                deadline_whole,
            )
        deadline_text = deadline_whole + _FRACTIONS[deadline_fraction]
        queued_text = queued_whole + _FRACTIONS[queued_fraction]
    else:  # out of those bounds (or not ints): the floats, as the general path has them
        deadline_text = _number(deadline / 1000)
        queued_text = _number(queued / 1000)
    settings = _settings(window, liveness, piece, usual_piece, confirms, unit, ack_send, link)
    if events_text is None or deadline_text is None or queued_text is None or settings is None:
        return None
    head_text = (
        f'{{"deadline":{deadline_text},"scope":{scope_text},"events":{events_text},'
        f"{settings[0]}{queued_text}{settings[1]}"
    )
    if _MARK in head_text:
        return None
    head = head_text.encode("utf-8", "surrogatepass")
    if len(head) >= jsoncodec.DEFAULT_MAX_ITEMS:
        return None  # a huge scope: the general path bounds it
    count = len(blobs)
    lengths = (_LENGTHS[count] if count < len(_LENGTHS) else struct.Struct(f">{count}I")).pack(
        *map(len, blobs)
    )
    return [_PREFIX.pack(jsoncodec.VERSION, len(head), count), head, lengths, *blobs]


_KEPT_SETTINGS: Final[dict[int, tuple[Any, ...]]] = {}
"""The settings last written (``_settings``) with each window of an int, by that window: the
other settings' very objects, then the text. By the window, not the last one or two sets: a
distributor with requests in flight writes several in turn (the pool's window of large
pieces for one request, small ones for the others, fewer credits while the pool runs short:
``wire.CreditPool.reserve``; a third of the envelopes found none of the last two kept at 8
connections), and a set written anew costs about 12k instructions. Bounded (``memo``),
each entry replaced whole, in one assignment (another thread's distributor may be writing
too)."""


_MAX_SETTINGS: Final = memo.BOUND


def _settings(
    window: Any,
    liveness: Any,
    piece: Any,
    usual_piece: int,
    confirms: bool,
    unit: Any,
    ack_send: bool,
    link: Any = "",
) -> tuple[str, str] | None:
    """The text around the queued time: its key and what precedes it (the window and the
    liveness), and what follows it to the head's end. A distributor writes the same
    settings, the same objects, into envelope after envelope: their text is kept with them,
    found by the window (an int) and then by identity (an equal object may write otherwise:
    1 and 1.0, 0.0 and -0.0)."""
    if type(window) is int:  # not a bool, nor a float: an equal int writes alike
        last = _KEPT_SETTINGS.get(window)
        if (
            last is not None
            and last[0] is liveness
            and last[1] is piece
            and last[2] is usual_piece
            and last[3] is confirms
            and last[4] is unit
            and last[5] is ack_send
            and last[6] is link
        ):
            text: tuple[str, str] = last[7]
            return text
    window_text = _number(window)
    liveness_text = _number(liveness)
    if window_text is None or liveness_text is None:
        return None
    tail = ""
    if piece != usual_piece:
        piece_text = _number(piece)
        if piece_text is None:
            return None
        tail += ',"piece":' + piece_text
    if confirms:
        tail += ',"confirms":true'
    if unit:
        unit_text = _number(unit)
        if unit_text is None:
            return None
        tail += ',"unit":' + unit_text
    if ack_send:
        tail += ',"ack_send":true'
    if link:
        # The distributor's offer, the same str object in every envelope: written once and
        # kept with the other settings. Printable ASCII with no quote nor backslash only,
        # which json writes as it is; anything else, the general path.
        if type(link) is not str or not link.isascii() or not link.isprintable():
            return None
        if '"' in link or "\\" in link:
            return None
        tail += ',"link":"' + link + '"'
    text = (f'"window":{window_text},"liveness":{liveness_text},"queued":', tail + "}")
    # Kept with the objects themselves (no other value can take their ids while kept) when
    # their text depends on nothing else: immutable numbers, and the flags as bools.
    if (
        type(window) is int
        and type(piece) is int
        and type(unit) is int
        and type(confirms) is bool
        and type(ack_send) is bool
        and type(link) is str
    ):
        entry = (liveness, piece, usual_piece, confirms, unit, ack_send, link, text)
        memo.keep(_KEPT_SETTINGS, window, entry, _MAX_SETTINGS)
    return text


def _number(value: Any) -> str | None:
    """A finite float or a small int (not a bool) as json writes it; None for anything else."""
    kind = type(value)
    if kind is float:
        ms = value * 1000.0
        if 1.0 <= ms < 1e15 and ms.is_integer():
            whole_ms = int(ms)
            if whole_ms / 1000 == value:
                # The float nearest a decimal of at most 15 significant digits (a timestamp
                # in whole milliseconds, as the distributor writes them): repr gives that
                # decimal's own digits, written here from ints for half of repr's cost.
                seconds, fraction = divmod(whole_ms, 1000)
                return str(seconds) + _FRACTIONS[fraction]
        return _float_repr(value) if isfinite(value) else None
    if kind is int and -_INT_BOUND < value < _INT_BOUND:
        return _int_repr(value)
    return None


def _scope(scope: dict[str, Any], blobs: list[bytes], drop_state: bool = False) -> str | None:
    keys = tuple(scope)
    httptools = keys == _HTTPTOOLS_KEYS
    if httptools or keys == _UVICORN_KEYS:
        text = _uvicorn_scope(scope, blobs, httptools)
        if text is not None:
            return text
    elif drop_state and keys in (_UVICORN_STATE_KEYS, _HTTPTOOLS_STATE_KEYS):
        # Uvicorn's own scope, its ``state`` (never written) among the keys. Any other scope
        # with a ``state`` is declined below (an unknown key): the caller drops it, asks again.
        return _uvicorn_scope(scope, blobs, keys == _HTTPTOOLS_STATE_KEYS, True)
    chunks: list[str] = []
    for key, value in scope.items():
        name = _SCOPE_KEYS.get(key)
        if name is None:
            return None
        kind = type(value)
        if kind is str:
            text = _quote(value)
        elif kind is bytes:
            blobs.append(value)
            text = "0E0"
        elif key == "headers":
            if kind is not list:
                return None
            pairs = _pairs(value, blobs)
            if pairs is None:
                return None
            text = pairs
        elif key == "asgi":
            if kind is not dict:
                return None
            items = []
            for field, version in value.items():
                field_text = _ASGI_KEYS.get(field)
                if field_text is None or type(version) is not str:
                    return None
                items.append(field_text + _quote(version))
            text = "{" + ",".join(items) + "}"
        elif value is None:
            text = "null"
        elif kind in _PAIR_TYPES and len(value) == 2:  # server, client: (host, port)
            host, port = value
            if not (type(host) is str and type(port) is int and -_INT_BOUND < port < _INT_BOUND):
                return None
            text = f"[{_quote(host)},{_int_repr(port)}]"
        else:
            return None
        chunks.append(name + text)
    return "{" + ",".join(chunks) + "}"


def _uvicorn_scope(
    scope: dict[str, Any], blobs: list[bytes], httptools: bool, state: bool = False
) -> str | None:
    """``_scope`` for the keys uvicorn gives, in the order of its h11 protocol or (when
    ``httptools``) of its httptools one, with the values it gives (str, bytes for the paths,
    addresses as (host, port) pairs): one expression instead of a turn of the general loop
    per key. None (and ``blobs`` untouched) for anything else: the loop then decides. With
    ``state``, the keys are those of ``_UVICORN_STATE_KEYS`` (``_HTTPTOOLS_STATE_KEYS``), and
    the ``state`` is left out."""
    if state:
        if httptools:
            (
                kind,
                asgi,
                http_version,
                server,
                client,
                scheme,
                root_path,
                headers,
                _,
                method,
                path,
                raw_path,
                query_string,
            ) = scope.values()
        else:
            (
                kind,
                asgi,
                http_version,
                server,
                client,
                scheme,
                method,
                root_path,
                path,
                raw_path,
                query_string,
                headers,
                _,
            ) = scope.values()
    elif httptools:
        (
            kind,
            asgi,
            http_version,
            server,
            client,
            scheme,
            root_path,
            headers,
            method,
            path,
            raw_path,
            query_string,
        ) = scope.values()
    else:
        (
            kind,
            asgi,
            http_version,
            server,
            client,
            scheme,
            method,
            root_path,
            path,
            raw_path,
            query_string,
            headers,
        ) = scope.values()
    if not (
        type(kind) is str  # one by one: cheaper than a set inclusion over a map of six
        and type(http_version) is str
        and type(scheme) is str
        and type(method) is str
        and type(root_path) is str
        and type(path) is str
        and type(raw_path) is bytes
        and type(query_string) is bytes
        and type(asgi) is dict
        and tuple(asgi) == _UVICORN_ASGI_KEYS
        and type(headers) is list
    ):
        return None
    version, spec_version = asgi.values()
    if type(version) is not str or type(spec_version) is not str:
        return None
    key = id(client)
    cached = _STARTS.get(key)
    fields = (kind, version, spec_version, http_version, scheme)
    if cached is not None and cached[0] is client and cached[1] is server and cached[2] == fields:
        start = cached[3]
        last = cached[4]
        # The connection's last request, alike in all the rest, has the same text and the
        # same bytes values: theirs are kept, equal to these. Compared by == in C, one
        # tuple against the other, the strs and the list checked exact above; the kept
        # values are private and exact (strs, a list of tuples of bytes). A header pair
        # or value of another type may still compare equal (a memoryview, a subclass
        # whose __eq__ lies, mock.ANY): the hit is taken only when every pair is an exact
        # tuple and every value exact bytes (checked after the ==, so that a miss pays
        # nothing for it; a plain loop: in C, a set inclusion over a map of their types
        # costs twice as much), so == compared them as bytes.
        if last is not None and (httptools, method, root_path, path, headers) == last[0]:
            for pair in headers:  # httptools above: the keys' order
                if type(pair) is not tuple:
                    break
                name, value = pair
                if type(name) is not bytes or type(value) is not bytes:
                    break
            else:
                if httptools:
                    blobs += last[2]
                    blobs.append(raw_path)
                    blobs.append(query_string)
                else:
                    blobs.append(raw_path)
                    blobs.append(query_string)
                    blobs += last[2]
                text: str = last[1]
                return text
        if last is not None:  # a miss: the next requests not kept for a while
            skip = _SKIP
        else:
            skip = cached[5]
            if skip:
                skip -= 1
        keeps, fresh = True, False
    else:
        server_text = _address(server)
        client_text = _address(client)
        if server_text is None or client_text is None:
            return None
        start = (
            f'{{"type":{_quote(kind)},"asgi":{{"version":{_quote(version)},'
            f'"spec_version":{_quote(spec_version)}}},"http_version":{_quote(http_version)},'
            f'"server":{server_text},"client":{client_text},"scheme":{_quote(scheme)},'
        )
        # Kept with the pairs themselves, whose ids cannot be reused while they live, when
        # they are pairs of a str and an int (checked above) and strs: immutable, so their
        # text is too; the strs are compared (a server makes some anew for every request).
        keeps, fresh, last = type(client) is tuple and type(server) is tuple, True, None
        skip = 0
    count = len(blobs)
    # The bytes values go to the tail in the order of their keys in the text.
    if httptools:
        pairs = _pairs(headers, blobs)  # appends to blobs only what it writes
        if pairs is None:
            return None
        blobs.append(raw_path)
        blobs.append(query_string)
        text = (
            f'{start}"root_path":{_quote(root_path)},"headers":{pairs},'
            f'"method":{_quote(method)},"path":{_quote(path)},"raw_path":0E0,"query_string":0E0}}'
        )
    else:
        pair_blobs: list[bytes] = [raw_path, query_string]
        pairs = _pairs(headers, pair_blobs)
        if pairs is None:
            return None
        blobs += pair_blobs
        count += 2
        text = (
            f'{start}"method":{_quote(method)},"root_path":{_quote(root_path)},'
            f'"path":{_quote(path)},"raw_path":0E0,"query_string":0E0,"headers":{pairs}}}'
        )
    if not keeps:  # pairs of another type: nothing kept
        return text
    if skip:  # not kept, nor ``skip - 1`` requests more
        memo.keep(_STARTS, key, (client, server, fields, start, None, skip), _MAX_STARTS)
        return text
    kept = tuple(blobs[count : count + 2 * len(headers)])
    if (
        len(kept) <= _MAX_KEPT_VALUES
        and text.isascii()  # O(1): one byte a character, the bound below holds in bytes
        and len(text) + sum(map(len, kept)) <= _MAX_KEPT_SIZE
    ):
        # The headers kept as fresh tuples of the bytes checked (never the caller's list
        # nor its pairs, which may be lists or change after), the values as a tuple.
        request = (
            httptools,
            method,
            root_path,
            path,
            list(zip(kept[::2], kept[1::2], strict=True)),
        )
        last = (request, text, kept)
        memo.keep(_STARTS, key, (client, server, fields, start, last, 0), _MAX_STARTS)
    elif fresh:
        memo.keep(_STARTS, key, (client, server, fields, start, None, 0), _MAX_STARTS)
    return text


def _address(value: Any) -> str | None:
    """A (host, port) pair as the general loop writes it, or None (null) as ``null``; None
    for anything else."""
    if value is None:
        return "null"
    if type(value) in _PAIR_TYPES and len(value) == 2:
        host, port = value
        if type(host) is str and type(port) is int and -_INT_BOUND < port < _INT_BOUND:
            return f"[{_quote(host)},{_int_repr(port)}]"
    return None


def _pairs(headers: list[Any], blobs: list[bytes]) -> str | None:
    """Headers as pairs of bytes (tuples or lists, as json writes both); ``blobs`` untouched
    unless they are. A plain loop: checked in C (``map`` and set inclusions, then ``chain``),
    a request's few headers cost more (valgrind: 9.4k instructions for one header against
    3.8k, 19.2k for eight against 13.2k)."""
    values: list[bytes] = []
    append = values.append
    for pair in headers:
        if type(pair) not in _PAIR_TYPES or len(pair) != 2:
            return None
        name, value = pair
        if type(name) is not bytes or type(value) is not bytes:
            return None
        append(name)
        append(value)
    blobs += values
    count = len(headers)
    if count < len(_PAIRS_TEXT):
        return _PAIRS_TEXT[count]
    return "[" + ",".join([_PAIR] * count) + "]"


def _events(events: list[Any], blobs: list[bytes]) -> str | None:
    """The request events as the distributor forwards them: ``http.request`` with a body."""
    if len(events) == 1:  # the usual: one event, whose text is one of two constants
        event = events[0]
        if type(event) is dict and tuple(event) == _REQUEST_EVENT_KEYS:
            kind, body, more = event.values()
            if (
                type(kind) is str
                and kind == "http.request"
                and type(body) is bytes
                and type(more) is bool
            ):
                blobs.append(body)
                return _ONE_REQUEST[more]
    chunks: list[str] = []
    for event in events:
        if type(event) is not dict or tuple(event) != _REQUEST_EVENT_KEYS:
            return None
        kind, body, more = event["type"], event["body"], event["more_body"]
        if not (type(kind) is str and type(body) is bytes and type(more) is bool):
            return None
        blobs.append(body)
        chunks.append(
            f'{{"type":{_quote(kind)},"body":0E0,"more_body":{"true" if more else "false"}}}'
        )
    return "[" + ",".join(chunks) + "]"
