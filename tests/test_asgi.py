"""Unit tests for ``minidasgi.asgi``: telling ASGI 3 apps from the seed's class style."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from minidasgi.asgi import as_asgi3, is_asgi3

Calls = list[tuple[str, Any]]


async def asgi3_function(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "from-function", "path": scope["path"]})


def make_recording_class_style_app(calls: Calls) -> type:
    class ClassStyleApp:
        """The seed's style: ``cls(scope)``, then ``await instance(receive, send)``."""

        def __init__(self, scope: Any) -> None:
            calls.append(("init", scope))
            self.scope = scope

        async def __call__(self, receive: Any, send: Any) -> None:
            calls.append(("call", (self, receive, send)))
            message = await receive()
            await send({"type": "echo", "got": message, "path": self.scope["path"]})

    return ClassStyleApp


class Asgi3Instance:
    """An instance whose ``__call__`` is an ASGI 3 coroutine function (like FastAPI)."""

    def __init__(self) -> None:
        self.calls: Calls = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(("call", (scope, receive, send)))
        await send({"type": "from-instance"})


class SeedApp:
    def __init__(self, scope: Any) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"Hello World!"})


class Recorder:
    def __init__(self, incoming: list[dict[str, Any]] | None = None) -> None:
        self.incoming = list(incoming or [])
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return self.incoming.pop(0)

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def test_async_function_is_asgi3() -> None:
    assert is_asgi3(asgi3_function)


def test_class_with_init_scope_and_async_call_is_class_style() -> None:
    assert not is_asgi3(make_recording_class_style_app([]))
    assert not is_asgi3(SeedApp)


def test_instance_with_async_call_is_asgi3() -> None:
    assert is_asgi3(Asgi3Instance())


def test_sync_function_is_class_style() -> None:
    def factory(scope: Any) -> Any:
        return SeedApp(scope)

    assert not is_asgi3(factory)


def test_bound_async_method_is_asgi3() -> None:
    class Server:
        async def handle(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "from-method"})

    handle = Server().handle
    assert is_asgi3(handle)
    assert as_asgi3(handle) is handle
    assert is_asgi3(Asgi3Instance().__call__)


def test_partial_of_async_function_is_asgi3() -> None:
    assert is_asgi3(functools.partial(asgi3_function))


async def test_bound_async_method_runs_as_asgi3() -> None:
    instance = Asgi3Instance()
    app = as_asgi3(instance.__call__)
    recorder = Recorder()
    scope = {"type": "http"}
    await asyncio.wait_for(app(scope, recorder.receive, recorder.send), 2)
    assert recorder.sent == [{"type": "from-instance"}]
    assert instance.calls[0][1][0] is scope


def test_as_asgi3_returns_asgi3_apps_unchanged() -> None:
    instance = Asgi3Instance()
    assert as_asgi3(asgi3_function) is asgi3_function
    assert as_asgi3(instance) is instance


async def test_as_asgi3_wraps_class_style_calling_cls_scope_then_instance_receive_send() -> None:
    calls: Calls = []
    app_class = make_recording_class_style_app(calls)
    app = as_asgi3(app_class)
    assert app is not app_class
    assert is_asgi3(app)
    scope = {"type": "http", "path": "/api/test"}
    recorder = Recorder([{"type": "http.request", "body": b"hi"}])

    await asyncio.wait_for(app(scope, recorder.receive, recorder.send), 2)

    assert [name for name, _ in calls] == ["init", "call"]
    assert calls[0][1] is scope
    instance, receive, send = calls[1][1]
    assert isinstance(instance, app_class)
    assert instance.scope is scope
    assert receive == recorder.receive
    assert send == recorder.send
    assert recorder.sent == [
        {"type": "echo", "got": {"type": "http.request", "body": b"hi"}, "path": "/api/test"}
    ]


async def test_each_call_of_a_wrapped_class_style_app_makes_a_new_instance() -> None:
    calls: Calls = []
    app = as_asgi3(make_recording_class_style_app(calls))
    for path in ("/one", "/two"):
        recorder = Recorder([{"type": "http.request"}])
        await asyncio.wait_for(app({"path": path}, recorder.receive, recorder.send), 2)
    instances = [args[0] for name, args in calls if name == "call"]
    assert len(instances) == 2
    assert instances[0] is not instances[1]
    assert [i.scope["path"] for i in instances] == ["/one", "/two"]


async def test_seed_app_wrapped_sends_its_response() -> None:
    recorder = Recorder()
    await asyncio.wait_for(as_asgi3(SeedApp)({"type": "http"}, recorder.receive, recorder.send), 2)
    assert recorder.sent == [
        {"type": "http.response.start", "status": 200},
        {"type": "http.response.body", "body": b"Hello World!"},
    ]


async def test_class_style_true_forces_the_class_style_wrapper() -> None:
    calls: Calls = []

    def factory(scope: Any) -> Any:
        calls.append(("factory", scope))

        async def instance(receive: Any, send: Any) -> None:
            calls.append(("instance", (receive, send)))

        return instance

    app = as_asgi3(factory, class_style=True)
    assert app is not factory
    recorder = Recorder()
    await asyncio.wait_for(app({"type": "http"}, recorder.receive, recorder.send), 2)
    assert calls == [("factory", {"type": "http"}), ("instance", (recorder.receive, recorder.send))]


def test_class_style_false_forces_asgi3() -> None:
    assert as_asgi3(SeedApp, class_style=False) is SeedApp


def test_wrapper_name_mentions_the_wrapped_class() -> None:
    assert "SeedApp" in as_asgi3(SeedApp).__qualname__


@pytest.mark.parametrize("app", [None, 5, "app", {"type": "http"}, object()])
def test_non_callable_raises_type_error(app: Any) -> None:
    with pytest.raises(TypeError, match="callable"):
        as_asgi3(app)
    with pytest.raises(TypeError, match="callable"):
        as_asgi3(app, class_style=True)
