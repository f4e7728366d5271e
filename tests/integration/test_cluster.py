"""Redis Cluster at the RESP level (issue 13, part 2), against real clusters started by the
tests (``minidasgi.testing.ClusterSetup``): slots computed as Redis computes them, commands
routed to the master serving each key, ``MOVED`` after a slot is reassigned, ``ASK`` during
a migration, and sharded pub/sub following a channel through a ``CLUSTER FAILOVER``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import websockets

from minidasgi import Node, create_distributor, create_path_distributor, wire
from minidasgi.resp import parse_url
from minidasgi.resp.cluster import ClusterClient, ShardedSubscriber, key_slot
from minidasgi.status import format_status, take_status
from minidasgi.testing import CLUSTER_SLOTS, ClusterSetup, RedisServer

from . import apps
from .stack import NodeProcess, poll, run_node, serve_app
from .test_sentinel import BACK_WITHIN, HANG, Runs, flowing, light_traffic

pytestmark = [pytest.mark.timeout(90), pytest.mark.requires_server("7.0")]


class _Spares:
    """Clusters started ahead of the tests that need them, each handed to one test only.

    A new cluster takes 2.1 s to settle, nearly all of it waiting (a master's cluster state
    turns ok no sooner than 2 s after it starts, and a node timeout after it joins a majority),
    while the tests here take 0.01-0.5 s: started one after the other, the clusters were most
    of this module's time. A few settle in background threads while the tests run; every test
    still gets a cluster of its own that nothing used before.
    """

    AHEAD = 4  # clusters of a shape settling at once

    def __init__(self, wanted: dict[int, int]) -> None:
        self._wanted = dict(wanted)  # replicas per master -> clusters the tests still ask for
        self._settling: dict[int, collections.deque[Future[ClusterSetup]]] = {}
        self._threads = ThreadPoolExecutor(max_workers=2 * self.AHEAD)
        for replicas in self._wanted:
            self._settling[replicas] = collections.deque()
            self._top_up(replicas)

    def _top_up(self, replicas: int) -> None:
        settling = self._settling[replicas]
        while len(settling) < min(self.AHEAD, self._wanted[replicas]):
            settling.append(self._threads.submit(lambda: ClusterSetup(replicas=replicas).start()))

    def take(self, replicas: int) -> ClusterSetup:
        """A started cluster, never used before (one is started now if none was)."""
        settling = self._settling.setdefault(replicas, collections.deque())
        self._wanted[replicas] = max(self._wanted.get(replicas, 0), 1)
        self._top_up(replicas)
        future = settling.popleft()
        self._wanted[replicas] -= 1
        self._top_up(replicas)
        return future.result()

    def close(self) -> None:
        for settling in self._settling.values():
            while settling:
                with contextlib.suppress(Exception):  # its test would have reported it
                    discard(settling.popleft().result())
        self._threads.shutdown()


def discard(setup: ClusterSetup) -> None:
    """Kill the cluster's servers and remove their files (see ``conftest.discard``)."""
    for server in setup.servers:
        with contextlib.suppress(Exception):
            server.kill()
    setup.close()


@pytest.fixture(scope="module")
def spares(request: pytest.FixtureRequest) -> Iterator[_Spares]:
    # How many clusters of each shape this run's tests of the module will ask for.
    wanted = collections.Counter[int]()
    for item in request.session.items:
        if item.path == request.path:
            names = getattr(item, "fixturenames", ())
            wanted[0] += "cluster" in names
            wanted[1] += "cluster_with_replicas" in names
    pool = _Spares({replicas: n for replicas, n in wanted.items() if n})
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def cluster(spares: _Spares) -> Iterator[ClusterSetup]:
    setup = spares.take(replicas=0)
    try:
        yield setup
    finally:
        discard(setup)


@pytest.fixture
def cluster_with_replicas(spares: _Spares) -> Iterator[ClusterSetup]:
    setup = spares.take(replicas=1)
    try:
        yield setup
    finally:
        discard(setup)


def keys_on_each_master(setup: ClusterSetup) -> dict[int, str]:
    """One key per master: port -> key."""
    found: dict[int, str] = {}
    for n in range(1000):
        key = f"q-{n}"
        server = setup.master_of(key)
        assert server is not None
        found.setdefault(server.port, key)
        if len(found) == len(setup.masters):
            return found
    raise AssertionError("no key for some master")


def test_key_slot_agrees_with_the_server(cluster: ClusterSetup) -> None:
    server = cluster.masters[0]
    for n in range(200):
        key = os.urandom(n % 24) + b"{" * (n % 3) + f"k{n}}}".encode()
        assert key_slot(key) == server.command("CLUSTER", "KEYSLOT", key), key


async def test_commands_go_to_the_master_of_their_key(cluster: ClusterSetup) -> None:
    client = ClusterClient(parse_url(cluster.url))
    try:
        await client.wait_connected(5)
        keys = keys_on_each_master(cluster)
        for port, key in keys.items():
            assert await client.lpush(key, "a", "b") == 2
            server = next(s for s in cluster.masters if s.port == port)
            assert server.command("LLEN", key) == 2
        # One connection per master actually used.
        assert len(client._clients) == len(cluster.masters)
        # Keys sharing a hash tag share a slot, so multi-key commands work on them.
        await client.lpush("{route}:a", "x")
        await client.lpush("{route}:b", "y")
        popped = await client.execute("RPOPLPUSH", "{route}:a", "{route}:b", key="{route}:a")
        assert popped == b"x"
    finally:
        await client.close()


def _move_empty_slot(
    setup: ClusterSetup, slot: int, source: RedisServer, target: RedisServer
) -> None:
    """Give an empty slot of ``source`` to ``target`` for good, in the order of the Redis
    manual's resharding (``CLUSTER SETSLOT``): ``target`` takes it out of IMPORTING, which
    raises its config epoch above every other node's, then ``source``, then the others.

    ``SETSLOT NODE`` alone changes no epoch: a heartbeat ``source`` sent before its own
    SETSLOT, read by a node after that node's, claims the slot at ``source``'s epoch, and
    when that epoch is the higher the node hands the slot back to ``source``, and tells the
    others so. The move then came undone on some nodes, by chance ("too many redirects", or
    a map naming ``source`` again).
    """
    source_id = source.command("CLUSTER", "MYID")
    target_id = target.command("CLUSTER", "MYID")
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    others = [server for server in setup.masters if server not in (source, target)]
    for server in [target, source, *others]:
        server.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_moved_refreshes_the_map_and_follows(cluster: ClusterSetup) -> None:
    client = ClusterClient(parse_url(cluster.url))
    try:
        await client.wait_connected(5)
        key = "moved-key"
        owner = cluster.master_of(key)
        target = next(s for s in cluster.masters if s is not owner)
        await client.lpush(key, "before")
        assert owner is not None and owner.command("DEL", key) == 1  # an empty slot moves
        _move_empty_slot(cluster, key_slot(key), owner, target)
        assert client.owner(key)[1] == owner.port  # the client's map is stale
        assert await client.lpush(key, "after") == 1  # MOVED, refreshed, sent again
        assert target.command("LLEN", key) == 1
        assert client.owner(key)[1] == target.port
    finally:
        await client.close()


async def test_ask_during_a_migration(cluster: ClusterSetup) -> None:
    client = ClusterClient(parse_url(cluster.url))
    try:
        await client.wait_connected(5)
        key = "ask-key"
        slot = key_slot(key)
        source = cluster.master_of(key)
        assert source is not None
        target = next(s for s in cluster.masters if s is not source)
        source_id = source.command("CLUSTER", "MYID")
        target_id = target.command("CLUSTER", "MYID")
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        # The key is not on the source: it answers ASK, and the client asks the target.
        assert await client.lpush(key, "x") == 1
        assert target.command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
        assert source.command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert client.owner(key)[1] == source.port  # ASK leaves the map alone
    finally:
        await client.close()


async def test_sharded_pubsub_across_masters(cluster: ClusterSetup) -> None:
    client = ClusterClient(parse_url(cluster.url))
    got: list[tuple[bytes, bytes]] = []
    subscriber = ShardedSubscriber(
        parse_url(cluster.url), on_message=lambda c, d: got.append((c, d))
    )
    try:
        channels = list(keys_on_each_master(cluster).values())
        await client.wait_connected(5)
        await asyncio.wait_for(subscriber.subscribe(*channels), 5)
        assert subscriber.connected
        assert len(subscriber._subscribers) == len(cluster.masters)
        for channel in channels:
            assert await client.publish(channel, b"hi " + channel.encode()) == 1
        assert await poll(lambda: len(got) == len(channels), 5)
        assert sorted(got) == sorted((c.encode(), b"hi " + c.encode()) for c in channels)
        assert await client.publish("nobody-listens", b"x") == 0
    finally:
        await subscriber.close()
        await client.close()


async def test_sharded_subscription_follows_a_failover(
    cluster_with_replicas: ClusterSetup,
) -> None:
    setup = cluster_with_replicas
    client = ClusterClient(parse_url(setup.url))
    got: list[bytes] = []
    lost: list[int] = []
    subscriber = ShardedSubscriber(
        parse_url(setup.url),
        on_message=lambda c, d: got.append(d),
        on_connection_lost=lambda: lost.append(1),
    )
    try:
        channel = "failover-channel"
        await client.wait_connected(5)
        await asyncio.wait_for(subscriber.subscribe(channel), 5)
        old = setup.master_of(channel)
        assert old is not None
        replica = next(
            s
            for s in setup.replicas
            if b"master_port:%d" % old.port in s.command("INFO", "replication")  # type: ignore[operator]
        )
        replica.command("CLUSTER", "FAILOVER")
        assert await poll(lambda: setup.master_of(channel) is replica, 10)
        # Redis unsubscribed the channel on the demoted master (sunsubscribe): the
        # subscriber refreshes its map and subscribes on the new master.
        assert await poll(lambda: lost and subscriber.connected, 10)
        assert subscriber._placed[channel.encode()][1] == replica.port

        async def delivered() -> bool:
            await client.publish(channel, b"after")
            await asyncio.sleep(0.05)
            return b"after" in got

        assert await poll(delivered, 10)
    finally:
        await subscriber.close()
        await client.close()


# End to end: a distributor and Nodes on a cluster.


async def echo_or_ws(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await apps.ws_echo(scope, receive, send)
    else:
        await apps.echo(scope, receive, send)


async def test_http_and_websocket_across_masters(cluster: ClusterSetup) -> None:
    """Routes whose keys land on different masters; the distributor's and the Nodes' reply
    channels land where their names hash."""
    keys = keys_on_each_master(cluster)  # port -> key
    routes = {f"^/{key}/": key for key in keys.values()}
    app = create_path_distributor(url=cluster.url, routes=routes, worker_timeout=5)
    nodes = [Node(url=cluster.url, app=echo_or_ws, key=key) for key in keys.values()]
    async with contextlib.AsyncExitStack() as stack:
        base = await stack.enter_async_context(serve_app(app))
        for node in nodes:
            await stack.enter_async_context(run_node(node))
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for key in keys.values():
                response = await client.post(f"/{key}/x", content=b"body for " + key.encode())
                assert response.status_code == 200, response.text
                assert response.content == b"body for " + key.encode()
        for key in keys.values():
            url = base.replace("http", "ws") + f"/{key}/ws"
            async with websockets.connect(url) as ws:
                await ws.send(f"hi {key}")
                assert await asyncio.wait_for(ws.recv(), 5) == f"hi {key}"
    for server in cluster.masters:
        assert server.command("DBSIZE") == 0


def blocked_pops(setup: ClusterSetup) -> dict[int, int]:
    """Clients blocked (in BRPOP) on each master: port -> count."""
    counts = {}
    for server in setup.masters:
        info = server.command("INFO", "clients")
        assert isinstance(info, bytes)
        line = next(x for x in info.split(b"\r\n") if x.startswith(b"blocked_clients:"))
        counts[server.port] = int(line.split(b":")[1])
    return counts


async def test_one_node_pops_keys_on_every_master(cluster: ClusterSetup) -> None:
    """A Node whose keys fall in different slots pops each slot's keys on a connection of its
    own (to the master serving it): one Node serves routes to every master, beside keys
    sharing a hash tag (one slot, one connection)."""
    keys = keys_on_each_master(cluster)  # port -> key
    tagged = ["{api}:users", "{api}:admin"]
    names = [*keys.values(), *tagged]
    node = Node(url=cluster.url, app=apps.echo, keys=names)
    assert len(node.pop_groups) == len(keys) + 1
    routes = {f"^/{key}/": key for key in names}
    app = create_path_distributor(url=cluster.url, routes=routes, worker_timeout=5)
    async with serve_app(app) as base, run_node(node):
        # One blocked pop per group, each on the master serving its slot.
        tag_master = cluster.master_of("{api}")
        assert tag_master is not None
        expected = collections.Counter(keys.keys())
        expected[tag_master.port] += 1
        assert await poll(lambda: blocked_pops(cluster) == dict(expected), 10), blocked_pops(
            cluster
        )
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for key in names:
                response = await client.post(f"/{key}/x", content=b"body for " + key.encode())
                assert response.status_code == 200, response.text
                assert response.content == b"body for " + key.encode()
            # Concurrent requests on every key at once: all served by this one Node.
            responses = await asyncio.gather(
                *(client.post(f"/{k}/{n}", content=b"%d" % n) for n in range(4) for k in names)
            )
            assert [r.status_code for r in responses] == [200] * len(responses)
    assert node.metrics.served == len(names) * 5
    for server in cluster.masters:
        assert server.command("DBSIZE") == 0


async def test_slot_groups_share_the_concurrency(cluster: ClusterSetup) -> None:
    """Pops on different masters share the Node's slots: a blocked pop holds one, so with
    every slot taken by a running request no pop is outstanding and a further request stays
    in Redis for other Nodes; a finished request frees a slot for it."""
    first, second = list(keys_on_each_master(cluster).values())[:2]
    release = asyncio.Event()
    started: list[str] = []

    async def held(scope: Any, receive: Any, send: Any) -> None:
        started.append(scope["path"])
        await release.wait()
        await apps.hello(scope, receive, send)

    node = Node(url=cluster.url, app=held, keys=[first, second], concurrency=2)
    routes = {f"^/{first}/": first, f"^/{second}/": second}
    app = create_path_distributor(url=cluster.url, routes=routes, worker_timeout=10)
    async with serve_app(app) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=15) as client:
            assert await poll(lambda: sum(blocked_pops(cluster).values()) == 2, 10)
            one = asyncio.ensure_future(client.get(f"/{first}/1"))
            two = asyncio.ensure_future(client.get(f"/{second}/2"))
            assert await poll(lambda: len(started) == 2, 10)
            # Both slots run requests: no pop may be outstanding on any master.
            assert await poll(lambda: sum(blocked_pops(cluster).values()) == 0, 10)
            three = asyncio.ensure_future(client.get(f"/{first}/3"))
            owner = cluster.master_of(first)
            assert owner is not None
            assert await poll(lambda: owner.command("LLEN", first) == 1, 10)
            assert sum(blocked_pops(cluster).values()) == 0
            assert len(started) == 2
            release.set()
            responses = await asyncio.gather(one, two, three)
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert sorted(started) == [f"/{first}/1", f"/{first}/3", f"/{second}/2"]


@pytest.mark.parametrize("spread", ["one key", "a key per master"])
async def test_a_node_on_a_cluster_stops_at_once(cluster: ClusterSetup, spread: str) -> None:
    """``stop()`` wakes every blocked pop with CLIENT UNBLOCK, sent to the master that holds
    each pop connection: the Node ends well before its pops would time out."""
    keys = list(keys_on_each_master(cluster).values())
    if spread == "one key":
        keys = keys[1:2]
    pop_timeout = 6.0
    node = Node(url=cluster.url, app=apps.hello, keys=keys, pop_timeout=pop_timeout)
    serving = asyncio.ensure_future(node.serve())
    try:
        await asyncio.wait_for(node.wait_started(), 10)
        owners = {port: 0 for port in blocked_pops(cluster)}
        for key in keys:
            owner = cluster.master_of(key)
            assert owner is not None
            owners[owner.port] += 1
        assert await poll(lambda: blocked_pops(cluster) == owners, 10)
        stopped_at = time.monotonic()
        node.stop()
        await asyncio.wait_for(serving, 15)
        # Well under the pops' own timeout (they may have started a moment before the stop).
        assert time.monotonic() - stopped_at < pop_timeout / 2
    finally:
        if not serving.done():
            serving.cancel()
    assert sum(blocked_pops(cluster).values()) == 0
    # Woken by CLIENT UNBLOCK, each on the master holding the pop.
    assert {s.port: unblocks(s) for s in cluster.masters} == owners


def unblocks(server: RedisServer) -> int:
    """CLIENT UNBLOCK commands ``server`` ran."""
    info = server.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    for line in info.split(b"\r\n"):
        if line.startswith(b"cmdstat_client|unblock:calls="):
            return int(line.split(b"=")[1].split(b",")[0])
    return 0


@pytest.mark.parametrize("fault", ["cluster-failover", "sigkill"])
async def test_failover_under_light_traffic(
    cluster_with_replicas: ClusterSetup, fault: str
) -> None:
    """The master serving the queue fails over (``CLUSTER FAILOVER`` on its replica, or a
    SIGKILL): service back within 5 s of the promotion, no hang, nothing run twice, no keys
    left."""
    setup = cluster_with_replicas
    key = "cluster-q"
    runs = Runs()
    app = create_distributor(url=setup.url, key=key, worker_timeout=3)
    node = Node(url=setup.url, app=runs, key=key)
    old = setup.master_of(key)
    assert old is not None
    replica = next(
        s
        for s in setup.replicas
        if b"master_port:%d" % old.port in s.command("INFO", "replication")  # type: ignore[operator]
    )
    async with serve_app(app) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=HANG) as client:
            assert (await client.get("/", headers={"x-request-id": "first"})).status_code == 200
        stop = asyncio.Event()
        outcomes: list[tuple[float, float, str]] = []
        traffic = asyncio.ensure_future(light_traffic(base, stop, outcomes))
        assert await poll(lambda: flowing(outcomes), 10), "no traffic before the fault"
        faulted = time.monotonic()
        if fault == "sigkill":
            old.kill()
        else:
            await asyncio.to_thread(replica.command, "CLUSTER", "FAILOVER")
        try:

            def promoted() -> bool:
                info = replica.command("INFO", "replication")
                return isinstance(info, bytes) and b"role:master" in info

            assert await poll(lambda: asyncio.to_thread(promoted), 15), "no promotion"
            promotion = time.monotonic()
            served = await poll(
                lambda: any(o == "200" and sent > promotion for sent, _, o in outcomes),
                BACK_WITHIN + 1,
            )
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.wait_for(traffic, HANG + 5)
        statuses = collections.Counter(o for _, _, o in outcomes)
        assert served, f"no request succeeded after the promotion: {statuses}"
        back = min(done for sent, done, o in outcomes if o == "200" and sent > promotion)
        print(
            f"{fault}: promoted {promotion - faulted:.2f} s after the fault, "
            f"served again {back - promotion:.2f} s after the promotion; outcomes {statuses}"
        )
        assert back - promotion <= BACK_WITHIN
        assert "hang" not in statuses
        assert set(statuses) <= {"200", "502", "503", "RemoteProtocolError"}, statuses
        twice = {k: n for k, n in runs.count.items() if n > 1}
        assert not twice, f"requests run more than once: {twice}"
    if fault == "sigkill":
        await asyncio.to_thread(old.start)  # rejoins as a replica of the new master

    def no_keys() -> bool:
        return all(s.command("DBSIZE") == 0 for s in setup.servers if s.running)

    assert await poll(lambda: asyncio.to_thread(no_keys), 15)


def slots_of(setup: ClusterSetup, master: RedisServer) -> tuple[int, int]:
    """The first and last slot ``ClusterSetup.start`` gave ``master``."""
    index, count = setup.masters.index(master), len(setup.masters)
    return index * CLUSTER_SLOTS // count, (index + 1) * CLUSTER_SLOTS // count - 1


async def test_a_request_waiting_for_a_lost_master_lets_the_node_loop_turn(
    cluster: ClusterSetup, squatter: RedisServer
) -> None:
    """A Node's publisher used a master (a distributor's channel lives there) that then dies
    with no replica: the slot map keeps it, so the publisher is not ``connected``, while the
    Node's own channel and its queue live on other masters. A request popped then waits for
    the publisher, and that wait must let the Node's event loop turn: it spun without ever
    suspending (``ClusterClient.wait_connected`` returns once the slot map is known), its
    deadline could not fire, and the reconnection never ran (found hung at 100% CPU in a full
    suite run). The Node runs in a child process: its health endpoint answers throughout, the
    request is told GONE at its deadline (its client gets the no-worker answer, not the 504
    of a Node that never answers), it pops nothing more, leaving requests to a Node that can
    serve them, and it serves again once the master is back. Its health port is the kernel's
    choice in the child (``--health-port 0``). The squatter is a regression guard: it holds
    the first port ``free_port`` hands out, which the test no longer asks for; when the health
    port came from ``free_port``, the Node's bind was refused there and the test hung."""
    stats_master = cluster.master_of(wire.stats_channel("minidasgi", 0))
    assert stats_master is not None
    dead = next(s for s in cluster.masters if s is not stats_master)
    key = keys_on_each_master(cluster)[stats_master.port]  # the queue: not on the dead master
    first, last = slots_of(cluster, dead)

    def distributor(on_dead: bool) -> Any:
        while True:  # its channel's name is random: drawn again until it falls as wanted
            app = create_distributor(url=cluster.url, key=key, worker_timeout=2)
            if (first <= key_slot(app.channel) <= last) == on_dead:
                return app

    doomed, survivor = distributor(True), distributor(False)
    options = ["--health-port", "0", "--channel-outside", f"{first}-{last}"]
    # A long pop: the one under way when the master dies is the one that takes the request.
    options += ["--pop-timeout", "30"]
    node = NodeProcess(cluster.url, key, "apps:hello", *options)
    async with (
        serve_app(doomed) as doomed_base,
        serve_app(survivor) as base,
        httpx.AsyncClient(timeout=HANG) as client,
    ):
        await asyncio.to_thread(node.start)
        try:
            health = f"http://127.0.0.1:{node.health_port}/-/healthz"

            async def answers() -> bool:
                try:
                    return (await client.get(health, timeout=2)).status_code == 200
                except httpx.HTTPError:
                    return False

            # The Node's publisher publishes on the master that will die, then on another.
            assert (await client.get(doomed_base + "/")).status_code == 200
            assert (await client.get(base + "/")).status_code == 200
            dead.kill()
            ready = health.replace("healthz", "readyz")

            async def unready() -> bool:  # the publisher has seen the master go
                return (await client.get(ready, timeout=2)).status_code == 503

            assert await poll(unready, 10), "the Node's publisher did not see the master go"
            probes: list[bool] = []
            request = asyncio.ensure_future(client.get(base + "/"))
            while not request.done():
                probes.append(await answers())
                await asyncio.sleep(0.2)
            response = await request
            assert probes and all(probes), f"the Node's loop stood still: {probes}"
            assert response.status_code == 405, response.text  # GONE: popped and never run

            def idle() -> bool:  # no pop blocked on the queue's master
                info = stats_master.command("INFO", "clients")
                assert isinstance(info, bytes)
                return b"blocked_clients:0\r\n" in info

            # Until it can answer, the Node pops nothing more: what it would pop would wait
            # unrun until its deadline, while a Node that can serve it does.
            assert await poll(lambda: asyncio.to_thread(idle), 10), "it still pops"
            while True:
                healthy = Node(url=cluster.url, app=apps.hello, key=key)
                if not first <= key_slot(healthy.channel) <= last:
                    break
            async with run_node(healthy):
                assert (await client.get(base + "/")).status_code == 200
            assert healthy.metrics.served == 1
            await asyncio.to_thread(dead.start)

            async def served() -> bool:
                return (await client.get(base + "/")).status_code == 200

            assert await poll(served, 30), "the Node did not serve again"
            assert await answers()
        finally:
            await asyncio.to_thread(node.stop)


async def test_fail_fast_counts_sharded_subscribers(cluster: ClusterSetup) -> None:
    """``fail_fast`` asks ``PUBSUB NUMSUB`` beside the LPUSH: on a Cluster that must count the
    Nodes' sharded presence subscriptions (SHARDNUMSUB) on the master serving the channel."""
    app = create_distributor(url=cluster.url, key="ff-q", fail_fast=True, worker_timeout=30)
    async with serve_app(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            started = time.monotonic()
            response = await client.get("/")
            assert response.status_code == 503, response.text
            assert "no worker" in response.text
            assert time.monotonic() - started < 15  # at once, not after worker_timeout
            async with run_node(Node(url=cluster.url, app=apps.hello, key="ff-q")):
                assert (await client.get("/")).status_code == 200
    for server in cluster.masters:
        assert server.command("DBSIZE") == 0


async def test_presence_shares_the_slot_of_its_key(cluster: ClusterSetup) -> None:
    """A Node's presence subscription for a key lives on the master serving that key (its
    name carries the key's hash tag), so the fail-fast count and the push go to one master."""
    key = next(
        k
        for k in (f"presence-{n}" for n in range(1000))
        if cluster.master_of(f"minidasgi:0:presence:{k}") is not cluster.master_of(k)
    )
    owner = cluster.master_of(key)
    assert owner is not None
    async with run_node(Node(url=cluster.url, app=apps.hello, key=key)):
        for server in cluster.masters:
            channels = server.command("PUBSUB", "SHARDCHANNELS", "minidasgi:0:presence:*")
            assert channels == (
                [f"minidasgi:0:presence:{{{key}}}".encode()] if server is owner else []
            ), server.port
        app = create_distributor(url=cluster.url, key=key, fail_fast=True, worker_timeout=5)
        async with serve_app(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
            assert (await client.get("/")).status_code == 200
    for server in cluster.masters:
        assert server.command("DBSIZE") == 0


async def test_status_on_a_cluster(cluster: ClusterSetup) -> None:
    """``minidasgi status`` on a Cluster: queues on several masters (waiting requests, their
    age, the Nodes counted by sharded presence), and the stats of every process gathered over
    sharded pub/sub; nothing stored."""
    served, unserved = list(keys_on_each_master(cluster).values())[:2]
    routes = {f"^/{served}/": served, f"^/{unserved}/": unserved}
    app = create_path_distributor(url=cluster.url, routes=routes, worker_timeout=30)
    node = Node(url=cluster.url, app=apps.hello, keys=[served, "{api}:users"], concurrency=7)
    params = parse_url(cluster.url)
    async with serve_app(app) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=40) as client:
            assert (await client.get(f"/{served}/")).status_code == 200
            waiting = asyncio.ensure_future(client.get(f"/{unserved}/"))
            owner = cluster.master_of(unserved)
            assert owner is not None
            assert await poll(lambda: owner.command("LLEN", unserved) == 1, 10)
            report = await take_status(params, timeout=5)
            assert (report["asked"], report["answered"]) == (2, 2)
            (seen,) = report["nodes"]
            assert seen["keys"] == [served, "{api}:users"] and seen["concurrency"] == 7
            assert seen["served"] == 1
            (dist,) = report["distributors"]
            assert dist["in_flight"] == 1 and dist["served"] == 1
            assert [(q["key"], q["waiting"], q["nodes"]) for q in report["queues"]] == [
                (served, 0, 1),
                ("{api}:users", 0, 1),
            ]
            report = await take_status(params, [unserved], timeout=5)
            (queue,) = report["queues"]
            assert (queue["waiting"], queue["nodes"]) == (1, 0)
            assert queue["oldest_age"] is not None and queue["oldest_age"] >= 0
            text = format_status(report, params.address)
            assert unserved in text and "cluster" in text
            # The command line, in a process of its own.
            command = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "minidasgi", "status", "--redis", cluster.url, "--json"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(command.communicate(), 30)
            assert command.returncode == 0, err.decode()
            shown = json.loads(out)
            assert [q["key"] for q in shown["queues"]] == [served, "{api}:users"]
            assert (shown["asked"], shown["answered"]) == (2, 2)
            async with run_node(Node(url=cluster.url, app=apps.hello, key=unserved)):
                assert (await waiting).status_code == 200
    for server in cluster.masters:
        assert server.command("DBSIZE") == 0


async def test_publish_soon_and_lpush_soon_follow_the_slots(cluster: ClusterSetup) -> None:
    """The coalescing API (a callback per reply, no task per message) on a Cluster: routed
    by key, a MOVED followed, 0 receivers reported as such in a stable cluster."""
    client = ClusterClient(parse_url(cluster.url), settle_time=0)
    try:
        await client.wait_connected(5)
        keys = list(keys_on_each_master(cluster).values())
        for key in keys:
            await client.lpush(key, "warm")  # connect every master
        lengths = await asyncio.gather(*(client.lpush_soon(k, ["a", "b"]) for k in keys))
        assert lengths == [3] * len(keys)
        assert await client.publish_soon("nobody", b"x") == 0
        key = keys[0]
        owner = cluster.master_of(key)
        target = next(s for s in cluster.masters if s is not owner)
        assert owner is not None and owner.command("DEL", key) == 1
        _move_empty_slot(cluster, key_slot(key), owner, target)
        assert await client.lpush_soon(key, ["moved"]) == 1  # MOVED, then the slow path
        assert target.command("LLEN", key) == 1
    finally:
        await client.close()


async def test_publish_into_tells_settled_on_a_reply_and_after_a_moved(
    cluster: ClusterSetup,
) -> None:
    """The outbox forgets a batch watched for a lost message when ``settled`` is called: on
    a Cluster too, from the SPUBLISH's reply and from the slow path a MOVED takes."""
    client = ClusterClient(parse_url(cluster.url), settle_time=0)
    told: list[asyncio.Future[int]] = []
    loop = asyncio.get_running_loop()
    try:
        await client.wait_connected(5)
        channel = "settled-channel"
        assert await client.publish_soon(channel, b"warm") == 0  # its master connected
        replied: asyncio.Future[int] = loop.create_future()
        client.publish_into(channel, b"x", replied, told.append)
        assert await poll(lambda: len(told) == 1, 5)
        assert told[0] is replied and replied.result() == 0
        owner = cluster.master_of(channel)
        assert owner is not None
        target = next(s for s in cluster.masters if s is not owner)
        _move_empty_slot(cluster, key_slot(channel), owner, target)
        moved: asyncio.Future[int] = loop.create_future()
        client.publish_into(channel, b"y", moved, told.append)  # MOVED, then the slow path
        assert await poll(lambda: len(told) == 2, 10)
        assert told[1] is moved and moved.result() == 0
        assert client.owner(channel)[1] == target.port  # it did go the slow path
        assert len(told) == 2  # each told once
    finally:
        await client.close()
