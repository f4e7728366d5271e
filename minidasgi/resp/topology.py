"""Which clients a Redis topology needs, chosen from ``ConnectionParams``.

One server and Sentinel are served by ``Client`` and ``Subscriber`` (Sentinel only changes
where their connections go: see ``sentinel``); a Cluster by ``cluster.ClusterClient``, which
routes each command by its key, ``cluster.ShardedSubscriber`` (sharded pub/sub) and
``cluster.PinnedClient`` for blocking pops, one per slot the popped keys fall in
(``pop_groups``). The distributor and the Node build their connections here, push to keys and
publish to channels, and never learn which server or slot serves them. This module holds no
state and never opens a connection itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .client import Client
from .cluster import ClusterClient, PinnedClient, ShardedSubscriber, key_slot
from .connection import Connection, ConnectionParams
from .directread import TailSize
from .pubsub import Subscriber

__all__ = [
    "AnySubscriber",
    "CommandClient",
    "Commands",
    "command_client",
    "pop_client",
    "pop_groups",
    "subscriber",
    "unblock",
]

CommandClient = Client | ClusterClient
"""A reconnecting command client of any topology."""

AnySubscriber = Subscriber | ShardedSubscriber
"""A reconnecting subscriber of any topology."""


class Commands(Protocol):
    """What ``CommandClient.connection()`` gives: the commands the distributor and the Node
    send on it (a ``Connection``, or a Cluster's router)."""

    async def execute(self, *args: object) -> Any: ...

    async def lpush(self, key: str | bytes, *values: object) -> int: ...

    async def publish(self, channel: str | bytes, message: object) -> int: ...

    async def pipeline(self, *commands: bytes) -> list[Any]: ...


def command_client(
    params: ConnectionParams,
    *,
    name: str,
    parser: str | None = None,
    health_check_interval: float | None = 5.0,
) -> CommandClient:
    """The command client for ``params``' topology (not started)."""
    if params.cluster is not None:
        return ClusterClient(
            params, name=name, parser=parser, health_check_interval=health_check_interval
        )
    return Client(params, name=name, parser=parser, health_check_interval=health_check_interval)


def subscriber(
    params: ConnectionParams,
    *,
    on_message: Callable[[bytes, bytes], None],
    on_connection_lost: Callable[[], None] | None = None,
    health_check_interval: float = 5.0,
    parser: str | None = None,
    direct_reads: bool | TailSize = False,
) -> AnySubscriber:
    """The subscriber for ``params``' topology (sharded pub/sub on a Cluster);
    ``direct_reads`` as ``Subscriber``'s."""
    if params.cluster is not None:
        return ShardedSubscriber(
            params,
            on_message=on_message,
            on_connection_lost=on_connection_lost,
            health_check_interval=health_check_interval,
            parser=parser,
            direct_reads=direct_reads,
        )
    return Subscriber(
        params=params,
        on_message=on_message,
        on_connection_lost=on_connection_lost,
        health_check_interval=health_check_interval,
        parser=parser,
        direct_reads=direct_reads,
    )


def pop_groups(params: ConnectionParams, keys: Sequence[str]) -> list[list[str]]:
    """The keys one blocking pop may name together, in groups, in the order given: all of
    them on one server or under Sentinel; on a Cluster, the keys of each slot (a BRPOP naming
    keys in different slots is refused with CROSSSLOT)."""
    if params.cluster is None:
        return [list(keys)] if keys else []
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(key_slot(key), []).append(key)
    return list(groups.values())


def pop_client(
    params: ConnectionParams,
    keys: Sequence[str],
    *,
    name: str,
    parser: str | None = None,
    health_check_interval: float | None = 5.0,
) -> Client:
    """The connection that pops ``keys`` (BRPOP blocks it: it carries nothing else). On a
    Cluster it follows the master serving the keys' slot, which they must share
    (``pop_groups`` makes such groups): ``ValueError`` else."""
    if params.cluster is None:
        return Client(params, name=name, parser=parser, health_check_interval=health_check_interval)
    slots = {key_slot(key) for key in keys}
    if len(slots) != 1:
        raise ValueError(
            f"on a Redis Cluster the keys one blocking pop names must share a slot: {list(keys)!r}"
            " do not (pop_groups splits them by slot)"
        )
    return PinnedClient(
        params,
        slots.pop(),
        name=name,
        parser=parser,
        health_check_interval=health_check_interval,
    )


async def unblock(publisher: CommandClient, blocked: Connection, client_id: int) -> bool:
    """Wake the blocking command of connection ``client_id`` (``blocked``) as if it timed out
    (``CLIENT UNBLOCK``), sent by ``publisher`` to the server ``blocked`` is connected to: on a
    Cluster that is the master serving its slot, which alone knows that id. True if a command
    was woken; False if none was blocked there (not sent yet, or still on its way: Redis
    reads each connection on its own, so a command sent earlier on ``blocked`` may reach it
    later). ``RespError`` if it cannot be sent."""
    woken: object
    if isinstance(publisher, ClusterClient):
        address = (blocked.params.host, blocked.params.port)
        woken = await publisher.execute_at(address, "CLIENT", "UNBLOCK", client_id)
    else:
        woken = await publisher.execute("CLIENT", "UNBLOCK", client_id)
    return woken == 1
