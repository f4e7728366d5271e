"""Unit tests for ``minidasgi.resp.client``: what ``Client.publish_into`` writes and how it
settles its future, against a stand-in connection (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from minidasgi.resp.client import Client
from minidasgi.resp.connection import make_params
from minidasgi.resp.protocol import ReplyError, pack_command, pack_gathering


class _Connection:
    """Records what would be written and the reply callbacks, as ``send_packed_to`` does."""

    is_closed = False

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.callbacks: list[Callable[[Any], None]] = []

    def send_packed_to(self, data: Any, *callbacks: Callable[[Any], None]) -> None:
        self.written.append(data)
        self.callbacks.extend(callbacks)


def _client() -> tuple[Client, _Connection]:
    client = Client(make_params("redis://127.0.0.1:1"))
    connection = _Connection()
    client._connection = connection  # type: ignore[assignment]
    return client, connection


@pytest.mark.parametrize(
    "channel, message",
    [
        ("minidasgi:0:dist:ab12", b"\x03\x00\x00\x00\x05[1,2]"),
        (b"raw-channel", b""),
        ("c", b"x" * 5000),  # past the general packer's 1 KiB split
    ],
)
async def test_publish_into_writes_what_pack_command_writes(channel: Any, message: bytes) -> None:
    client, connection = _client()
    result: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    client.publish_into(channel, message, result)
    assert connection.written == [pack_command("PUBLISH", channel, message)]
    connection.callbacks[0](3)
    assert result.result() == 3


async def test_publish_into_writes_a_message_of_parts_as_parts() -> None:
    client, connection = _client()
    result: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    parts = [b"head", memoryview(b"y" * 70000)]
    client.publish_into("c", parts, result)
    assert connection.written == [pack_gathering("PUBLISH", "c", parts)]
    assert b"".join(connection.written[0]) == pack_command("PUBLISH", "c", b"head" + b"y" * 70000)


async def test_publish_into_counts_an_error_reply_as_nobody() -> None:
    client, connection = _client()
    result: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    client.publish_into("c", b"m", result)
    connection.callbacks[0](ReplyError("NOPERM no permissions"))
    assert result.result() == 0
