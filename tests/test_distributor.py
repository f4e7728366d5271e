"""The distributor's pure helpers, without Redis or a server."""

from __future__ import annotations

import asyncio
import gc
import random
import types
from typing import Any

import pytest

from minidasgi import wire
from minidasgi.admission import Admission
from minidasgi.distributor import (
    Distributor,
    _Exchange,
    _portable_scope,
    _tuple_headers,
)
from minidasgi.resp import RedisConnectionError


def _uvicorn_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 45678),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [(b"host", b"example.org")],
        "state": {"pool": object()},
    }


def test_the_usual_scope_travels_without_its_state() -> None:
    scope = _uvicorn_scope()
    portable = _portable_scope(scope)
    assert "state" not in portable
    assert portable == {k: v for k, v in scope.items() if k != "state"}
    assert list(portable) == [k for k in scope if k != "state"]  # the server's order
    portable["path"] = "/elsewhere"
    assert scope["path"] == "/" and "state" in scope  # a copy


def test_extensions_and_other_keys_are_filtered() -> None:
    scope = _uvicorn_scope()
    scope["extensions"] = {"http.response.trailers": {}, "http.response.pathsend": {}}
    scope["app"] = object()
    scope["custom"] = {"ok": [1, "two", b"3"]}
    scope["opaque"] = object()
    portable = _portable_scope(scope)
    assert portable["extensions"] == {"http.response.trailers": {}}
    assert portable["custom"] == {"ok": [1, "two", b"3"]}
    assert "app" not in portable and "opaque" not in portable and "state" not in portable


async def test_a_failed_push_that_no_longer_matters_is_not_reported_as_lost() -> None:
    # The LPUSH's outcome goes to a callback (``_Exchange._pushed``), which ignores it once
    # the request was acked: its failure must still count as read, or asyncio logs it as an
    # exception never retrieved when the batch's future is freed.
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    told: list[object] = []
    done = asyncio.Event()
    acked = types.SimpleNamespace(_pushing=False)  # an ack came first

    def pushed_then(outcome: Any, index: int) -> None:
        told.append(outcome)
        done.set()
        _Exchange._pushed(acked, outcome, index)  # type: ignore[arg-type]

    class LostRouter:  # a Cluster's router whose connection is lost under the LPUSH
        async def pipeline(self, *commands: bytes) -> list[Any]:
            raise RedisConnectionError("lost the connection")

    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    try:
        admission = Admission(channel_prefix="p", db=0)
        admission.put(LostRouter(), "k", b"e", pushed_then)  # type: ignore[arg-type]
        await done.wait()
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert [type(outcome) for outcome in told] == [RedisConnectionError]
    assert reported == []


def test_header_pairs_become_tuples_alike_on_both_paths() -> None:
    """``_tuple_headers`` converts a header list in place: the result is the comprehension's,
    down to the types, for every mixture (fuzzed)."""
    rng = random.Random(10)
    kinds = [[b"a", b"b"], (b"c", b"d"), [b"e"], b"fg", None, [[b"h"], b"i"], ()]
    for _ in range(500):
        headers: Any = [rng.choice(kinds) for _ in range(rng.randrange(0, 5))]
        if rng.random() < 0.5:
            headers = [[b"n%d" % i, b"v"] for i in range(rng.randrange(0, 5))]
        event: dict[str, Any] = {"type": "http.response.start", "headers": headers}
        expected = [tuple(p) if type(p) is list else p for p in headers]
        _tuple_headers(event)
        assert event["headers"] == expected
        assert [type(p) for p in event["headers"]] == [type(p) for p in expected]
    event = {"type": "http.response.start", "headers": ((b"a", b"b"),)}
    _tuple_headers(event)  # not a list: as it came
    assert event["headers"] == ((b"a", b"b"),)


def test_the_header_bounds_in_one_pass_answer_as_before() -> None:
    """Header size (431) before a declared body too large (413), then Redis (503 here: never
    connected); ``Expect: 100-continue`` in any case of its name and value."""
    distributor = Distributor(key="k", max_header_size=100, max_body_size=1000)

    def answer(*headers: tuple[bytes, bytes], kind: str = "http") -> Any:
        return distributor._key_or_refusal({"type": kind, "path": "/", "headers": list(headers)})

    large = (b"content-length", b"0" * 50 + b"1001")
    assert answer(large)[0] == 413
    assert answer((b"x", b"y" * 100), large)[0] == 431
    assert answer((b"content-length", b"1000"), (b"Content-Length", b"1" * 40))[0] == 413
    assert answer(large, kind="websocket")[0] == 503  # no body to bound
    assert answer((b"content-length", b"1000"))[0] == 503


def test_the_header_pass_also_finds_expect_100_continue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key comes with whether the request expects "100 Continue", found in the same pass
    over the headers as the bounds (before: a pass of its own per request): in any case of
    the name and value, among several Expect headers, for HTTP only."""
    monkeypatch.setattr(Distributor, "ready", property(lambda self: True))
    distributor = Distributor(key="k", max_body_size=1000)

    def answer(*headers: tuple[bytes, bytes], kind: str = "http") -> Any:
        return distributor._key_or_refusal({"type": kind, "path": "/", "headers": list(headers)})

    assert answer((b"host", b"h")) == ("k", False)
    assert answer((b"host", b"h"), (b"EXPECT", b"100-Continue")) == ("k", True)
    assert answer((b"expect", b"100-continue"), (b"expect", b"x")) == ("k", True)
    assert answer((b"expect", b"x"), (b"expect", b"100-continue")) == ("k", True)
    assert answer((b"expects", b"100-continue"), (b"expect", b"x")) == ("k", False)
    assert answer((b"content-length", b"5"), (b"expect", b"100-continue")) == ("k", True)
    assert answer((b"expect", b"100-continue"), kind="websocket") == ("k", False)


@pytest.mark.parametrize("response_timeout", [None, 30.0])
def test_an_ack_send_is_one_inbox_item_and_its_send_relayed_first(
    response_timeout: float | None,
) -> None:
    # The usual ACK_SEND: the ACK queued, its SEND kept for the relay to take before the
    # inbox (one item, not two). A relay bounded by ``response_timeout`` waits for every
    # message within it: both queued, as before.
    from minidasgi.distributor import _USUAL_SEND

    distributor = Distributor(key="k", response_timeout=response_timeout)
    exchange = _Exchange(distributor, "k", _uvicorn_scope(), None, None)  # type: ignore[arg-type]
    ack = ("minidasgi:0:node:82b515ab9ac6c3fe40465eb2", 1, 1.0)
    send = ([{"type": "http.response.start", "status": 200, "headers": []}],)
    distributor._on_ack_send(exchange, exchange.id, send, ack, 100, _USUAL_SEND)
    items = []
    while not exchange.inbox.empty():
        items.append(exchange.inbox.get_nowait())
    if response_timeout is None:
        assert items == [("ack", ack)]
        assert exchange._first == (_USUAL_SEND, send)
    else:
        assert items == [("ack", ack), (_USUAL_SEND, send)]
        assert exchange._first is None
    assert exchange._arrived and exchange.received is None  # counted, no window made


NODE = "minidasgi:0:node:82b515ab9ac6c3fe40465eb2"


def _answered(answers: list[Any], **settings: Any) -> tuple[Distributor, list[dict[str, Any]], Any]:
    """A distributor on the running loop with stand-ins for Redis: each LPUSH is answered,
    in the next loop turn, by the next of ``answers`` (a list of events, sent with the ACK
    as an ACK_SEND, or None: a GONE); the list of what it sends to the client, and the
    ``send`` that fills it."""
    from minidasgi import wire

    loop = asyncio.get_running_loop()
    distributor = Distributor(key="k", **settings)
    distributor._bind_loop()
    distributor._starting = loop.create_future()
    distributor._starting.set_result(None)
    connected = types.SimpleNamespace(connected=True, connection=lambda: None)
    distributor._client = distributor._subscriber = connected  # type: ignore[assignment]
    answering = iter(answers)

    def lpush(connection: Any, key: str, data: bytes, pushed: Any) -> None:
        request_id, events = pushed.__self__.id, next(answering)
        if events is not None:
            message = wire.pack_parts(wire.ACK_SEND, request_id, events, NODE, 1, 1.0)
        else:
            message = wire.pack(wire.GONE, request_id, "expired")
        loop.call_soon(distributor._on_message, b"channel", message)

    distributor.admission.send = lpush  # type: ignore[method-assign]
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return distributor, sent, send


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _hello(more: bool = False) -> list[dict[str, Any]]:
    return [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]},
        {"type": "http.response.body", "body": b"hi", "more_body": more},
    ]


async def test_an_exchange_end_is_counted_and_logged_as_its_times_say(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two requests through ``Distributor.__call__`` with stand-ins for Redis and for the
    # distributor's clock: one answered by a Node (its ACK_SEND), one dropped unrun by it
    # (GONE, no ack: the no-worker answer). Their counts, histograms and access-log lines:
    # the queue wait and the response time only for the acked one.
    import logging
    import time

    from minidasgi import distributor as module

    base = time.monotonic()  # near the loop's clock: the ack's deadline counts from it
    # Each request reads it as it arrives, at its LPUSH, at its ack (the first only), at its end.
    clock = iter(
        [base, base + 0.001, base + 0.003, base + 0.007, base + 1, base + 1.001, base + 1.003]
    )
    monkeypatch.setattr(
        module, "time", types.SimpleNamespace(monotonic=lambda: next(clock), time=time.time)
    )
    distributor, sent, send = _answered([_hello(), None], access_log="text")
    caplog.set_level(logging.INFO, logger="minidasgi.access")
    for path in ("/one", "/two"):
        scope = _uvicorn_scope()
        scope["path"] = path
        await distributor(scope, _receive, send)
    assert next(clock, None) is None  # every time read
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [200, 405]
    m = distributor.metrics
    assert m.requests.values == {("k", "200"): 1, ("k", "405"): 1}
    for family, count, total in [
        (m.queue_wait, 1, 0.002),
        (m.response_time, 1, 0.004),
        (m.total_time, 2, 0.010),
    ]:
        histogram = family.series[("k",)]
        assert histogram.count == count and histogram.sum == pytest.approx(total)
    assert [r.getMessage() for r in caplog.records if r.name == "minidasgi.access"] == [
        f"GET '/one' key=k node={NODE} status=200 queue_wait_ms=2.000 total_ms=7.000",
        "GET '/two' key=k node=- status=405 queue_wait_ms=- total_ms=3.000",
    ]


@pytest.mark.parametrize("response_timeout", [None, 30.0])
async def test_a_whole_response_with_its_ack_is_sent_without_the_relay(
    monkeypatch: pytest.MonkeyPatch, response_timeout: float | None
) -> None:
    # The usual small response, whole in its ACK_SEND, is sent by the exchange's run with no
    # relay (its coroutine); a response with more to come, or one bounded by a
    # ``response_timeout``, goes through the relay as before.
    relayed: list[str] = []
    relay = _Exchange._relay

    async def counted(exchange: _Exchange) -> None:
        relayed.append(exchange.scope["path"])
        await relay(exchange)

    monkeypatch.setattr(_Exchange, "_relay", counted)
    distributor, sent, record = _answered(
        [_hello(), _hello(more=True)], response_timeout=response_timeout
    )
    streaming = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        await record(message)
        if message.get("more_body") is True:
            streaming.set()

    for path in ("/whole", "/more"):
        scope = _uvicorn_scope()
        scope["path"] = path
        request = asyncio.ensure_future(distributor(scope, _receive, send))
        if path == "/more":
            await asyncio.wait_for(streaming.wait(), 5)
            (exchange,) = distributor._exchanges.values()
            last = {"type": "http.response.body", "body": b"!", "more_body": False}
            distributor._on_message(b"channel", wire.pack(wire.SEND, exchange.id, [last]))
        await asyncio.wait_for(request, 5)
    assert relayed == (["/more"] if response_timeout is None else ["/whole", "/more"])
    bodies = [m.get("body") for m in sent if m["type"] == "http.response.body"]
    assert bodies == [b"hi", b"hi", b"!"]


@pytest.mark.parametrize("failure", [OSError, asyncio.TimeoutError])
async def test_a_whole_response_whose_send_fails_ends_as_the_relay_ends_it(
    failure: type[BaseException],
) -> None:
    # The usual small response sent by the exchange's run (no relay): a client gone (the
    # server's send raises an OSError) ends the exchange quietly, not aborted; a send that
    # times out aborts the started response. Either way the Node is told to cancel.
    from minidasgi.distributor import ResponseAborted

    distributor, sent, _ = _answered([_hello()])
    cancelled: list[tuple[str, str]] = []

    async def cancel_on(node: str, request_id: str) -> None:
        cancelled.append((node, request_id))

    distributor.cancel_on = cancel_on  # type: ignore[method-assign]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        raise failure()

    scope = _uvicorn_scope()
    if failure is OSError:
        await distributor(scope, _receive, send)
    else:
        with pytest.raises(ResponseAborted):
            await distributor(scope, _receive, send)
    for _ in range(3):  # the cancel is spawned
        await asyncio.sleep(0)
    assert [m["type"] for m in sent] == ["http.response.start"]
    assert [node for node, _ in cancelled] == [NODE]
    aborted = distributor.metrics.aborts.values
    assert aborted == ({} if failure is OSError else {("k",): 1})
    assert distributor.metrics.requests.values == {("k", "200"): 1}
