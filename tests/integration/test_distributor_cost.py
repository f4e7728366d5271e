"""What the distributor spends per hello-world request, counted structurally (no timings):
the codec paths its messages take."""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from minidasgi import Distributor, Node, create_distributor, envelopewriter, jsoncodec, wire
from minidasgi.deadlines import Deadlines
from minidasgi.inbox import Inbox
from minidasgi.testing import RedisServer

from . import apps
from .stack import run_node, serve_app

pytestmark = pytest.mark.timeout(60)

N = 20


async def test_a_hello_world_request_and_its_answer_skip_the_general_decoder(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    decoded: list[Any] = []
    decode = jsoncodec.decode

    def spy(data: Any, **bounds: Any) -> Any:
        value = decode(data, **bounds)
        decoded.append(value[0] if type(value) is list and value else type(value))
        return value

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(jsoncodec, "decode", spy)
            for _ in range(N):
                response = await client.get("/", headers={"x-test": "1"})
                assert response.text == "Hello World!"
            monkeypatch.undo()
    # The answers came as ACK_SEND messages, read by ``responsereader`` (before: each by the
    # general decoder), and the Node read uvicorn's envelopes with ``envelopereader`` (before:
    # N dicts decoded the general way).
    assert decoded.count(dict) == 0, decoded
    assert "ack-send" not in decoded, decoded


async def test_a_response_that_comes_whole_with_its_ack_sets_no_disconnect_watch(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    watched: list[Any] = []
    add = distributor.watch_deadlines.add

    def spy(callback: Any, argument: Any) -> list[Any]:
        watched.append(argument)
        return add(callback, argument)

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(distributor.watch_deadlines, "add", spy)
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            monkeypatch.undo()
    # The answer was relayed in the turn its ack was read, with no wait for the Node: no
    # deadline to watch the client (before: one per request), nor the timer it arms.
    assert watched == []


async def test_a_response_that_completes_returns_no_credit_before_its_window_closes(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    consumed: list[Any] = []
    real = wire.ReceiveWindow.consumed

    def spy(self: wire.ReceiveWindow) -> int:
        consumed.append(self)
        return real(self)

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(wire.ReceiveWindow, "consumed", spy)
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            monkeypatch.undo()
        # Every credit came back to the pool with the windows' close.
        assert distributor.credit_pool.used == 0
    # The response's one message completed it: its credit would go to no one, and the
    # window's close gives the pool all it holds (before: counted back, one call each).
    assert consumed == []


async def test_the_envelopes_timestamps_are_whole_milliseconds(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    timestamps: list[Any] = []
    real = envelopewriter.try_encode_parts

    def spy(
        deadline: Any, scope: Any, events: Any, window: Any, liveness: Any, queued: Any, *rest: Any
    ) -> Any:
        timestamps.append((deadline, queued, rest[-1]))
        return real(deadline, scope, events, window, liveness, queued, *rest)

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            monkeypatch.setattr(envelopewriter, "try_encode_parts", spy)
            before = time.time()
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            monkeypatch.undo()
    assert len(timestamps) == N
    for deadline, queued, millis in timestamps:
        # Given in whole ms, written from the ints (envelopewriter), not by repr; rounded
        # down, never later.
        assert millis is True and type(deadline) is int and type(queued) is int
        assert deadline == queued + 30_000
        assert before * 1000 - 1 <= queued <= time.time() * 1000


async def test_a_hello_world_request_waits_for_its_node_without_the_inbox_coroutine(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    waits: list[str] = []
    real_get, real_arrival = Inbox.get, Inbox.arrival

    def get(self: Inbox[Any]) -> Any:
        waits.append("get")
        return real_get(self)

    def arrival(self: Inbox[Any]) -> Any:
        waits.append("arrival")
        return real_arrival(self)

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(Inbox, "get", get)
            monkeypatch.setattr(Inbox, "arrival", arrival)
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            monkeypatch.undo()
    # One wait per request, for the ACK (with the response in it), on the inbox's future
    # itself; the response, queued with the ACK, is taken at once (before: a coroutine
    # each, two per request).
    assert waits.count("get") == 0, waits
    assert waits.count("arrival") == N, waits


async def test_a_hello_world_requests_lpush_makes_no_future_for_nobody(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    given: list[Any] = []
    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            pushes = distributor.admission.pushes
            send_into = pushes._send_into

            def spy(key: str, items: list[Any], future: Any) -> None:
                given.append(future)
                send_into(key, items, future)

            monkeypatch.setattr(pushes, "_send_into", spy)
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            monkeypatch.undo()
    # The requests learn their LPUSH's outcome from their callbacks: the batches have no
    # future (before: one each, made and settled for nobody, about 4k instructions).
    assert len(given) == N and given == [None] * N


async def test_a_reply_of_one_message_is_not_split_as_a_batch_frame(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    split: list[Any] = []
    real = wire.split_frame

    def spy(data: Any) -> list[Any]:
        split.append(data)
        return real(data)

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(wire, "split_frame", spy)
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            monkeypatch.undo()
    # One request at a time: each answer is one message, handled as it is (before: made a
    # list of one by ``split_frame``, a call each).
    assert split == []


async def test_a_response_whole_with_its_ack_is_not_counted_in_flight_with_its_node(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    added: list[str] = []
    real = distributor.peers.add

    def spy(peer: str, request_id: str, now: float, *, pings: bool) -> None:
        added.append(request_id)
        real(peer, request_id, now, pings=pings)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await apps.slow(scope, receive, send)
        else:
            await apps.hello(scope, receive, send)

    node = Node(url=redis_server.url, app=app, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(distributor.peers, "add", spy)
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            hello_added = len(added)
            # A streamed response is counted while the relay waits for its pieces, and
            # forgotten at its end.
            assert (await client.get("/slow?3")).text == "0\n1\n2\ndone\n"
            monkeypatch.undo()
        assert distributor.peers.requests(node.channel) == []
    # Nothing more was awaited from the Node once the ack came with the whole response:
    # no add (nor discard) per request (before: one each).
    assert hello_added == 0
    assert len(added) == 1


def test_on_uvloop_each_lpush_batch_is_counted_out_without_a_future(
    redis_server: RedisServer,
) -> None:
    # uvloop hides its ready handles: the pushes' batcher counts its batches in flight, and
    # a batch nobody awaits is counted out by a stand-in (before: a future made for it).
    uvloop = pytest.importorskip("uvloop")
    given: list[Any] = []

    async def scenario() -> None:
        distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
        node = Node(url=redis_server.url, app=apps.hello, key="hello")
        async with serve_app(distributor, http="h11") as base, run_node(node):
            async with httpx.AsyncClient(base_url=base) as client:
                assert (await client.get("/")).text == "Hello World!"  # connections warm
                pushes = distributor.admission.pushes
                send_into = pushes._send_into

                def spy(key: str, items: list[Any], settlement: Any) -> None:
                    given.append(settlement)
                    send_into(key, items, settlement)

                pushes._send_into = spy
                for _ in range(N):
                    assert (await client.get("/")).text == "Hello World!"
                pushes._send_into = send_into
                assert pushes._in_flight == 0  # every batch counted out: eager still
                assert pushes.batches == pushes.items == N + 1

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert len(given) == N
    assert not any(isinstance(settlement, asyncio.Future) for settlement in given)
    assert all(settlement.done() for settlement in given)


async def test_the_readiness_check_calls_only_the_two_connected_properties(
    redis_server: RedisServer,
) -> None:
    # Checked twice per request: a property each, reading an attribute (before: each also
    # called Connection.is_closed, or the subscriber's Event.is_set).
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    called: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            called.append(frame.f_code.co_qualname)

    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections up
        sys.setprofile(profile)
        try:
            ready = distributor.ready
        finally:
            sys.setprofile(None)
    assert ready
    assert called == ["Distributor.ready", "Client.connected", "Subscriber.connected"], called


async def test_a_hello_world_request_costs_the_distributor_seven_coroutine_steps(
    redis_server: RedisServer,
) -> None:
    # A coroutine costs its creation, its frame and its end even when it never waits (about
    # 1.1k instructions, three times a plain call). Per request: the ASGI call and the
    # exchange's run, each entered and resumed once (for the ACK), the wait for the ACK
    # likewise, and the relay, which never waits for a response that came whole with its
    # ACK. Before, the relay sent the response's events from a coroutine of their own
    # (``_send_events``): 8 steps per request.
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    entered: Counter[str] = Counter()
    distributor_code = Distributor.__call__.__code__.co_filename

    def profile(frame: Any, event: str, _: Any) -> None:
        code = frame.f_code
        # A coroutine of the distributor's entered: its first step, or a resumption.
        if (
            event == "call"
            and code.co_flags & inspect.CO_COROUTINE
            and code.co_filename == distributor_code
        ):
            entered[code.co_qualname] += 1

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            sys.setprofile(profile)
            try:
                for _ in range(N):
                    assert (await client.get("/")).text == "Hello World!"
            finally:
                sys.setprofile(None)
    per_request = {
        name: count
        for name, count in entered.items()
        if name == "Distributor.__call__" or name.startswith("_Exchange.")
    }
    assert per_request == {
        "Distributor.__call__": 2 * N,
        "_Exchange.run": 2 * N,
        "_Exchange._wait_ack": 2 * N,
        "_Exchange._relay": N,
    }, entered


async def test_a_hello_world_request_reads_the_loops_clock_only_for_what_needs_it(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On asyncio's own loop, whose clock is time.monotonic(), the ACK's deadline is counted
    # from the LPUSH's time, read once for both; and the Node is heard from at its ACK only
    # if it has requests in flight here (a response that came whole with its ACK leaves it
    # none). Before, each read the loop's clock again: two calls of ``loop.time()`` per
    # request (about 0.7k instructions each).
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    readers: Counter[str] = Counter()
    ours = (Distributor.__call__.__code__.co_filename, Deadlines.add.__code__.co_filename)
    loop = asyncio.get_running_loop()
    clock = loop.time

    def counted() -> float:
        caller = sys._getframe(1).f_code
        if caller.co_filename in ours:
            readers[caller.co_qualname] += 1
        return clock()

    pushed: list[float] = []
    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(loop, "time", counted)
            add = distributor.ack_deadlines.add

            def spy(callback: Any, argument: Any, now: float | None = None) -> list[Any]:
                entry = add(callback, argument) if now is None else add(callback, argument, now)
                pushed.append(entry[0] - distributor.ack_deadlines.duration)
                return entry

            monkeypatch.setattr(distributor.ack_deadlines, "add", spy)
            before = time.monotonic()
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            after = time.monotonic()
            monkeypatch.undo()
    assert readers == Counter(), readers
    # The deadlines were counted from times of this run, on the loop's own clock.
    assert len(pushed) == N and all(before <= t <= after for t in pushed), pushed


async def test_a_hello_world_envelopes_timestamps_are_written_from_the_distributors_ints(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The distributor takes its times in whole milliseconds and gives the writer those ints
    # alone: no float is taken apart to write them (``_number``, about 4.4k instructions
    # each; from the ints 2k). Before: two per request.
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    numbers: list[Any] = []
    real = envelopewriter._number

    def spy(value: Any) -> str | None:
        numbers.append(value)
        return real(value)

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(envelopewriter, "_number", spy)
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            monkeypatch.undo()
    assert numbers == []


async def test_a_hello_world_answer_is_read_once_and_its_ack_not_checked_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The distributor reads the usual ACK_SEND with ``responsereader`` itself, whose reader
    # admits only an ACK that ``wire.ack_of_ack_send`` accepts: neither ``wire.unpack`` nor
    # that check is called for it (before: both, once per request, about 3k instructions).
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    calls: list[str] = []
    unpack, ack_of_ack_send = wire.unpack, wire.ack_of_ack_send

    def unpack_spy(data: Any) -> Any:
        calls.append("unpack")
        return unpack(data)

    def ack_spy(args: Any) -> Any:
        calls.append("ack_of_ack_send")
        return ack_of_ack_send(args)

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(wire, "unpack", unpack_spy)
            monkeypatch.setattr(wire, "ack_of_ack_send", ack_spy)
            for _ in range(N):
                assert (await client.get("/")).text == "Hello World!"
            monkeypatch.undo()
    assert calls == []
