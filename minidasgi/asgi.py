"""ASGI types, and telling an ASGI 3 app from the seed's class style.

Owns nothing but names: the callable types and ``as_asgi3``, which wraps a class-style app
(``cls(scope)`` then ``await instance(receive, send)``, ASGI 2) so everything else calls one
shape. It tells the two apart the way uvicorn does.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send", "as_asgi3", "is_asgi3"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_asgi3(app: Any) -> bool:
    """True for an ASGI 3 callable, False for the class (ASGI 2) style."""
    if inspect.isclass(app):
        return hasattr(app, "__await__")
    if inspect.isfunction(app):
        return asyncio.iscoroutinefunction(app)
    if asyncio.iscoroutinefunction(app):
        # A bound async method or a partial of a coroutine function: uvicorn's ``__call__``
        # test says class style here, and calling it as ``app(scope)`` fails.
        return True
    call = getattr(app, "__call__", None)  # noqa: B004 - the same test uvicorn makes
    return asyncio.iscoroutinefunction(call)


def as_asgi3(app: Any, *, class_style: bool | None = None) -> ASGIApp:
    """Return ``app`` as an ASGI 3 callable.

    ``class_style=True`` forces the seed's style (``app(scope)`` then ``instance(receive,
    send)``); ``None`` guesses as uvicorn does.
    """
    if not callable(app):
        raise TypeError(f"an ASGI app must be callable, not {type(app).__name__}")
    if class_style is None:
        class_style = not is_asgi3(app)
    if not class_style:
        asgi3: ASGIApp = app
        return asgi3

    async def class_style_app(scope: Scope, receive: Receive, send: Send) -> None:
        instance = app(scope)
        await instance(receive, send)

    class_style_app.__qualname__ = f"class_style({getattr(app, '__qualname__', app)!s})"
    return class_style_app
