"""The worker: pops requests from Redis lists and runs them in an ASGI app.

Owns the Node's Redis connections (a blocking-pop connection, a publishing connection and a
subscriber on the Node's own channel; on a Cluster, one blocking-pop connection per slot its
keys fall in), its pop loops, and one ``_Job`` per request in flight. It must never pop a
request it has no free slot for: what it cannot run stays in Redis for other Nodes (a blocked
pop holds a slot, whichever group it pops; one BLMPOP with a count takes up to one request per
free slot in a single round trip; before Redis 7.0, or with several pop groups, a BRPOP and
then under load an RPOP with a count). It never retries or re-queues a request (delivery is at
most once).

A job acks and runs the app at once, without waiting for the ack to land: the distributor
answers "no worker" only for a request it took back from the list unrun, or one a Node said
GONE for before acking, so nothing is gained by the wait. The exception is the recovery window
(``confirmation``): a request that may predate the pop connection (counted with ``LLEN`` each
time that connection is made) may be a leftover of a Redis restarted from its files or of a
promoted replica, answered or run already; if its envelope says the distributor confirms, the
job's ACK asks for it and the app starts only on ``CONFIRM`` (or a PING naming the request),
never on ``CANCEL``, a lost distributor or ``peer_timeout`` of silence.

An HTTP request whose body came whole lets its ack wait a moment (``outbox``, ``hold=True``) to
travel in the same PUBLISH as the response's first message; when its app sends that message in
the loop turn it started in, and the distributor reads it, inside it (``wire.ACK_SEND``: one
message to encode, publish and dispatch instead of two). A job feeds the app the events the
distributor sends and publishes what the app sends (all through the ``outbox``: one PUBLISH per
distributor per loop turn), answering in the envelope's format (``wire``: fleet upgrades),
under credit-based flow control (``wire.SendWindow`` / ``wire.ReceiveWindow`` /
``wire.CreditPool``); a distributor that sends more than the credit granted fails the request.
If the distributor goes away (PUBLISH reaches nobody, this Node's subscriber lost messages, or
nothing at all came from it for ``peer_timeout`` while requests are in flight with it), the
app's ``receive()`` answers a disconnect and the app is cancelled shortly after.

Whatever ends a job without its response complete (the above, a CANCEL, a flow-control
violation, a forced stop) publishes ``[GONE, id, reason]`` to the distributor, best effort; an
envelope already expired when popped is dropped unrun with a GONE too. If a GONE is lost, the
distributor's next PING names the request and this Node answers GONE for it then
(``liveness.PeerTracker`` keeps the requests each distributor shares with this Node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import codec, collector, confirmation, eventloop, health, link, memo, metrics, stats, wire
from .asgi import ASGIApp, Message, as_asgi3
from .codec import CodecError, UnsupportedVersion
from .inbox import SharedInbox
from .lifespan import Lifespan
from .link import UploadReceiver as _UploadReceiver
from .liveness import PeerTracker, RoundErrors, check_settings
from .mutex import Mutex
from .outbox import Lost, Outbox
from .resp import ReplyError, RespError, topology
from .resp.client import Client
from .resp.connection import Connection, make_params
from .resp.sentinel import SentinelSpec
from .slots import Slots

__all__ = ["DEFAULT_CONCURRENCY", "Node", "WebSocketClosed"]

logger = logging.getLogger("minidasgi.node")

DEFAULT_CONCURRENCY = 100
"""Requests one Node runs at once unless told otherwise."""

_MAX_BATCH = 32  # requests taken in one pop when a Node has that many slots free
_HEADERS = frozenset(["http.response.start", "http.response.trailers"])  # what carries headers
_FITS = wire.EARLIER_MAX_MESSAGE_SIZE  # a message this small always travels (``_Job._fits``)
_DISCONNECT_GRACE = 0.5  # seconds an app gets to notice a vanished peer before its cancellation
_RECHECK = 0.05  # seconds between two looks at the connections, when no wait agrees with them
_RECHECK_MAX = 1.0  # ... at most, once they have been away a while


class Node:
    """Runs an ASGI app on the requests pushed onto one or more Redis lists.

    ``cls=`` takes the seed's class style (``cls(scope)``, then ``await instance(receive,
    send)``); ``app=`` an ASGI 3 app (or a class-style one, told apart as uvicorn does).
    ``key=`` or ``keys=`` name the lists to pop. Connection settings as for
    ``create_path_distributor``; ``url=`` accepts ``redis://``, ``rediss://``, ``unix://``,
    ``redis+sentinel://`` (``sentinel=`` takes a ``SentinelSpec`` instead) or
    ``redis+cluster://`` (keys in different slots are popped on a connection per slot, all
    sharing the ``concurrency`` slots; give the Node at least one slot per such group).

    ``channel_prefix`` starts the Node's pub/sub channel name: the same as its tenant's
    distributors', with ACL users confined to it (README, "Security and trust").

    ``run()`` blocks until SIGINT or SIGTERM; ``await serve()`` embeds the Node in a running
    event loop and returns after ``stop()``.

    ``health_check_interval``: seconds of silence after which the publishing and subscribing
    connections are checked with a PING; a dead peer is replaced within about two intervals
    or the reply bound (``?reply_timeout=`` in the URL, 10 s by default). The pop connection
    needs no PING: a BRPOP's reply is due within ``pop_timeout`` plus the reply bound.
    ``liveness_interval``: seconds between the PINGs a Node publishes to each distributor it
    has requests in flight with (none while idle). ``peer_timeout``: seconds of silence from
    such a distributor (no message of any kind) after which its requests count as abandoned:
    their apps see a disconnect and are cancelled. It must exceed the distributors'
    ``liveness_interval`` by a good margin.

    ``health_port``: serve ``/-/healthz`` (the process answers), ``/-/readyz`` (Redis and the
    subscription are up, and the Node is not stopping) and ``/-/metrics`` (Prometheus text) on
    that port of ``health_host`` (0: a free port, see ``health_server.port``).
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        cls: Any = None,
        key: str | None = None,
        *,
        app: Any = None,
        keys: Iterable[str] | None = None,
        url: str | None = None,
        username: str | None = None,
        ssl: Any = None,
        unix_socket: str | None = None,
        sentinel: SentinelSpec | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        lifespan: str = "auto",
        shutdown_timeout: float = 30.0,
        pop_timeout: float = 5.0,
        liveness_interval: float = 1.0,
        health_check_interval: float = 5.0,
        peer_timeout: float = 10.0,
        channel_prefix: str = "minidasgi",
        parser: str | None = None,
        max_envelope_size: int = 16 * 1024 * 1024,
        health_port: int | None = None,
        health_host: str = "127.0.0.1",
    ) -> None:
        if (cls is None) == (app is None):
            raise TypeError("give a Node exactly one of cls= (class-style app) or app= (ASGI app)")
        self.app: ASGIApp = as_asgi3(cls, class_style=True) if cls is not None else as_asgi3(app)
        names = ([key] if key is not None else []) + list(keys or [])
        if not names:
            raise TypeError("give a Node the key (or keys) of the queue(s) to serve")
        self.keys = list(dict.fromkeys(names))
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.params = make_params(
            url,
            host=host if url is None else None,
            port=port if url is None else None,
            db=db if url is None else None,
            username=username,
            password=password,
            ssl=ssl,
            unix_socket=unix_socket,
            sentinel=sentinel,
        )
        self.concurrency = concurrency
        # The keys each blocking pop names: all of them, but on a Cluster one group per slot,
        # each popped on a connection of its own (to the master serving that slot).
        self.pop_groups = topology.pop_groups(self.params, self.keys)
        if concurrency < len(self.pop_groups):
            logger.warning(
                "a Node with concurrency %d pops %d slot groups (%s): each waiting pop holds a "
                "slot, so some groups wait for another's pop to end (up to pop_timeout); give "
                "it a concurrency of at least %d, or keys with one {hash tag}",
                concurrency,
                len(self.pop_groups),
                "; ".join(",".join(g) for g in self.pop_groups),
                len(self.pop_groups),
            )
        self.lifespan = Lifespan(self.app, lifespan)
        self.shutdown_timeout = shutdown_timeout
        self.pop_timeout = pop_timeout
        self.liveness_interval = liveness_interval
        if not health_check_interval > 0:
            raise ValueError("health_check_interval must be a positive number of seconds")
        check_settings(liveness_interval, peer_timeout)
        self.health_check_interval = health_check_interval
        self.peer_timeout = peer_timeout
        self.peers = PeerTracker(peer_timeout)  # the distributors we share requests with
        # Distributors with a PING still being published, and when it was sent (``tick``:
        # while Redis answers none, silence proves nothing).
        self._pinging: dict[str, float] = {}
        self._acks: dict[int, tuple[Any, ...]] = {}  # by window (``_ack_args``)
        self.max_envelope_size = max_envelope_size
        self.channel = wire.new_channel(channel_prefix, self.params.db, "node")
        self._own = self.channel.encode()  # checked per pop and per request: encoded once
        self.channel_prefix = channel_prefix
        # Subscribed beside self.channel: presence (one per key, counted by fail-fast
        # distributors and `minidasgi status`) and stats requests.
        self.presence_channels = [
            wire.presence_channel(
                channel_prefix, self.params.db, k, cluster=self.params.cluster is not None
            )
            for k in self.keys
        ]
        self._key_names = {k.encode(): k for k in self.keys}
        self.metrics = metrics.NodeMetrics(
            in_flight=lambda: len(self._jobs),
            concurrency=concurrency,
            redis_connected=self._redis_connected,
            credit_pool=lambda: (self.credit_pool.in_flight, self.credit_pool.budget),
        )
        self.health_server = (
            None
            if health_port is None
            else health.HealthServer(
                health_host, health_port, ready=lambda: self.ready, registry=self.metrics.registry
            )
        )
        self._subscriber: topology.AnySubscriber | None = None
        self._started_at = stats.process_started()
        self._parser = parser
        self._jobs: dict[str, _Job] = {}
        # Set by a message dropped, malformed or unexpected: the rest of its batch goes too
        # (``wire.drop_rest``).
        self._dropped = False
        self._held_starts: list[_Job] = []  # jobs holding a response start this loop turn
        self._starts_flush: asyncio.Handle | None = None  # the callback that flushes them
        # The pop loop ends this loop turn itself (``_promise_turn``): nothing schedules the
        # flushes at its end until it does.
        self._turn_promised = False
        self._stopping: asyncio.Event | None = None
        self._force = False
        self._draining = False  # WebSockets are closed as they are accepted (``_drain``)
        self._publisher: topology.CommandClient | None = None
        self.outbox = Outbox(lambda: self._publisher)
        self._started: asyncio.Event | None = None
        # Per pop group: its connection and that connection's id, for CLIENT UNBLOCK.
        self._pop_ids: dict[int, tuple[Connection, int]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._requests: set[asyncio.Task[None]] = set()  # popped, running or about to
        self._batch_pops = True  # RPOP takes a count (Redis 6.2)
        self._pop_many = True  # BLMPOP is there and allowed (Redis 7.0)
        self.recovery = confirmation.RecoveryWindow()  # popped requests to have confirmed
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop serve() runs in
        self.credit_pool = wire.CreditPool()  # bounds what distributors may have sent us unread
        # Link addresses (``host:port``) that failed, with the monotonic time until which the
        # body goes through Redis without trying them again (``link.UNREACHABLE_FOR``).
        self.unreachable_links: dict[str, float] = {}
        self._owns_process = False  # run() rather than serve(): the collector is ours to tune

    def __repr__(self) -> str:
        return f"<Node {self.params.address} keys={self.keys} jobs={len(self._jobs)}>"

    @property
    def in_flight(self) -> int:
        """Requests being run now."""
        return len(self._jobs)

    @property
    def ready(self) -> bool:
        """True while the Node pops: subscribed, Redis connected, not stopping."""
        started = self._started is not None and self._started.is_set()
        return started and not self.stopping and self._redis_connected()

    def _redis_connected(self) -> bool:
        publisher, subscriber = self._publisher, self._subscriber
        return bool(publisher and publisher.connected and subscriber and subscriber.connected)

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stopping is not None and self._stopping.is_set()

    def run(self, loop: str = "asyncio") -> None:
        """Serve until SIGINT or SIGTERM, then shut down gracefully (a second signal forces).

        ``loop``: the event loop to run on, ``asyncio``, ``uvloop`` or ``auto`` (uvloop when
        installed: ``eventloop``); ``eventloop.LoopUnavailable`` if uvloop is asked for but
        missing."""
        self._owns_process = True
        eventloop.run(self._serve_with_signals(), loop)

    async def _serve_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.serve()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """Stop popping and finish gracefully; called twice, cancel the requests in flight."""
        if self._stopping is None:
            self._stopping = asyncio.Event()
        if self._stopping.is_set():
            self._force = True
            logger.warning("node forced to stop (%d requests in flight)", len(self._jobs))
            for job in list(self._jobs.values()):
                job.cancel("forced shutdown")
            self.lifespan.cancel()  # a startup or shutdown that hangs holds the Node no more
        else:
            logger.info("node shutting down (%d requests in flight)", len(self._jobs))
        self._stopping.set()
        if self._subscriber is not None:  # fail-fast distributors stop counting this Node
            self.spawn(self._subscriber.unsubscribe(*self.presence_channels))
        self._unblock_pops()

    def _unblock_pops(self) -> None:
        """Wake every blocked BRPOP as if it timed out: nothing popped is ever dropped."""
        if self._publisher is None:
            return
        for connection, client_id in list(self._pop_ids.values()):
            self.spawn(self._unblock_pop(self._publisher, connection, client_id))

    async def _unblock_pop(
        self, publisher: topology.CommandClient, connection: Connection, client_id: int
    ) -> None:
        # A pop written but not yet at Redis (a slow or briefly stalled link) is not woken
        # by an UNBLOCK that gets there first, and would hold the stop for its whole
        # ``pop_timeout``: asked again while the pop connection still waits for a reply
        # (that pop's, or a command before it), backing off as the connections' rechecks
        # do, and no longer than the pop itself may last.
        loop = asyncio.get_running_loop()
        until = loop.time() + self.pop_timeout
        pause = _RECHECK
        with contextlib.suppress(RespError):  # the BRPOP's own timeout is the fallback
            while not await topology.unblock(publisher, connection, client_id):
                if not connection.awaiting_replies or loop.time() >= until:
                    return
                await asyncio.sleep(pause)
                pause = min(2 * pause, _RECHECK_MAX)

    async def wait_started(self) -> None:
        """Wait until the Node is subscribed and popping."""
        if self._started is None:
            self._started = asyncio.Event()
        await self._started.wait()

    async def serve(self) -> None:
        """Run the Node in the current event loop until ``stop()``."""
        if self._stopping is None:
            self._stopping = asyncio.Event()
        if self._started is None:
            self._started = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        health = self.health_check_interval
        publisher = self._publisher = topology.command_client(
            self.params, name="node publisher", parser=self._parser, health_check_interval=health
        )
        poppers = [
            (
                keys,
                topology.pop_client(
                    self.params,
                    keys,
                    name="node queue" if len(self.pop_groups) == 1 else f"node queue {keys[0]}",
                    parser=self._parser,
                    health_check_interval=health,
                ),
            )
            for keys in self.pop_groups
        ]
        subscriber = self._subscriber = topology.subscriber(
            self.params,
            health_check_interval=health,
            on_message=self._on_message,
            on_connection_lost=self._on_subscriber_lost,
            parser=self._parser,
            # Large payloads as memoryviews, an upload piece's body read apart as bytes of its
            # own where the process allows it (``read_tails_apart``; split_frame, unpack take
            # either).
            direct_reads=wire.tail_size,
        )
        if self.health_server is not None:
            await self.health_server.start()
        publisher.start()
        for _, popper in poppers:
            popper.start()
        monitor: asyncio.Task[None] | None = None
        try:
            # Waits out a Redis that is not up yet; raises at once for refused credentials.
            await self._until_stopped(publisher.wait_connected())
            await self.lifespan.startup()
            stats_channel = wire.stats_channel(self.channel_prefix, self.params.db)
            await self._until_stopped(
                subscriber.subscribe(self.channel, stats_channel, *self.presence_channels)
            )
            if not self._stopping.is_set():
                monitor = asyncio.get_running_loop().create_task(self._watch_peers())
                logger.info("node serving %s from Redis at %s", self.keys, self.params.address)
                self._started.set()
                if self._owns_process:  # the heap start-up leaves: out of the collector's way
                    collector.settle()
                await self._pop_loop(poppers)
            await self._drain()
        finally:
            if monitor is not None:
                monitor.cancel()
            for job in list(self._jobs.values()):
                job.cancel("node stopped")
            for _, popper in poppers:
                await popper.close()
            try:
                await self.lifespan.shutdown()
            finally:
                self.outbox.flush()  # the last GONEs, written before the connection closes
                batcher = self.outbox.batcher
                logger.info(
                    "node coalescing: %d messages in %d PUBLISH (%.2f)",
                    batcher.items,
                    batcher.batches,
                    batcher.items / batcher.batches if batcher.batches else 0.0,
                )
                await subscriber.close()
                await publisher.close()
                if self.health_server is not None:
                    await self.health_server.close()

    async def _until_stopped(self, awaitable: Any) -> Any:
        """Await ``awaitable`` unless ``stop()`` comes first: its result, or None if
        stopped."""
        assert self._stopping is not None
        task = asyncio.ensure_future(awaitable)
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        return None

    async def _pop_loop(self, poppers: list[tuple[list[str], Client]]) -> None:
        """Pop each group of keys on its own connection, all groups sharing the Node's
        concurrency slots, until ``stop()``."""
        assert self._stopping is not None
        slots = Slots(self.concurrency)
        loop = asyncio.get_running_loop()
        groups = [
            loop.create_task(self._pop_group(index, keys, popper, slots, alone=len(poppers) == 1))
            for index, (keys, popper) in enumerate(poppers)
        ]
        try:
            _, pending = await asyncio.wait(groups, return_when=asyncio.FIRST_EXCEPTION)
            if pending:  # a group failed: the others stop as at stop(), nothing popped lost
                self._stopping.set()
                self._unblock_pops()
                await asyncio.wait(pending)
        finally:
            for group in groups:  # only if this task itself was cancelled
                group.cancel()
        for group in groups:
            group.result()

    async def _pop_group(
        self,
        index: int,
        keys: list[str],
        popper: Client,
        slots: Slots,
        *,
        alone: bool,
    ) -> None:
        """Pop ``keys`` while a slot is free: a blocked pop holds a slot, so the Node never
        pops more requests than it can run. ``alone``: the only group, whose blocked BLMPOP
        may hold every free slot (up to ``_MAX_BATCH``) to take a batch in one round trip;
        with several groups a blocked pop holds one slot, and takes more (RPOP with a count)
        only once it popped (``_pop``)."""
        assert self._stopping is not None
        loop = asyncio.get_running_loop()
        popped_on = None
        started = 0  # requests started by the pop under way (it may start them before it returns)
        promised = False  # the pop under way promised its loop turn (``_promise_turn``)

        def start(key: bytes, data: bytes) -> None:
            nonlocal started
            started += 1
            early = self.recovery.popped(key)  # counted in pop order, whatever the request
            # Its slot is freed by the request itself, as it ends (``_run_request``).
            coroutine = self._run_request(key, data, early, slots)
            # Made by the Task class itself, as the loop's create_task does when the loop has
            # no task factory (asked each time: one may come while a pop waits): its checks
            # and its naming cost each request ~2k instructions.
            task = (
                asyncio.Task(coroutine, loop=loop)
                if loop.get_task_factory() is None
                else loop.create_task(coroutine)
            )
            self._requests.add(task)

        def popped(key: bytes, values: list[bytes]) -> None:
            nonlocal promised
            for data in values:
                start(key, data)
            if len(values) == 1 and len(self._requests) == 1:
                # A lone request: its first step runs in the next turn, just before this loop
                # wakes in that turn and sends what it posted (below), unless the job, ending
                # its response in that step, sent it already (``_end_turn``): either way the
                # turn is seen to, and the lone request's own flush below is not needed.
                promised = True
                self._promise_turn()

        while not self._stopping.is_set():
            # Every slot free now, up to a batch, in one call: no task, no loop turn.
            count = slots.take(_MAX_BATCH if alone and self._pop_many else 1)
            if not count:  # every slot busy: wait for one (or for stop()), then look again
                await self._until_stopped(slots.wait())
                continue
            held, started, promised, failed = count, 0, False, False
            try:
                # A pop is never cancelled (that could lose an item already popped): stop()
                # wakes it with CLIENT UNBLOCK, and the timeout bounds the wait if that fails.
                # Connected (nearly always): no coroutine to wait with. Redis away: each wait
                # below is ended by stop() too, or a stop would wait out pop_timeout.
                if popper.connected:
                    connection = popper.connection()
                else:
                    connection = await self._until_stopped(popper.wait_connected(self.pop_timeout))
                    if connection is None:  # stopped (the finally gives the slots back)
                        continue
                # Pop only what can be acked and heard about: after a Redis restart the
                # publisher may still be reconnecting, and a request popped then would be
                # dropped unacked (as if its distributor were gone) while the client waits for
                # the no-worker error; and while the subscriber is away, whatever the
                # distributor sends for a new request (a confirmation, body pieces, credit)
                # would be lost, and the request failed, instead of waiting in Redis.
                # Both at once (the waits of each may return while the other does not hold,
                # and on a Cluster the publisher's while its own flag does not: a master it
                # used is down): a request popped now would wait unrun until its deadline,
                # where another Node could serve it.
                publisher, subscriber = self._publisher, self._subscriber
                assert publisher is not None and subscriber is not None
                if not (publisher.connected and subscriber.hears(self._own)):
                    await self._until_stopped(
                        asyncio.wait_for(self._until_can_take_on(), self.pop_timeout)
                    )
                    if self._stopping.is_set():
                        continue
                if connection is not popped_on:
                    self._pop_ids.pop(index, None)
                    client_id = await self._client_id(connection)
                    if client_id is not None:
                        self._pop_ids[index] = (connection, client_id)
                    # Before the first pop on it: what waits now may predate the connection.
                    waiting = await self._waiting(connection, keys)
                    self.recovery.reconnected(keys, waiting, time.time())
                    popped_on = connection
                if self._stopping.is_set():
                    pass  # (the finally gives the slots back)
                else:
                    many = alone and self._pop_many
                    if many:
                        # _pop's BLMPOP, here: a coroutine less for each pop to pass through
                        # (~1.2k instructions, in its creation and at each resumption). Its
                        # requests are started as its reply is read (``popped``): all the
                        # slots held are theirs, or freed below.
                        try:
                            await connection.brpop_many(
                                *keys, count=count, timeout=self.pop_timeout, popped=popped
                            )
                        except ReplyError as exc:
                            if not _unavailable(exc):
                                raise
                            logger.info("popping with BRPOP and RPOP (no BLMPOP: %s)", exc)
                            self._pop_many = many = False
                    if not many:
                        # Out of the handler above: awaited in it, its BRPOP would keep the
                        # refusal, its traceback and their frames alive through the wait.
                        held = await self._pop(connection, keys, count, slots, start)
            except (asyncio.TimeoutError, RespError) as exc:
                if not isinstance(exc, asyncio.TimeoutError):
                    logger.warning("cannot pop requests: %s", exc)
                    failed = True
            finally:
                # Unequal whenever a pop started fewer requests than the slots it took: a
                # lone BLMPOP takes up to _MAX_BATCH and, at one connection, starts one.
                if held != started:
                    slots.release(held - started)
                if self._turn_promised:  # kept whatever happened: the job's messages wait
                    promised = True
                    self._send_turn()
            if failed:
                await asyncio.sleep(0.05)
            if started == 1 and not promised:
                # The queue was short, and the next pop will likely wait anyway: the job ran to its
                # first wait already (started as its pop's reply was read), so first let what it
                # posted leave, so that its response goes out a write sooner. Alone in flight, it
                # leaves at once, before the pop, rather than in the flushes at the end of this turn
                # (a loop iteration later); with others in flight, in those flushes, with whatever
                # the others post in the turn (sent at once, it would leave them a PUBLISH of their
                # own). After a batch, more requests are likely waiting: pop at once.
                if len(self._requests) <= 1:
                    self._send_turn()
                else:
                    await asyncio.sleep(0)

    def _send_turn(self) -> None:
        """``_end_turn`` for the pop loop: an error is logged, as a loop callback's would
        be, and the pops go on."""
        try:
            self._end_turn()
        except Exception:
            logger.exception("sending a lone request's messages failed")

    async def _pop(
        self,
        connection: Any,
        keys: list[str],
        count: int,
        slots: Slots,
        start: Callable[[bytes, bytes], None],
    ) -> int:
        """Pop up to ``count`` requests (``count`` slots held) with a ``BRPOP`` and ``start``
        each; return the slots held now (the caller frees those ``start`` did not take, also
        if this raises). The pop loop pops with one ``BLMPOP`` (Redis 7.0) where it can, a
        single round trip per pop however many requests wait (its requests started by the
        code that reads its reply, so that their tasks' first steps come before the loop's
        wake-up, in the same loop pass: ``_pop_group``); this is for Redis before 7.0, an
        ACL user without ``+blmpop``, or a group that is not ``alone`` (whose blocked pop
        holds one slot only): a ``BRPOP`` and then, under load, an ``RPOP`` with a count
        for the slots free by then (the request popped first starts before the second round
        trip). A request started alone has run to its first wait when this returns."""
        item = await connection.brpop(*keys, timeout=self.pop_timeout)
        if item is None:
            return count
        key, data = item
        start(key, data)
        # Under load more requests wait behind this one: take up to one per free slot in a
        # single round trip (RPOP with a count) rather than a BRPOP each.
        if self._batch_pops:
            count += slots.take(_MAX_BATCH - count)
        if count == 1:
            await asyncio.sleep(0)  # its first step, as a BLMPOP's has had (see above)
            return count
        more: list[bytes] = []
        try:
            more = await connection.execute("RPOP", key, count - 1) or []
        except ReplyError:  # Redis before 6.2 has no count: pop one by one
            self._batch_pops = False
        except RespError as exc:
            logger.warning("cannot pop requests: %s", exc)
        for data in more[: count - 1]:
            start(key, data)
        return count

    async def _client_id(self, connection: Any) -> int | None:
        """The pop connection's id, for CLIENT UNBLOCK at stop; None if the ACL user may
        not ask (a stop then waits up to ``pop_timeout`` for the BRPOP to end)."""
        try:
            client_id: int = await connection.execute("CLIENT", "ID")
        except ReplyError as exc:
            logger.info("no CLIENT ID (%s): stopping will wait for the pop to time out", exc)
            return None
        return client_id

    async def _waiting(self, connection: Any, keys: list[str]) -> dict[str, int] | None:
        """The requests waiting on each of ``keys`` (``confirmation``); None if the ACL user
        may not ask (the recovery window is then told by the clocks)."""
        try:
            counts = await asyncio.gather(*(connection.execute("LLEN", k) for k in keys))
        except ReplyError as exc:
            logger.info(
                "no LLEN (%s): requests queued before a reconnection are confirmed by clock", exc
            )
            return None
        pairs = zip(keys, counts, strict=True)
        return {k: n if type(n) is int else 0 for k, n in pairs}

    async def _drain(self) -> None:
        if not self._requests:
            return
        logger.info(
            "waiting up to %s s for %d requests", self.shutdown_timeout, len(self._requests)
        )
        # An open WebSocket has no end of its own to wait for: closed now, as uvicorn closes
        # its own at shutdown (``_Job.close_for_stop``); its app ends within the drain. One
        # accepted from now on is closed as it is accepted (``_Job.send``).
        self._draining = True
        closing = [
            asyncio.ensure_future(job.close_for_stop())
            for job in list(self._jobs.values())
            if job.accepted
        ]
        _, pending = await asyncio.wait(set(self._requests), timeout=self.shutdown_timeout)
        for job in list(self._jobs.values()):
            job.cancel("shutdown timeout")
        if pending:
            await asyncio.wait(pending, timeout=5)
        if closing:  # each ends once its close is sent, or its job cancelled just above
            await asyncio.wait(closing, timeout=5)

    def _can_take_on(self) -> bool:
        """True while a request can be acked and its distributor heard: the publisher is
        connected and this Node's own channel subscribed."""
        publisher, subscriber = self._publisher, self._subscriber
        return bool(
            publisher and publisher.connected and subscriber and subscriber.hears(self._own)
        )

    async def _until_can_take_on(self) -> None:
        """Wait until ``_can_take_on()``; unbounded (the callers bound it).

        Each wait may return at once while the flag stays False: on a Cluster the publisher's
        ``wait_connected`` returns once the slot map is known, while its ``connected`` also
        wants every master used so far (one that died with no replica stays in the map), and
        a subscriber may hear the channel while the publisher is away. Looping on them alone
        never suspended: the event loop froze, and with it the reconnection waited for and the
        caller's deadline. Then look again after ``_RECHECK`` seconds, twice as long each time
        up to ``_RECHECK_MAX``: a look is local state, but on a Cluster ``connected`` also has
        the slot map read (at most every 0.1 s, on a connection of its own), which an idle Node
        looking every 50 ms would do ten times a second while a master is away."""
        publisher, subscriber = self._publisher, self._subscriber
        assert publisher is not None and subscriber is not None
        delay = _RECHECK
        while not self._can_take_on():
            await subscriber.wait_hears(self._own)
            await publisher.wait_connected()
            if not self._can_take_on():
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECHECK_MAX)

    async def _run_request(
        self, key: bytes, data: bytes, early: bool | None = False, slots: Slots | None = None
    ) -> None:
        """Run one popped request; ``early``: it may predate the pop connection (None:
        unknown, the envelope's time tells: ``confirmation``). ``slots``: the pop loop's,
        one of which this request holds until it ends."""
        task = asyncio.current_task(self.loop)  # once, for the job and the end: with the loop
        try:
            try:
                # Its scope as the app gets it where the reader can (``_local_scope``).
                envelope = wire.Envelope.decode(data, max_size=self.max_envelope_size, asgi=True)
            except UnsupportedVersion as exc:
                # A distributor newer than this Node: tell it at once, so its client is answered.
                peek = wire.peek_envelope(data)
                logger.error(
                    "dropped a request from queue %r that this worker cannot read (malformed, or "
                    "from a newer distributor: upgrade this worker): %s%s",
                    key,
                    exc,
                    "" if peek else "; it has no preamble, so its distributor cannot be told",
                )
                if peek is not None:
                    reason = f"unsupported wire format {exc.version}: upgrade the worker"
                    self.outbox.post(peek[1], wire.pack(wire.GONE, peek[0], reason))
                return
            except (CodecError, wire.WireError) as exc:
                logger.warning("dropped a malformed request from queue %r: %s", key, exc)
                return
            if envelope.id in self._jobs:
                logger.warning("dropped request %s: the id is already running", envelope.id)
                return
            if time.time() > envelope.deadline:  # envelope.expired(), without the call
                # Only an optimisation (this Node's clock against the distributor's): the
                # distributor answers "no worker" only for a request it took back from the list,
                # and for one whose GONE says it never ran.
                logger.info("dropped request %s: its distributor stopped waiting", envelope.id)
                self._tell_gone(envelope.reply, envelope.id, "expired", envelope.version)
                return
            if not self._can_take_on():
                # Popped by a pop already waiting when the subscriber (or the publisher) went
                # away: whatever the distributor sends this request (body pieces, credit, a
                # confirmation) would be lost, and its ack too. Unacked and unrun, it waits for
                # both connections until its deadline.
                try:
                    await asyncio.wait_for(
                        self._until_can_take_on(), max(0.0, envelope.deadline - time.time())
                    )
                except asyncio.TimeoutError:
                    logger.warning("dropped request %s unrun: no subscription", envelope.id)
                    self._tell_gone(envelope.reply, envelope.id, "expired", envelope.version)
                    return
                if envelope.id in self._jobs:  # a copy popped meanwhile, forged
                    logger.warning("dropped request %s: the id is already running", envelope.id)
                    return
            confirm = envelope.confirms and (
                early if early is not None else self.recovery.predates(key, envelope.queued)
            )
            # By position: a class called with a keyword argument makes a dict of it.
            job = _Job(self, envelope, confirm)
            job.task = task
            # Known to the peer tracker only once something may look (``_track``): a request
            # that ends in its first step, as most do, costs it nothing. Its arrival is set
            # before it is in ``_jobs``, where ``_track_all`` finds it.
            now = job.arrived = time.monotonic()
            self._jobs[envelope.id] = job
            try:
                job.begin()
                # The app is awaited here, in the request's own coroutine, not in one of the
                # job's: a coroutine per request less (its creation, its frame and its end,
                # about a thousand instructions; ``test_node_cost`` counts them).
                try:
                    if job.confirmation is not None:
                        if not await job.wait_confirmed():
                            return
                        now = time.monotonic()
                    # Else the app starts now: ``begin`` never waits (one clock read less).
                    job.app_started = now
                    await self.app(job.scope, job.receive, job.send)
                except asyncio.CancelledError:
                    if not job.gone:
                        raise
                    logger.debug("request %s cancelled", job.id)
                except WebSocketClosed:  # the app sent after its WebSocket closed: its end
                    logger.debug("request %s: the app sent after its WebSocket closed", job.id)
                except Exception:
                    await job.app_failed()
                else:
                    if not job.finished:  # else all is told already: no coroutine for nothing
                        await job.app_ended(failed=False)
                finally:
                    # Before the GONE the code below may post: a GONE before the ACK says the
                    # request never ran, and its client would get the no-worker answer.
                    if job.unsent_ack is not None:
                        job.ack_alone()
                if job.link is not None and job.link.ended:
                    # The response's tail may still be on its way through the link: the job
                    # (counted in flight, answering PINGs) lasts until the distributor has
                    # read it and closes the link, bounded (``link.LINGER``).
                    await job.link.linger()
                if job.upload_mode:
                    # An upload link whose body the app did not read to the end: told so,
                    # bounded, not just dropped (the distributor would take that for a
                    # broken link, and fail a response the app did send).
                    await job.end_upload()
            finally:
                job.received.close()
                if job.link is not None:
                    job.link.abort()  # closed already after a last frame: nothing more
                if job.upload_mode:
                    job.drop_upload()
                del self._jobs[envelope.id]
                if job.tracked:
                    self.peers.discard(job.reply, job.id)
                if job.app_started:
                    name = self._key_names.get(key) or key.decode(errors="replace")
                    elapsed = time.monotonic() - job.app_started
                    self.metrics.finished(name, job.status, job.failed, elapsed)
                if job.acked and not job.finished and not job.told:
                    # The distributor would otherwise wait for a response that never comes.
                    job.repeat_ack_unless_known()
                    self._tell_gone(job.reply, job.id, job.why or "ended", job.version)
        finally:
            if slots is not None:
                # Here rather than in a done callback on the task: a loop callback less per
                # request (its task ends in this very step).
                self._requests.discard(task)
                slots.release()

    def link_unreachable(self, address: str) -> bool:
        """Whether ``address`` failed less than ``link.UNREACHABLE_FOR`` seconds ago."""
        until = self.unreachable_links.get(address)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self.unreachable_links[address]
        return False

    def remember_unreachable(self, address: str) -> None:
        """``address`` failed: use Redis for its responses for a while (bounded table)."""
        links = self.unreachable_links
        if len(links) >= _MAX_UNREACHABLE and address not in links:
            del links[next(iter(links))]  # the oldest
        links[address] = time.monotonic() + link.UNREACHABLE_FOR

    def _ack_args(self, window: int) -> tuple[Any, ...]:
        """An ACK's first three arguments for a request of ``window``, kept by window: the
        same tuple for every such request, which the response writer knows by its identity
        (``responsewriter``: no second look at its values, no key to hash)."""
        ack = (self.channel, window, self.liveness_interval)
        memo.keep(self._acks, window, ack)
        return ack

    def _tell_gone(self, channel: str, request_id: str, reason: str, version: int) -> None:
        """Best effort: if this is lost too, the distributor's next PING finds it."""
        message = wire.pack(wire.GONE, request_id, reason[:100], version=version)
        self.outbox.post(channel, message)

    def hold_start(self, job: _Job) -> None:
        """``job`` holds its ACK or its response start for this loop turn: they are flushed
        after the turn (``_Job.turn_ended``) with every other one held in it, by one loop
        callback rather than one per request."""
        held = self._held_starts
        held.append(job)
        if len(held) == 1 and not self._turn_promised:
            assert self.loop is not None
            self._starts_flush = self.loop.call_soon(self._flush_starts)

    def _flush_starts(self) -> None:
        # A start held in this turn before this callback goes now, a turn early at worst: its
        # send re-checks, so a body that takes it along meanwhile still does.
        self._starts_flush = None
        held, self._held_starts = self._held_starts, []
        for job in held:
            # Most took their ACK and start along with their body already: no call for them.
            if job.unsent_ack is not None or job.held_start is not None:
                job.turn_ended()

    def _promise_turn(self) -> None:
        """The pop loop will call ``_end_turn`` before this loop turn's end, the next turn
        at the latest (a lone request, started from the code that read its pop: its first
        step and the pop loop's wake-up run in that turn). Until then no held start nor
        message schedules a flush: one scheduled and then called off would still cost the
        loop an iteration of its own, with nothing to do."""
        self._turn_promised = True
        self.outbox.promise_flush()

    def _end_turn(self) -> None:
        """Do now what the callbacks at the end of this loop turn would do: the held starts,
        then the outbox's flush (both called off); keeps a promise (``_promise_turn``)."""
        self._turn_promised = False
        scheduled = self._starts_flush
        if scheduled is not None:
            scheduled.cancel()
        if scheduled is not None or self._held_starts:
            self._flush_starts()
        self.outbox.flush_turn()

    def spawn(self, coroutine: Any) -> None:
        """Run a fire-and-forget coroutine, keeping a reference until it ends."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def publish(self, channel: str, message: bytes) -> int:
        """PUBLISH (coalesced) for the jobs; 0 when Redis is unreachable (the peer is as good
        as gone)."""
        return await self.outbox.publish(channel, message)

    def _on_message(self, channel: bytes, data: bytes | memoryview) -> None:
        try:
            messages = wire.split_frame(data)
        except wire.WireError as exc:
            logger.warning("dropped a malformed batch on %r: %s", channel, exc)
            return
        self._dropped = False
        for index, message in enumerate(messages):
            self._on_one_message(channel, message)
            if self._dropped:
                wire.drop_rest(logger, messages, index, repr(channel))
                return

    def _on_one_message(self, channel: bytes, data: Any) -> None:
        try:
            kind, request_id, args = wire.unpack_general(data)  # no ACK_SEND comes here
        except UnsupportedVersion as exc:
            logger.error("dropped a message on %r: %s (upgrade this worker)", channel, exc)
            self._dropped = True
            return
        except (CodecError, wire.WireError) as exc:
            logger.warning("dropped a malformed message on %r: %s", channel, exc)
            self._dropped = True
            return
        if kind == wire.PING:
            self._on_ping(args, data[0])
            return
        if kind == wire.STATS:
            self._answer_stats(request_id, args)
            return
        job = self._jobs.get(request_id)
        if job is None:
            return
        if not job.tracked:
            self._track(job)
        elif not self.peers.knows(job.reply):
            # Its distributor was given up (``tick`` forgot it, this job stays till its task
            # ends): a later request of it, not told yet, must hear this word too.
            self._track_all()
        self.peers.heard(job.reply, time.monotonic())
        if kind == wire.EVENT and args and isinstance(args[0], dict):
            job.deliver(args[0], len(data))
        elif kind == wire.CREDIT and args and type(args[0]) is int:
            job.window.grant(args[0])
            if job.gathered:
                job.send_gathered()
        elif kind == wire.CONFIRM:
            job.confirm(True)
        elif kind == wire.CANCEL:
            if job.complete and not job.finished:
                # The app sent its whole response, part of which may still wait for credit
                # that a distributor which gave the request up will never grant.
                job.stop_sending("cancelled by the distributor")
            elif not job.complete:  # else the response is out: let the app finish its work
                job.cancel("cancelled by the distributor")
        else:
            # Well-formed, but no distributor sends it (a forged one, under the Redis
            # credentials), or an EVENT or a CREDIT whose argument is not one: dropped as a
            # malformed one is, with the rest of its batch in one line.
            if kind in (wire.EVENT, wire.CREDIT):
                logger.warning("dropped a malformed %r message for request %s", kind, request_id)
            else:
                logger.warning("dropped an unexpected %r message for request %s", kind, request_id)
            self._dropped = True

    def _track(self, job: _Job) -> None:
        """Tell the peer tracker of ``job``, as of its arrival: a request is registered there
        only once some code may look (a message from its distributor, a PING, the periodic
        check), not as it starts. No code runs between its task's steps but the loop's, so a
        request that ends in its first step (a hello world, nearly every request) is never
        seen missing; one that waits is found by the first look after it started, which
        hears it as of its arrival (``PeerTracker.add`` keeps the latest word)."""
        job.tracked = True
        self.peers.add(job.reply, job.id, job.arrived, pings=job.pings)

    def _track_all(self) -> None:
        """``_track`` every request not yet known to the peer tracker: a scan of all the
        running jobs, once per periodic check, per PING from a distributor the tracker has no
        state for, and per message for a request whose distributor it gave up; only the
        untold ones are added."""
        for job in self._jobs.values():
            if not job.tracked:
                self._track(job)

    def _on_ping(self, args: list[Any], version: int) -> None:
        """A distributor names the requests it has in flight with this Node: answer GONE for
        those this Node does not run (any more)."""
        ping = wire.parse_ping(args)
        if ping is None:
            return  # an old id-less PING: nothing to answer
        sender, request_ids = ping
        if not self.peers.knows(sender):  # else its untold requests keep this later word
            self._track_all()  # when they are told (``PeerTracker.add``)
        self.peers.heard(sender, time.monotonic())
        unknown = []
        for request_id in request_ids:
            job = self._jobs.get(request_id)
            if job is None:
                unknown.append(request_id)
            elif job.confirmation is not None and job.reply == sender:
                # Named only once the distributor accepted the ACK: as good as a CONFIRM.
                job.confirm(True)
        for request_id in unknown[: wire.MAX_PING_ANSWERS]:  # the rest at the next PING
            self._tell_gone(sender, request_id, "unknown to the worker", version)

    def _answer_stats(self, request_id: str, args: list[Any]) -> None:
        reply = stats.reply_channel(self.channel_prefix, self.params.db, args)
        if reply is None or self._publisher is None:
            return
        payload = stats.node_payload(
            channel=self.channel,
            keys=self.keys,
            concurrency=self.concurrency,
            in_flight=len(self._jobs),
            served=self.metrics.served,
            failed=self.metrics.failed,
            started=self._started_at,
            stopping=self.stopping,
        )
        self.outbox.post(reply, wire.pack(wire.STATS_REPLY, request_id, payload))

    def _on_subscriber_lost(self) -> None:
        # Events from distributors may have been lost: no job can trust its input any more.
        for job in list(self._jobs.values()):
            job.peer_lost("the node lost its subscription")

    async def _watch_peers(self) -> None:
        errors = RoundErrors()
        while True:
            await asyncio.sleep(self.liveness_interval)
            try:
                self._check_peers()
            except Exception as exc:
                # A bug (nothing raises here today): the next round may still find the dead
                # distributors, and without the checks their jobs would wait forever.
                message = errors.report(exc, time.monotonic())
                if message is not None:
                    logger.error(message, exc_info=exc)

    def _check_peers(self) -> None:
        """One round of ``_watch_peers``: give up the jobs of silent distributors, ping the
        others."""
        self._track_all()
        pinging, now = self._pinging, time.monotonic()
        lost = self.peers.tick(
            now,
            self.liveness_interval,
            unanswered_since=min(pinging.values()) if pinging else None,
        )
        for _, request_ids in lost:
            for request_id in request_ids:
                job = self._jobs.get(request_id)
                if job is not None:
                    job.peer_lost(f"nothing heard from the distributor for {self.peer_timeout:g} s")
        for channel, request_ids in self.peers.peers():
            # A job that finished or already gave up needs nothing from its distributor; one
            # whose link lingers (``link.LinkWriter.linger``) is still heard from, so that its
            # distributor relays the link's tail rather than give the Node up.
            live = [
                i
                for i in request_ids
                if (job := self._jobs.get(i))
                and not job.gone
                and (not job.finished or job.link is not None)
            ]
            if live and channel not in self._pinging:
                # Not awaited: a PING stuck on a stalled link must not stop the checks.
                self._pinging[channel] = now
                self.spawn(self._ping(channel, live, self._jobs[live[0]].version))

    async def _ping(self, channel: str, request_ids: list[str], version: int) -> None:
        try:
            for message in wire.ping_messages(self.channel, request_ids, version=version):
                if await self.publish(channel, message) == 0:
                    for job in list(self._jobs.values()):
                        if job.reply == channel:
                            job.peer_lost("the distributor is gone")
                    return
            sent = self._pinging.get(channel)
            if sent is not None:  # how long Redis took to answer: deaf meanwhile
                self.peers.unserved(sent, time.monotonic())
        finally:
            self._pinging.pop(channel, None)


class WebSocketClosed(OSError):
    """Raised by a WebSocket app's ``send()`` once its connection is closed (its client left,
    its distributor is gone, or this Node closed it as it stopped): the ``OSError`` the ASGI
    spec asks a server to raise there, as uvicorn's ``ClientDisconnected`` (Starlette makes it
    ``WebSocketDisconnect``). An app that only sends ends at its next message instead of
    sending into the void for ever, holding its slot; one that lets it out ends quietly."""


class _Disconnected(Exception):
    """Raised inside a job when its distributor is gone."""


class _Job:
    """One request on a Node.

    ``complete``: the app sent the last message of its response (or closed its WebSocket);
    sending more is an error. ``finished``: the distributor has been told all there is to
    tell, so the job no longer needs its distributor; it is set once the last message was
    posted (its PUBLISH's count is not awaited: ``_publish_events``).
    """

    # What most requests never change: read from the class until a job sets its own (an
    # attribute set per request costs more than the lookup that finds it here).
    pieces: wire.Reassembler | None = None  # a WebSocket's, made at its first message
    task: asyncio.Task[None] | None = None
    held_start: Message | None = None
    _gathered_size = 0
    _flushing = False
    _flush_scheduled = False
    response_started = False
    trailers = False  # the start announced trailers the front server can take
    body_done = False  # the last body was sent (trailers may follow)
    complete = False
    finished = False
    accepted = False  # a WebSocket's handshake was accepted
    stopped = False  # a WebSocket the Node closes as it stops (``close_for_stop``)
    _disconnect_code = 1000  # a WebSocket's, once its response is over (``_response_sent``)
    gone = False  # the distributor or client went away
    link: link.LinkWriter | None = None  # the rest of the body goes on this (``_open_link``)
    _link_offer = ""  # the distributor's offer (``wire.Envelope.link``)
    _streamed = False  # a first body with more to come went through Redis
    _link_tried = False
    # The request's body on an upload link (``link.open_upload``): 0, none; 1, wanted (its body
    # streams and an offer came), opened at the app's first receive(); 2, opening or open, the
    # body still through Redis until the distributor's marker; 3, the body comes on it.
    upload_mode = 0
    uplink: _UploadReceiver | None = None
    _uplink_opening: asyncio.Task[None] | None = None
    acked = False  # the distributor may know this Node took the request
    told = False  # the distributor ended the request itself (a client disconnect)
    why = ""  # why the job ended early, for the GONE message
    disconnect: Message | None = None  # returned by every receive() once known
    app_started = 0.0  # monotonic time the app was called, for metrics
    status = 0  # the status the app answered (0: none)
    failed = False
    _credits: wire.CreditMessages | None = None  # made at the first credit
    # A WebSocket's SENDs of the usual shape, written straight (``wire.WebSocketData``).
    _data: wire.WebSocketData | None = None
    # The ACK's arguments while it waits, until the end of the loop turn the app started
    # in, to travel inside the response's first SEND (``wire.ACK_SEND``).
    unsent_ack: tuple[Any, ...] | None = None
    _ack: tuple[Any, ...] | None = None  # the ACK's arguments, once made
    _ack_posted: asyncio.Future[int] | None = None  # the batch that carried it
    # In the recovery window (``confirmation``): the distributor's answer, True to run.
    confirmation: asyncio.Future[bool] | None = None
    # The pieces of one message must not interleave with another task's message: a sender
    # alone (nearly always) only sets ``_in_send``; a Mutex is made once a second one comes
    # (``_wait_to_send``), locked for the sender inside, and used from then on. One per
    # request made and taken twice cost ~3k instructions.
    _in_send = False
    _sending: Mutex | None = None
    tracked = False  # known to the Node's peer tracker (``Node._track``)
    # Monotonic time the request started, for the peer tracker: no class default (0.0 would
    # read as heard at boot, its distributor lost at the next check); set before the job is
    # in ``Node._jobs``, so a job put there without it fails loudly in ``Node._track``.
    arrived: float

    def __init__(self, node: Node, envelope: wire.Envelope, confirm: bool = False) -> None:
        self.node = node
        self.pings = envelope.liveness > 0  # its distributor pings: its silence counts
        self.id = envelope.id
        self.reply = envelope.reply
        self.version = envelope.version  # the distributor's format, which every reply uses
        scope = envelope.scope  # its own: decoded for this request alone
        if envelope.asgi:  # tuples already, and none of the extensions the reader refuses
            scope["state"] = dict(node.lifespan.state)
        else:
            scope = _local_scope(scope, node.lifespan.state)
        self.scope = scope
        kind = self.kind = scope["type"]
        # Shared: an app may call receive() from more than one task.
        inbox: SharedInbox[tuple[Message, bool]] = SharedInbox(node.loop)
        self.inbox = inbox
        events = envelope.events
        for event in events:
            inbox.put_nowait((event, False))
        piece = self.piece = envelope.piece  # the largest body piece the distributor reads
        # A WebSocket's credit counts bytes when its distributor announced a unit: then this
        # side counts its own way too, and says so in the ACK (``wire.CREDIT_UNIT``).
        unit = envelope.unit if kind == "websocket" else 0
        self.window = wire.SendWindow(envelope.window, unit, piece)
        # No events: the client waits for "100 Continue", given when the app asks for the body.
        self.awaiting_body = kind == "http" and not events
        if kind == "http" and events and not events[-1].get("more_body", False):
            self.received = wire.ReceiveWindow(1)  # the body came whole: nothing more to flow
        elif kind == "http" and self.version != codec.RELEASED:
            self.received = node.credit_pool.window(self._grant_later)  # large pieces if room
        else:
            # A distributor of the first release sends 128 KiB pieces; a WebSocket, long-lived
            # and seldom bulky, must not hold the room for large pieces (CreditPool.window).
            pool = node.credit_pool
            self.received = wire.ReceiveWindow(pool.open(), pool, self._grant_later)
            if unit:
                self.received.count_units(wire.CREDIT_UNIT)
        # Response body chunks smaller than a piece, joined into one piece (at most ``piece``
        # bytes) that leaves at the end of the loop turn, or once credit comes if none is
        # left: an app sending small chunks costs a message (and a credit) per piece, not
        # per chunk. ``_flushing``: the app's task waits for credit to send it itself.
        self.gathered: list[bytes] = []
        if unit:  # a WebSocket's SENDs of the usual shape are written straight
            self._data = wire.WebSocketData(self.id, self.version)
        self._ack_send = envelope.ack_send  # the distributor reads ACK_SEND
        if envelope.link:
            self._link_offer = envelope.link
            self._heartbeat = envelope.liveness if envelope.liveness > 0 else 1.0
            if kind == "http" and (not events or events[-1].get("more_body", False)):
                self.upload_mode = 1
        if confirm:  # in the recovery window (``confirmation``)
            self.confirmation = asyncio.get_running_loop().create_future()

    def confirm(self, confirmed: bool) -> None:
        """The distributor's answer to an ACK that asked for it (or the end of the wait)."""
        if self.confirmation is not None and not self.confirmation.done():
            self.confirmation.set_result(confirmed)

    def begin(self) -> None:
        """Ack the request, before its app runs. The rest of the run is in
        ``Node._run_request``, the request's own task (``task``), rather than in a coroutine
        of the job's (one coroutine less per request): it waits for a confirmation if one
        was asked (``wait_confirmed``), awaits the app, tells the distributor an end the
        response did not (``app_ended``, ``app_failed``) and posts an ACK no SEND took along
        (``ack_alone``). The ACK is posted, not awaited: the app runs at once. A request
        whose body came whole lets its ACK wait a moment for the response, to share its
        PUBLISH (``unsent_ack``); the others need the credit and the Node channel the ACK
        brings at once (a body to stream, a WebSocket, 100-continue). A count of 0 (the
        distributor is gone) disconnects the app, as a client gone would."""
        node = self.node
        received = self.received
        window = received.window
        ack = node._acks.get(window) or node._ack_args(window)
        hold = window == 1 and self.kind == "http" and not self.awaiting_body
        if self.confirmation is not None:
            ack += (True,)  # and no holding: nothing runs before the answer
            hold = False
        if received.piece != wire.CHUNK_SIZE or received.unit:
            if self.confirmation is None:
                ack += (False,)  # the fourth argument: no confirmation asked
            ack += (received.piece,)  # the fifth: the distributor may send pieces this large
            if received.unit:
                ack += (received.unit,)  # the sixth: its credit counts in these units
        self._ack = ack
        if hold and self._ack_send:
            # Not posted yet: the app's first SEND, if it comes in this loop turn, carries it
            # (one message to encode, decode and dispatch instead of two); else it leaves
            # alone at the end of the turn, before anything else this job posts (``_post``).
            self.unsent_ack = ack
            node.hold_start(self)  # the end of the turn: turn_ended
        else:
            self._post_ack(ack, hold=hold)
        self.acked = True

    async def app_failed(self) -> None:
        """The app raised (called from the ``except`` that caught it): logged, and the
        distributor told (``app_ended``)."""
        logger.exception(
            "exception in ASGI app for %s %s", self.scope.get("method", ""), self.scope["path"]
        )
        self.failed = True
        await self.app_ended(failed=True)

    def _post_ack(self, ack: tuple[Any, ...], *, hold: bool) -> None:
        self._ack_posted = self.node.outbox.post(
            self.reply,
            wire.pack(wire.ACK, self.id, *ack, version=self.version),
            hold=hold,
            lost=self._check_reached,
        )

    def repeat_ack_unless_known(self) -> None:
        """Before the GONE of a request whose app ran: post its ACK again if the batch that
        carried it reached nobody. A GONE with no ACK ahead tells the distributor the
        request never ran, and it answers its client "no worker", which a client may take as
        safe to retry; after the ACK, the GONE makes a 502. A repeat of an ACK the distributor
        did get is ignored there. (A request that asked for a confirmation ran only once its
        distributor had the ACK.)"""
        ack, posted = self._ack, self._ack_posted
        if ack is None or posted is None or not self.app_started or self.confirmation is not None:
            return
        # Still on its way, it leaves ahead of the GONE (in order, on one connection; lost,
        # the GONE behind it is too).
        if not posted.done() or (
            not posted.cancelled() and posted.exception() is None and posted.result() > 0
        ):
            return
        self._post_ack(ack, hold=False)

    def ack_alone(self) -> None:
        """Post the ACK if it still waits: no SEND took it along in the loop turn the app
        started in. Held, as it is when it never waited, for a SEND that may yet join it.
        A start the app sent meanwhile is then sent too unless a body takes it along (its
        own end-of-turn check: ``turn_ended`` does one or the other)."""
        ack = self.unsent_ack
        if ack is not None:
            self.unsent_ack = None
            self._post_ack(ack, hold=True)
            self._flush_start()

    async def wait_confirmed(self) -> bool:
        """Wait for the distributor to confirm the request: CONFIRM, or a PING naming it. A
        CANCEL cancels the job, a lost distributor ends the wait (``peer_lost``), and nothing
        at all within ``peer_timeout`` counts as a refusal."""
        assert self.confirmation is not None
        try:
            confirmed = await asyncio.wait_for(self.confirmation, self.node.peer_timeout)
        except asyncio.TimeoutError:
            confirmed = False
            self.why = self.why or "no confirmation from the distributor"
        if not confirmed:
            logger.info("request %s dropped unrun: %s", self.id, self.why or "not confirmed")
            self.gone = True
        return confirmed

    async def app_ended(self, *, failed: bool) -> None:
        """Tell the distributor the app ended without its response all sent, if so."""
        if not self.finished and not self.gone:
            self.complete = True
            self.held_start = None  # a start no body followed: DONE tells all there is
            if self.gathered:
                await self._wait_to_send()
                try:
                    await self._flush_gathered()
                finally:
                    self._end_send()
                if self.gone:
                    return
            if await self._publish(wire.DONE, failed):
                self.finished = True

    def _grant_later(self, credit: int) -> None:
        """Credit owed since the pool was full, now that it has room."""
        if not self.gone:
            self._post(wire.CREDIT, credit, lost=self._check_reached)

    def _check_reached(self, posted: asyncio.Future[int]) -> None:
        """A callback on a message not awaited: disconnect the app if nobody got it."""
        if posted.cancelled() or posted.exception() is not None or posted.result() == 0:
            self.peer_lost("the distributor is gone")

    def _end_lost(self, posted: asyncio.Future[int]) -> None:
        """A callback on a response's last message: if nobody got it (the link to Redis lost
        on the way, say), the distributor, whose client waits for that end, is told the
        request is gone. Its PING would find that out only once the app is over: an app
        working on after its response (background tasks) would hold the client that long.
        Told straight from the PUBLISH's reply (``Outbox.post``), it costs no loop callback:
        it watches the count after the request has ended too (a distributor that pings would
        find a lost end by its next PING; one that does not, only by this)."""
        if not posted.cancelled() and posted.exception() is None and posted.result() != 0:
            return
        if self.node._jobs.get(self.id) is self:
            # Still running: disconnected and cancelled as for any message lost, and its end
            # tells the distributor (``_run_request``).
            self.finished = False
            self.peer_lost("the distributor did not get the end of the response")
        else:
            self.repeat_ack_unless_known()
            self.node._tell_gone(
                self.reply, self.id, "the end of the response was lost", self.version
            )

    def _post(self, kind: str, *args: Any, lost: Lost | None = None) -> asyncio.Future[int]:
        """Queue one message to the distributor; the future gives the receiver count, and
        ``lost`` is told if nobody got it (``Outbox.post``)."""
        if self.unsent_ack is not None:
            return self._post_after_ack(kind, args, lost)
        return self.node.outbox.post(self.reply, self._pack(kind, *args), lost=lost)

    def _pack(self, kind: str, *args: Any) -> wire.Packed:
        """One message to the distributor, encoded (``ValueError`` if it is too large)."""
        if kind == wire.SEND:  # the usual response written straight (``wire.pack_response``)
            data = wire.pack_response(kind, self.id, *args, version=self.version)
            return self._bounded(kind, data, args[0])
        return self._bounded(kind, wire.pack_parts(kind, self.id, *args, version=self.version), ())

    def _pack_send(self, events: list[Message]) -> wire.Packed:
        """``_pack`` of a SEND: a WebSocket's of the usual shape written straight."""
        data = self._data
        if data is None:
            return self._pack(wire.SEND, events)
        return self._bounded(wire.SEND, data.send(events), events)

    def _bounded(self, kind: str, data: wire.Packed, events: Sequence[Message]) -> wire.Packed:
        """``data``, or ``ValueError`` if it is too large to send (``_fits``)."""
        if type(data) is bytes and len(data) <= _FITS:  # small: it fits, whatever it carries
            return data
        if not self._fits(data, events):
            # The distributor would drop it as malformed and wait forever: fail the app here.
            raise ValueError(
                f"a {kind} message of {wire.packed_size(data)} bytes is over the limit of "
                f"{self.max_message}, or its response headers over "
                f"{wire.EARLIER_MAX_MESSAGE_SIZE} (response headers too large?)"
            )
        return data

    @property
    def max_message(self) -> int:
        """The largest message the distributor reads (asked only of a large message)."""
        return wire.message_limit(self.piece)

    def _fits(self, data: wire.Packed, events: Sequence[Message]) -> bool:
        """Whether a message carrying ``events`` may travel: within what every distributor
        reads, or else within what this one reads (``max_message``: more only while it
        announced large pieces) with everything but response body bytes still within the
        former. So whether a response's headers travel never depends on the piece size its
        distributor announced, which its load decides (``wire.CreditPool.window``)."""
        size = wire.packed_size(data)
        if size <= _FITS:
            return True
        if not any(e.get("type") in _HEADERS for e in events):
            return self._size_fits(size, None)
        body = sum(len(e["body"]) for e in events if e.get("type") == "http.response.body")
        return self._size_fits(size, size - body)

    def _size_fits(self, size: int, head: int | None) -> bool:
        """``_fits`` told by sizes: a message of ``size`` bytes, of which ``head`` are not
        response body bytes when it carries headers (None when it carries none). The one
        rule for both ways of telling it (``_fits`` from the events, ``_post_written``
        from a start and a body)."""
        if size <= _FITS:
            return True
        if size > self.max_message:
            return False
        return head is None or head <= _FITS

    def _post_after_ack(
        self, kind: str, args: tuple[Any, ...], lost: Lost | None
    ) -> asyncio.Future[int]:
        """``_post`` of the first message after an ACK that waits (``begin``): a SEND carries
        it (``wire.ACK_SEND``); anything else, or a SEND too large to, follows it."""
        ack = self.unsent_ack
        assert ack is not None
        self.unsent_ack = None
        if kind == wire.SEND:
            data = wire.pack_response(wire.ACK_SEND, self.id, args[0], ack, version=self.version)
            # A small message fits whatever it carries: no call to tell (``_fits``).
            if (type(data) is bytes and len(data) <= _FITS) or self._fits(data, args[0]):
                return self._post_with_ack(data, lost)
        self._post_ack(ack, hold=False)
        return self._post(kind, *args, lost=lost)

    def _post_with_ack(self, data: wire.Packed, lost: Lost | None) -> asyncio.Future[int]:
        """Post ``data``, an ACK_SEND carrying the ACK that waited: posted from now on, and
        known by its batch (``_ack_posted``, which ``repeat_ack_unless_known`` reads). Both
        ways of writing one (``_post_after_ack``, ``_post_written``) end here."""
        self.unsent_ack = None
        posted = self._ack_posted = self.node.outbox.post(self.reply, data, lost=lost)
        return posted

    def _post_credit(self, credit: int) -> None:
        """``_post`` of a CREDIT, each value encoded once per request (``wire.CreditMessages``).
        A credit that gets lost would stall the transfer for good: nobody getting it
        disconnects the app (``_check_reached``)."""
        if self.unsent_ack is not None:  # (a whole request's body takes no credit back)
            self.ack_alone()
        credits = self._credits
        if credits is None:
            credits = self._credits = wire.CreditMessages(self.id, self.version)
        self.node.outbox.post(self.reply, credits.pack(credit), lost=self._check_reached)

    async def _publish(self, kind: str, *args: Any) -> bool:
        """Publish one message to the distributor; False (and disconnect) if nobody got it."""
        if await self._post(kind, *args) == 0:
            self.peer_lost("the distributor is gone")
            return False
        return True

    def deliver(self, event: Message, size: int = 0) -> None:
        """An event from the distributor (client body, client disconnect), which came in a
        message of ``size`` bytes."""
        if event.get("type") in ("http.disconnect", "websocket.disconnect"):
            if self.told:
                return  # one is all the app needs; repeats (forged, uncounted) would pile up
            self.gone = self.told = True
            self.window.abort(_Disconnected())
            self.inbox.put_nowait((event, False))  # sent without credit
            return
        if not self.received.arrived(size):
            self.cancel("the distributor sent more than the credit granted")
            return
        self.inbox.put_nowait((event, True))

    def peer_lost(self, why: str) -> None:
        """The distributor can no longer be reached: disconnect the app, then cancel it."""
        if self.gone or self.finished:
            return
        logger.warning("request %s: %s", self.id, why)
        self.gone = True
        self.why = why
        self.confirm(False)
        self.window.abort(_Disconnected())
        if self.link is not None:
            self.link.abort()
        if self.upload_mode:
            self.drop_upload()
        self._wake_receive(1006)
        if self.task is not None:
            asyncio.get_running_loop().call_later(_DISCONNECT_GRACE, self._cancel_task)

    def stop_sending(self, why: str) -> None:
        """The distributor gave the request up once the app had sent its whole response: drop
        what still waits for credit (the app's send returns, as an ASGI server's does once
        its client is gone) and let the app, which may have work after its response, run on.
        Cancelling it instead would race the last publish: a CANCEL answering a PING can
        arrive just before a response that got through is marked ``finished``."""
        if self.gone or self.finished:
            return
        logger.info("request %s: %s", self.id, why)
        self.gone = True
        self.why = why
        self.window.abort(_Disconnected())
        if self.link is not None:
            self.link.abort()
        self._wake_receive(1000)

    async def close_for_stop(self) -> None:
        """The Node stops: close this accepted WebSocket with 1012 (Service Restart) and have
        its app's ``receive()`` answer ``websocket.disconnect`` with that code, as uvicorn
        does to its own WebSockets at shutdown; a ``send()`` after raises ``WebSocketClosed``,
        as once a client is gone. The close waits its turn behind a message the app is sending (and
        for credit, as any message): a client that reads nothing gets it no sooner than the
        app's messages, and the drain's end cancels its job as any other.

        It lets no ``WebSocketClosed`` out: it runs in a task nobody reads (the drain's, or
        one spawned as a socket is accepted), whose exception asyncio would log at ERROR. A
        socket closed while the close waited its turn (its job cancelled at the drain's end,
        its client gone, its app's own close sent first) leaves nothing to close."""
        if self.complete or self.gone:
            return
        self.stopped = True
        self._disconnect_code = 1012
        with contextlib.suppress(WebSocketClosed):
            await self.send({"type": "websocket.close", "code": 1012})

    def _wake_receive(self, code: int) -> None:
        """Make a receive() waiting now, and every later one, return a disconnect."""
        disconnect: Message = {"type": "http.disconnect"}
        if self.kind == "websocket":
            disconnect = {"type": "websocket.disconnect", "code": code}
        self.inbox.put_nowait((disconnect, False))

    def cancel(self, why: str) -> None:
        """Stop the app now."""
        if not self.gone:
            logger.info("request %s: %s", self.id, why)
            self.gone = True
            self.why = why
            self.window.abort(_Disconnected())
            if self.link is not None:
                self.link.abort()
            if self.upload_mode:
                self.drop_upload()
        self._cancel_task()

    def _cancel_task(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def receive(self) -> Message:
        """The app's ``receive``."""
        if self.awaiting_body:
            self.awaiting_body = False
            if not self.gone:  # the distributor now reads the body
                self._post(wire.CONTINUE, lost=self._check_reached)
        if self.upload_mode:
            if self.upload_mode == 1:
                if _declared_size(self.scope) < link.UPLOAD_FROM:
                    self.upload_mode = 0  # a small body: not worth a connection
                else:
                    self.upload_mode = 2
                    self._uplink_opening = asyncio.ensure_future(self._open_upload())
            elif self.upload_mode == 3:
                return await self._receive_uploaded()
        while True:
            if self.disconnect is not None and (self.inbox.empty() or self.kind == "websocket"):
                return self.disconnect  # as uvicorn: once disconnected, always disconnected
            inbox = self.inbox
            # Taken at once when there (a whole body came in the envelope): no coroutine.
            event, counted = await inbox.get() if inbox.empty() else inbox.get_nowait()
            if counted:
                credit = self.received.consumed()
                if credit and not self.gone:
                    self._post_credit(credit)
            kind = event.get("type")
            if kind in ("http.disconnect", "websocket.disconnect"):
                self.disconnect = event
                return event
            if kind != "websocket.receive":
                if self.upload_mode and kind == "http.request":
                    if event.get("link") is True:  # the marker: the rest is on the link
                        self.upload_mode = 3
                        return await self._receive_uploaded()
                    if not event.get("more_body", False):  # all of it came through Redis
                        self.drop_upload()
                return event
            pieces = self.pieces
            if pieces is None:
                pieces = self.pieces = wire.Reassembler(wire.MAX_WEBSOCKET_MESSAGE)
            try:
                whole = pieces.add(dict(event))
            except wire.WireError as exc:
                logger.warning("request %s: refused a WebSocket message: %s", self.id, exc)
                await self.send({"type": "websocket.close", "code": 1009})
                self.disconnect = {"type": "websocket.disconnect", "code": 1009}
                return self.disconnect
            if whole is not None:
                return whole

    async def send(self, message: Message) -> None:
        """The app's ``send``."""
        if self._sending is None and not self._in_send:
            self._in_send = True  # the usual case: no other task is sending
        else:
            await self._wait_to_send()
        # The message is handled here rather than in a coroutine of its own: a coroutine
        # per message less (a start never waits at all).
        try:
            if self.gone:
                if self.kind == "websocket":
                    raise WebSocketClosed(f"the WebSocket of request {self.id} is closed")
                return  # as uvicorn does once the client is gone
            kind = message["type"]
            if self.complete:
                if self.stopped:  # closed by the Node's stop, as once the client is gone
                    raise WebSocketClosed(f"the WebSocket of request {self.id} is closed")
                raise RuntimeError(f"{kind} sent after the response completed")
            if kind == "http.response.start":
                if self.response_started:
                    raise RuntimeError("http.response.start sent twice")
                self.response_started = True
                status = message.get("status")
                self.status = status if type(status) is int else 0
                self.trailers = bool(message.get("trailers", False)) and self._offers(
                    "http.response.trailers"
                )
                # Held to travel with the first body in one PUBLISH, but only for this loop turn:
                # an app that works before its first body must not keep the client from its
                # headers (EventSource.onopen, long polls, progress indicators).
                self.held_start = dict(message)
                if self.unsent_ack is None:  # else the job is held for this turn already
                    self.node.hold_start(self)
                return
            if kind == "http.response.body":
                if not self.response_started:
                    raise RuntimeError("http.response.body sent before http.response.start")
                if self.body_done:  # only possible while announced trailers are awaited
                    raise RuntimeError("http.response.body sent after the last body")
                body = message.get("body", b"")
                if type(body) is not bytes:  # bytes as they are: no call for them
                    body = bytes(body)
                more = message.get("more_body", False)
                if more is not True and more is not False:
                    more = bool(more)
                self.body_done = not more
                # With trailers announced, the response completes with its last trailers.
                complete = self.complete = not more and not self.trailers
                if self.link is not None:
                    await self._send_on_link(body, more)
                    return
                if more and self._link_offer and not self.trailers:
                    # The first body with more to come goes through Redis (a small response
                    # never pays for a link); the next ones on the link, if it opens.
                    if not self._streamed:
                        self._streamed = True
                    elif not self._link_tried and await self._open_link():
                        await self._send_on_link(body, more)
                        return
                size = self.piece
                if len(body) <= size:  # one piece, nearly always
                    if not self._publish_at_once(body, more, complete):
                        event = {"type": kind, "body": body, "more_body": more}
                        await self._publish_events([event], last=complete)
                    return
                view = memoryview(body)  # views: the pieces are copied once, into the message
                pieces = [view[i : i + size] for i in range(0, len(body), size)]
                for index, piece in enumerate(pieces):
                    last_body = not more and index == len(pieces) - 1
                    event = {"type": kind, "body": piece, "more_body": not last_body}
                    await self._publish_events([event], last=last_body and not self.trailers)
                return
            self._check_sendable(kind)
            if kind == "http.response.trailers":
                last = not message.get("more_trailers", False)
                self.complete = last
                await self._publish_events([dict(message)], last=last)
                return
            last = kind == "websocket.close" or (
                kind == "websocket.http.response.body" and not message.get("more_body", False)
            )
            self.complete = last
            if kind == "websocket.send":
                for part in wire.split_message(dict(message), self.window.piece):
                    await self._publish_events([part], last=False)
                return
            if kind == "websocket.accept":  # after the usual message: no test for it there
                self.accepted = True
                if self.node._draining:  # accepted while the Node stops: closed as the rest
                    self.node.spawn(self.close_for_stop())  # once this send is over
            await self._publish_events([dict(message)], last=last)
        finally:
            sending = self._sending  # _end_send, inline: no call per message
            if sending is None:
                self._in_send = False
            else:
                sending.release()

    async def _open_link(self) -> bool:
        """Open a link to the distributor (bounded: ``link.open_link``) and tell it, through
        Redis, that the body continues there. False, with nothing sent, when the offer is
        not one, its address failed lately, or it cannot be opened now: the body goes on
        through Redis."""
        self._link_tried = True
        node = self.node
        offer = link.parse_offer(self._link_offer)
        if offer is None:
            return False
        host, port, token = offer
        address = f"{host}:{port}"
        if node.link_unreachable(address):
            node.metrics.link_fallbacks.inc()
            return False
        try:
            writer = await link.open_link(host, port, token, self.id, heartbeat=self._heartbeat)
        except link.LinkRefused as exc:
            # The listener is there and refused this one link (its limits, a reset): this
            # body goes through Redis, the next response tries again (the listener logs it).
            logger.debug("request %s: the distributor refused its link: %s", self.id, exc)
            node.metrics.link_fallbacks.inc()
            return False
        except (OSError, asyncio.TimeoutError, link.LinkError) as exc:
            logger.warning(
                "request %s: cannot open the link to the distributor at %s (%s); bodies to "
                "it go through Redis for %g s",
                self.id,
                address,
                exc or type(exc).__name__,
                link.UNREACHABLE_FOR,
            )
            node.remember_unreachable(address)
            node.metrics.link_fallbacks.inc()
            return False
        if self.gone:
            writer.abort()
            return False
        self.link = writer
        node.metrics.links.inc()
        marker = {"type": "http.response.body", "body": b"", "more_body": True, "link": True}
        await self._publish_events([marker], last=False)
        return True

    async def _open_upload(self) -> None:
        """Open an upload link (bounded: ``link.open_upload``), kept as ``uplink`` for the
        distributor's marker. Nothing if the offer is not one, its address failed lately, or
        the link cannot be opened: the body goes on through Redis."""
        node = self.node
        offer = link.parse_offer(self._link_offer)
        if offer is None:
            return
        host, port, token = offer
        address = f"{host}:{port}"
        if node.link_unreachable(address):
            node.metrics.upload_fallbacks.inc()
            return
        try:
            receiver = await link.open_upload(host, port, token, self.id)
        except link.LinkRefused as exc:
            # Refused (its limits, a request whose body is complete, an older distributor
            # that takes no upload link): this body goes through Redis.
            logger.debug("request %s: the distributor refused its upload link: %s", self.id, exc)
            node.metrics.upload_fallbacks.inc()
            return
        except (OSError, asyncio.TimeoutError, link.LinkError) as exc:
            logger.warning(
                "request %s: cannot open the upload link to the distributor at %s (%s); "
                "bodies to and from it go through Redis for %g s",
                self.id,
                address,
                exc or type(exc).__name__,
                link.UNREACHABLE_FOR,
            )
            node.remember_unreachable(address)
            node.metrics.upload_fallbacks.inc()
            return
        if self.gone or self.upload_mode < 2:  # ended meanwhile, or the body came whole
            receiver.abort()
            return
        self.uplink = receiver
        node.metrics.upload_links.inc()

    async def _receive_uploaded(self) -> Message:
        """The body's next piece from the upload link (after the marker). A link that breaks,
        is silent past ``peer_timeout`` (the distributor beats while its client pauses) or
        sends a malformed frame is dropped, and the app sees a disconnect; the distributor,
        seeing it break, fails the request."""
        if self.disconnect is not None:
            return self.disconnect
        opening = self._uplink_opening
        if self.uplink is None and opening is not None and not opening.done():
            # The marker can overtake the handshake's answer: the link is taken already.
            await asyncio.wait((opening,))  # bounded (``link.CONNECT_TIMEOUT``)
        uplink = self.uplink
        if uplink is None or self.gone:
            return self._upload_failed("a link marker for an upload link it does not have")
        silence = max(self.node.peer_timeout, 2 * self._heartbeat)
        try:
            body, more = await uplink.read(silence)
        except asyncio.TimeoutError:
            return self._upload_failed(f"nothing heard on its upload link for {silence:g} s")
        except (OSError, EOFError, link.LinkError) as exc:
            return self._upload_failed(f"its upload link broke ({exc or type(exc).__name__})")
        self.node.metrics.upload_bytes.inc((), len(body))
        if not more:
            self.drop_upload(abort=False)
        return {"type": "http.request", "body": body, "more_body": more}

    def _upload_failed(self, why: str) -> Message:
        if not self.gone:
            logger.warning("request %s: %s", self.id, why)
        self.drop_upload(abort=True)
        self.disconnect = {"type": "http.disconnect"}
        return self.disconnect

    def drop_upload(self, *, abort: bool = True) -> None:
        """Close the upload link (after its last frame: ``abort=False``), or stop opening it."""
        self.upload_mode = 0
        opening = self._uplink_opening
        if opening is not None and not opening.done():
            opening.cancel()
        uplink, self.uplink = self.uplink, None
        if uplink is not None:
            if uplink.ended and not abort:
                uplink.close()
            else:
                uplink.abort()

    async def end_upload(self) -> None:
        """The app ended with its upload link open, its body not all read: tell the
        distributor (``link.UploadReceiver.finish``, bounded) before closing it. A link being
        opened is waited for (bounded: ``link.CONNECT_TIMEOUT``): the distributor may have taken
        it already, and would take its abort for a break."""
        opening = self._uplink_opening
        if opening is not None and not opening.done() and not self.gone:
            await asyncio.wait((opening,))
        uplink = self.uplink
        if uplink is None or uplink.ended or self.gone:
            self.drop_upload(abort=uplink is None or not uplink.ended)
            return
        self.upload_mode = 0
        await uplink.finish()
        self.drop_upload()

    async def _send_on_link(self, body: bytes, more: bool) -> None:
        """Write a body on the link; its last one ends the response (no trailers here)."""
        writer = self.link
        assert writer is not None
        if self.gone:
            writer.abort()
            return
        try:
            await writer.send(body, more)
        except (ConnectionError, OSError) as exc:
            writer.abort()
            self.stop_sending(f"its link to the distributor broke ({exc or type(exc).__name__})")
            return
        self.node.metrics.link_bytes.inc((), len(body))
        if not more:
            writer.close()
            self._response_sent()

    async def _wait_to_send(self) -> None:
        """Wait for the turn to send, taken once this returns (give it back: ``_end_send``)."""
        sending = self._sending
        if sending is None:
            sending = self._sending = Mutex()
            if self._in_send:
                sending.try_acquire()  # for the sender inside, who releases it at its end
        if not sending.try_acquire():
            await sending.acquire()

    def _end_send(self) -> None:
        """Give the turn to send back (to the task waiting longest, if any)."""
        sending = self._sending
        if sending is None:
            self._in_send = False
        else:
            sending.release()

    def _offers(self, extension: str) -> bool:
        extensions = self.scope.get("extensions")
        return isinstance(extensions, dict) and extension in extensions

    def _check_sendable(self, kind: str) -> None:
        """Refuse, as an ASGI server does, a message this scope does not allow: an extension
        not offered (the app's scope has only those that travel), or out of order."""
        if self.kind == "websocket":
            if kind in ("websocket.accept", "websocket.send", "websocket.close"):
                return
            if kind.startswith("websocket.http.response.") and self._offers(
                "websocket.http.response"
            ):
                return
        elif kind == "http.response.trailers" and self.trailers:
            if not self.body_done:
                raise RuntimeError("http.response.trailers sent before the last body")
            return
        elif kind == "http.response.early_hint" and self._offers("http.response.early_hint"):
            if self.response_started:
                raise RuntimeError("http.response.early_hint sent after http.response.start")
            return
        raise RuntimeError(f"unexpected ASGI message {kind!r} for this {self.kind} scope")

    def turn_ended(self) -> None:
        """The end of the loop turn this job held its ACK or its start in (``hold_start``)."""
        if self.unsent_ack is not None:
            self.ack_alone()  # and the start with it, unless a body took it along
        else:
            self._flush_start()

    def _flush_start(self) -> None:
        """A loop turn after the start: send it now if no body took it along."""
        if self.held_start is not None and not self.gone:
            self.node.spawn(self._send_held_start())

    async def _send_held_start(self) -> None:
        await self._wait_to_send()  # after whatever the app is sending now, never amid it
        try:
            if self.held_start is not None and not self.gone and not self.complete:
                await self._publish_events([], last=False)
        finally:
            self._end_send()

    async def _publish_events(self, events: list[Message], *, last: bool) -> None:
        if self.held_start is not None:
            events.insert(0, self.held_start)
            self.held_start = None
        elif not last and self._gatherable(events):
            body = events[0]["body"]
            if self._gathered_size + len(body) > self.piece:
                await self._flush_gathered()  # a piece is full: wait for credit for it
                if self.gone:
                    return
            self.gathered.append(body)
            self._gathered_size += len(body)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                assert self.node.loop is not None
                self.node.loop.call_soon(self._end_of_turn)
            return
        if self.gathered:
            await self._flush_gathered()
        window = self.window
        message: wire.Packed | None = None
        cost = 1
        if window.unit:
            # Encoded first: counting bytes (a WebSocket's credit unit), its size is its cost.
            message = self._pack_send(events)
            cost = window.cost(wire.packed_size(message))
        if not window.try_take(cost):
            try:
                await window.acquire(cost)
            except _Disconnected:
                return
        if self.gone:
            return
        # Pipelined within the window: the count is checked when the reply comes, by the code
        # that reads it, once per batch for all of its messages (the last one's too: below).
        lost = self._end_lost if last else self._check_reached
        if message is None:
            if not self._post_send(events, lost):  # the start went alone: then the body
                if not window.try_take(1):
                    try:
                        await window.acquire(1)
                    except _Disconnected:
                        return
                if self.gone:
                    return
                self._post(wire.SEND, events[1:], lost=lost)
        else:  # a WebSocket's: its ACK never waits (``begin``), so it has left already
            self.node.outbox.post(self.reply, message, lost=lost)
        if last:
            self._response_sent()

    def _publish_at_once(self, body: bytes, more: bool, last: bool) -> bool:
        """``_publish_events`` of a body of one piece (``body``, ``more``) without its
        coroutine (about a thousand instructions per response), when nothing in it can wait:
        no gathered chunks to send first, not a chunk to gather, not a WebSocket's, and the
        credit there (two with a start held: one for the start alone, should the two be
        too large to travel together). True when done; False, having done nothing, when
        the caller must await ``_publish_events``."""
        window = self.window
        held = self.held_start
        if held is None:
            if not last or self.gathered or window.unit or not window.try_take(1):
                return False
        else:
            # (A start held means nothing gathered yet, and an HTTP response's window.)
            if window.available < 2 or not window.try_take(1):
                return False
            self.held_start = None
        # (Not gone: ``send`` looked, and nothing since could have waited.)
        lost = self._end_lost if last else self._check_reached
        if not self._post_written(held, body, more, lost):
            event: Message = {"type": "http.response.body", "body": body, "more_body": more}
            events = [event] if held is None else [held, event]
            if not self._post_send(events, lost):
                # The start went alone: the body on the second credit, there still unless
                # the distributor was lost meanwhile (the window aborted, the job gone).
                if not window.try_take(1) or self.gone:
                    return True
                self._post(wire.SEND, events[1:], lost=lost)
        if last:
            self._response_sent()
        return True

    def _post_send(self, events: list[Message], lost: Lost) -> bool:
        """``_post`` of a SEND of ``events`` on the credit taken for it; False when its start
        was too large to travel with its first body (large headers, a large piece, a
        distributor that reads less) and went alone rather than failing the response: the
        caller then posts ``events[1:]`` on a credit of its own (the distributor counts every
        SEND). ``ValueError`` if the start alone is still too large."""
        try:
            self._post(wire.SEND, events, lost=lost)  # may carry the ACK (ACK_SEND)
        except ValueError:
            if len(events) < 2 or events[0].get("type") != "http.response.start":
                raise
            self._post(wire.SEND, events[:1], lost=lost)
            return False
        return True

    def _post_written(self, start: Message | None, body: bytes, more: bool, lost: Lost) -> bool:
        """``_post`` of the usual response's SEND (``start``, if any, and one body piece),
        carrying the ACK if it waits, written straight from the body and its flag
        (``wire.write_response``: no body event made, nor its keys checked). False, having
        posted nothing, when the writer declines it or ``_fits`` would refuse it: ``_post``
        decides then."""
        ack = self.unsent_ack
        if ack is None:
            data = wire.write_response(wire.SEND, self.id, start, body, more, version=self.version)
        else:
            data = wire.write_response(
                wire.ACK_SEND, self.id, start, body, more, ack, version=self.version
            )
        if data is None:
            return False
        # What ``_fits`` allows, told without the events (``_size_fits``). Anything else goes
        # to ``_post``, which splits a start too large to travel with its body.
        size = len(data) if type(data) is bytes else wire.packed_size(data)
        if size > _FITS and not self._size_fits(size, None if start is None else size - len(body)):
            return False
        if ack is None:
            self.node.outbox.post(self.reply, data, lost=lost)
        else:  # ``_post_with_ack``, inline
            self.unsent_ack = None
            self._ack_posted = self.node.outbox.post(self.reply, data, lost=lost)
        return True

    def _response_sent(self) -> None:
        """The response's last message is posted. It is not awaited: the app's send returns,
        and the request ends, in this loop turn, not in a turn of its own once the
        PUBLISH's reply is read. Its receiver count is checked all the same (``_end_lost``),
        straight from the PUBLISH's reply, whether the app runs on or the request has ended.

        Gone by now, the job is not finished: the message was lost as it left (Redis
        unreachable), and the outbox told ``_end_lost`` from within the post (the callers
        checked ``gone`` before posting), so the distributor is still to be told (a GONE at
        the job's end)."""
        if not self.gone:
            self.finished = True
            # uvicorn answers a disconnect once the response is over
            if self.kind == "websocket":
                self._wake_receive(self._disconnect_code)
                # Closed: what the client sent before the close reached it is moot, as under
                # uvicorn, whose receive() answers the disconnect from then on.
                self.disconnect = {"type": "websocket.disconnect", "code": self._disconnect_code}
            else:  # ``_wake_receive``'s HTTP disconnect, inline
                self.inbox.put_nowait(({"type": "http.disconnect"}, False))
        if self.node._turn_promised:
            self.node._end_turn()  # it leaves now, before the app's and the request's ends

    def _gatherable(self, events: list[Message]) -> bool:
        """A response body chunk, not the last, smaller than a piece."""
        if len(events) != 1:
            return False
        event = events[0]
        body = event.get("body")
        return (
            event.get("type") == "http.response.body"
            and type(body) is bytes
            and len(body) < self.piece
            and bool(event.get("more_body", False))
            and "link" not in event  # the link's marker travels alone
        )

    def _end_of_turn(self) -> None:
        self._flush_scheduled = False
        if self.gathered:
            self.send_gathered()

    async def _flush_gathered(self) -> None:
        """Send the gathered piece, waiting for credit (the turn to send taken first:
        ``_wait_to_send``)."""
        self._flushing = True
        try:
            await self.window.acquire()
        except _Disconnected:
            return
        finally:
            self._flushing = False
        self._post_gathered()

    def send_gathered(self) -> None:
        """Credit arrived: send the gathered piece now, unless the app's task is about to."""
        if self._flushing or self.gone or self.window.available <= 0:
            return
        self.window.available -= 1  # SendWindow.acquire, which cannot wait here
        self._post_gathered()

    def _post_gathered(self) -> None:
        # Not joined: the chunks travel as the parts of one bytes value (``codec.Gathered``),
        # copied once, by the socket's writev (a join here copied every byte a second time).
        # They are ``bytes`` (``_gatherable``): holding them until the write cannot change them.
        gathered = self.gathered
        body: bytes | codec.Gathered = (
            gathered[0] if len(gathered) == 1 else codec.Gathered(gathered)
        )
        self.gathered = []
        self._gathered_size = 0
        if self.gone:
            return
        event = {"type": "http.response.body", "body": body, "more_body": True}
        self._post(wire.SEND, [event], lost=self._check_reached)


_MAX_UNREACHABLE = 1024  # link addresses remembered as unreachable at most


def _local_scope(scope: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The scope as the app expects it: tuples where ASGI servers give tuples, own state.

    Made in place: ``scope`` is an envelope's, decoded for this request alone."""
    local = scope
    extensions = local.get("extensions")
    if isinstance(extensions, dict):
        # Only what travels (a distributor filters too): the app must never be offered an
        # extension this Node cannot honour end to end.
        local["extensions"] = {
            name: value for name, value in extensions.items() if name in wire.RELAYED_EXTENSIONS
        }
    headers = local.get("headers")
    if type(headers) is list:
        # One by one: for a request's few headers, a loop costs less than a map's machinery.
        pairs = []
        for pair in headers:
            if type(pair) is not list:  # not as decoded: only the pairs, whatever they are
                pairs = [tuple(pair) for pair in headers if isinstance(pair, (list, tuple))]
                break
            pairs.append(tuple(pair))
        local["headers"] = pairs
    client = local.get("client")
    if type(client) is list:
        local["client"] = tuple(client)
    server = local.get("server")
    if type(server) is list:
        local["server"] = tuple(server)
    local["state"] = dict(state)
    return local


def _declared_size(scope: dict[str, Any]) -> float:
    """The request body's size its ``content-length`` header declares; infinite if none (a
    chunked body) or unreadable."""
    try:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                return int(value)
    except (TypeError, ValueError):  # the app's to judge: only the link is not opened
        pass
    return float("inf")


def _unavailable(error: ReplyError) -> bool:
    """True for a command this server does not have, or this ACL user may not run."""
    return error.code == "NOPERM" or "unknown command" in str(error).lower()
