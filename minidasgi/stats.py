"""The stats payload a Node or a distributor publishes when ``minidasgi status`` asks.

Owns the payload's fields, building it from plain values, checking one received (it comes
through Redis: untrusted, so sizes and types are checked and unknown fields dropped), and the
reply channels a process agrees to answer on. It does no I/O and imports neither side.

A request is ``[wire.STATS, id, reply_channel]`` on ``wire.stats_channel``; the answer is
``[wire.STATS_REPLY, id, payload]`` published on ``reply_channel``, which must be a status
channel of the same prefix and db (``status_channel``), so that a stats request cannot make
a process publish on another process' channel.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

__all__ = [
    "MAX_KEYS",
    "check",
    "distributor_payload",
    "node_payload",
    "process_started",
    "reply_channel",
    "status_channel",
]

MAX_KEYS = 256
"""Keys listed in one payload at most."""

_HOST = socket.gethostname()[:255]
_STARTED = time.time()


def status_channel(prefix: str, db: int, suffix: str | None = None) -> str:
    """A status command's reply channel (``suffix``: random when not given)."""
    return f"{prefix}:{db}:status:{suffix or os.urandom(12).hex()}"


def reply_channel(prefix: str, db: int, args: list[Any]) -> str | None:
    """The reply channel a stats request names, if it is one this process may answer on."""
    if len(args) != 1 or not isinstance(args[0], str) or len(args[0]) > 256:
        return None
    channel: str = args[0]
    return channel if channel.startswith(f"{prefix}:{db}:status:") else None


def node_payload(
    *,
    channel: str,
    keys: list[str],
    concurrency: int,
    in_flight: int,
    served: int,
    failed: int,
    started: float,
    stopping: bool,
) -> dict[str, Any]:
    """What a Node tells about itself."""
    return {
        "role": "node",
        "channel": channel,
        "keys": keys[:MAX_KEYS],
        "concurrency": concurrency,
        "in_flight": in_flight,
        "served": served,
        "failed": failed,
        "uptime": round(time.time() - started, 3),
        "host": _HOST,
        "pid": os.getpid(),
        "stopping": stopping,
    }


def distributor_payload(
    *, channel: str, in_flight: int, served: int, refused: dict[str, int], started: float
) -> dict[str, Any]:
    """What a distributor process tells about itself."""
    return {
        "role": "distributor",
        "channel": channel,
        "in_flight": in_flight,
        "served": served,
        "refused": dict(list(refused.items())[:16]),
        "uptime": round(time.time() - started, 3),
        "host": _HOST,
        "pid": os.getpid(),
    }


_INT_FIELDS = ("concurrency", "in_flight", "served", "failed", "pid")


def check(payload: Any) -> dict[str, Any] | None:
    """A received payload with only known, well-typed fields; None if it is not one."""
    if not isinstance(payload, dict) or payload.get("role") not in ("node", "distributor"):
        return None
    checked: dict[str, Any] = {"role": payload["role"]}
    for name in ("channel", "host"):
        value = payload.get(name)
        checked[name] = value[:256] if isinstance(value, str) else "?"
    for name in _INT_FIELDS:
        value = payload.get(name)
        if type(value) is int and value >= 0:
            checked[name] = value
    uptime = payload.get("uptime")
    if isinstance(uptime, (int, float)) and not isinstance(uptime, bool) and uptime >= 0:
        checked["uptime"] = float(uptime)
    keys = payload.get("keys")
    if isinstance(keys, list):
        checked["keys"] = [k[:256] for k in keys[:MAX_KEYS] if isinstance(k, str)]
    refused = payload.get("refused")
    if isinstance(refused, dict):
        checked["refused"] = {
            str(k)[:64]: v for k, v in list(refused.items())[:16] if type(v) is int
        }
    if isinstance(payload.get("stopping"), bool):
        checked["stopping"] = payload["stopping"]
    return checked


def process_started() -> float:
    """The time this module was imported: about when the process started."""
    return _STARTED
