"""Running an ASGI app's lifespan protocol, as uvicorn does, for the Node.

Owns the lifespan task of one app: ``startup()`` before the first request, ``shutdown()`` after
the last. ``mode`` is ``"auto"`` (an app that fails before answering the first lifespan event
is taken not to support lifespan), ``"on"`` (such a failure is fatal) or ``"off"``.

Neither wait has a bound of its own, as under uvicorn (an app may take its time to load); a
forced stop gives the lifespan up (``cancel``), so a startup or shutdown that hangs never holds
the process for ever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .asgi import ASGIApp, Message

__all__ = ["Lifespan", "LifespanFailed"]

logger = logging.getLogger("minidasgi.lifespan")


_ANSWERS = frozenset(
    {
        "lifespan.startup.complete",
        "lifespan.startup.failed",
        "lifespan.shutdown.complete",
        "lifespan.shutdown.failed",
    }
)


class LifespanFailed(RuntimeError):
    """The app reported ``lifespan.startup.failed`` or crashed during startup (mode "on")."""


class Lifespan:
    """The lifespan conversation with one app."""

    def __init__(self, app: ASGIApp, mode: str = "auto") -> None:
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"lifespan must be 'auto', 'on' or 'off', not {mode!r}")
        self.app = app
        self.mode = mode
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._startup_done = asyncio.Event()
        self._shutdown_done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: str | None = None
        self._supported = True
        self._answered = False
        self._cancelled = False
        self.phase: str | None = None
        """``"startup"`` or ``"shutdown"`` while the app's answer to it is awaited."""

    async def startup(self) -> None:
        """Send ``lifespan.startup`` and wait for the app's answer."""
        if self.mode == "off":
            return
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        self._task = asyncio.get_running_loop().create_task(self._run(scope))
        await self._inbox.put({"type": "lifespan.startup"})
        await self._answer("startup", self._startup_done)
        if self._cancelled:
            return
        if self._error is not None:
            raise LifespanFailed(f"application startup failed: {self._error}")
        if self.mode == "on" and not self._supported:
            raise LifespanFailed("the application does not support lifespan")

    async def shutdown(self) -> None:
        """Send ``lifespan.shutdown`` and wait for the app's answer."""
        if self._task is None or not self._supported or self._task.done() or self._cancelled:
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._answer("shutdown", self._shutdown_done)
        if self._error is not None and not self._cancelled:
            logger.error("application shutdown failed: %s", self._error)

    def cancel(self) -> None:
        """Give the lifespan up (a forced stop): the app's lifespan task is cancelled, a
        startup or shutdown awaited now returns (a startup as if complete: the caller, which
        is stopping, serves nothing), and a later ``shutdown()`` sends nothing, as uvicorn
        skips the lifespan shutdown on a forced exit."""
        self._cancelled = True
        if self.phase is not None:
            logger.warning("cancelled the app's lifespan %s, which had not completed", self.phase)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        # Set here, not left to the task's end: a task cancelled before its first step never
        # runs its ``finally``.
        self._startup_done.set()
        self._shutdown_done.set()

    async def _answer(self, phase: str, done: asyncio.Event) -> None:
        """Wait for the app's answer to ``phase`` (``done``), saying so first, as uvicorn
        does: a lifespan that hangs is the last thing the log shows."""
        logger.info("waiting for the app's lifespan %s", phase)
        self.phase = phase
        try:
            await done.wait()
        finally:
            self.phase = None

    async def _receive(self) -> Message:
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        kind = message.get("type")
        if kind not in _ANSWERS:
            raise RuntimeError(f"unexpected lifespan message {kind!r}")
        self._answered = True
        if kind == "lifespan.startup.complete":
            self._startup_done.set()
        elif kind == "lifespan.startup.failed":
            self._error = str(message.get("message", ""))
            self._startup_done.set()
        elif kind == "lifespan.shutdown.complete":
            self._shutdown_done.set()
        elif kind == "lifespan.shutdown.failed":
            self._error = str(message.get("message", ""))
            self._shutdown_done.set()

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not self._answered:
                self._supported = False
                if self.mode == "auto":
                    logger.info("ASGI 'lifespan' protocol appears unsupported.")
                    return
                logger.error("exception in the app's lifespan", exc_info=exc)
                return
            logger.error("exception in the app's lifespan", exc_info=exc)
            if not self._startup_done.is_set():
                self._error = repr(exc)
        finally:
            self._startup_done.set()
            self._shutdown_done.set()
