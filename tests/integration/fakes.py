"""A fake Redis for the RESP tests: a TCP server whose replies each test scripts, to send
what a real server never would (garbage, replies nobody asked for, silence)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_command(reader: asyncio.StreamReader) -> list[bytes] | None:
    """Read one RESP command (array of bulk strings); ``None`` at EOF."""
    header = await reader.readline()
    if not header:
        return None
    assert header.startswith(b"*"), header
    args = []
    for _ in range(int(header[1:])):
        size = await reader.readline()
        assert size.startswith(b"$"), size
        args.append((await reader.readexactly(int(size[1:]) + 2))[:-2])
    return args


class FakeRedis:
    """A TCP server on 127.0.0.1 that runs ``handler(reader, writer)`` for each client."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        try:
            await self._handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> FakeRedis:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # wakes handlers blocked on a read with EOF
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self._server.wait_closed()


async def drain_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass
