"""What a Node spends per request, counted structurally (no timings): asyncio objects made
and loop callbacks scheduled while it serves a batch of hello-world requests popped at once."""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from minidasgi import Node, jsoncodec, responsewriter, wire
from minidasgi import node as node_module
from minidasgi.resp import Connection, Subscriber, connect
from minidasgi.testing import RedisServer

from . import apps
from .stack import poll, run_node

N = 32  # one pop's batch


def _envelope(request_id: str, reply: str, *, ack_send: bool = False, liveness: float = 0) -> bytes:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [[b"host", b"example"]],
        "client": ["127.0.0.1", 1],
        "server": ["127.0.0.1", 2],
    }
    events = [{"type": "http.request", "body": b"", "more_body": False}]
    envelope = wire.Envelope(
        request_id, reply, time.time() + 30, scope, events, liveness=liveness, ack_send=ack_send
    )
    return envelope.encode()


async def _distributor_end(
    redis_server: RedisServer, on_message: Callable[[bytes, bytes], None]
) -> tuple[str, Subscriber, Connection]:
    """What a distributor holds, for a test that plays one: its reply channel (subscribed, its
    messages to ``on_message``) and a connection to push envelopes with. Closed by the test."""
    reply = wire.new_channel("minidasgi", 0, "dist")
    subscriber = Subscriber(redis_server.url, on_message=on_message)
    subscriber.start()
    await asyncio.wait_for(subscriber.subscribe(reply), 5)
    pusher = await asyncio.wait_for(connect(redis_server.url), 5)
    return reply, subscriber, pusher


async def _echo_body(scope: Any, receive: Any, send: Any) -> None:
    """Reads its (whole) body as most apps do, then answers it."""
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"Hello World!" + body})


async def _serve_counted(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Counter[str]:
    """N requests popped in one batch; what was made and scheduled meanwhile, per request."""
    node = Node(url=redis_server.url, app=_echo_body, key="K", lifespan="off")
    got: list[Any] = []

    def on_message(_: bytes, data: bytes) -> None:
        for message in wire.split_frame(data):
            kind, _, args = wire.unpack(message)
            if kind == wire.SEND:
                got.extend(e for e in args[0] if e["type"] == "http.response.body")

    reply, subscriber, pusher = await _distributor_end(redis_server, on_message)
    counts: Counter[str] = Counter()
    try:
        async with run_node(node):
            loop: Any = asyncio.get_running_loop()
            if not hasattr(loop, "_run_once"):
                pytest.skip("needs asyncio's own event loop")
            for name in ("Queue", "Event", "Lock"):
                made = getattr(asyncio, name)

                class Counted(made):  # type: ignore[misc, valid-type]
                    def __init__(self, *args: Any, _name: str = name, **kwargs: Any) -> None:
                        counts[_name] += 1
                        super().__init__(*args, **kwargs)

                monkeypatch.setattr(asyncio, name, Counted)
            call_soon = loop.call_soon

            def counted_call_soon(*args: Any, **kwargs: Any) -> Any:
                counts["call_soon"] += 1
                return call_soon(*args, **kwargs)

            monkeypatch.setattr(loop, "call_soon", counted_call_soon, raising=False)
            envelopes = [_envelope(wire.new_request_id(), reply) for _ in range(N)]
            await pusher.execute("LPUSH", "K", *envelopes)  # one pop takes them all
            assert await poll(lambda: len(got) >= N, 10), got
            monkeypatch.undo()
    finally:
        monkeypatch.undo()
        await pusher.close()
        await subscriber.close()
    assert [e["body"] for e in got] == [b"Hello World!"] * N
    return counts


async def test_a_request_makes_no_asyncio_queue_nor_lock(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job's inbox is a deque with a waiter future made only when the app waits: an
    # asyncio.Queue per request also made an Event, getters and putters it never used. Its
    # sends are serialized by a Mutex, taken without a coroutine when nobody else sends.
    counts = await _serve_counted(redis_server, monkeypatch)
    assert counts["Queue"] == 0, counts
    assert counts["Lock"] == 0, counts


async def test_a_request_costs_fewer_than_three_loop_callbacks(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Per request: its task's first step and its wake-up by the PUBLISH's reply; a held
    # response start is flushed by one callback per loop turn for all jobs, and the request
    # frees its slot itself as its task ends. Before, a done callback did that (3.4 per
    # request, counting the test's own subscriber and Redis I/O); before that, a start cost
    # a callback per request and the task's end two: 6.4.
    counts = await _serve_counted(redis_server, monkeypatch)
    assert counts["call_soon"] < 3 * N, counts


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"b")]})
    await send({"type": "http.response.body", "body": b"Hello World!"})


@pytest.mark.parametrize("ack_send", [True, False])
async def test_a_hello_world_response_skips_the_general_writer(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, ack_send: bool
) -> None:
    # The start and body of a usual response, in an ACK_SEND (a distributor that reads it) or
    # a SEND, are written straight (``responsewriter``); before, each by the general writer.
    # And from the body and its flag (``try_write_body``): no body event made for the writer
    # to check (``try_write``), as the Node did before.
    node = Node(url=redis_server.url, app=_hello, key="K", lifespan="off", liveness_interval=3600)
    kinds: list[str] = []
    bodies: list[bytes] = []

    def on_message(_: bytes, data: bytes) -> None:
        for message in wire.split_frame(data):
            kind, _, args = wire.unpack(message)
            kinds.append(kind)
            if kind in (wire.SEND, wire.ACK_SEND):
                bodies.extend(e["body"] for e in args[0] if e["type"] == "http.response.body")

    encoded: list[Any] = []
    try_encode_parts = jsoncodec.try_encode_parts

    def spy(value: Any, **bounds: Any) -> Any:
        encoded.append(value[0] if type(value) is list and value else type(value))
        return try_encode_parts(value, **bounds)

    from_events: list[str] = []
    try_write = responsewriter.try_write

    def events_spy(kind: str, *args: Any) -> Any:
        from_events.append(kind)
        return try_write(kind, *args)

    reply, subscriber, pusher = await _distributor_end(redis_server, on_message)
    try:
        async with run_node(node):
            monkeypatch.setattr(jsoncodec, "try_encode_parts", spy)
            monkeypatch.setattr(responsewriter, "try_write", events_spy)
            envelopes = [
                _envelope(wire.new_request_id(), reply, ack_send=ack_send) for _ in range(N)
            ]
            await pusher.execute("LPUSH", "K", *envelopes)
            assert await poll(lambda: len(bodies) >= N, 10), kinds
            monkeypatch.undo()
    finally:
        monkeypatch.undo()
        await pusher.close()
        await subscriber.close()
    assert bodies == [b"Hello World!"] * N
    expected = wire.ACK_SEND if ack_send else wire.SEND
    assert kinds.count(expected) == N, kinds
    assert wire.SEND not in encoded and wire.ACK_SEND not in encoded, encoded
    assert from_events == [], from_events


async def test_a_usual_scope_reaches_the_app_as_the_envelope_reader_made_it(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scope uvicorn gives, read by ``envelopereader`` with tuples where the app expects
    # tuples: no second pass over it (``_local_scope``) to make them; before, one a request.
    scopes: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await _hello(scope, receive, send)

    node = Node(url=redis_server.url, app=app, key="K", lifespan="off", liveness_interval=3600)
    made: list[Any] = []
    local_scope = node_module._local_scope

    def spy(scope: Any, state: Any) -> Any:
        made.append(scope)
        return local_scope(scope, state)

    monkeypatch.setattr(node_module, "_local_scope", spy)
    scope = apps.uvicorn_scope()
    events = [{"type": "http.request", "body": b"", "more_body": False}]
    reply, subscriber, pusher = await _distributor_end(redis_server, lambda *_: None)
    try:
        async with run_node(node):
            now = int(time.time() * 1000)
            envelopes = [
                wire.encode_envelope(
                    wire.new_request_id(),
                    reply,
                    now + 30_000,
                    scope,
                    events,
                    liveness=1.0,
                    queued=now,
                    ack_send=True,
                    millis=True,
                )
                for _ in range(N)
            ]
            await pusher.execute("LPUSH", "K", *envelopes)
            assert await poll(lambda: len(scopes) >= N, 10)
    finally:
        await pusher.close()
        await subscriber.close()
    assert made == []
    for seen in scopes:
        assert seen["headers"] == scope["headers"]
        assert all(type(pair) is tuple for pair in seen["headers"])
        assert seen["server"] == scope["server"] and type(seen["server"]) is tuple
        assert seen["client"] == scope["client"] and type(seen["client"]) is tuple
        assert seen["state"] == {} and "extensions" not in seen
    assert len({id(seen["state"]) for seen in scopes}) == N  # each its own


def _ws_envelope(request_id: str, reply: str) -> bytes:
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [[b"host", b"example"]],
        "client": ["127.0.0.1", 1],
        "server": ["127.0.0.1", 2],
        "subprotocols": [],
    }
    events = [{"type": "websocket.connect"}]
    envelope = wire.Envelope(
        request_id, reply, time.time() + 30, scope, events, liveness=0, unit=wire.CREDIT_UNIT
    )
    return envelope.encode()


async def _echo_ws(scope: Any, receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": message["text"]})


async def test_websocket_messages_echoed_in_one_batch_cost_one_loop_callback_for_their_publish(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # N messages of one socket in one batch frame: the app echoes them all in one step of its
    # task (none waits), and the N SENDs leave in one PUBLISH whose outcome is checked by one
    # callback for all of them (Outbox.post's ``lost``). Before, each SEND hung a done
    # callback of its own on the batch's future: one loop callback per message.
    n = 32
    node = Node(url=redis_server.url, app=_echo_ws, key="K", lifespan="off", liveness_interval=3600)
    request_id = wire.new_request_id()
    acks: list[Any] = []
    echoed: list[str] = []

    def on_message(_: bytes, data: bytes) -> None:
        for message in wire.split_frame(data):
            kind, _, args = wire.unpack(message)
            if kind == wire.ACK:
                acks.append(args)
            elif kind == wire.SEND:
                echoed.extend(e["text"] for e in args[0] if e["type"] == "websocket.send")

    reply, subscriber, pusher = await _distributor_end(redis_server, on_message)
    calls = 0
    try:
        async with run_node(node):
            loop: Any = asyncio.get_running_loop()
            if not hasattr(loop, "_run_once"):
                pytest.skip("needs asyncio's own event loop")
            await pusher.execute("LPUSH", "K", _ws_envelope(request_id, reply))
            assert await poll(lambda: acks, 10)
            node_channel = acks[0][0]
            events = [{"type": "websocket.receive", "text": f"m{i}"} for i in range(n)]
            frame = wire.batch_frame([wire.pack(wire.EVENT, request_id, e) for e in events])
            call_soon = loop.call_soon

            def counted_call_soon(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                return call_soon(*args, **kwargs)

            monkeypatch.setattr(loop, "call_soon", counted_call_soon, raising=False)
            await pusher.execute("PUBLISH", node_channel, frame)
            assert await poll(lambda: len(echoed) >= n, 10), echoed
            # Every PUBLISH's reply read and its callback run (whatever the machine's load).
            assert await poll(lambda: not node.outbox._lost, 10)
            monkeypatch.undo()
            disconnect = {"type": "websocket.disconnect", "code": 1000}
            await pusher.execute(
                "PUBLISH", node_channel, wire.pack(wire.EVENT, request_id, disconnect)
            )
            assert await poll(lambda: not node._jobs, 10)
    finally:
        monkeypatch.undo()
        await pusher.close()
        await subscriber.close()
    assert echoed == [f"m{i}" for i in range(n)]
    assert calls < n / 2, calls


async def _turns_of_one_request(
    node: Node, pusher: Any, reply: str, got: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, int]]:
    """Push one hello-world request; return the loop turns (counted from the push) in which
    the Node read it off its pop connection ("popped") and wrote a PUBLISH naming it, or a
    BLMPOP, in order."""
    loop: Any = asyncio.get_running_loop()
    popper = node._pop_ids[0][0]
    request_id = wire.new_request_id()
    marker = request_id.encode()
    turns = [0]
    events: list[tuple[str, int]] = []
    run_once, write, parser = loop._run_once, Connection._write, popper._parser

    def turn() -> None:
        turns[0] += 1
        run_once()

    def spied_write(self: Connection, data: Any) -> None:
        if b"BLMPOP" in bytes(data):
            events.append(("pop", turns[0]))
        elif marker in bytes(data) and b"PUBLISH" in bytes(data):
            events.append(("publish", turns[0]))
        write(self, data)

    class Reading:
        def feed(self, data: Any) -> None:
            if marker in bytes(data):
                events.append(("popped", turns[0]))
            parser.feed(data)

        def feed_gets(self, data: Any) -> Any:
            self.feed(data)
            return parser.gets()

        def gets(self) -> Any:
            return parser.gets()

    monkeypatch.setattr(loop, "_run_once", turn, raising=False)
    monkeypatch.setattr(Connection, "_write", spied_write)
    popper._parser = Reading()
    try:
        count = len(got)
        await pusher.execute("LPUSH", "K", _envelope(request_id, reply, ack_send=True))
        assert await poll(lambda: len(got) > count, 10)
    finally:
        popper._parser = parser
        monkeypatch.undo()
    return events


async def test_one_request_in_flight_is_published_the_turn_after_its_pop_and_before_the_next(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The BLMPOP's reply starts the job from the code that reads it, so the job's first step
    # runs in the next loop turn, just before the pop loop wakes; the pop loop then sends what
    # the job posted itself, before the next pop. Before: the pop loop woke first and started
    # the job, which ran a turn later (the PUBLISH two turns after the pop); before that, three.
    node = Node(url=redis_server.url, app=_hello, key="K", lifespan="off", liveness_interval=3600)
    got: list[bytes] = []
    reply, subscriber, pusher = await _distributor_end(
        redis_server, lambda _, data: got.append(data)
    )
    try:
        async with run_node(node):
            if not hasattr(asyncio.get_running_loop(), "_run_once"):
                pytest.skip("needs asyncio's own event loop")
            assert await poll(lambda: 0 in node._pop_ids, 5)
            for _ in range(3):
                events = await _turns_of_one_request(node, pusher, reply, got, monkeypatch)
                [(_, popped)] = [e for e in events if e[0] == "popped"]
                after = [e for e in events if e[1] >= popped and e[0] != "popped"]
                assert after[:2] == [("publish", popped + 1), ("pop", popped + 1)], events
    finally:
        monkeypatch.undo()
        await pusher.close()
        await subscriber.close()


async def _state_after_turns(
    node: Node,
    pusher: Any,
    reply: str,
    got: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
    liveness: float = 1.0,
) -> tuple[int, dict[int, tuple[int, int, bool, int]]]:
    """Push one hello-world request; return the loop turn (counted from the push) in which
    the Node read it off its pop connection, and per turn, once it ran, the requests in
    flight, the cancelled handles left in the loop's ready queue (each costs a turn of its
    own), whether the Node left a flush scheduled (its held starts', its outbox's), and how
    many of its outbox's batches still have a callback to run when their reply comes. The
    test's own pusher and subscriber share the loop: their handles are not counted."""
    loop: Any = asyncio.get_running_loop()
    popper = node._pop_ids[0][0]
    request_id = wire.new_request_id()
    marker = request_id.encode()
    turns = [0]
    popped_in: list[int] = []
    after: dict[int, tuple[int, int, bool, int]] = {}
    run_once, parser = loop._run_once, popper._parser

    def turn() -> None:
        turns[0] += 1
        run_once()
        cancelled = sum(handle.cancelled() for handle in loop._ready)
        scheduled = node._starts_flush is not None or bool(node.outbox.batcher._flush_scheduled)
        # A batch watched for a lost message is told by the code reading its reply, or, on
        # a done callback of its future, by a loop callback (a turn of its own then).
        callbacks = sum(bool(future._callbacks) for future in node.outbox._lost)
        after[turns[0]] = (len(node._requests), cancelled, scheduled, callbacks)

    class Reading:
        def feed(self, data: Any) -> None:
            if marker in bytes(data):
                popped_in.append(turns[0])  # the turn under way
            parser.feed(data)

        def feed_gets(self, data: Any) -> Any:
            self.feed(data)
            return parser.gets()

        def gets(self) -> Any:
            return parser.gets()

    monkeypatch.setattr(loop, "_run_once", turn, raising=False)
    popper._parser = Reading()
    try:
        count = len(got)
        envelope = _envelope(request_id, reply, ack_send=True, liveness=liveness)
        await pusher.execute("LPUSH", "K", envelope)
        assert await poll(lambda: len(got) > count, 10)
    finally:
        popper._parser = parser
        monkeypatch.undo()
    [popped] = popped_in
    return popped, after


async def test_a_lone_request_ends_in_the_turn_it_ran_and_leaves_the_loop_nothing_to_run(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At one request in flight: the turn after the pop's reply is read runs the job, which
    # posts its response and ends without waiting for the PUBLISH's reply, then the pop loop,
    # which sends the next BLMPOP; neither leaves a callback for the next turn (a flush
    # scheduled and called off would cost one, with nothing to do), so the loop sleeps until
    # the next reply comes. Three turns per request, not four: before, the job woke again for
    # the PUBLISH's reply, and held starts and the outbox scheduled flushes the pop loop then
    # called off.
    node = Node(url=redis_server.url, app=_hello, key="K", lifespan="off", liveness_interval=3600)
    got: list[bytes] = []
    reply, subscriber, pusher = await _distributor_end(
        redis_server, lambda _, data: got.append(data)
    )
    try:
        async with run_node(node):
            if not hasattr(asyncio.get_running_loop(), "_run_once"):
                pytest.skip("needs asyncio's own event loop")
            assert await poll(lambda: 0 in node._pop_ids, 5)
            for _ in range(3):
                popped, after = await _state_after_turns(node, pusher, reply, got, monkeypatch)
                assert after[popped][0] == 1, after  # the job's first step is to run
                # The job ended, and left the loop nothing of the Node's to run, nor a
                # callback for when its PUBLISH's reply comes (a turn of its own then).
                assert after[popped + 1] == (0, 0, False, 0), after
            # A distributor that does not ping (an older one) has only the Node to tell it of
            # a lost end: the Node watches the count, but from the code reading the reply,
            # with no callback on the loop (before, a done callback of the batch's future).
            popped, after = await _state_after_turns(
                node, pusher, reply, got, monkeypatch, liveness=0
            )
            assert after[popped + 1] == (0, 0, False, 0), after
            # What is watched is forgotten once its PUBLISH's reply is read: told by that code,
            # which nothing else would make up for.
            assert await poll(lambda: not node.outbox._lost, 5), node.outbox._lost
    finally:
        monkeypatch.undo()
        await pusher.close()
        await subscriber.close()


async def test_a_hello_world_request_costs_the_node_three_coroutines(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A coroutine that never waits still costs its creation, its frame and its end (about a
    # thousand instructions, three times a plain call): per request the task's own
    # (``_run_request``, which awaits the app itself) and one per ``send``. Before, each send
    # ran a second one (``_send``), an app that had sent its whole response a last one for
    # nothing (``_done``): 8 per request; then the job's ``run`` and one to publish the body
    # (``_publish_events``, now only when the body must wait or be gathered): 5.
    node = Node(url=redis_server.url, app=_hello, key="K", lifespan="off", liveness_interval=3600)
    bodies: list[bytes] = []

    def on_message(_: bytes, data: bytes) -> None:
        for message in wire.split_frame(data):
            kind, _, args = wire.unpack(message)
            if kind in (wire.SEND, wire.ACK_SEND):
                bodies.extend(e["body"] for e in args[0] if e["type"] == "http.response.body")

    entered: Counter[str] = Counter()
    node_code = Node.__init__.__code__.co_filename

    def profile(frame: Any, event: str, _: Any) -> None:
        code = frame.f_code
        # A coroutine of the Node's entered (its first step, or a resumption: the hello app
        # never waits, so each runs in one step; the pop loop's few are counted too).
        if (
            event == "call"
            and code.co_flags & inspect.CO_COROUTINE
            and code.co_filename == node_code
        ):
            entered[code.co_qualname] += 1

    reply, subscriber, pusher = await _distributor_end(redis_server, on_message)
    try:
        async with run_node(node):
            envelopes = [_envelope(wire.new_request_id(), reply, ack_send=True) for _ in range(N)]
            sys.setprofile(profile)
            try:
                await pusher.execute("LPUSH", "K", *envelopes)
                assert await poll(lambda: len(bodies) >= N, 10)
            finally:
                sys.setprofile(None)
    finally:
        await pusher.close()
        await subscriber.close()
    assert bodies == [b"Hello World!"] * N
    assert entered["_Job.send"] == 2 * N, entered
    assert entered["Node._run_request"] == N, entered
    assert "_Job._publish_events" not in entered, entered
    assert sum(entered.values()) < 4 * N, entered


async def test_a_lone_request_ends_its_loop_turn_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At one request in flight the pop promises the loop turn (``_promise_turn``); the job,
    # whose response ends in its first step, sends what it posted itself (``_end_turn``), and
    # the pop loop, waking after it in the same turn, has nothing left to send. Before, the
    # pop loop, no longer finding the promise, ended the turn a second time for nothing.
    node = Node(url=redis_server.url, app=_hello, key="K", lifespan="off", liveness_interval=3600)
    got: list[bytes] = []
    reply, subscriber, pusher = await _distributor_end(
        redis_server, lambda _, data: got.append(data)
    )
    ends = 0
    try:
        async with run_node(node):
            assert await poll(lambda: 0 in node._pop_ids, 5)
            end_turn = node._end_turn

            def counted() -> None:
                nonlocal ends
                ends += 1
                end_turn()

            monkeypatch.setattr(node, "_end_turn", counted)
            n = 5
            for i in range(n):
                envelope = _envelope(wire.new_request_id(), reply, ack_send=True, liveness=1.0)
                await pusher.execute("LPUSH", "K", envelope)
                assert await poll(lambda sent=i: len(got) > sent, 10)
                # The pop loop has woken and popped again (the request is over).
                assert await poll(lambda: not node._requests and node._pop_ids, 10)
            await asyncio.sleep(0.05)
            monkeypatch.undo()
    finally:
        monkeypatch.undo()
        await pusher.close()
        await subscriber.close()
    assert ends == n, ends


async def test_a_request_task_is_made_by_the_task_class_unless_the_loop_has_a_factory(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a task factory, the loop's create_task only checks the loop and names the task
    # before making it with the Task class (~2k instructions per request): the Node makes it
    # itself. A factory the loop has still makes every request's task, also one set while a
    # pop waits. Before, every request went through create_task.
    node = Node(url=redis_server.url, app=_hello, key="K", lifespan="off", liveness_interval=3600)
    got: list[bytes] = []
    reply, subscriber, pusher = await _distributor_end(
        redis_server, lambda _, data: got.append(data)
    )
    made: list[str] = []
    factory_made: list[Any] = []

    def factory(loop: Any, coroutine: Any, **kwargs: Any) -> Any:
        factory_made.append(coroutine.__qualname__)
        return asyncio.Task(coroutine, loop=loop, **kwargs)

    async def serve(count: int) -> None:
        for _ in range(count):
            sent = len(got)
            await pusher.execute("LPUSH", "K", _envelope(wire.new_request_id(), reply))
            assert await poll(lambda before=sent: len(got) > before, 10)

    loop: Any = asyncio.get_running_loop()
    try:
        async with run_node(node):
            assert await poll(lambda: 0 in node._pop_ids, 5)
            create_task = loop.create_task

            def counted(coroutine: Any, **kwargs: Any) -> Any:
                made.append(coroutine.__qualname__)
                return create_task(coroutine, **kwargs)

            monkeypatch.setattr(loop, "create_task", counted, raising=False)
            await serve(3)
            assert "Node._run_request" not in made, made
            monkeypatch.undo()
            loop.set_task_factory(factory)
            try:
                await serve(3)
            finally:
                loop.set_task_factory(None)
    finally:
        monkeypatch.undo()
        await pusher.close()
        await subscriber.close()
    assert factory_made.count("Node._run_request") == 3, factory_made


async def test_a_blmpop_pop_passes_through_no_coroutine_of_the_node_but_its_loop(
    redis_server: RedisServer,
) -> None:
    # Each pop's wait passes through every coroutine between the pop loop and the reply's
    # future, in its creation and at its resumption: the BLMPOP is awaited by the pop loop
    # itself, not through ``_pop`` (~1.2k instructions per pop), which serves BRPOP only.
    node = Node(url=redis_server.url, app=_hello, key="K", lifespan="off", liveness_interval=3600)
    got: list[bytes] = []
    reply, subscriber, pusher = await _distributor_end(
        redis_server, lambda _, data: got.append(data)
    )
    entered: Counter[str] = Counter()
    node_code = Node.__init__.__code__.co_filename

    def profile(frame: Any, event: str, _: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_filename == node_code:
            entered[code.co_qualname] += 1

    try:
        async with run_node(node):
            assert await poll(lambda: 0 in node._pop_ids, 5)
            sys.setprofile(profile)
            try:
                for i in range(5):
                    envelope = _envelope(wire.new_request_id(), reply, ack_send=True)
                    await pusher.execute("LPUSH", "K", envelope)
                    assert await poll(lambda sent=i: len(got) > sent, 10)
            finally:
                sys.setprofile(None)
    finally:
        await pusher.close()
        await subscriber.close()
    assert entered["Node._pop_group"] >= 5, entered  # the pop loop woke for each request
    assert entered["Node._pop"] == 0, entered
