"""Unit tests for ``minidasgi.lifespan``: the lifespan conversation with fake apps."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from minidasgi.asgi import as_asgi3
from minidasgi.lifespan import Lifespan, LifespanFailed


class LifespanApp:
    """A well-behaved app that records what it receives and can fail on request."""

    def __init__(
        self, *, startup_failure: str | None = None, shutdown_failure: str | None = None
    ) -> None:
        self.startup_failure = startup_failure
        self.shutdown_failure = shutdown_failure
        self.received: list[str] = []
        self.scopes: list[dict[str, Any]] = []
        self.finished = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        assert scope["type"] == "lifespan"
        message = await receive()
        self.received.append(message["type"])
        if self.startup_failure is not None:
            await send({"type": "lifespan.startup.failed", "message": self.startup_failure})
            return
        scope["state"]["x"] = 1
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        self.received.append(message["type"])
        if self.shutdown_failure is not None:
            await send({"type": "lifespan.shutdown.failed", "message": self.shutdown_failure})
        else:
            await send({"type": "lifespan.shutdown.complete"})
        self.finished = True


class NoLifespanApp:
    """An app that knows only http, as many simple apps do: it raises on any other scope."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        assert scope["type"] == "http", "only http is supported"


class SeedApp:
    """The seed's class-style app: answers every scope with an HTTP response."""

    def __init__(self, scope: Any) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"Hello World!"})


async def test_startup_and_shutdown_complete_with_shared_state() -> None:
    app = LifespanApp()
    lifespan = Lifespan(app)
    await asyncio.wait_for(lifespan.startup(), 2)
    assert lifespan.state["x"] == 1
    assert app.scopes[0]["state"] is lifespan.state
    assert app.scopes[0]["asgi"]["version"] == "3.0"
    assert app.received == ["lifespan.startup"]
    await asyncio.wait_for(lifespan.shutdown(), 2)
    assert app.received == ["lifespan.startup", "lifespan.shutdown"]
    await asyncio.sleep(0)
    assert app.finished


async def test_startup_and_shutdown_complete_in_mode_on() -> None:
    app = LifespanApp()
    lifespan = Lifespan(app, "on")
    await asyncio.wait_for(lifespan.startup(), 2)
    await asyncio.wait_for(lifespan.shutdown(), 2)
    assert app.received == ["lifespan.startup", "lifespan.shutdown"]


@pytest.mark.parametrize("mode", ["auto", "on"])
async def test_startup_failed_raises_lifespan_failed_with_the_message(mode: str) -> None:
    lifespan = Lifespan(LifespanApp(startup_failure="database unreachable"), mode)
    with pytest.raises(LifespanFailed, match="database unreachable"):
        await asyncio.wait_for(lifespan.startup(), 2)


async def test_app_raising_at_once_in_auto_mode_is_unsupported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = NoLifespanApp()
    lifespan = Lifespan(app, "auto")
    with caplog.at_level(logging.INFO, logger="minidasgi.lifespan"):
        await asyncio.wait_for(lifespan.startup(), 2)
    assert app.calls == 1
    assert "unsupported" in caplog.text
    await asyncio.wait_for(lifespan.shutdown(), 2)
    assert app.calls == 1


async def test_app_raising_at_once_in_on_mode_fails() -> None:
    app = NoLifespanApp()
    lifespan = Lifespan(app, "on")
    with pytest.raises(LifespanFailed):
        await asyncio.wait_for(lifespan.startup(), 2)
    assert app.calls == 1
    await asyncio.wait_for(lifespan.shutdown(), 2)


async def test_app_returning_without_answering_in_auto_mode_is_unsupported() -> None:
    async def silent_app(scope: Any, receive: Any, send: Any) -> None:
        return None

    lifespan = Lifespan(silent_app, "auto")
    await asyncio.wait_for(lifespan.startup(), 2)
    await asyncio.wait_for(lifespan.shutdown(), 2)


async def test_mode_off_never_calls_the_app() -> None:
    app = LifespanApp()
    lifespan = Lifespan(app, "off")
    await asyncio.wait_for(lifespan.startup(), 2)
    await asyncio.wait_for(lifespan.shutdown(), 2)
    assert app.scopes == []
    assert lifespan.state == {}


async def test_seed_class_style_app_sending_http_messages_is_unsupported_in_auto_mode() -> None:
    lifespan = Lifespan(as_asgi3(SeedApp), "auto")
    await asyncio.wait_for(lifespan.startup(), 2)
    await asyncio.wait_for(lifespan.shutdown(), 2)


async def test_seed_class_style_app_fails_in_on_mode() -> None:
    lifespan = Lifespan(as_asgi3(SeedApp), "on")
    with pytest.raises(LifespanFailed):
        await asyncio.wait_for(lifespan.startup(), 2)


@pytest.mark.parametrize("mode", ["", "ON", "yes", None, True])
def test_invalid_mode_raises_value_error(mode: Any) -> None:
    with pytest.raises(ValueError, match="lifespan must be"):
        Lifespan(LifespanApp(), mode)


async def test_shutdown_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    app = LifespanApp(shutdown_failure="could not flush")
    lifespan = Lifespan(app)
    await asyncio.wait_for(lifespan.startup(), 2)
    with caplog.at_level(logging.ERROR, logger="minidasgi.lifespan"):
        await asyncio.wait_for(lifespan.shutdown(), 2)
    assert app.received == ["lifespan.startup", "lifespan.shutdown"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("could not flush" in r.getMessage() for r in errors)


async def test_app_crashing_during_shutdown_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def crashing_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        raise RuntimeError("boom on shutdown")

    lifespan = Lifespan(crashing_app)
    await asyncio.wait_for(lifespan.startup(), 2)
    with caplog.at_level(logging.ERROR, logger="minidasgi.lifespan"):
        await asyncio.wait_for(lifespan.shutdown(), 2)
    assert "boom on shutdown" in caplog.text


async def test_app_crashing_after_answering_during_startup_fails_startup() -> None:
    async def crashing_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        # An answer of the wrong phase, then a crash before startup completes.
        await send({"type": "lifespan.shutdown.complete"})
        raise RuntimeError("startup crashed")

    lifespan = Lifespan(crashing_app, "auto")
    with pytest.raises(LifespanFailed, match="startup crashed"):
        await asyncio.wait_for(lifespan.startup(), 2)


async def test_shutdown_after_the_app_returned_is_a_no_op() -> None:
    async def short_lived_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})

    lifespan = Lifespan(short_lived_app)
    await asyncio.wait_for(lifespan.startup(), 2)
    await asyncio.sleep(0)
    await asyncio.wait_for(lifespan.shutdown(), 2)


async def test_shutdown_without_startup_is_a_no_op() -> None:
    app = LifespanApp()
    await asyncio.wait_for(Lifespan(app).shutdown(), 2)
    assert app.scopes == []


class HangingApp:
    """An app whose lifespan ``phase`` (``"startup"`` or ``"shutdown"``) never completes;
    records whether it was cancelled."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.received: list[str] = []
        self.cancelled = False
        self.hanging = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            while True:
                message = await receive()
                self.received.append(message["type"])
                if message["type"] == f"lifespan.{self.phase}":
                    self.hanging.set()
                    await asyncio.Event().wait()
                await send({"type": f"{message['type']}.complete"})
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_cancel_ends_a_startup_that_hangs_and_no_shutdown_is_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = HangingApp("startup")
    lifespan = Lifespan(app, "on")
    starting = asyncio.ensure_future(lifespan.startup())
    await asyncio.wait_for(app.hanging.wait(), 2)
    assert lifespan.phase == "startup"
    with caplog.at_level(logging.WARNING, logger="minidasgi.lifespan"):
        lifespan.cancel()
    await asyncio.wait_for(starting, 2)  # returns: the caller is stopping
    await asyncio.wait_for(lifespan.shutdown(), 2)
    assert app.received == ["lifespan.startup"] and app.cancelled
    assert "cancelled the app's lifespan startup, which had not completed" in caplog.text


async def test_cancel_ends_a_shutdown_that_hangs() -> None:
    app = HangingApp("shutdown")
    lifespan = Lifespan(app)
    await asyncio.wait_for(lifespan.startup(), 2)
    stopping = asyncio.ensure_future(lifespan.shutdown())
    await asyncio.wait_for(app.hanging.wait(), 2)
    assert lifespan.phase == "shutdown"
    lifespan.cancel()
    await asyncio.wait_for(stopping, 2)
    assert app.received == ["lifespan.startup", "lifespan.shutdown"] and app.cancelled
    assert lifespan.phase is None


async def test_cancel_while_serving_skips_the_shutdown() -> None:
    """A forced stop before the shutdown: none is sent, as uvicorn skips it on a forced exit."""
    app = LifespanApp()
    lifespan = Lifespan(app)
    await asyncio.wait_for(lifespan.startup(), 2)
    lifespan.cancel()
    await asyncio.wait_for(lifespan.shutdown(), 2)
    assert app.received == ["lifespan.startup"]


async def test_cancel_before_the_app_ran_ends_the_startup_all_the_same() -> None:
    """A lifespan task cancelled before its first step never runs its ``finally``: the wait
    ends all the same."""
    app = HangingApp("startup")
    lifespan = Lifespan(app, "on")
    starting = asyncio.ensure_future(lifespan.startup())
    await asyncio.sleep(0)  # the startup sent, the app not yet run
    lifespan.cancel()
    await asyncio.wait_for(starting, 2)
    assert app.received == []
