"""Which clients a Redis topology needs, chosen from ``ConnectionParams``.

One server and Sentinel are served by ``Client`` and ``Subscriber`` (Sentinel only changes
where their connections go: see ``sentinel``); a Cluster by ``cluster.ClusterClient``, which
routes each command by its key, ``cluster.ShardedSubscriber`` (sharded pub/sub) and
``cluster.PinnedClient`` for blocking pops. The distributor and the Node build their
connections here, push to keys and publish to channels, and never learn which server or slot
serves them. This module holds no state and never opens a connection itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .client import Client
from .cluster import ClusterClient, PinnedClient, ShardedSubscriber, key_slot
from .connection import ConnectionParams
from .pubsub import Subscriber

__all__ = [
    "AnySubscriber",
    "CommandClient",
    "Commands",
    "command_client",
    "pop_client",
    "subscriber",
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
) -> AnySubscriber:
    """The subscriber for ``params``' topology (sharded pub/sub on a Cluster)."""
    if params.cluster is not None:
        return ShardedSubscriber(
            params,
            on_message=on_message,
            on_connection_lost=on_connection_lost,
            health_check_interval=health_check_interval,
            parser=parser,
        )
    return Subscriber(
        params=params,
        on_message=on_message,
        on_connection_lost=on_connection_lost,
        health_check_interval=health_check_interval,
        parser=parser,
    )


def pop_client(
    params: ConnectionParams,
    keys: Sequence[str],
    *,
    name: str,
    parser: str | None = None,
    health_check_interval: float | None = 5.0,
) -> Client:
    """The connection that pops ``keys`` (BRPOP blocks it: it carries nothing else). On a
    Cluster the keys must share a slot (give them one ``{hash tag}``): ``ValueError`` else."""
    if params.cluster is None:
        return Client(params, name=name, parser=parser, health_check_interval=health_check_interval)
    slots = {key_slot(key) for key in keys}
    if len(slots) != 1:
        raise ValueError(
            f"on a Redis Cluster the keys one Node pops must share a slot: give {list(keys)!r} "
            "one {hash tag} (e.g. '{api}:users', '{api}:admin') or run a Node per key"
        )
    return PinnedClient(
        params,
        slots.pop(),
        name=name,
        parser=parser,
        health_check_interval=health_check_interval,
    )
