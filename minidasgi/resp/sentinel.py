"""Redis Sentinel: finding the master through sentinels, and following it when it moves.

Theory of operation, after Redis' "Sentinel clients" guidelines. ``ConnectionParams`` with a
``sentinel`` (a ``SentinelSpec``: the sentinels' addresses and the master's name) and no
host yet stand for "whichever server is master now". Opening a connection with them
(``resolve``) asks the sentinels in turn for the master's address (``SENTINEL
GET-MASTER-ADDR-BY-NAME``), moving the first one that answers to the front of the list; the
connection then checks with ``ROLE`` that the server is master indeed (a sentinel may name a
server that is still, or already no longer, master), and every connection opened with the
resolved params watches its replies for ``READONLY`` and ``-UNBLOCKED`` (the server was
demoted under it).

One ``_Monitor`` per master and event loop is shared by every connection of the process. While
any connection watches the master (``watch``), the monitor keeps a subscription to
``+switch-master`` on one sentinel (the next one when that one is lost) and, each time it
(re)subscribes, asks the sentinels again, since a switch may have happened unheard. On a switch
it drops every watching connection to the old master at once (their owners reconnect, to the
new master) and wakes the reconnect backoffs (``pause``): a failed-over master can keep
accepting writes for seconds before it learns of its demotion, and whatever is written there
is lost, so waiting for errors is not enough. While the subscription is live the address it
knows is trusted; otherwise every new connection asks the sentinels again.

Sentinels are reached with the credentials of the ``SentinelSpec`` (none by default), never
with the master's. This module knows nothing of ASGI and never retries a command: it only
decides where connections go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .protocol import RedisConnectionError, ReplyError, RespError

if TYPE_CHECKING:
    from .connection import Connection, ConnectionParams

__all__ = ["SWITCH_CHANNEL", "SentinelSpec", "pause", "resolve", "suspect", "watch"]

logger = logging.getLogger("minidasgi.resp.sentinel")

SWITCH_CHANNEL = "+switch-master"
"""The sentinels' channel announcing ``name old-ip old-port new-ip new-port`` on a failover."""

#: Error codes by which a server tells a client that it is no longer the master: a write
#: refused by a replica, and a blocking pop woken because the server became a replica.
DEMOTION_CODES = frozenset({"READONLY", "UNBLOCKED"})

_MAX_SENTINELS = 64
_MAX_BACKOFF = 2.0

Address = tuple[str, int]


@dataclass(frozen=True)
class SentinelSpec:
    """Where the sentinels are and which master to ask them for.

    ``username``/``password`` log in to the sentinels (not to the master: those are the
    ``ConnectionParams``' own); ``repr`` never shows the password, nor a username that may be
    a misplaced one.
    """

    service_name: str
    sentinels: tuple[Address, ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.service_name:
            raise ValueError("a Sentinel setup needs the master's name")
        if not self.sentinels:
            raise ValueError("a Sentinel setup needs at least one sentinel address")
        if len(self.sentinels) > _MAX_SENTINELS:
            raise ValueError(f"at most {_MAX_SENTINELS} sentinels")

    def __repr__(self) -> str:
        from .connection import _shown_username

        shown = _shown_username(self.username)
        user = f", username={shown!r}" if shown is not None else ""
        secret = ", password='***'" if self.password is not None else ""
        return f"SentinelSpec({self.service_name!r}, {self.sentinels!r}{user}{secret})"

    @property
    def address(self) -> str:
        """For messages: ``master 'name' via sentinels h1:p1,h2:p2``."""
        hosts = ",".join(_format(a) for a in self.sentinels)
        return f"master {self.service_name!r} via sentinels {hosts}"


def _format(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hosts(text: str, default_port: int = 26379) -> tuple[Address, ...]:
    """``h1:26379,h2:26380,[::1]`` as addresses (``default_port`` when left out)."""
    addresses = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ValueError(f"no host in sentinel address {part!r}")
        if port_text and not port_text.isdigit():
            raise ValueError(f"invalid port in sentinel address {part!r}")
        port = int(port_text) if port_text else default_port
        if not 0 < port < 65536:
            raise ValueError(f"invalid port in sentinel address {part!r}")
        addresses.append((host, port))
    if not addresses:
        raise ValueError("no host address")
    return tuple(addresses)


# The functions the connection, client and subscriber call (through ``topology``).


async def resolve(params: ConnectionParams) -> ConnectionParams:
    """``params`` pointed at the current master (``RedisConnectionError`` when no sentinel
    names one)."""
    assert params.sentinel is not None
    host, port = await _monitor(params).resolve()
    return replace(params, host=host, port=port)


async def check_role(connection: Connection) -> None:
    """Raise ``RedisConnectionError`` unless the server says it is master (``ROLE``). A
    server whose ACL refuses ROLE is taken at the sentinels' word."""
    try:
        reply = await connection.execute("ROLE")
    except ReplyError as exc:
        logger.debug("cannot check the role of Redis at %s: %s", connection.params.address, exc)
        return
    role = reply[0] if isinstance(reply, list) and reply else b"?"
    if role != b"master":
        suspect(connection.params)
        shown = role.decode(errors="replace")[:20] if isinstance(role, bytes) else "?"
        raise RedisConnectionError(
            f"Redis at {connection.params.address} is a {shown}, not the master "
            "(a failover is under way)"
        )


def suspect(params: ConnectionParams) -> None:
    """The server at ``params`` said it is not master: ask the sentinels again next time."""
    if params.sentinel is not None:
        _monitor(params).suspect((params.host, params.port))


def watch(params: ConnectionParams, on_lost: Callable[[Exception], None]) -> Callable[[], None]:
    """Call ``on_lost(error)`` when the master moves away from ``params``' server; return the
    function that stops watching (call it when the connection ends)."""
    assert params.sentinel is not None
    return _monitor(params).watch((params.host, params.port), on_lost)


async def pause(params: ConnectionParams, delay: float) -> None:
    """Sleep ``delay`` seconds before a reconnection; behind Sentinel, less if the master
    moves meanwhile."""
    if params.sentinel is None:
        await asyncio.sleep(delay)
    else:
        await _monitor(params).pause(delay)


_monitors: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[SentinelSpec, Any], _Monitor]
] = weakref.WeakKeyDictionary()


def _monitor(params: ConnectionParams) -> _Monitor:
    """The monitor of this master in the running loop (made on first use)."""
    spec = params.sentinel
    assert spec is not None
    loop = asyncio.get_running_loop()
    monitors = _monitors.setdefault(loop, {})
    key = (spec, (params.ssl, params.connect_timeout, params.reply_timeout))
    monitor = monitors.get(key)
    if monitor is None:
        if len(monitors) >= _MAX_SENTINELS:  # settings are code's, but stay bounded
            monitors.clear()
        monitor = monitors[key] = _Monitor(spec, params)
    return monitor


class _Monitor:
    """Knows where one master is, and tells the connections watching it when it moves."""

    def __init__(self, spec: SentinelSpec, params: ConnectionParams) -> None:
        self.spec = spec
        self._connect_timeout = params.connect_timeout
        self._reply_timeout = params.reply_timeout
        self._order: list[Address] = list(spec.sentinels)  # the last that answered first
        self.master: Address | None = None
        self._trusted = False  # the subscription is live: a switch would have been heard
        self._query: asyncio.Future[Address] | None = None
        self._watchers: dict[int, tuple[Address, Callable[[Exception], None]]] = {}
        self._next_id = 0
        self._moved = asyncio.get_running_loop().create_future()  # set at each switch
        self._listener: asyncio.Task[None] | None = None

    def _sentinel_params(self, address: Address) -> ConnectionParams:
        from .connection import ConnectionParams

        return ConnectionParams(
            host=address[0],
            port=address[1],
            username=self.spec.username,
            password=self.spec.password,
            connect_timeout=self._connect_timeout,
            reply_timeout=self._reply_timeout,
        )

    async def resolve(self) -> Address:
        if self.master is not None and self._trusted:
            return self.master
        query = self._query
        if query is None or query.done():
            # One question to the sentinels for every connection reconnecting at once.
            query = self._query = asyncio.ensure_future(self._ask_sentinels())
            query.add_done_callback(_retrieve)
        return await asyncio.shield(query)

    async def _ask_sentinels(self) -> Address:
        from .connection import open_connection

        errors = []
        for address in list(self._order):
            try:
                connection = await open_connection(self._sentinel_params(address))
            except (RespError, OSError) as exc:
                errors.append(str(exc))
                continue
            try:
                reply = await connection.execute(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.spec.service_name
                )
            except (RespError, OSError) as exc:
                errors.append(f"sentinel {_format(address)}: {exc}")
                continue
            finally:
                await connection.close()
            master = _address(reply)
            if master is None:
                errors.append(
                    f"sentinel {_format(address)} knows no master {self.spec.service_name!r}"
                )
                continue
            if self._order[0] != address:  # ask the one that answered first next time
                self._order.remove(address)
                self._order.insert(0, address)
            self._switch(master, f"sentinel {_format(address)} names it")
            return master
        raise RedisConnectionError(
            f"no sentinel named the master {self.spec.service_name!r}: " + "; ".join(errors)
        )

    def suspect(self, address: Address) -> None:
        if self.master == address:
            self._trusted = False

    def watch(self, address: Address, on_lost: Callable[[Exception], None]) -> Callable[[], None]:
        if self.master is not None and address != self.master:
            # Resolved before a switch and connected after it: at once, to the new master.
            on_lost(self._moved_error(address, self.master))
            return _nothing
        watcher_id = self._next_id
        self._next_id += 1
        self._watchers[watcher_id] = (address, on_lost)
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

        def unwatch() -> None:
            self._watchers.pop(watcher_id, None)
            if not self._watchers and self._listener is not None:
                # Nobody left to tell: no sentinel connection outlives the last client.
                self._listener.cancel()
                self._listener = None
                self._trusted = False

        return unwatch

    async def pause(self, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._moved), delay)

    def _moved_error(self, old: Address, new: Address) -> RedisConnectionError:
        return RedisConnectionError(
            f"the master {self.spec.service_name!r} moved from {_format(old)} to {_format(new)}"
        )

    def _switch(self, master: Address, why: str) -> None:
        """``master`` is the master now: drop every connection to another server."""
        old, self.master = self.master, master
        if old == master:
            return
        if old is not None:
            logger.warning(
                "Redis master %r moved from %s to %s (%s)",
                self.spec.service_name,
                _format(old),
                _format(master),
                why,
            )
        moved, self._moved = self._moved, asyncio.get_running_loop().create_future()
        moved.set_result(None)
        for watcher_id, (address, on_lost) in list(self._watchers.items()):
            if address != master:
                del self._watchers[watcher_id]
                try:
                    on_lost(self._moved_error(address, master))
                except Exception:  # one owner's failure must not keep the others on the old one
                    logger.exception("failed to drop a connection to the old master")

    def _on_message(self, channel: bytes, data: bytes) -> None:
        parts = data.split()
        if len(parts) != 5 or parts[0].decode(errors="replace") != self.spec.service_name:
            return
        master = _address(parts[3:5])
        if master is not None:
            self._switch(master, "+switch-master")
            self._trusted = True

    async def _listen(self) -> None:
        """Keep a ``+switch-master`` subscription on one sentinel, the next one when lost."""
        from .pubsub import Subscriber

        backoff = 0.05
        while True:
            for address in list(self._order):
                lost = asyncio.Event()
                subscriber = Subscriber(
                    params=self._sentinel_params(address),
                    on_message=self._on_message,
                    on_connection_lost=lost.set,
                )
                try:
                    await asyncio.wait_for(
                        subscriber.subscribe(SWITCH_CHANNEL), self._connect_timeout
                    )
                    # A switch may have happened while nobody listened: ask again.
                    self._trusted = False
                    await self._ask_sentinels()
                    if not lost.is_set():
                        self._trusted = True
                        backoff = 0.05
                        await lost.wait()
                except (asyncio.TimeoutError, RespError, OSError) as exc:
                    logger.debug("sentinel %s: %s", _format(address), exc)
                finally:
                    self._trusted = False
                    await subscriber.close()
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, _MAX_BACKOFF)


def _nothing() -> None:
    pass


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _address(reply: object) -> Address | None:
    """``[host, port]`` from a sentinel, checked (None when malformed or absent)."""
    if not (isinstance(reply, list) and len(reply) == 2):
        return None
    host, port = reply
    if not (isinstance(host, bytes) and isinstance(port, bytes) and port.isdigit()):
        return None
    if not 0 < len(host) <= 255 or not 0 < int(port) < 65536:
        return None
    return host.decode(errors="replace"), int(port)
