"""What the distributor spends per hello-world request, counted structurally (no timings):
the codec paths its messages take."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from minidasgi import (
    Distributor,
    Node,
    create_distributor,
    envelopewriter,
    jsoncodec,
    responsereader,
    wire,
)
from minidasgi import distributor as distributor_module
from minidasgi.deadlines import Deadlines
from minidasgi.inbox import Inbox
from minidasgi.testing import RedisServer

from . import apps
from .stack import run_node, serve_app

pytestmark = pytest.mark.timeout(60)

N = 20


@contextlib.asynccontextmanager
async def _hello_worlds(
    redis_server: RedisServer,
    distributor: Distributor,
    counting: contextlib.AbstractContextManager[Any],
    *,
    app: Any = apps.hello,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, Node]]:
    """``distributor`` and a Node of ``app`` serving the key ``hello``: one request warms
    the connections, then ``N`` hello-world requests go one at a time inside ``counting``
    (what puts the spies in place and takes them out: ``_patched``, ``_profiled``). Yields
    the client and the Node after them, still counting, for more requests and checks."""
    node = Node(url=redis_server.url, app=app, key="hello")
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            with counting:
                for _ in range(N):
                    response = await client.get("/", headers=headers)
                    assert response.text == "Hello World!"
                yield client, node


@contextlib.contextmanager
def _patched(monkeypatch: pytest.MonkeyPatch, *patches: tuple[object, str, Any]) -> Iterator[None]:
    """Each ``(target, name, value)`` set for the block; after it, all ``monkeypatch`` set
    is undone (as each test did by hand: what it counts is these requests alone)."""
    for target, name, value in patches:
        monkeypatch.setattr(target, name, value)
    try:
        yield
    finally:
        monkeypatch.undo()


def _spy(target: object, name: str, record: Callable[..., object]) -> tuple[object, str, Any]:
    """A patch for ``_patched``: ``target.name`` that calls ``record`` with its arguments,
    then the real one."""
    real = getattr(target, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        record(*args, **kwargs)
        return real(*args, **kwargs)

    return target, name, spy


@contextlib.contextmanager
def _profiled(profile: Callable[[Any, str, Any], None]) -> Iterator[None]:
    """``profile`` as the profiler for the block (``sys.setprofile``)."""
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(None)


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

    counting = _patched(monkeypatch, (jsoncodec, "decode", spy))
    async with _hello_worlds(redis_server, distributor, counting, headers={"x-test": "1"}):
        pass
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
    spy = _spy(distributor.watch_deadlines, "add", lambda _, argument: watched.append(argument))
    counting = _patched(monkeypatch, spy)
    async with _hello_worlds(redis_server, distributor, counting):
        pass
    # The answer was relayed in the turn its ack was read, with no wait for the Node: no
    # deadline to watch the client (before: one per request), nor the timer it arms.
    assert watched == []


async def test_a_response_that_completes_returns_no_credit_before_its_window_closes(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    consumed: list[Any] = []
    counting = _patched(monkeypatch, _spy(wire.ReceiveWindow, "consumed", consumed.append))
    async with _hello_worlds(redis_server, distributor, counting):
        # Every credit came back to the pool with the windows' close.
        assert distributor.credit_pool.used == 0
    # The response's one message completed it: its credit would go to no one, and the
    # window's close gives the pool all it holds (before: counted back, one call each).
    assert consumed == []


async def test_a_response_that_comes_whole_in_one_message_makes_no_receive_window(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    pools: list[Any] = []  # the pool of each window made (the Node makes its own too)

    def record(window: Any, credits: int = 0, pool: Any = None, *_: Any) -> None:
        pools.append(pool)

    counting = _patched(monkeypatch, _spy(wire.ReceiveWindow, "__init__", record))
    async with _hello_worlds(redis_server, distributor, counting):
        # The credits the envelopes announced came back all the same.
        assert (distributor.credit_pool.used, distributor.credit_pool.large) == (0, 0)
    # The credits were taken from the pool, the window never made: the answer's one
    # message fits the first credit (before: a window made, fed and closed per request).
    assert len(pools) >= N  # the Node's, one per request
    assert not any(pool is distributor.credit_pool for pool in pools)


async def test_the_envelopes_timestamps_are_whole_milliseconds(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    timestamps: list[Any] = []

    def record(deadline: Any, _s: Any, _e: Any, _w: Any, _l: Any, queued: Any, *rest: Any) -> None:
        timestamps.append((deadline, queued, rest[6]))  # piece ... drop_state, millis, link

    before = time.time()
    counting = _patched(monkeypatch, _spy(envelopewriter, "try_encode_parts", record))
    async with _hello_worlds(redis_server, distributor, counting):
        pass
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
    get = _spy(Inbox, "get", lambda _: waits.append("get"))
    arrival = _spy(Inbox, "arrival", lambda _: waits.append("arrival"))
    counting = _patched(monkeypatch, get, arrival)
    async with _hello_worlds(redis_server, distributor, counting):
        pass
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
    pushes = distributor.admission.pushes
    spy = _spy(pushes, "_send_into", lambda _key, _items, future: given.append(future))
    counting = _patched(monkeypatch, spy)
    async with _hello_worlds(redis_server, distributor, counting):
        pass
    # The requests learn their LPUSH's outcome from their callbacks: the batches have no
    # future (before: one each, made and settled for nobody, about 4k instructions).
    assert len(given) == N and given == [None] * N


async def test_a_reply_of_one_message_is_not_split_as_a_batch_frame(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    split: list[Any] = []
    counting = _patched(monkeypatch, _spy(wire, "split_frame", split.append))
    async with _hello_worlds(redis_server, distributor, counting):
        pass
    # One request at a time: each answer is one message, handled as it is (before: made a
    # list of one by ``split_frame``, a call each).
    assert split == []


async def test_a_response_whole_with_its_ack_is_not_counted_in_flight_with_its_node(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    added: list[str] = []
    spy = _spy(
        distributor.peers, "add", lambda _peer, request_id, *_, **__: added.append(request_id)
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await apps.slow(scope, receive, send)
        else:
            await apps.hello(scope, receive, send)

    counting = _patched(monkeypatch, spy)
    async with _hello_worlds(redis_server, distributor, counting, app=app) as (client, node):
        hello_added = len(added)
        # A streamed response is counted while the relay waits for its pieces, and
        # forgotten at its end.
        assert (await client.get("/slow?3")).text == "0\n1\n2\ndone\n"
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
        pushes = distributor.admission.pushes
        spy = _spy(pushes, "_send_into", lambda _key, _items, settlement: given.append(settlement))
        with pytest.MonkeyPatch.context() as monkeypatch:
            counting = _patched(monkeypatch, spy)
            async with _hello_worlds(redis_server, distributor, counting):
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


async def test_a_hello_world_request_costs_the_distributor_four_coroutine_steps(
    redis_server: RedisServer,
) -> None:
    # A coroutine costs its creation, its frame and its end even when it never waits (about
    # 1.1k instructions, three times a plain call). Per request: the ASGI call and the
    # exchange's run, each entered and resumed once (for the ACK). The run waits for the ACK
    # itself, and sends a response that came whole with its ACK itself. Before, the wait for
    # the ACK was a coroutine of its own (entered and resumed), and so was the relay, which
    # never waits for such a response: 7 steps per request (8 when the relay sent the
    # response's events from a coroutine of their own, ``_send_events``).
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

    async with _hello_worlds(redis_server, distributor, _profiled(profile)):
        pass
    per_request = {
        name: count
        for name, count in entered.items()
        if name == "Distributor.__call__" or name.startswith("_Exchange.")
    }
    assert per_request == {"Distributor.__call__": 2 * N, "_Exchange.run": 2 * N}, entered


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
    add = distributor.ack_deadlines.add

    def spy(callback: Any, argument: Any, now: float | None = None) -> list[Any]:
        entry = add(callback, argument) if now is None else add(callback, argument, now)
        pushed.append(entry[0] - distributor.ack_deadlines.duration)
        return entry

    times: list[float] = []

    @contextlib.contextmanager
    def counting() -> Iterator[None]:
        with _patched(
            monkeypatch, (loop, "time", counted), (distributor.ack_deadlines, "add", spy)
        ):
            times.append(time.monotonic())  # before the requests
            yield

    async with _hello_worlds(redis_server, distributor, counting()):
        times.append(time.monotonic())  # after them
    # The liveness watch reads the clock once a second, not per request: on a loaded machine
    # its tick may fall inside the requests (a full-suite run failed on that once), and so may
    # the PING it sends then, timed to its reply.
    readers.pop("Distributor._watch_peers", None)
    readers.pop("Distributor._ping", None)
    assert readers == Counter(), readers
    # The deadlines were counted from times of this run, on the loop's own clock.
    before, after = times
    assert len(pushed) == N and all(before <= t <= after for t in pushed), pushed


async def test_a_hello_world_envelopes_timestamps_are_written_from_the_distributors_ints(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The distributor takes its times in whole milliseconds and gives the writer those ints
    # alone: no float is taken apart to write them (``_number``, about 4.4k instructions
    # each; from the ints 2k). Before: two per request.
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    numbers: list[Any] = []
    counting = _patched(monkeypatch, _spy(envelopewriter, "_number", numbers.append))
    async with _hello_worlds(redis_server, distributor, counting):
        pass
    assert numbers == []


async def test_a_hello_world_answer_is_read_once_and_its_ack_not_checked_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The distributor reads the usual ACK_SEND with ``responsereader`` itself, whose reader
    # admits only an ACK that ``wire.ack_of_ack_send`` accepts: neither ``wire.unpack`` nor
    # that check is called for it (before: both, once per request, about 3k instructions).
    # It takes the message's parts as the reader has them (``try_parts``), not the message
    # as a list (``try_decode``), sliced again into the SEND's and the ACK's arguments.
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    calls: list[str] = []
    counting = _patched(
        monkeypatch,
        _spy(wire, "unpack", lambda _: calls.append("unpack")),
        _spy(wire, "ack_of_ack_send", lambda _: calls.append("ack_of_ack_send")),
        _spy(responsereader, "try_decode", lambda *_, **__: calls.append("try_decode")),
    )
    async with _hello_worlds(redis_server, distributor, counting):
        pass
    assert calls == []


async def test_a_hello_world_answer_is_relayed_without_its_events_looked_at(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``responsereader`` admits only a start (an int status, header pairs it gives as
    # tuples, no trailers) and a body: the relay sends them as they are, with no pass over
    # the header pairs (before: ``_tuple_headers`` once per request, with the general
    # relay's look at each event's type around it).
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    walked: list[Any] = []
    counting = _patched(monkeypatch, _spy(distributor_module, "_tuple_headers", walked.append))
    async with _hello_worlds(redis_server, distributor, counting, headers={"x-test": "1"}):
        pass
    assert walked == []


async def test_a_streamed_answer_after_the_usual_first_message_is_relayed_whole(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first message of a streamed response may have the usual shape, its body saying
    # more follows: the relay's short path sends it and gives its credit back, then relays
    # the rest as ever. A pool of one credit makes a window of one 128 KiB piece: without
    # that credit back the Node would wait for it forever.
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    distributor.credit_pool = wire.CreditPool(budget=1)
    firsts: list[Any] = []
    read = responsereader.try_parts

    def spy(data: Any, **bounds: Any) -> Any:
        parts = read(data, **bounds)
        if parts is not None:
            firsts.append(parts[1][1].get("more_body"))
        return parts

    monkeypatch.setattr(responsereader, "try_parts", spy)
    node = Node(url=redis_server.url, app=apps.small_chunks, key="hello")
    count = 40  # 640 KiB: five windows of one 128 KiB piece
    expected = b"".join(apps.small_chunk(index) for index in range(count))
    async with serve_app(distributor, http="h11") as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for _ in range(3):
                response = await client.get(f"/?{count}")
                assert response.status_code == 200
                assert response.content == expected
    assert firsts == [True] * 3
    assert (distributor.credit_pool.used, distributor.credit_pool.large) == (0, 0)
