"""The integration tests' private redis-servers: ``minidasgi.testing``, failing the test
(never skipping it) when no ``redis-server`` binary is installed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from minidasgi.testing import (
    INSTALL_HINT,
    RedisReplyError,
    RedisServer,
    RedisServerError,
    RedisServerNotFound,
    ServerBinary,
    TLSNotSupportedError,
)
from minidasgi.testing import find_redis_server as _find_redis_server
from minidasgi.testing import locate_redis_server as _locate_redis_server

__all__ = [
    "INSTALL_HINT",
    "RedisFactory",
    "RedisReplyError",
    "RedisServer",
    "RedisServerError",
    "ServerBinary",
    "TLSNotSupportedError",
    "calls",
    "client_list",
    "find_redis_server",
    "locate_redis_server",
    "pop_waiting",
]

if TYPE_CHECKING:
    from .faultproxy import FaultProxy

RedisFactory = Callable[..., RedisServer]
"""Type of the ``redis_factory`` fixture: ``redis_factory(**RedisServer kwargs)``."""


def find_redis_server() -> str:
    """The redis-server binary, or fail the test with install instructions."""
    try:
        return _find_redis_server()
    except RedisServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


def locate_redis_server() -> ServerBinary:
    """The server binary and its version, or fail the test with install instructions."""
    try:
        return _locate_redis_server()
    except RedisServerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


def client_list(server: RedisServer) -> list[dict[str, str]]:
    """``CLIENT LIST`` of ``server``: a dict of its fields (``id``, ``addr``, ``flags``,
    ``cmd``, ...) for each connection."""
    listing = server.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    return [
        dict(field.split("=", 1) for field in line.split() if "=" in field)
        for line in listing.decode().splitlines()
    ]


def pop_waiting(server: RedisServer, proxy: FaultProxy) -> bool:
    """True once a connection through ``proxy`` (a Node's) waits at ``server`` in a blocking
    command (flag ``b``: its pop is under way there, not merely sent). A stall of the Node's
    link from then on holds back what follows the pop, not the pop itself."""
    proxied = {c.upstream_port for c in proxy.connections()}
    return any(
        "b" in c["flags"] and int(c["addr"].rsplit(":", 1)[1]) in proxied
        for c in client_list(server)
    )


def calls(server: RedisServer, command: str) -> int:
    """How many times ``server`` ran ``command`` (lower case, ``client|list`` for a
    subcommand on Redis 7) since its start or its last ``CONFIG RESETSTAT``."""
    stats = server.command("INFO", "commandstats")
    assert isinstance(stats, bytes)
    prefix = f"cmdstat_{command}:calls="
    for line in stats.decode().splitlines():
        if line.startswith(prefix):
            return int(line[len(prefix) :].split(",", 1)[0])
    return 0
