"""The event loop a Node runs on: asyncio's own, or uvloop's, named as uvicorn names them.

Owns the choice (``auto``, ``asyncio``, ``uvloop``), the error when uvloop is asked for but
missing, and running a coroutine on the loop chosen. It never installs a global event loop
policy for longer than that run.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LOOPS", "LoopUnavailable", "loop_factory", "run"]

T = TypeVar("T")

LOOPS = ("auto", "asyncio", "uvloop")
"""The names ``loop_factory`` takes: ``auto`` is uvloop when it is installed, else asyncio."""


class LoopUnavailable(Exception):
    """The event loop asked for cannot be had (uvloop is not installed)."""


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A function making a new event loop of the kind ``name`` (one of ``LOOPS``); None for
    asyncio's own, made as ``asyncio.run`` makes it. Raise ``LoopUnavailable`` if ``name`` is
    ``uvloop`` and uvloop cannot be imported, ``ValueError`` for an unknown name."""
    if name not in LOOPS:
        raise ValueError(f"the event loop must be one of {', '.join(LOOPS)}, not {name!r}")
    if name == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if name == "auto":
            return None
        raise LoopUnavailable(
            "the uvloop event loop was asked for, but uvloop is not installed: "
            "pip install uvloop (or choose --loop asyncio)"
        ) from None
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """``asyncio.run(main)`` on a new event loop of the kind ``loop`` (one of ``LOOPS``)."""
    try:
        factory = loop_factory(loop)
    except BaseException:
        main.close()  # never awaited: no warning about it
        raise
    if factory is None:
        return asyncio.run(main)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)
    policy = asyncio.get_event_loop_policy()  # pragma: no cover - Python 3.10
    new_loop = factory  # pragma: no cover

    class _Policy(asyncio.DefaultEventLoopPolicy):  # pragma: no cover
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return new_loop()

    asyncio.set_event_loop_policy(_Policy())  # pragma: no cover
    try:  # pragma: no cover
        return asyncio.run(main)
    finally:  # pragma: no cover
        asyncio.set_event_loop_policy(policy)
