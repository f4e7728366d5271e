"""``minidasgi status``: queues, Nodes and distributors as Redis and the processes see them.

Owns one look at a deployment, as data (``take_status``) and as text (``format_status``).
Per key: requests waiting (``LLEN``), the age of the oldest (the ``queued`` time in the
envelope at the list's tail, the next to be popped) and Nodes listening (``PUBSUB NUMSUB`` on
the key's presence channel). Per process: its own answer to a stats request published on the
stats channel (NATS-style), collected on a reply channel of this command's own until every
receiver PUBLISH counted has answered or ``timeout`` passes.

It stores nothing in Redis and needs only ``LLEN LINDEX PUBSUB PUBLISH SUBSCRIBE PING`` on
the keys and on ``&prefix:*`` channels (on a Redis Cluster, ``SPUBLISH SSUBSCRIBE`` and
``CLUSTER SLOTS`` too: each command goes to the master serving its key or channel, and the
processes answer through sharded pub/sub, as all their traffic does there). What the
processes send back is untrusted: payloads are checked by ``stats.check`` and at most
``MAX_PROCESSES`` are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import codec, stats, wire
from .resp import topology
from .resp.cluster import ClusterClient
from .resp.connection import ConnectionParams, open_connection
from .resp.protocol import RedisConnectionError, ReplyError, pack_command

__all__ = ["MAX_PROCESSES", "format_status", "take_status"]

MAX_PROCESSES = 10_000
_MAX_ENVELOPE = 16 * 1024 * 1024


async def take_status(
    params: ConnectionParams,
    keys: list[str] | None = None,
    *,
    channel_prefix: str = "minidasgi",
    timeout: float = 1.0,
) -> dict[str, Any]:
    """One look: ``{"queues": [...], "nodes": [...], "distributors": [...], "time": t}``.

    ``keys``: the queues to show; by default those the answering Nodes serve.
    Raises ``RespError`` (or ``TimeoutError``) when Redis cannot be asked.
    """
    loop = asyncio.get_running_loop()
    request_id = wire.new_request_id()
    answers: dict[str, dict[str, Any]] = {}
    enough = asyncio.Event()
    expected = -1

    def on_message(channel: bytes, data: bytes) -> None:
        try:
            kind, answer_id, args = wire.unpack_general(data)
        except (codec.CodecError, wire.WireError):
            return
        if kind != wire.STATS_REPLY or answer_id != request_id or not args:
            return
        payload = stats.check(args[0])
        if payload is not None and len(answers) < MAX_PROCESSES:
            answers[payload["channel"]] = payload
        if 0 <= expected <= len(answers):
            enough.set()

    connection, close = await _open(params, timeout)
    subscriber = topology.subscriber(params, on_message=on_message)
    try:
        reply = stats.status_channel(channel_prefix, params.db)
        await asyncio.wait_for(subscriber.subscribe(reply), timeout)
        deadline = loop.time() + timeout
        request = wire.pack(wire.STATS, request_id, reply)
        stats_channel = wire.stats_channel(channel_prefix, params.db)
        expected = await connection.publish(stats_channel, request)
        if len(answers) < expected:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(enough.wait(), max(deadline - loop.time(), 0))
        nodes = sorted(
            (a for a in answers.values() if a["role"] == "node"),
            key=lambda a: (a.get("host", ""), a.get("pid", 0)),
        )
        distributors = sorted(
            (a for a in answers.values() if a["role"] == "distributor"),
            key=lambda a: (a.get("host", ""), a.get("pid", 0)),
        )
        if not keys:
            keys = sorted({k for n in nodes for k in n.get("keys", [])})
        cluster = params.cluster is not None
        queues = [await _queue(connection, key, channel_prefix, params.db, cluster) for key in keys]
    finally:
        await subscriber.close()
        await close()
    return {
        "time": time.time(),
        "queues": queues,
        "nodes": nodes,
        "distributors": distributors,
        "asked": expected,
        "answered": len(answers),
    }


async def _open(
    params: ConnectionParams, timeout: float
) -> tuple[topology.Commands, Callable[[], Awaitable[None]]]:
    """The commands to ask with, and how to close them: a connection, or on a Cluster a
    router sending each command to the master serving its key."""
    if params.cluster is None:
        connection = await asyncio.wait_for(open_connection(params), timeout)
        return connection, connection.close
    client = ClusterClient(params, name="status", health_check_interval=None)
    try:
        await client.wait_connected(timeout)
        return client.connection(), client.close
    except asyncio.TimeoutError:
        await client.close()
        raise RedisConnectionError(
            f"{params.address} gave no slot map in {timeout:g} s: {client.last_error}"
        ) from None
    except BaseException:
        await client.close()
        raise


async def _queue(
    connection: topology.Commands, key: str, prefix: str, db: int, cluster: bool
) -> dict[str, Any]:
    presence = wire.presence_channel(prefix, db, key, cluster=cluster)
    length, oldest, listeners = await connection.pipeline(
        pack_command("LLEN", key),
        pack_command("LINDEX", key, -1),
        pack_command("PUBSUB", "NUMSUB", presence),
    )
    queue: dict[str, Any] = {"key": key, "waiting": None, "oldest_age": None, "nodes": None}
    if type(length) is int:
        queue["waiting"] = length
    elif isinstance(length, ReplyError):
        queue["error"] = str(length)
    if isinstance(oldest, bytes):
        with contextlib.suppress(codec.CodecError, wire.WireError):
            envelope = wire.Envelope.decode(oldest, max_size=_MAX_ENVELOPE)
            if envelope.queued:
                queue["oldest_age"] = round(max(time.time() - envelope.queued, 0.0), 3)
    if isinstance(listeners, list) and len(listeners) == 2 and type(listeners[1]) is int:
        queue["nodes"] = listeners[1]
    return queue


def format_status(report: dict[str, Any], address: str) -> str:
    """The report as text tables."""
    when = time.strftime("%H:%M:%S", time.localtime(report["time"]))
    lines = [f"{when}  Redis {address}  ({report['answered']} of {report['asked']} answered)"]
    lines.append("")
    lines.append(f"{'QUEUE':<32} {'WAITING':>8} {'OLDEST':>9} {'NODES':>6}")
    if not report["queues"]:
        lines.append("(no queue: name keys, or start a Node)")
    for q in report["queues"]:
        age = "-" if q["oldest_age"] is None else f"{q['oldest_age']:.3f}s"
        waiting = "?" if q["waiting"] is None else str(q["waiting"])
        nodes = "?" if q["nodes"] is None else str(q["nodes"])
        lines.append(f"{q['key'][:32]:<32} {waiting:>8} {age:>9} {nodes:>6}")
    lines.append("")
    lines.append(
        f"{'NODE (host:pid)':<28} {'KEYS':<24} {'CONC':>5} {'FLIGHT':>6} {'SERVED':>8} "
        f"{'FAILED':>6} {'UPTIME':>9}"
    )
    for n in report["nodes"]:
        who = f"{n.get('host', '?')}:{n.get('pid', '?')}"
        if n.get("stopping"):
            who += " (stopping)"
        lines.append(
            f"{who[:28]:<28} {','.join(n.get('keys', []))[:24]:<24} "
            f"{n.get('concurrency', '?'):>5} {n.get('in_flight', '?'):>6} "
            f"{n.get('served', '?'):>8} {n.get('failed', '?'):>6} "
            f"{_duration(n.get('uptime')):>9}"
        )
    lines.append("")
    lines.append(f"{'DISTRIBUTOR (host:pid)':<28} {'FLIGHT':>6} {'SERVED':>8}  REFUSED")
    for d in report["distributors"]:
        who = f"{d.get('host', '?')}:{d.get('pid', '?')}"
        refused = d.get("refused", {})
        shown = " ".join(f"{k}={v}" for k, v in sorted(refused.items()) if v) or "-"
        lines.append(
            f"{who[:28]:<28} {d.get('in_flight', '?'):>6} {d.get('served', '?'):>8}  {shown}"
        )
    return "\n".join(lines)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, float):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
