"""Redis Cluster: which master serves a key or a channel, and following the slot map.

Theory of operation. A key belongs to one of 16384 slots: CRC16 (the XMODEM variant the
Redis cluster specification gives) of the key modulo 16384, or of its hash tag, the part
between the first ``{`` and the next ``}`` when that part is not empty, so that keys which
must go together (a queue and its companions) can be put in one slot. ``SlotMap`` says which
master serves each slot; it is read with ``CLUSTER SLOTS`` from any node that answers (the
startup nodes, then every node the last map named) and checked before use: a reply from
Redis is untrusted input, bounded in size and shape.

``ClusterClient`` keeps one reconnecting ``Client`` per master actually used, opened on first
use, and sends each command to the master of its key's slot. A ``MOVED`` reply means the slot
moved: the map is refreshed (one refresh for every caller at once) and the command sent once
more to the new owner; ``ASK`` means the slot is being migrated and this key lives on the
target already: ``ASKING`` and the command go out together on the target's connection. A
redirect means that the command did not run, so following one is not a retry; at most
``_MAX_REDIRECTS`` are followed. A lost connection (a master failing over) refreshes the map
too, so that the next command goes to the new master.

Sharded pub/sub (Redis 7): ``publish`` is ``SPUBLISH`` on the master of the channel's slot, and
``ShardedSubscriber`` keeps one sharded ``Subscriber`` per master owning a wanted channel. When
Redis unsubscribes a channel by itself (its slot moved: a failover, a resharding) or a
subscriber's connection is lost, the map is refreshed and the channel subscribed again where it
lives now. Classic PUBLISH is broadcast over the cluster bus and counts only the local
receivers, so it is never used here.

The receiver count: "0 receivers means the peer is dead" holds on one server, not right after
a cluster's map changed (an SPUBLISH just after a failover was measured returning 0 while its
message was delivered, the subscriber having moved in between). ``try_publish`` reports such a
0 as 1 (unknown, assumed alive) for ``settle_time`` seconds after a map change; the
conversation's per-request liveness (PINGs naming requests, peer timeouts) finds a peer that
really died. A 0 in a stable cluster keeps its meaning, at no extra cost.

This module knows nothing of ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .client import Client, copy_outcome
from .directread import TailSize
from .protocol import (
    PythonParser,
    RedisConnectionError,
    ReplyError,
    RespError,
    pack_command,
    pack_gathering,
)
from .pubsub import Subscriber, _as_bytes

if TYPE_CHECKING:
    from .connection import Connection, ConnectionParams

__all__ = [
    "SLOTS",
    "ClusterClient",
    "ClusterSpec",
    "PinnedClient",
    "ShardedSubscriber",
    "SlotMap",
    "crc16",
    "hash_tag",
    "key_slot",
]

logger = logging.getLogger("minidasgi.resp.cluster")

SLOTS = 16384
_MAX_REDIRECTS = 5
_MAX_NODES = 1000  # masters and replicas a slot map may name
_REFRESH_MIN_INTERVAL = 0.1  # seconds between two map refreshes asked by errors

Address = tuple[str, int]


# crc16: CRC-16/XMODEM (polynomial 0x1021, initial value 0), as the cluster specification
# gives it; a table of 256 entries computed once.


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM of ``data`` (``crc16(b"123456789") == 0x31C3``)."""
    crc = 0
    table = _CRC16_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: str) -> str | None:
    """The part of ``key`` its slot is computed from when that is not the whole key: between
    the first ``{`` and the next ``}``, if not empty; else None."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return None


def key_slot(key: str | bytes) -> int:
    """The cluster slot of ``key``, with the ``{hash tag}`` rule: only the part between the
    first ``{`` and the next ``}`` is hashed, when that part is not empty."""
    data = key.encode() if isinstance(key, str) else bytes(key)
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16(data) % SLOTS


@dataclass(frozen=True)
class ClusterSpec:
    """The nodes to ask for the slot map first (any of the cluster's nodes will do)."""

    startup_nodes: tuple[Address, ...]

    def __post_init__(self) -> None:
        if not self.startup_nodes:
            raise ValueError("a cluster URL names at least one node")
        if len(self.startup_nodes) > _MAX_NODES:
            raise ValueError(f"at most {_MAX_NODES} cluster nodes")

    @property
    def address(self) -> str:
        """For messages: ``cluster h1:p1,h2:p2``."""
        return "cluster " + ",".join(_format(a) for a in self.startup_nodes)


def _format(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SlotMap:
    """Which master serves each slot, from a ``CLUSTER SLOTS`` reply."""

    def __init__(self, owners: list[Address | None], nodes: Iterable[Address]) -> None:
        self.owners = owners  # SLOTS entries; None: no master serves the slot
        self.nodes = tuple(dict.fromkeys(nodes))  # every node named, masters first

    @classmethod
    def parse(cls, reply: object, default_host: str) -> SlotMap:
        """Read a ``CLUSTER SLOTS`` reply; raise ``ValueError`` if it is malformed."""
        if not isinstance(reply, list) or len(reply) > SLOTS:
            raise ValueError("CLUSTER SLOTS did not answer a list of ranges")
        owners: list[Address | None] = [None] * SLOTS
        masters: list[Address] = []
        replicas: list[Address] = []
        for entry in reply:
            if not (isinstance(entry, list) and 3 <= len(entry) <= 2 + _MAX_NODES):
                raise ValueError("malformed CLUSTER SLOTS range")
            first, last = entry[0], entry[1]
            if not (type(first) is int and type(last) is int and 0 <= first <= last < SLOTS):
                raise ValueError("malformed CLUSTER SLOTS range")
            nodes = [_node_address(node, default_host) for node in entry[2:]]
            master = nodes[0]
            owners[first : last + 1] = [master] * (last - first + 1)
            masters.append(master)
            replicas.extend(nodes[1:])
        return cls(owners, [*masters, *replicas])

    def owner(self, slot: int) -> Address | None:
        return self.owners[slot]

    @property
    def masters(self) -> set[Address]:
        return {owner for owner in self.owners if owner is not None}


def _node_address(node: object, default_host: str) -> Address:
    if not (isinstance(node, list) and len(node) >= 2):
        raise ValueError("malformed CLUSTER SLOTS node")
    host, port = node[0], node[1]
    if not (isinstance(host, bytes) and len(host) <= 255 and type(port) is int):
        raise ValueError("malformed CLUSTER SLOTS node")
    if not 0 < port < 65536:
        raise ValueError("malformed CLUSTER SLOTS port")
    # An empty host (or "?") means "the address you reached me at".
    name = host.decode(errors="replace") if host and host != b"?" else default_host
    return name, port


def _redirect(error: ReplyError) -> tuple[str, int, Address] | None:
    """``("MOVED"|"ASK", slot, address)`` from a redirect error, else None."""
    parts = str(error).split(" ")
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK") or not parts[1].isdigit():
        return None
    host, _, port = parts[2].rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return parts[0], int(parts[1]), (host.strip("[]"), int(port))


class _ClusterMap:
    """The slot map of one cluster, shared by every client of the process (per event loop):
    one read of ``CLUSTER SLOTS`` serves them all, and a change seen by one (a MOVED, a lost
    master) moves them all."""

    def __init__(self, params: ConnectionParams, parser: str | None) -> None:
        assert params.cluster is not None
        self.params = params
        self.spec = params.cluster
        self._parser = parser
        self.slots: SlotMap | None = None
        self._refreshing: asyncio.Future[SlotMap] | None = None
        self._refreshed_at = -1e9  # monotonic time of the last refresh asked by an error
        self.changed_at = -1e9  # monotonic time the map last changed
        self.last_error: Exception | None = None
        self._listeners: set[Callable[[SlotMap], None]] = set()
        self._last_good: Address | None = None  # asked first: a dead node may be slow to fail

    def node_params(self, address: Address) -> ConnectionParams:
        return replace(self.params, host=address[0], port=address[1], cluster=None)

    def listen(self, callback: Callable[[SlotMap], None]) -> Callable[[], None]:
        """Call ``callback(slots)`` at each change; return the function that stops it."""
        self._listeners.add(callback)
        return lambda: self._listeners.discard(callback)

    async def refresh(self) -> SlotMap:
        """Read the slot map again (one read for every caller at once)."""
        refreshing = self._refreshing
        if refreshing is None or refreshing.done():
            refreshing = self._refreshing = asyncio.ensure_future(self._read())
            refreshing.add_done_callback(_retrieve)
        return await asyncio.shield(refreshing)

    async def known(self) -> SlotMap:
        """The map, read first if it is not known yet."""
        return self.slots if self.slots is not None else await self.refresh()

    def refresh_soon(self) -> None:
        """A refresh after an error, at most one per ``_REFRESH_MIN_INTERVAL``."""
        now = time.monotonic()
        if now - self._refreshed_at < _REFRESH_MIN_INTERVAL:
            return
        self._refreshed_at = now
        task = asyncio.ensure_future(self.refresh())
        task.add_done_callback(_retrieve)

    async def _read(self) -> SlotMap:
        from .connection import open_connection

        known = self.slots.nodes if self.slots is not None else ()
        first = () if self._last_good is None else (self._last_good,)
        candidates = list(dict.fromkeys([*first, *known, *self.spec.startup_nodes]))
        errors = []
        for address in candidates:
            try:
                connection = await open_connection(self.node_params(address), parser=self._parser)
            except (RespError, OSError) as exc:
                errors.append(str(exc))
                continue
            try:
                reply = await connection.execute("CLUSTER", "SLOTS")
                slots = SlotMap.parse(reply, address[0])
            except (RespError, OSError, ValueError) as exc:
                errors.append(f"{_format(address)}: {exc}")
                continue
            finally:
                await connection.close()
            if not slots.masters:
                errors.append(f"{_format(address)} serves no slot yet")
                continue
            self._last_good = address
            self._install(slots)
            return slots
        error = RedisConnectionError(
            f"no node of {self.spec.address} gave the slot map: " + "; ".join(errors[:5])
        )
        self.last_error = error
        raise error

    def _install(self, slots: SlotMap) -> None:
        old = self.slots
        self.slots = slots
        if old is not None and old.owners == slots.owners:
            return
        self.changed_at = time.monotonic()
        if old is not None:
            logger.info("the slot map of %s changed", self.spec.address)
        for callback in list(self._listeners):
            try:
                callback(slots)
            except Exception:  # one client's failure must not keep the others on old masters
                logger.exception("a slot map listener failed")


_maps: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[ClusterSpec, Any], _ClusterMap]
] = weakref.WeakKeyDictionary()


def _shared_map(params: ConnectionParams, parser: str | None) -> _ClusterMap:
    """The slot map of ``params``' cluster in the running loop (made on first use)."""
    assert params.cluster is not None
    loop = asyncio.get_running_loop()
    maps = _maps.setdefault(loop, {})
    key = (
        params.cluster,
        (params.username, params.password, params.ssl, params.connect_timeout, parser),
    )
    found = maps.get(key)
    if found is None:
        if len(maps) >= 64:  # settings come from code, but stay bounded
            maps.clear()
        found = maps[key] = _ClusterMap(params, parser)
    return found


# Commands that name their key elsewhere than in their first argument.
_NO_KEY = frozenset({b"PING", b"CLIENT", b"INFO", b"CLUSTER", b"ROLE", b"TIME", b"READONLY"})


def _routing_key(args: tuple[object, ...]) -> str | bytes | None:
    """The key (or channel) a command is routed by: its first argument, but for the few
    keyless commands minidasgi sends and ``PUBSUB SHARDNUMSUB channel``."""
    if not args:
        return None
    name = args[0].encode() if isinstance(args[0], str) else args[0]
    if not isinstance(name, bytes):
        return None
    name = name.upper()
    if name in _NO_KEY or len(args) < 2:
        return None
    if name == b"PUBSUB":
        return _as_key(args[2]) if len(args) > 2 else None
    return _as_key(args[1])


def _as_key(value: object) -> str | bytes | None:
    return value if isinstance(value, (str, bytes)) else None


class ClusterClient:
    """Commands to a Redis Cluster, each sent to the master serving its key, with the surface
    of ``Client`` (``connection()`` gives a router with the surface of a ``Connection``).

    ``params`` carries the login, timeouts and TLS every node is reached with, and its
    ``cluster`` the startup nodes. ``settle_time``: seconds after a slot map change during
    which ``try_publish`` counts 0 receivers as unknown (see the module docstring).
    """

    def __init__(
        self,
        params: ConnectionParams,
        *,
        name: str = "cluster client",
        parser: str | None = None,
        health_check_interval: float | None = 5.0,
        settle_time: float = 5.0,
    ) -> None:
        if params.cluster is None:
            raise ValueError("ClusterClient needs params with a cluster")
        self.params = params
        self.name = name
        self.settle_time = settle_time
        self._parser = parser
        self._health_check_interval = health_check_interval
        self._clients: dict[Address, Client] = {}
        self._map: _ClusterMap | None = None
        self._unlisten: Callable[[], None] | None = None
        self._closing = False
        self._router = _Router(self)

    def __repr__(self) -> str:
        return f"<ClusterClient {self.name} {self.address} masters={len(self._clients)}>"

    @property
    def address(self) -> str:
        assert self.params.cluster is not None
        return self.params.cluster.address

    @property
    def map(self) -> _ClusterMap:
        if self._map is None:
            self._map = _shared_map(self.params, self._parser)
            self._unlisten = self._map.listen(self._on_map)
        return self._map

    @property
    def slots(self) -> SlotMap | None:
        return self._map.slots if self._map is not None else None

    @property
    def last_error(self) -> Exception | None:
        return self._map.last_error if self._map is not None else None

    @property
    def connected(self) -> bool:
        """True once the slot map is known and every master used so far is connected.

        A master found disconnected has the map read again (at most every 0.1 s): it may have
        failed over, and a readiness probe must not wait for a command to find out.
        """
        if self.slots is None:
            return False
        if all(c.connected for c in self._clients.values()):
            return True
        self.map.refresh_soon()
        return False

    def start(self) -> None:
        """Read the slot map in the background (idempotent)."""
        if self.slots is None and not self._closing:
            self.map.refresh_soon()

    async def wait_reopened(self) -> bool:
        """``Client.wait_reopened`` for every master used so far, together (so at most
        ``REOPEN_WAIT`` in all): whether all are connected once that is over."""
        await asyncio.gather(*(client.wait_reopened() for client in self._clients.values()))
        return self.connected

    async def wait_connected(self, timeout: float | None = None) -> SlotMap:
        """Wait until the slot map is known, at most ``timeout`` seconds."""
        return await asyncio.wait_for(self._wait_map(), timeout)

    async def _wait_map(self) -> SlotMap:
        backoff = 0.05
        while True:
            try:
                return await self.map.known()
            except RespError:
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, 2.0)

    async def refresh(self) -> SlotMap:
        """Read the slot map again."""
        return await self.map.refresh()

    async def close(self) -> None:
        """Close every connection."""
        self._closing = True
        if self._unlisten is not None:
            self._unlisten()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    def _on_map(self, slots: SlotMap) -> None:
        masters = slots.masters
        for address in list(self._clients):
            if address not in masters:  # no longer a master: its connection serves nothing
                client = self._clients.pop(address)
                task = asyncio.ensure_future(client.close())
                task.add_done_callback(_retrieve)

    def settling(self) -> bool:
        """True for ``settle_time`` seconds after the slot map changed."""
        return time.monotonic() - self.map.changed_at < self.settle_time

    def client_for(self, address: Address) -> Client:
        """The reconnecting connection to the master at ``address`` (opened on first use)."""
        client = self._clients.get(address)
        if client is None:
            if self._closing:
                raise RedisConnectionError(f"{self.name} is closed")
            client = Client(
                self.map.node_params(address),
                name=f"{self.name} {_format(address)}",
                parser=self._parser,
                health_check_interval=self._health_check_interval,
            )
            self._clients[address] = client
            client.start()
        return client

    def owner(self, key: str | bytes) -> Address:
        """The master serving ``key`` (``RedisConnectionError`` while unknown)."""
        slots = self.slots
        owner = slots.owner(key_slot(key)) if slots is not None else None
        if owner is None:
            self.map.refresh_soon()
            raise RedisConnectionError(f"no master of {self.address} is known to serve {key!r}")
        return owner

    def connection(self) -> _Router:
        """A router with the surface of a ``Connection`` (``RedisConnectionError`` at once
        while the slot map is unknown)."""
        if self.slots is None:
            self.start()
            raise RedisConnectionError(f"the slot map of {self.address} is not known yet")
        return self._router

    # Commands.

    async def execute(self, *args: object, key: str | bytes | None = None) -> Any:
        """Run one command on the master serving ``key`` (by default the command's first
        argument), following redirects."""
        if key is None:
            key = _routing_key(args)
            if key is None:
                raise RedisConnectionError(f"{args[0]!r} names no key to route it in a cluster")
        address = self.owner(key)
        asking = False
        for _ in range(_MAX_REDIRECTS):
            client = self.client_for(address)
            if not client.ever_connected and client.last_error is None:
                # A master used for the first time: its first connection is on its way.
                with contextlib.suppress(asyncio.TimeoutError):
                    await client.wait_connected(self.params.connect_timeout)
            try:
                connection = client.connection()
                if asking:
                    _, reply = await connection.pipeline(
                        pack_command("ASKING"), pack_command(*args)
                    )
                    if isinstance(reply, ReplyError):
                        raise reply
                    return reply
                return await connection.execute(*args)
            except ReplyError as exc:
                redirect = _redirect(exc)
                if redirect is None:
                    raise
                kind, _slot, address = redirect
                asking = kind == "ASK"
                if not asking:
                    await self.refresh()
            except RedisConnectionError:
                self.map.refresh_soon()  # a failover, perhaps: look where the slot went
                raise
        raise RedisConnectionError(f"too many redirects for {key!r} in {self.address}")

    async def execute_at(self, address: Address, *args: object) -> Any:
        """Run one command on the node at ``address``, whatever slots it serves (for commands
        about a connection of that node, such as ``CLIENT UNBLOCK``); no redirect followed."""
        client = self.client_for(address)
        if not client.ever_connected and client.last_error is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await client.wait_connected(self.params.connect_timeout)
        return await client.connection().execute(*args)

    async def lpush(self, key: str | bytes, *values: object) -> int:
        """LPUSH on the master serving ``key``."""
        reply: int = await self.execute("LPUSH", key, *values, key=key)
        return reply

    async def publish(self, channel: str | bytes, message: object) -> int:
        """SPUBLISH on the master serving ``channel``; returns the number of receivers."""
        reply: int = await self.execute("SPUBLISH", channel, message, key=channel)
        return reply

    async def try_publish(self, channel: str | bytes, message: object) -> int:
        """SPUBLISH with Redis unreachable counted (and logged) as 0 receivers, and 0 counted
        as 1 while the cluster settles after a map change (see the module docstring)."""
        try:
            count = await self.publish(channel, message)
        except RespError as exc:
            logger.warning("%s cannot publish: %s", self.name, exc)
            return 0
        if count == 0 and self.settling():
            return 1
        return count

    def publish_soon(self, channel: str | bytes, message: object) -> asyncio.Future[int]:
        """``try_publish`` without waiting for the reply: the future gives the count. Sent on
        the owner's live connection with a callback (no task per message); a redirect, or a
        master used for the first time, takes the slow path of ``try_publish``."""
        result: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.publish_into(channel, message, result)
        return result

    def publish_into(
        self,
        channel: str | bytes,
        message: object,
        result: asyncio.Future[int],
        settled: Callable[[asyncio.Future[int]], None] | None = None,
    ) -> None:
        """``publish_soon`` settling the caller's ``result`` straight from the reply; a
        ``result`` already done is left alone. ``settled``, if given, is called with
        ``result`` once this settled it (``Client.publish_into``)."""
        try:
            connection = self.client_for(self.owner(channel)).connection()
            connection.send_packed_to(
                pack_gathering("SPUBLISH", channel, message),
                lambda reply: self._settle_count(result, reply, channel, message, settled),
            )
        except RespError:
            _chain(result, self.try_publish(channel, _joined(message)), settled)

    def _settle_count(
        self,
        result: asyncio.Future[int],
        reply: Any,
        channel: str | bytes,
        message: object,
        settled: Callable[[asyncio.Future[int]], None] | None = None,
    ) -> None:
        if result.done():
            return
        if isinstance(reply, ReplyError) and _redirect(reply) is not None:
            # The slot moved.
            _chain(result, self.try_publish(channel, _joined(message)), settled)
            return
        if isinstance(reply, BaseException):
            logger.warning("%s cannot publish: %s", self.name, reply)
            if isinstance(reply, RedisConnectionError):
                self.map.refresh_soon()
            result.set_result(0)
        else:
            count = reply if type(reply) is int else 0
            result.set_result(1 if count == 0 and self.settling() else count)
        if settled is not None:
            settled(result)

    def lpush_soon(self, key: str | bytes, values: list[Any]) -> asyncio.Future[int]:
        """LPUSH ``values`` without waiting for the reply: the future gives the list's length
        or raises ``RespError``; sent as ``publish_soon`` is."""
        result: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            connection = self.client_for(self.owner(key)).connection()
            connection.send_packed_to(
                pack_command("LPUSH", key, *values),
                lambda reply: self._settle_push(result, reply, key, values),
            )
        except RespError:
            _chain(result, self.lpush(key, *values))
        return result

    def _settle_push(
        self,
        result: asyncio.Future[int],
        reply: Any,
        key: str | bytes,
        values: list[Any],
    ) -> None:
        if result.done():
            return
        if isinstance(reply, ReplyError) and _redirect(reply) is not None:
            _chain(result, self.lpush(key, *values))  # nothing ran: follow the redirect
            return
        if isinstance(reply, BaseException):
            if isinstance(reply, RedisConnectionError):
                self.map.refresh_soon()
            result.set_exception(reply)
            return
        result.set_result(reply)


def _chain(
    result: asyncio.Future[Any],
    coroutine: Coroutine[Any, Any, Any],
    settled: Callable[[asyncio.Future[Any]], None] | None = None,
) -> None:
    """Run ``coroutine`` and copy its outcome to ``result`` (the rare slow path); a
    cancelled run fails ``result``, which may refuse to be cancelled (a caller's batch).
    ``settled``, if given, is called with ``result`` once it was settled so."""

    def copy(done: asyncio.Future[Any]) -> None:
        if result.done():
            return
        copy_outcome(result, done)
        if settled is not None:
            settled(result)

    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(copy)


class _Router:
    """What ``ClusterClient.connection()`` gives: the commands of a ``Connection`` that the
    distributor and the Node use, each routed by its key."""

    def __init__(self, cluster: ClusterClient) -> None:
        self._cluster = cluster

    async def execute(self, *args: object) -> Any:
        return await self._cluster.execute(*args)

    async def lpush(self, key: str | bytes, *values: object) -> int:
        return await self._cluster.lpush(key, *values)

    async def publish(self, channel: str | bytes, message: object) -> int:
        return await self._cluster.publish(channel, message)

    async def pipeline(self, *commands: bytes) -> list[Any]:
        """Commands packed with ``pack_command``, each routed by its key (at once, not in one
        write: they may live on different masters); ``PUBSUB NUMSUB`` counts sharded
        subscribers. Error replies are returned in place, as ``Connection.pipeline`` does."""
        parser = PythonParser()
        calls = []
        for packed in commands:
            parser.feed(packed)
            args = parser.gets()
            if not isinstance(args, list) or not args:
                raise ValueError("not a packed command")
            if [a.upper() for a in args[:2]] == [b"PUBSUB", b"NUMSUB"]:
                args = [b"PUBSUB", b"SHARDNUMSUB", *args[2:]]
            calls.append(self._cluster.execute(*args))
        replies = await asyncio.gather(*calls, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException) and not isinstance(reply, ReplyError):
                raise reply
        return list(replies)


class PinnedClient(Client):
    """A reconnecting connection to whichever master serves ``slot`` now: for blocking pops,
    whose keys must share that slot. The connection is closed when the slot moves (a MOVED
    or ``-UNBLOCKED`` reply, or a new slot map naming another master); the next one goes to
    the new owner."""

    def __init__(self, params: ConnectionParams, slot: int, **options: Any) -> None:
        super().__init__(params, **options)
        self.slot = slot

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<PinnedClient {self.name} {self.params.address} slot={self.slot} {state}>"

    async def _open(self) -> Connection:
        from .connection import open_connection

        shared = _shared_map(self.params, self._parser)
        slots = await shared.known()
        owner = slots.owner(self.slot)
        if owner is None:
            shared.refresh_soon()
            raise RedisConnectionError(
                f"no master of {self.params.address} serves slot {self.slot}"
            )
        try:
            connection = await open_connection(shared.node_params(owner), parser=self._parser)
        except (RespError, OSError):
            shared.refresh_soon()  # the owner may have failed over
            raise
        connection.leave_on(_LEAVE_CODES, shared.refresh_soon)
        return connection

    async def _watch(self, connection: Connection) -> Exception:
        shared = _shared_map(self.params, self._parser)
        server = (connection.params.host, connection.params.port)

        def on_map(slots: SlotMap) -> None:
            owner = slots.owner(self.slot)
            if owner is not None and owner != server:
                connection.fail(
                    RedisConnectionError(
                        f"slot {self.slot} moved from {_format(server)} to {_format(owner)}"
                    )
                )

        unlisten = shared.listen(on_map)
        try:
            return await super()._watch(connection)
        finally:
            unlisten()


# Replies by which a node says it no longer serves a pinned connection's slot.
_LEAVE_CODES = frozenset({"MOVED", "UNBLOCKED", "CLUSTERDOWN"})


class ShardedSubscriber:
    """Subscribes to channels with sharded pub/sub on the masters serving them, following
    them when their slots move. Same surface as ``Subscriber``; ``on_connection_lost`` is
    called whenever messages of some channel may have been missed."""

    def __init__(
        self,
        params: ConnectionParams,
        *,
        on_message: Callable[[bytes, bytes], None],
        on_connection_lost: Callable[[], None] | None = None,
        health_check_interval: float = 5.0,
        parser: str | None = None,
        direct_reads: bool | TailSize = False,
    ) -> None:
        self.cluster = ClusterClient(params, parser=parser, name="sharded subscriber")
        self.params = params
        self._on_message = on_message
        self._on_connection_lost = on_connection_lost
        self._health_check_interval = health_check_interval
        self._parser = parser
        self._direct_reads = direct_reads
        self._channels: set[bytes] = set()
        self._subscribers: dict[Address, Subscriber] = {}
        self._placed: dict[bytes, Address] = {}  # channel -> the master it is subscribed on
        self._moving: asyncio.Task[None] | None = None
        self._closing = False
        self._unlisten: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<ShardedSubscriber {self.cluster.address} channels={len(self._channels)}>"

    @property
    def connected(self) -> bool:
        """True while every wanted channel is confirmed on the master serving it."""
        if set(self._placed) != self._channels:
            return False
        return all(s.connected for s in self._subscribers.values())

    def hears(self, channel: str | bytes) -> bool:
        """True while ``channel`` is confirmed on the master it is placed on (the other
        channels may be elsewhere, on a master that is down)."""
        name = _as_bytes(channel)
        address = self._placed.get(name)
        subscriber = None if address is None else self._subscribers.get(address)
        return subscriber is not None and subscriber.connected

    async def wait_hears(self, channel: str | bytes, timeout: float | None = None) -> None:
        """Wait until ``hears(channel)``; raise ``TimeoutError`` after ``timeout`` seconds."""

        async def settled() -> None:
            # The channel's subscriber comes and goes as the channel moves between masters
            # (one for a master that died never connects again): look again every 50 ms, a
            # check of local state only, and only while the channel is not heard.
            while not self.hears(channel):  # noqa: ASYNC110 (no one event to wait for)
                await asyncio.sleep(0.05)

        await asyncio.wait_for(settled(), timeout)

    def _on_map(self, slots: SlotMap) -> None:
        """The slot map changed: move the channels whose master changed."""
        if any(slots.owner(key_slot(c)) != a for c, a in self._placed.items()):
            self._replace_soon()

    @property
    def channels(self) -> frozenset[bytes]:
        return frozenset(self._channels)

    async def subscribe(self, *channels: str | bytes) -> None:
        """Subscribe on the masters serving the channels; return once all are confirmed."""
        names = [_as_bytes(c) for c in channels]
        self._channels.update(names)
        if self._unlisten is None:
            self._unlisten = self.cluster.map.listen(self._on_map)
        await self.cluster.wait_connected()
        await asyncio.gather(*(self._place(name) for name in names))

    async def _place(self, channel: bytes) -> None:
        address = self.cluster.owner(channel)
        placed = self._placed.get(channel)
        if placed == address:
            await self._subscribers[address].subscribe(channel)
            return
        if placed is not None:
            old = self._subscribers.get(placed)
            if old is not None:
                await old.unsubscribe(channel)
        subscriber = self._subscribers.get(address)
        if subscriber is None:
            subscriber = self._subscribers[address] = Subscriber(
                params=self.cluster.map.node_params(address),
                on_message=self._on_message,
                on_connection_lost=self._lost,
                health_check_interval=self._health_check_interval,
                parser=self._parser,
                sharded=True,
                on_unsubscribed=self._moved,
                direct_reads=self._direct_reads,
            )
        self._placed[channel] = address
        await subscriber.subscribe(channel)

    def _moved(self, channel: bytes) -> None:
        """Redis unsubscribed ``channel`` by itself: its slot moved."""
        self._placed.pop(channel, None)
        if self._on_connection_lost is not None:
            self._on_connection_lost()
        self._replace_soon()

    def _lost(self) -> None:
        if self._on_connection_lost is not None:
            self._on_connection_lost()
        self._replace_soon()

    def _replace_soon(self) -> None:
        if self._closing or (self._moving is not None and not self._moving.done()):
            return
        self._moving = asyncio.ensure_future(self._replace())

    async def _replace(self) -> None:
        """Refresh the map and subscribe every channel where it lives now, until all are
        confirmed (a master that died keeps its channels until the map names its successor:
        the map is read again, with backoff, until then)."""
        backoff = 0.05
        while not self._closing:
            try:
                await self.cluster.refresh()
                for channel in list(self._channels):
                    address = self.cluster.owner(channel)
                    if self._placed.get(channel) != address:
                        await asyncio.wait_for(self._place(channel), self._health_check_interval)
                for address in list(self._subscribers):
                    if address not in self._placed.values():
                        await self._subscribers.pop(address).close()
                if self.connected:
                    return
            except (RespError, asyncio.TimeoutError) as exc:
                logger.debug("sharded subscriber: %s", exc)
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, 2.0)

    async def unsubscribe(self, *channels: str | bytes) -> None:
        """Stop receiving messages from these channels (all when none is named)."""
        names = [_as_bytes(c) for c in channels]
        for name in names or list(self._channels):
            self._channels.discard(name)
            address = self._placed.pop(name, None)
            if address is not None and address in self._subscribers:
                await self._subscribers[address].unsubscribe(name)

    async def close(self) -> None:
        """Stop and disconnect. Safe to call more than once."""
        self._closing = True
        if self._unlisten is not None:
            self._unlisten()
        if self._moving is not None:
            self._moving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._moving
        subscribers, self._subscribers = list(self._subscribers.values()), {}
        for subscriber in subscribers:
            await subscriber.close()
        await self.cluster.close()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _joined(message: object) -> object:
    """A message given as a list of buffers (see ``pack_gathering``) as one bytes value."""
    return b"".join(message) if type(message) is list else message
