"""The integration tests' private redis-servers: ``minidasgi.testing``, failing the test
(never skipping it) when no ``redis-server`` binary is installed."""

from __future__ import annotations

from collections.abc import Callable

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
    "find_redis_server",
    "locate_redis_server",
]

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
