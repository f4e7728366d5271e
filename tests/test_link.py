"""The link's sans-I/O parts: the offer, the handshake and frame headers (untrusted input,
every size bounded), and the reader's backpressure and watchdog on a fake transport."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest

from minidasgi import create_distributor, link

TOKEN = bytes(range(32))


def test_an_offer_reads_back() -> None:
    offer = link.make_offer("10.0.0.1", 4567, TOKEN)
    assert link.parse_offer(offer) == ("10.0.0.1", 4567, TOKEN)
    assert link.parse_offer(link.make_offer("[::1]", 80, TOKEN)) == ("::1", 80, TOKEN)


@pytest.mark.parametrize(
    "offer",
    [
        None,
        7,
        "",
        "host:1",  # no token
        "host:0:" + "00" * 32,  # port 0
        "host:65536:" + "00" * 32,
        "host:x:" + "00" * 32,
        ":80:" + "00" * 32,  # no host
        "host:80:" + "00" * 31,  # a short token
        "host:80:" + "zz" * 32,  # not hex
        "h" * 400 + ":80:" + "00" * 32,  # too long
    ],
)
def test_what_is_not_an_offer(offer: Any) -> None:
    assert link.parse_offer(offer) is None


def test_a_handshake_reads_back_and_has_a_fixed_size() -> None:
    data = link.pack_handshake(TOKEN, "abc123")
    assert len(data) == link.HANDSHAKE_SIZE == 101
    assert link.parse_handshake(data, TOKEN) == "abc123"
    assert link.parse_handshake(link.pack_handshake(TOKEN, "i" * 64), TOKEN) == "i" * 64


def _forged(size: int, raw: bytes, padding: bytes = b"") -> bytes:
    data = link.MAGIC + TOKEN + bytes([size]) + raw + padding
    return data.ljust(link.HANDSHAKE_SIZE, b"\0")[: link.HANDSHAKE_SIZE]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (link.pack_handshake(bytes(32), "abc"), "wrong link token"),
        (b"MDL2" + link.pack_handshake(TOKEN, "abc")[4:], "not a link handshake"),
        (link.pack_handshake(TOKEN, "abc")[:-1], "not a link handshake"),
        (link.pack_handshake(TOKEN, "abc") + b"\0", "not a link handshake"),
        (_forged(0, b""), "malformed"),
        (_forged(65, b"a" * 64), "malformed"),
        (_forged(3, b"abc", b"trailing"), "malformed"),
        (_forged(3, b"a\xffc"), "malformed"),
        (_forged(3, b"a\nc"), "malformed"),
    ],
)
def test_a_bad_handshake_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(link.LinkError, match=why):
        link.parse_handshake(data, TOKEN)


def test_frame_headers_are_bounded() -> None:
    assert link.parse_frame_header(link.pack_frame_header(5, link.MORE)) == (5, link.MORE)
    assert link.parse_frame_header(link.pack_frame_header(0, link.HEARTBEAT)) == (0, 2)
    size = link.MAX_FRAME
    assert link.parse_frame_header(link.pack_frame_header(size, link.LAST)) == (size, 0)
    for header in (
        link.pack_frame_header(size + 1, link.MORE),  # too large
        link.pack_frame_header(1, link.HEARTBEAT),  # a heartbeat with a body
        link.pack_frame_header(1, 3),  # an unknown kind
    ):
        with pytest.raises(link.LinkError):
            link.parse_frame_header(header)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.aborted = False
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def _feed(reader: link.LinkReader, data: bytes) -> None:
    """What the loop does: bytes into the reader's buffers, in as many reads as they take."""
    while data:
        buffer = reader.get_buffer(-1)
        assert len(buffer), "get_buffer() returned an empty buffer"  # asyncio's fatal error
        size = min(len(buffer), len(data))
        buffer[:size] = data[:size]
        data = data[size:]
        reader.buffer_updated(size)


async def _attached(
    peer_timeout: float = 0.2, heartbeat: float = 0.0
) -> tuple[link.LinkReader, _Transport, list[Any]]:
    events: list[Any] = []
    listener = link.LinkListener("127.0.0.1", 0, TOKEN, lambda request_id: True)
    reader = listener._accept()
    transport = _Transport()
    reader.connection_made(transport)
    _feed(reader, link.pack_handshake(TOKEN, "r1"))
    assert transport.written == link.ACCEPTED and not transport.reading
    listener.take(
        "r1",
        lambda body, more: events.append((len(body), more)),
        lambda why: events.append(("lost", why)),
        lambda why: events.append(("silent", why)),
        peer_timeout,
        heartbeat,
    )
    assert transport.reading
    return reader, transport, events


async def test_the_reader_holds_back_past_its_bound_and_its_watchdog_waits() -> None:
    reader, transport, events = await _attached()
    piece = b"x" * (1 << 20)
    for _ in range(4):
        _feed(reader, link.pack_frame_header(len(piece), link.MORE) + piece)
    assert events == [(1 << 20, True)] * 4
    assert not transport.reading  # 4 MiB handed on, none consumed
    await asyncio.sleep(0.5)  # silent for several watchdog ticks, while held back
    assert events == [(1 << 20, True)] * 4 and not transport.aborted
    reader.consumed(2 << 20)
    assert transport.reading
    _feed(reader, link.pack_frame_header(0, link.HEARTBEAT))
    _feed(reader, link.pack_frame_header(3, link.LAST) + b"end")
    assert events[-1] == (3, False)
    assert transport.aborted  # closed after the last frame


async def test_empty_frames_are_bodies_too() -> None:
    reader, _, events = await _attached()
    _feed(reader, link.pack_frame_header(0, link.MORE))
    _feed(reader, link.pack_frame_header(2, link.MORE) + b"ab")
    _feed(reader, link.pack_frame_header(0, link.LAST))
    assert events == [(0, True), (2, True), (0, False)]


async def test_a_silent_link_is_reported_once() -> None:
    _, transport, events = await _attached(peer_timeout=0.1)
    await asyncio.sleep(0.4)
    assert events == [("silent", "nothing heard on the worker's link for 0.05 s")]
    assert transport.aborted


async def test_a_bad_frame_breaks_the_link() -> None:
    reader, transport, events = await _attached()
    _feed(reader, link.pack_frame_header(1, 9))
    assert events[0][0] == "lost" and transport.aborted


async def _handshaken(port: int, request_id: str) -> tuple[bytes, asyncio.StreamWriter]:
    """A real connection to a listener with a valid handshake: (its answer, the writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(link.pack_handshake(TOKEN, request_id))
    answer = await asyncio.wait_for(reader.read(1), 5)
    return answer, writer


async def test_links_whose_marker_never_comes_are_closed_and_free_their_slots() -> None:
    """Accepted links that their exchange never takes (the Node gone between its handshake
    and its marker, the exchange ended first) fill every waiting slot; past their wait they
    are closed and freed, and a Node's link is accepted again."""
    listener = link.LinkListener("127.0.0.1", 0, TOKEN, lambda request_id: True)
    listener.wait_timeout = 0.5
    await listener.start()
    try:
        writers = []
        for i in range(link.MAX_WAITING):
            answer, writer = await _handshaken(listener.port, f"req-{i}")
            assert answer == link.ACCEPTED
            writers.append(writer)
            if i % 2:  # the Node went away: an RST or a FIN the paused reader does not see
                writer.transport.abort()
            else:
                writer.close()
        answer, late = await _handshaken(listener.port, "one-too-many")
        assert answer == b""  # every slot taken
        late.close()
        await poll(lambda: not listener._waiting, 10)
        answer, writer = await _handshaken(listener.port, "legit")
        assert answer == link.ACCEPTED
        writer.close()
        # An exchange that ends before taking its link closes it at once (``discard``).
        listener.discard("legit")
        assert not listener._waiting
    finally:
        listener.close()


async def poll(check: Any, timeout: float) -> None:
    """Wait until ``check()`` is true, at most ``timeout`` seconds (else fail)."""
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {timeout} s")


async def test_heartbeats_as_rare_as_the_liveness_checks_allow_keep_the_link() -> None:
    """``liveness_interval`` 0.15 s with ``peer_timeout`` 0.2 s (settings the liveness checks
    take): the Node's heartbeats, one per 0.15 s, must not let a watchdog tick pass unheard.
    The tick spans two heartbeat intervals, so the link lives while its app pauses."""
    reader, transport, events = await _attached(peer_timeout=0.2, heartbeat=0.15)
    for _ in range(8):  # 1.2 s of an app pausing, the Node beating as it does
        await asyncio.sleep(0.15)
        assert not transport.aborted, events
        _feed(reader, link.pack_frame_header(0, link.HEARTBEAT))
    _feed(reader, link.pack_frame_header(3, link.LAST) + b"end")
    assert events == [(3, False)]
    assert reader._watch_every >= 2 * 0.15


def _feed_while_reading(reader: link.LinkReader, transport: _Transport, data: bytes) -> bytes:
    """Feed as the loop would while the transport reads: what is left when it pauses."""
    while data and transport.reading:
        buffer = reader.get_buffer(-1)
        size = min(len(buffer), len(data), 64 * 1024)
        buffer[:size] = data[:size]
        data = data[size:]
        reader.buffer_updated(size)
    return data


async def test_the_links_together_keep_within_one_budget_and_small_buffers() -> None:
    """Slow clients on several links: what the links hand on and their exchanges have not
    consumed stays within the listener's budget (plus one piece per link), each reader's
    buffer within one piece (frames of 2 MiB arrive in pieces), and consuming on one link
    resumes those held back by the budget."""
    listener = link.LinkListener("127.0.0.1", 0, TOKEN, lambda request_id: True)
    listener.budget = 10 << 20
    readers = []
    for i in range(4):
        reader = listener._accept()
        transport = _Transport()
        reader.connection_made(transport)
        _feed(reader, link.pack_handshake(TOKEN, f"r{i}"))
        sizes: list[int] = []
        listener.take(
            f"r{i}", lambda body, more, sizes=sizes: sizes.append(len(body)), print, print, 10.0
        )
        readers.append((reader, transport, sizes))
    frame = link.pack_frame_header(2 << 20, link.MORE) + b"x" * (2 << 20)
    left = [frame * 4 for _ in readers]  # 8 MiB from each Node
    for _ in range(8):  # round robin, as the loop serves ready sockets
        for i, (reader, transport, _) in enumerate(readers):
            left[i] = _feed_while_reading(reader, transport, left[i])
    unread = [reader._unread for reader, _, _ in readers]
    assert listener.unread == sum(unread)
    assert sum(unread) <= listener.budget + link.PIECE * len(readers), unread
    assert all(not transport.reading for _, transport, _ in readers)
    assert all(len(reader._bodies) <= link.PIECE for reader, _, _ in readers)
    assert all(size <= link.PIECE for _, _, sizes in readers for size in sizes)
    first = readers[0][0]
    first.consumed(first._unread)  # one client caught up: the budget has room again
    assert any(transport.reading for _, transport, _ in readers[1:])
    for reader, _, _ in readers:
        reader.close()
    assert listener.unread == 0 and not listener.starved


def _taken(listener: link.LinkListener, request_id: str) -> tuple[link.LinkReader, _Transport]:
    """A link handshaken and taken by an exchange that consumes nothing by itself."""
    reader = listener._accept()
    transport = _Transport()
    reader.connection_made(transport)
    _feed(reader, link.pack_handshake(TOKEN, request_id))
    listener.take(request_id, lambda body, more: None, print, print, 10.0)
    return reader, transport


async def test_slow_links_holding_the_budget_never_starve_a_new_link() -> None:
    """Links whose clients read nothing hold all they may; a new link still reads, a piece at
    a time as its client consumes, however long the slow ones hold (each link's share)."""
    listener = link.LinkListener("127.0.0.1", 0, TOKEN, lambda request_id: True)
    listener.budget = 8 << 20
    frame = link.pack_frame_header(2 << 20, link.MORE) + b"x" * (2 << 20)
    slow = [_taken(listener, f"slow{i}") for i in range(8)]
    for _ in range(4):  # round robin, until every slow link is held back
        for reader, transport in slow:
            _feed_while_reading(reader, transport, frame * 4)
    assert all(not transport.reading for _, transport in slow)
    assert all(reader._unread >= link.PIECE for reader, _ in slow)  # each holds its share
    assert listener.unread <= listener.budget + (2 * len(slow) + 1) * link.PIECE
    fast, transport = _taken(listener, "fast")
    handed = 0
    for _ in range(32):  # 64 MiB through the new link, its client consuming as it comes
        assert transport.reading
        left = _feed_while_reading(fast, transport, frame)
        assert len(left) < len(frame)  # it read at least a piece
        handed += fast._unread
        fast.consumed(fast._unread)
        _feed_while_reading(fast, transport, left)
        handed += fast._unread
        fast.consumed(fast._unread)
    assert handed == 32 * (2 << 20)
    assert all(not transport.reading for _, transport in slow)  # still held
    # The slow links' exchanges end: their shares and what they held come back.
    for i in range(len(slow)):
        listener.discard(f"slow{i}")
    listener.discard("fast")
    assert listener.unread == 0 and not listener.starved and listener.high == listener.budget


def test_a_link_works_on_uvloop() -> None:
    """uvloop (``minidasgi distributor`` runs on it when installed) has transports of its own,
    not ``asyncio.Transport``s: a link is taken and its frames read there too (an assertion on
    the transport's class refused every link, a reset and an ERROR each)."""
    uvloop = pytest.importorskip("uvloop")
    frames: list[tuple[bytes, bool]] = []

    async def scenario() -> None:
        listener = link.LinkListener("127.0.0.1", 0, TOKEN, lambda request_id: True)
        await listener.start()
        try:
            writer = await link.open_link("127.0.0.1", listener.port, TOKEN, "r1", heartbeat=5)
            ended = asyncio.Event()

            def on_frame(body: bytes, more: bool) -> None:
                frames.append((body, more))
                if not more:
                    ended.set()

            listener.take("r1", on_frame, print, print, 10.0)
            await writer.send(b"x" * 3 * link.PIECE, True)
            await writer.send(b"end", False)
            writer.close()
            await asyncio.wait_for(ended.wait(), 5)
            await asyncio.wait_for(writer.linger(), 5)  # the listener closed it: no wait
            listener.discard("r1")
            assert listener.refusals == 0 and listener.unread == 0
        finally:
            listener.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert b"".join(body for body, _ in frames) == b"x" * 3 * link.PIECE + b"end"
    assert frames[-1] == (b"end", False)


def test_a_fixed_link_port_is_listened_on_again_from_a_new_event_loop() -> None:
    """A Distributor serves the loop it runs in; one started again in a new loop (the first
    ended without shutdown, as a test client's does) listens on its fixed port again: the
    old loop's end closed its listener."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    distributor = create_distributor(
        url="redis://127.0.0.1:1", key="k", link=f"127.0.0.1:{port}", startup_wait=0.2
    )
    ports = []

    async def start() -> None:
        await asyncio.wait_for(distributor.startup(), 5)  # Redis is not there: a warning
        ports.append(distributor.link_port)

    asyncio.run(start())
    asyncio.run(start())
    assert ports == [port, port]


async def _stuck_tail(
    listener: link.LinkListener, consumed: list[int]
) -> tuple[link.LinkWriter, list[bool]]:
    """A link whose exchange consumes nothing (its client reads nothing, or the distributor
    is frozen): the Node writes until its own buffer holds frames that cannot leave, then
    writes its last frame and lingers briefly; returns the writer and the ``more`` flags read."""
    flags: list[bool] = []

    def on_frame(body: bytes, more: bool) -> None:
        flags.append(more)
        consumed.append(len(body))

    writer = await link.open_link("127.0.0.1", listener.port, TOKEN, "r1", heartbeat=60)
    listener.take("r1", on_frame, print, print, 60.0)
    transport = writer._transport
    chunk = b"x" * (64 * 1024)
    for _ in range(100):  # until the kernel's buffers are full and the Node's own holds data
        while transport.get_write_buffer_size() < 512 * 1024:
            await asyncio.wait_for(writer.send(chunk, True), 5)
        before = transport.get_write_buffer_size()
        await asyncio.sleep(0.2)
        if transport.get_write_buffer_size() == before:
            break
    else:
        raise AssertionError("the link never filled")
    await writer.send(b"end", False)
    writer.close()
    await writer.linger(0.2)  # the job ends: the distributor did not read its last frame
    assert transport.get_write_buffer_size() > 0
    return writer, flags


async def test_a_tail_left_after_the_linger_that_makes_no_progress_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing watches a link once its job ended (no job, no liveness check, and no
    ``TCP_USER_TIMEOUT`` on the Node's end): a tail that cannot leave (a distributor frozen or
    gone) is dropped after ``TAIL_STALL`` without progress, not kept for ever."""
    monkeypatch.setattr(link, "TAIL_STALL", 0.3)
    listener = link.LinkListener("127.0.0.1", 0, TOKEN, lambda request_id: True)
    await listener.start()
    try:
        writer, flags = await _stuck_tail(listener, [])
        await poll(lambda: writer._transport.get_write_buffer_size() == 0, 5)  # aborted
        assert False not in flags  # the last frame never arrived
    finally:
        listener.close()


async def test_a_tail_that_leaves_slowly_after_the_linger_arrives_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow client, not a dead link: what is left leaves as it reads, however long, while
    some of it leaves every ``TAIL_STALL``."""
    monkeypatch.setattr(link, "TAIL_STALL", 0.3)
    listener = link.LinkListener("127.0.0.1", 0, TOKEN, lambda request_id: True)
    await listener.start()
    try:
        consumed: list[int] = []
        writer, flags = await _stuck_tail(listener, consumed)
        reader = listener.reader("r1")
        assert reader is not None
        for _ in range(500):  # the client takes a piece every 0.05 s
            if False in flags:
                break
            taken = sum(consumed)
            consumed.clear()
            if taken:
                reader.consumed(taken)
                listener.consumed(taken)
            await asyncio.sleep(0.05)
        assert flags[-1] is False  # the last frame came, after many TAIL_STALLs
        assert writer._transport.get_write_buffer_size() == 0
    finally:
        listener.close()


# -- upload links ------------------------------------------------------------------------------


def test_an_upload_handshake_is_refused_as_a_download_one() -> None:
    # What an older distributor (or the download's parser) makes of an upload handshake: not
    # a link handshake, so it closes it unanswered and the Node uses Redis.
    handshake = link.pack_handshake(TOKEN, "abc", link.UPLOAD_MAGIC)
    assert len(handshake) == link.HANDSHAKE_SIZE
    assert link.parse_handshake(handshake, TOKEN, link.UPLOAD_MAGIC) == "abc"
    with pytest.raises(link.LinkError, match="not a link handshake"):
        link.parse_handshake(handshake, TOKEN)
    with pytest.raises(link.LinkError, match="not a link handshake"):
        link.parse_handshake(link.pack_handshake(TOKEN, "abc"), TOKEN, link.UPLOAD_MAGIC)


async def _upload_pair(
    frames: bytes, *, close: bool = False
) -> tuple[link.UploadReceiver, asyncio.AbstractServer]:
    """A loopback server that answers the handshake and writes ``frames`` (then closes if
    ``close``); the receiver."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(link.HANDSHAKE_SIZE)
        writer.write(link.ACCEPTED + frames)
        await writer.drain()
        if not close:
            with contextlib.suppress(ConnectionError):
                await reader.read(1)  # until the receiver closes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    receiver = await link.open_upload("127.0.0.1", port, TOKEN, "abc")
    return receiver, server


async def test_an_upload_read_cancelled_midway_loses_nothing() -> None:
    body = bytes(range(256)) * (3 * link.PIECE // 256 + 7)  # more than three pieces
    heartbeat = link.pack_frame_header(0, link.HEARTBEAT)
    frames = (
        heartbeat
        + link.pack_frame_header(len(body), link.MORE)
        + body
        + heartbeat
        + link.pack_frame_header(3, link.LAST)
        + b"end"
    )
    receiver, server = await _upload_pair(frames)
    try:
        got = bytearray()
        reads = 0
        while True:
            reading = asyncio.ensure_future(receiver.read(5.0))
            if reads % 2 == 0:  # every other read cancelled at once: its piece comes next
                await asyncio.sleep(0)
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
                if not reading.cancelled():
                    piece, more = reading.result()
                    got += piece
                    if not more:
                        break
                reads += 1
                continue
            piece, more = await reading
            assert len(piece) <= link.PIECE
            got += piece
            reads += 1
            if not more:
                break
        assert bytes(got) == body + b"end"
        assert receiver.ended
    finally:
        receiver.abort()
        server.close()


async def test_an_upload_link_ending_early_or_malformed_fails_the_read() -> None:
    body = b"x" * 1000
    # The connection ends inside a frame's body.
    receiver, server = await _upload_pair(
        link.pack_frame_header(5000, link.MORE) + body, close=True
    )
    try:
        with pytest.raises(ConnectionError):
            await receiver.read(5.0)
    finally:
        receiver.abort()
        server.close()
    # A frame over MAX_FRAME.
    receiver, server = await _upload_pair(link.pack_frame_header(link.MAX_FRAME + 1, link.MORE))
    try:
        with pytest.raises(link.LinkError):
            await receiver.read(5.0)
    finally:
        receiver.abort()
        server.close()
    # Silence: nothing after the answer.
    receiver, server = await _upload_pair(b"")
    try:
        with pytest.raises(asyncio.TimeoutError):
            await receiver.read(0.2)
    finally:
        receiver.abort()
        server.close()


def test_an_upload_link_works_on_uvloop() -> None:
    """An upload link on uvloop's transports (not ``asyncio.Transport``s) at both ends: the
    listener hands its connection to an ``UploadSender``, the Node's receiver reads it."""
    uvloop = pytest.importorskip("uvloop")
    body = bytes(range(256)) * (2 * link.PIECE // 256 + 3)
    got = bytearray()

    async def scenario() -> None:
        senders: list[link.UploadSender] = []

        def on_upload(request_id: str, sender: link.UploadSender) -> bool:
            senders.append(sender)
            return True

        listener = link.LinkListener(
            "127.0.0.1", 0, TOKEN, lambda request_id: True, on_upload=on_upload
        )
        await listener.start()
        try:
            receiver = await link.open_upload("127.0.0.1", listener.port, TOKEN, "r1")
            assert len(senders) == 1 and senders[0].request_id == "r1"

            async def send() -> None:
                await senders[0].send([body], True)
                await senders[0].send([b"end"], False)

            sending = asyncio.ensure_future(send())
            more = True
            while more:
                piece, more = await receiver.read(5.0)
                got.extend(piece)
            await asyncio.wait_for(sending, 5)
            receiver.abort()
            assert listener.refusals == 0
        finally:
            listener.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert bytes(got) == body + b"end"


@pytest.mark.parametrize(("written", "lost"), [(link.UPLOAD_DONE, False), (b"\x02more", True)])
async def test_only_the_done_byte_ends_an_upload_link_quietly(written: bytes, lost: bool) -> None:
    # The Node may write one byte after its handshake, UPLOAD_DONE; anything else (even one
    # that starts with it) breaks the link.
    senders: list[link.UploadSender] = []
    why: list[str] = []

    def on_upload(request_id: str, sender: link.UploadSender) -> bool:
        sender.on_lost = why.append
        senders.append(sender)
        return True

    listener = link.LinkListener(
        "127.0.0.1", 0, TOKEN, lambda request_id: True, on_upload=on_upload
    )
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(link.pack_handshake(TOKEN, "r1", link.UPLOAD_MAGIC))
        assert await asyncio.wait_for(reader.readexactly(len(link.ACCEPTED)), 5) == link.ACCEPTED
        writer.write(written)
        await poll(lambda: senders and senders[0].closed, 5)
        assert senders[0].closed
        assert bool(why) == lost
        writer.close()
    finally:
        listener.close()


async def test_an_upload_links_stuck_tail_is_dropped_once_its_exchange_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The distributor wrote an upload's last frame, but the Node reads nothing (frozen):
    with no ``TCP_USER_TIMEOUT`` on that end, once the exchange ended (``release``) nothing
    but ``TAIL_STALL`` without progress drops the socket and what it holds."""
    monkeypatch.setattr(link, "TAIL_STALL", 0.3)
    senders: list[link.UploadSender] = []

    def on_upload(request_id: str, sender: link.UploadSender) -> bool:
        senders.append(sender)
        return True

    listener = link.LinkListener(
        "127.0.0.1", 0, TOKEN, lambda request_id: True, on_upload=on_upload
    )
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(link.pack_handshake(TOKEN, "r1", link.UPLOAD_MAGIC))
        assert await asyncio.wait_for(reader.readexactly(len(link.ACCEPTED)), 5) == link.ACCEPTED
        writer.transport.pause_reading()  # a frozen Node: reads nothing more
        (sender,) = senders
        await sender.send([b"x" * link.MAX_FRAME], False)  # the last frame: no wait for room
        transport = sender.transport
        assert transport is not None and sender.closed and sender.ended
        await asyncio.sleep(0.2)
        assert transport.get_write_buffer_size() > 0  # more than the sockets' buffers hold
        sender.release()  # the exchange ended
        await poll(lambda: transport.get_write_buffer_size() == 0, 5)
        assert transport.get_write_buffer_size() == 0  # dropped
        writer.close()
    finally:
        listener.close()
