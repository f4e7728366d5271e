"""minidasgi: spread ASGI traffic from front processes to worker processes through Redis.

Front processes run a ``Distributor`` (an ASGI app, under uvicorn or any ASGI server) that
pushes each request onto a Redis list chosen by its path; ``Node`` workers on any machine pop
those requests and run them in an ordinary ASGI app. Only the standard library is imported.
"""

from __future__ import annotations

from .distributor import (
    AppFailed,
    Distributor,
    ResponseAborted,
    create_distributor,
    create_path_distributor,
)
from .node import DEFAULT_CONCURRENCY, Node
from .routing import InvalidKey, RouteTable

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CONCURRENCY",
    "AppFailed",
    "Distributor",
    "InvalidKey",
    "Node",
    "ResponseAborted",
    "RouteTable",
    "__version__",
    "create_distributor",
    "create_path_distributor",
]
