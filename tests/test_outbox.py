"""The outbox's ``lost`` callbacks, against a fake publishing client (no network)."""

from __future__ import annotations

import asyncio
from typing import Any

from minidasgi import wire
from minidasgi.outbox import Outbox


class FakeClient:
    """Records each PUBLISH's future; the test settles them (``settle``), as a client does
    from the reply: the future, then whoever asked to be told."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any, asyncio.Future[int]]] = []
        self._settled: list[Any] = []

    def publish_into(
        self, channel: str, message: Any, result: asyncio.Future[int], settled: Any = None
    ) -> None:
        self.published.append((channel, message, result))
        self._settled.append(settled)

    def settle(self, index: int, outcome: int | BaseException) -> None:
        result = self.published[index][2]
        if isinstance(outcome, BaseException):
            result.set_exception(outcome)
        else:
            result.set_result(outcome)
        settled = self._settled[index]
        if settled is not None:
            settled(result)


class Told:
    """A ``lost`` callback that counts its calls."""

    def __init__(self) -> None:
        self.calls: list[asyncio.Future[int]] = []

    def __call__(self, future: asyncio.Future[int]) -> None:
        self.calls.append(future)


async def _posted(outbox: Outbox, client: FakeClient, callbacks: list[Told]) -> None:
    for n, lost in enumerate(callbacks):
        outbox.post("c", wire.pack(wire.CREDIT, "r", n), lost=lost)
    await asyncio.sleep(0)  # the end of the turn: one PUBLISH
    assert len(client.published) == 1


async def test_lost_is_told_once_per_batch_when_nobody_got_it() -> None:
    client = FakeClient()
    outbox = Outbox(lambda: client)  # type: ignore[arg-type, return-value]
    a, b = Told(), Told()
    await _posted(outbox, client, [a, a, b, a])
    client.settle(0, 0)
    assert len(a.calls) == 1 and len(b.calls) == 1
    assert a.calls[0] is client.published[0][2]


async def test_lost_is_not_told_when_the_batch_reached_its_peer() -> None:
    client = FakeClient()
    outbox = Outbox(lambda: client)  # type: ignore[arg-type, return-value]
    a = Told()
    await _posted(outbox, client, [a, a])
    client.settle(0, 1)
    await asyncio.sleep(0)
    assert a.calls == []
    assert outbox._lost == {}  # nothing kept for a settled batch


async def test_lost_is_told_when_the_batch_failed() -> None:
    client = FakeClient()
    outbox = Outbox(lambda: client)  # type: ignore[arg-type, return-value]
    a = Told()
    await _posted(outbox, client, [a])
    client.settle(0, ConnectionError("the link died"))
    assert len(a.calls) == 1


async def test_lost_is_told_when_there_is_no_client() -> None:
    outbox = Outbox(lambda: None)
    a = Told()
    outbox.post("c", wire.pack(wire.CREDIT, "r", 1), lost=a)
    await asyncio.sleep(0)  # the flush: no client, a count of 0, told at once
    assert len(a.calls) == 1


async def test_lost_is_told_by_the_settling_code_with_no_loop_callback() -> None:
    # Told straight from the code that settles the batch's future (the client, reading the
    # PUBLISH's reply): no done callback on the future, so no loop callback per batch (at one
    # request in flight, a loop iteration of its own). Before, the outbox hung a done
    # callback on the future of every batch with a message to watch, and told a turn later.
    client = FakeClient()
    outbox = Outbox(lambda: client)  # type: ignore[arg-type, return-value]
    a, b = Told(), Told()
    await _posted(outbox, client, [a, b])
    scheduled: list[object] = []
    loop = asyncio.get_running_loop()
    call_soon = loop.call_soon

    def counting_call_soon(*args: Any, **kwargs: Any) -> Any:
        scheduled.append(args[0])
        return call_soon(*args, **kwargs)

    loop.call_soon = counting_call_soon  # type: ignore[method-assign]
    try:
        client.settle(0, 0)
    finally:
        del loop.call_soon
    assert scheduled == []
    assert len(a.calls) == 1 and len(b.calls) == 1  # told already, in the settling code
    assert outbox._lost == {}


async def test_a_batch_that_fails_as_it_leaves_tells_its_lost_callbacks() -> None:
    # A client that raises as the batch leaves (before a command exists) fails the batch's
    # future, and tells its watchers, from the outbox itself.
    class Broken(FakeClient):
        def publish_into(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError("cannot pack that")

    client = Broken()
    outbox = Outbox(lambda: client)  # type: ignore[arg-type, return-value]
    a = Told()
    future = outbox.post("c", wire.pack(wire.CREDIT, "r", 1), lost=a)
    await asyncio.sleep(0)
    assert isinstance(future.exception(), ValueError)
    assert len(a.calls) == 1 and outbox._lost == {}


async def test_a_small_batch_travels_as_one_bytes_value_a_large_one_as_parts() -> None:
    # Joined, a small frame's PUBLISH is packed in one formatting step; a large frame's parts
    # are copied once, into the write. Either way the frame is the same.
    client = FakeClient()
    outbox = Outbox(lambda: client)  # type: ignore[arg-type, return-value]
    small = [wire.pack(wire.CREDIT, "r", n) for n in range(3)]
    large = [wire.pack(wire.CREDIT, "r", 1), b"\x03" + b"x" * 40000]
    for messages in (small, large):
        for message in messages:
            outbox.post("c", message)
        await asyncio.sleep(0)
    (_, first, _), (_, second, _) = client.published
    assert type(first) is bytes
    assert first == wire.batch_frame(small)
    assert type(second) is list
    assert b"".join(second) == wire.batch_frame(large)
    assert wire.split_frame(first) == small
