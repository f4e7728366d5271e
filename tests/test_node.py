"""Unit tests of the Node (no network): the scope it makes of a decoded one, a job's sends."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from minidasgi import responsewriter, wire
from minidasgi.node import Node, _Job, _local_scope
from minidasgi.resp import ReplyError


def test_the_apps_scope_has_tuples_where_asgi_servers_give_tuples() -> None:
    state = {"db": object()}
    scope: dict[str, Any] = {
        "type": "http",
        "headers": [[b"host", b"a"], [b"x", b"1"]],
        "client": ["127.0.0.1", 5000],
        "server": ["127.0.0.1", 8000],
    }
    local = _local_scope(scope, state)
    assert local["headers"] == [(b"host", b"a"), (b"x", b"1")]
    assert all(type(pair) is tuple for pair in local["headers"])
    assert local["client"] == ("127.0.0.1", 5000)
    assert local["server"] == ("127.0.0.1", 8000)
    assert local["state"] == state and local["state"] is not state


def test_headers_not_as_decoded_keep_only_their_pairs() -> None:
    # The general decoder may give anything there: only lists and tuples are kept, as tuples.
    for headers, kept in [
        ([[b"a", b"1"], "junk", (b"b", b"2")], [(b"a", b"1"), (b"b", b"2")]),
        ([("a", "1")], [("a", "1")]),
        ([5, [b"c", b"3"]], [(b"c", b"3")]),
        ([], []),
    ]:
        assert _local_scope({"type": "http", "headers": headers}, {})["headers"] == kept


def _posting_node() -> tuple[Node, list[bytes]]:
    """A Node that is not serving, whose outbox keeps what is posted (every post reaches one
    receiver)."""
    node = Node(app=lambda scope, receive, send: None, key="k", lifespan="off")
    node.loop = asyncio.get_running_loop()
    posted: list[bytes] = []

    def post(channel: str, message: wire.Packed, **_: Any) -> asyncio.Future[int]:
        posted.append(message if type(message) is bytes else b"".join(message))
        future: asyncio.Future[int] = node.loop.create_future()  # type: ignore[union-attr]
        future.set_result(1)
        return future

    node.outbox.post = post  # type: ignore[method-assign]
    return node, posted


async def test_a_request_is_told_to_the_peer_tracker_only_once_something_may_look() -> None:
    # Told as it started, every request cost the tracker an add and a discard, also the
    # hello world that ends in its first step; now only one still running when the periodic
    # check, a PING or a message of its distributor comes, as of its arrival.
    node, _ = _posting_node()
    node._can_take_on = lambda: True  # type: ignore[method-assign]
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] != "/":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    node.app = app
    quick = _http_envelope(1, ack_send=True, piece=wire.CHUNK_SIZE)
    await node._run_request(b"k", quick.encode())
    assert not node.peers.knows(quick.reply)

    def waiting(request_id: str, reply: str) -> wire.Envelope:
        scope = {"type": "http", "path": "/wait", "headers": []}
        events = [{"type": "http.request", "body": b"", "more_body": False}]
        return wire.Envelope(request_id, reply, time.time() + 60, scope, events, 1, 1.0)

    checked = waiting("c" * 32, "minidasgi:0:dist:c")
    messaged = waiting("m" * 32, "minidasgi:0:dist:m")
    pinged = waiting("p" * 32, "minidasgi:0:dist:p")
    tasks = [
        asyncio.ensure_future(node._run_request(b"k", envelope.encode()))
        for envelope in (checked, messaged, pinged)
    ]
    await asyncio.sleep(0)  # their first steps: all wait
    assert set(node._jobs) == {checked.id, messaged.id, pinged.id}
    assert not any(node.peers.knows(e.reply) for e in (checked, messaged, pinged))
    node._on_one_message(b"n", wire.pack(wire.CREDIT, messaged.id, 1))  # a message for one
    assert node.peers.requests(messaged.reply) == [messaged.id]
    assert not node.peers.knows(checked.reply) and not node.peers.knows(pinged.reply)
    before_ping = time.monotonic()
    (ping,) = wire.ping_messages(pinged.reply, [pinged.id])
    node._on_one_message(b"n", ping)  # a PING of another's distributor: that one told, heard
    assert node.peers.requests(pinged.reply) == [pinged.id]
    assert node.peers._peers[pinged.reply].heard >= before_ping
    node._check_peers()  # the periodic check: the last too, heard as of its arrival
    assert node.peers.requests(checked.reply) == [checked.id]
    assert node.peers._peers[checked.reply].heard == node._jobs[checked.id].arrived
    assert node.peers._peers[checked.reply].pings  # its envelope says its distributor pings
    release.set()
    await asyncio.gather(*tasks, *node._background)
    assert not any(node.peers.requests(e.reply) for e in (checked, messaged, pinged))


async def test_a_message_for_a_request_of_a_given_up_distributor_tells_its_untold_ones() -> None:
    # Its distributor given up (the tracker forgot it), a request stays in ``_jobs`` till its
    # task ends; a word for it must reach a later request of that distributor not told yet,
    # not be lost till the next look.
    node, _ = _posting_node()
    node._can_take_on = lambda: True  # type: ignore[method-assign]
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()

    node.app = app
    reply = "minidasgi:0:dist:d"
    events = [{"type": "http.request", "body": b"", "more_body": False}]

    def envelope(request_id: str) -> wire.Envelope:
        scope = {"type": "http", "path": "/", "headers": []}
        return wire.Envelope(request_id, reply, time.time() + 60, scope, events, 1, 1.0)

    first, second = envelope("1" * 32), envelope("2" * 32)
    tasks = [asyncio.ensure_future(node._run_request(b"k", first.encode()))]
    await asyncio.sleep(0)
    node._on_one_message(b"n", wire.pack(wire.CREDIT, first.id, 1))  # told
    silent = node._jobs[first.id].arrived + 2 * node.peers.timeout
    assert node.peers.tick(silent, node.liveness_interval) == [(reply, [first.id])]
    assert not node.peers.knows(reply)  # given up; the first request still runs
    tasks.append(asyncio.ensure_future(node._run_request(b"k", second.encode())))
    await asyncio.sleep(0)
    assert set(node._jobs) == {first.id, second.id} and not node.peers.knows(reply)
    before = time.monotonic()
    node._on_one_message(b"n", wire.pack(wire.CREDIT, first.id, 1))  # a word for the first
    assert node.peers.requests(reply) == [second.id]
    assert node.peers._peers[reply].heard >= before  # the word's time, not the arrival's
    release.set()
    await asyncio.gather(*tasks, *node._background)
    assert node.peers.requests(reply) == []


async def _ws_job(window: int) -> tuple[Any, list[bytes]]:
    """A WebSocket request's job on a Node that is not serving: what it posts is kept."""
    node, posted = _posting_node()
    scope = {"type": "websocket", "path": "/", "headers": []}
    envelope = wire.Envelope("r" * 32, "minidasgi:0:dist:x", time.time() + 5, scope, [], window)
    return _Job(node, envelope), posted


async def test_a_message_sent_while_another_waits_for_credit_waits_for_its_last_piece() -> None:
    # A sender alone takes no mutex (``_in_send``); one that finds another inside makes it.
    job, posted = await _ws_job(window=2)
    await job.send({"type": "websocket.accept"})  # one credit of two
    long = asyncio.create_task(job.send({"type": "websocket.send", "bytes": b"a" * 200_000}))
    await asyncio.sleep(0)
    assert len(posted) == 2  # the accept, the long message's first piece: no credit left
    short = asyncio.create_task(job.send({"type": "websocket.send", "bytes": b"b" * 10}))
    later = asyncio.create_task(job.send({"type": "websocket.send", "bytes": b"c" * 10}))
    job.window.grant(1)  # the short message's task runs first: it must wait for its turn
    for _ in range(4):
        await asyncio.sleep(0)
    job.window.grant(2)
    await asyncio.wait_for(asyncio.gather(long, short, later), 5)
    order = [next(c for c in "abc" if c.encode() * 10 in data) for data in posted[1:]]
    assert order == ["a", "a", "b", "c"]
    assert job._sending is not None and not job._sending.locked()
    job.window.grant(1)
    send = job.send({"type": "websocket.send", "bytes": b"d" * 10})
    await asyncio.wait_for(send, 5)  # the turn was given back
    assert len(posted) == 6


def _http_envelope(window: int, *, ack_send: bool, piece: int) -> wire.Envelope:
    """An HTTP request's envelope whose body came whole, due a minute from now."""
    scope = {"type": "http", "path": "/", "headers": []}
    events = [{"type": "http.request", "body": b"", "more_body": False}]
    return wire.Envelope(
        "r" * 32,
        "minidasgi:0:dist:x",
        time.time() + 60,
        scope,
        events,
        window,
        ack_send=ack_send,
        piece=piece,
    )


async def _http_job(
    window: int, *, ack_send: bool = False, piece: int = wire.CHUNK_SIZE
) -> tuple[Any, list[bytes], list[bool]]:
    """An HTTP request's job (its body came whole) on a Node that is not serving: what it
    posts is kept, and each call of the coroutine that publishes events, with its ``last``."""
    node, posted = _posting_node()
    job = _Job(node, _http_envelope(window, ack_send=ack_send, piece=piece))
    awaited: list[bool] = []
    publish_events = job._publish_events

    async def counted(events: list[Any], *, last: bool) -> None:
        awaited.append(last)
        await publish_events(events, last=last)

    job._publish_events = counted  # type: ignore[method-assign]
    return job, posted, awaited


def _sent(posted: list[bytes], kind: str = wire.SEND) -> list[list[str]]:
    """The event types of each message posted, every one a ``kind``."""
    types = []
    for message in posted:
        got, _, args = wire.unpack(message)
        assert got == kind
        types.append([event["type"] for event in args[0]])
    return types


async def test_a_response_of_one_body_piece_is_published_without_a_coroutine() -> None:
    # The usual response (a start, then one body piece, credit there) is posted by the
    # body's send itself: ``_publish_events``, a coroutine, is not entered.
    job, posted, awaited = await _http_job(window=8)
    await job.send({"type": "http.response.start", "status": 200, "headers": []})
    await job.send({"type": "http.response.body", "body": b"hello"})
    assert _sent(posted) == [["http.response.start", "http.response.body"]]
    assert awaited == []
    assert job.finished and job.window.available == 7
    assert (await job.receive())["type"] == "http.request"  # not read by the app
    assert (await job.receive())["type"] == "http.disconnect"  # as uvicorn, once it is over


async def test_a_start_held_with_a_single_credit_goes_the_general_way() -> None:
    # With one credit a start too large to travel with its body could not take a credit of
    # its own without waiting: the general path, which may wait, publishes it.
    job, posted, awaited = await _http_job(window=1)
    await job.send({"type": "http.response.start", "status": 200, "headers": []})
    await job.send({"type": "http.response.body", "body": b"hello"})
    assert _sent(posted) == [["http.response.start", "http.response.body"]]
    assert awaited == [True]
    assert job.finished and job.window.available == 0


async def test_a_start_too_large_for_its_body_goes_alone_on_a_credit_of_its_own() -> None:
    # 700 KiB of headers and a body piece of 100 KiB: together over the 768 KiB a
    # distributor of the previous release reads. The start leaves alone, then the body, each
    # on a credit, without the general path's coroutine.
    job, posted, awaited = await _http_job(window=2)
    headers = [(b"x-filler-%d" % i, b"h" * 1000) for i in range(700)]
    await job.send({"type": "http.response.start", "status": 200, "headers": headers})
    await job.send({"type": "http.response.body", "body": b"b" * (100 * 1024)})
    assert _sent(posted) == [["http.response.start"], ["http.response.body"]]
    assert awaited == []
    assert job.finished and job.window.available == 0


async def test_a_body_with_more_to_come_is_gathered_the_general_way() -> None:
    # A chunk with more to come, no start held: gathered into a piece by the general path.
    job, posted, awaited = await _http_job(window=8)
    await job.send({"type": "http.response.start", "status": 200, "headers": []})
    await job.send({"type": "http.response.body", "body": b"a", "more_body": True})
    await job.send({"type": "http.response.body", "body": b"b", "more_body": True})
    await job.send({"type": "http.response.body", "body": b"c"})
    assert awaited == [False, True]  # the first chunk took the start along at once
    assert _sent(posted) == [
        ["http.response.start", "http.response.body"],
        ["http.response.body"],
        ["http.response.body"],
    ]
    bodies = [wire.unpack(message)[2][0][-1]["body"] for message in posted]
    assert bodies == [b"a", b"b", b"c"]


async def test_a_held_ack_travels_with_the_response_written_from_its_body() -> None:
    # The ACK held for the response (a distributor that reads ACK_SEND) rides in the SEND
    # the body's send writes at once, and is known as posted (for a GONE that may follow).
    job, posted, awaited = await _http_job(window=8, ack_send=True)
    job.begin()
    assert job.unsent_ack is not None
    await job.send({"type": "http.response.start", "status": 200, "headers": []})
    await job.send({"type": "http.response.body", "body": b"hello"})
    assert _sent(posted, wire.ACK_SEND) == [["http.response.start", "http.response.body"]]
    assert job.unsent_ack is None and job._ack_posted is not None
    assert awaited == [] and job.finished


async def test_a_start_the_writer_declines_goes_with_its_body_the_general_way() -> None:
    # A start with a key the response writer does not write (trailers off) still travels
    # with its body in one message, made and encoded by the general path.
    job, posted, awaited = await _http_job(window=8, ack_send=True)
    job.begin()
    start = {"type": "http.response.start", "status": 200, "headers": [], "trailers": False}
    await job.send(start)
    await job.send({"type": "http.response.body", "body": b"hello"})
    assert _sent(posted, wire.ACK_SEND) == [["http.response.start", "http.response.body"]]
    assert wire.unpack(posted[0])[2][0][0] == start
    assert awaited == [] and job.finished and job.unsent_ack is None


async def test_a_body_piece_of_64_kib_or_more_is_written_once_as_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # From 64 KiB the writer gives the message as parts (the body not copied): still within
    # what always travels, it is posted as written, not written again the general way.
    job, posted, awaited = await _http_job(window=8)

    def general(*args: Any) -> Any:
        raise AssertionError("written the general way")

    monkeypatch.setattr(responsewriter, "try_write", general)
    monkeypatch.setattr(wire, "pack_parts", general)
    start = {"type": "http.response.start", "status": 200, "headers": []}
    body = b"b" * (100 * 1024)
    await job.send(start)
    await job.send({"type": "http.response.body", "body": body})
    monkeypatch.undo()
    event = {"type": "http.response.body", "body": body, "more_body": False}
    expected = wire.pack_parts(wire.SEND, job.id, [start, event])
    assert posted == [expected if type(expected) is bytes else b"".join(expected)]
    assert awaited == [] and job.finished


async def test_a_piece_larger_than_what_always_travels_is_written_once_if_it_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A distributor that reads 1 MiB pieces: the first piece of a download, after its start,
    # is over the 768 KiB every distributor reads but within what this one reads, its start
    # within the former (``_fits``). It is posted as written, not written again the general
    # way (a download's first and last pieces were, before).
    job, posted, awaited = await _http_job(window=8, piece=wire.PIECE_SIZE)

    def general(*args: Any) -> Any:
        raise AssertionError("written the general way")

    monkeypatch.setattr(responsewriter, "try_write", general)
    monkeypatch.setattr(wire, "pack_parts", general)
    start = {"type": "http.response.start", "status": 200, "headers": [(b"x", b"y")]}
    body = b"b" * wire.PIECE_SIZE
    await job.send(start)
    await job.send({"type": "http.response.body", "body": body, "more_body": True})
    await job.send({"type": "http.response.body", "body": body})
    monkeypatch.undo()
    more = {"type": "http.response.body", "body": body, "more_body": True}
    last = {"type": "http.response.body", "body": body, "more_body": False}
    expected = [
        wire.pack_parts(wire.SEND, job.id, [start, more]),
        wire.pack_parts(wire.SEND, job.id, [last]),
    ]
    assert posted == [m if type(m) is bytes else b"".join(m) for m in expected]
    assert awaited == []
    assert job.finished


async def _response_as_posted(
    window: int,
    ack_send: bool,
    piece: int,
    start: dict[str, Any],
    body: bytes,
    more: bool,
    *,
    general: bool,
) -> tuple[Any, ...]:
    """What a request whose app sends ``start`` then ``body`` posts, run by
    ``Node._run_request`` on a Node that is not serving, and the job's state after it;
    ``general``: every send taken the general way (``_publish_at_once`` declines). The
    distributor grants a SEND's credit back in the next loop turn, as if read at once."""
    node = Node(app=lambda scope, receive, send: None, key="k", lifespan="off")
    loop = node.loop = asyncio.get_running_loop()
    node._can_take_on = lambda: True  # type: ignore[method-assign]
    posted: list[bytes] = []

    def post(channel: str, message: wire.Packed, **_: Any) -> asyncio.Future[int]:
        posted.append(message if type(message) is bytes else b"".join(message))
        if wire.unpack(posted[-1])[0] in (wire.SEND, wire.ACK_SEND):
            loop.call_soon(jobs[0].window.grant, 1)
        future: asyncio.Future[int] = node.loop.create_future()  # type: ignore[union-attr]
        future.set_result(1)
        return future

    node.outbox.post = post  # type: ignore[method-assign]
    channel = node.channel.encode()  # each Node's own: told apart, the rest compared
    jobs: list[Any] = []
    taken: list[bool] = []  # what _publish_at_once answered

    async def app(scope: Any, receive: Any, send: Any) -> None:
        job = send.__self__
        jobs.append(job)
        at_once = job._publish_at_once

        def publish_at_once(*args: Any) -> bool:
            done = False if general else at_once(*args)
            taken.append(done)
            return done

        job._publish_at_once = publish_at_once
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": more})

    node.app = app
    envelope = _http_envelope(window, ack_send=ack_send, piece=piece)
    await node._run_request(b"k", envelope.encode())
    await asyncio.gather(*node._background)
    posted = [message.replace(channel, b"N" * len(channel)) for message in posted]
    (job,) = jobs
    state = (
        job.window.available,
        job.finished,
        job.failed,
        job.gone,
        job.unsent_ack,
        job._ack_posted is None,
        job.held_start,
    )
    return posted, state, taken


async def test_a_response_posts_the_same_whether_sent_at_once_or_the_general_way() -> None:
    # ``_publish_at_once`` (with ``_post_written``) repeats what the general path decides:
    # credit, the held ACK riding along, what fits, a start too large to travel with its
    # body. Over a grid of responses both must post the same bytes and leave the same job.
    filler = b"h" * 1000
    heads = [[], [(b"x", b"y" * 10)]] + [
        [(b"x-%d" % i, filler) for i in range(n)] for n in (700, 800, 1100)
    ]
    compared = 0
    answers: set[bool] = set()  # what _publish_at_once answered: both, over the grid
    sizes = (0, 5, 100 * 1024, 900 * 1024, wire.PIECE_SIZE)
    pieces = (wire.CHUNK_SIZE, wire.PIECE_SIZE)
    grid = itertools.product((1, 2, 3), (False, True), pieces, heads, sizes, (False, True))
    for window, ack_send, piece, headers, size, more in grid:
        if size > piece:
            continue
        for declined in (False, True):  # a start the writer declines (a key it does not write)
            start: dict[str, Any] = {
                "type": "http.response.start",
                "status": 200,
                "headers": headers,
            }
            if declined:
                start["trailers"] = False
            case = (window, ack_send, piece, start, b"b" * size, more)
            posted, state, taken = await _response_as_posted(*case, general=False)
            expected, expected_state, _ = await _response_as_posted(*case, general=True)
            where = (window, ack_send, piece, len(headers), size, more, declined)
            assert posted == expected, where
            assert state == expected_state, where
            answers.update(taken)
            compared += 1
    assert compared == 960 and answers == {True, False}


class _Pop:
    """What a stop's ``_unblock_pop`` reads of the pop connection."""

    def __init__(self, awaiting: int) -> None:
        self.awaiting_replies = awaiting


class _Unblocker:
    """A publisher answering CLIENT UNBLOCK with ``answers`` in turn, then the last again
    (1: a pop woken, 0: none blocked there); an error instead if ``refused``."""

    def __init__(self, *answers: int, refused: bool = False) -> None:
        self.answers, self.refused, self.sent = answers, refused, 0

    async def execute(self, *args: Any) -> int:
        assert args[:2] == ("CLIENT", "UNBLOCK")
        self.sent += 1
        if self.refused:
            raise ReplyError("NOPERM this user has no permissions to run 'client|unblock'")
        return self.answers[min(self.sent, len(self.answers)) - 1]


async def test_a_stop_asks_again_to_unblock_only_a_pop_on_its_way_and_within_bounds() -> None:
    node = Node(app=lambda scope, receive, send: None, key="k", lifespan="off", pop_timeout=0.5)

    async def asks(publisher: _Unblocker, awaiting: int) -> int:
        await asyncio.wait_for(node._unblock_pop(publisher, _Pop(awaiting), 7), 5)  # type: ignore[arg-type]
        return publisher.sent

    assert await asks(_Unblocker(1), 1) == 1  # woken at once
    assert await asks(_Unblocker(0), 0) == 1  # nothing blocked, nothing awaited: it ended
    assert await asks(_Unblocker(0, refused=True), 1) == 1  # not allowed: the pop times out
    assert await asks(_Unblocker(0, 0, 1), 1) == 3  # on its way, then blocked: woken
    # Never woken (the pop's way up stalled for good): given up by pop_timeout, and backing
    # off meanwhile (0.05, 0.1, 0.2, 0.4 s: five asks at most; one each 0.05 s made eleven).
    assert 2 <= await asks(_Unblocker(0), 1) <= 5
