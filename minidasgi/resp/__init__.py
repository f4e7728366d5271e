"""A small RESP (Redis protocol) client over asyncio streams: only what minidasgi needs.

``connect()`` returns a ``Connection`` for commands (LPUSH, BRPOP, PUBLISH, ...), shared by any
number of tasks; ``Subscriber`` receives pub/sub messages on a connection of its own. Where
the server is comes from ``ConnectionParams``: one server, or the master a set of sentinels
names (``sentinel``). This package knows nothing of ASGI.
"""

from __future__ import annotations

from .connection import Connection, ConnectionParams, connect, make_params, parse_url
from .protocol import (
    NEED_DATA,
    AuthenticationError,
    ProtocolError,
    PythonParser,
    RedisConnectionError,
    ReplyError,
    RespError,
    make_parser,
    pack_command,
)
from .pubsub import Message, Subscriber
from .sentinel import SentinelSpec

__all__ = [
    "NEED_DATA",
    "AuthenticationError",
    "Connection",
    "ConnectionParams",
    "Message",
    "ProtocolError",
    "PythonParser",
    "RedisConnectionError",
    "ReplyError",
    "RespError",
    "SentinelSpec",
    "Subscriber",
    "connect",
    "make_params",
    "make_parser",
    "pack_command",
    "parse_url",
]
