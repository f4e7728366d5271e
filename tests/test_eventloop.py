"""The event loop a Node runs on: the names, uvloop when installed, the error when missing."""

from __future__ import annotations

import asyncio
import sys

import pytest

from minidasgi import eventloop
from minidasgi.eventloop import LoopUnavailable, loop_factory

uvloop = pytest.importorskip("uvloop")


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_asyncio_is_asyncios_own_loop() -> None:
    assert loop_factory("asyncio") is None
    assert not issubclass(eventloop.run(_loop_type(), "asyncio"), uvloop.Loop)


@pytest.mark.parametrize("name", ["uvloop", "auto"])
def test_uvloop_and_auto_run_on_uvloop_when_installed(name: str) -> None:
    assert issubclass(eventloop.run(_loop_type(), name), uvloop.Loop)


def test_a_missing_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(LoopUnavailable, match="pip install uvloop"):
        loop_factory("uvloop")
    main = _loop_type()
    with pytest.raises(LoopUnavailable):
        eventloop.run(main, "uvloop")
    assert main.cr_frame is None  # closed: no "never awaited" warning


def test_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="must be one of auto, asyncio, uvloop, not 'trio'"):
        loop_factory("trio")
