"""The front ASGI app: routes each connection to a Redis list and relays it to a Node.

Owns the distributor's two Redis connections (commands, and a subscriber on its own reply
channel), the table of exchanges in flight, and the answers it gives by itself: 404 (no
route), 400 (a refused key), 431 (headers too large), 413 (body too large), 503 (Redis
unreachable), the seed's "no worker" error (405 by default) and 502 (the Node died or messages
were lost). It never runs application code and never retries a request.

For each request it LPUSHes an envelope, waits ``worker_timeout`` for an ack, then relays the
Node's events to the ASGI server and the client's events to the Node, under credit-based flow
control in both directions. A request not acked in time is taken back from the list (LREM) when
still there, and refused by the Node by its deadline otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import accesslog, admission, codec, health, metrics, stats, wire
from .asgi import Message, Receive, Scope, Send
from .codec import CodecError
from .resp import RespError, Subscriber
from .resp.client import Client
from .resp.connection import make_params
from .routing import InvalidKey, RouteTable, check_key

__all__ = ["Distributor", "ResponseAborted", "create_distributor", "create_path_distributor"]

logger = logging.getLogger("minidasgi.distributor")

DEFAULT_MAX_BODY_SIZE = 1024**3
DEFAULT_MAX_HEADER_SIZE = 64 * 1024
_WATCH_AFTER = 0.05  # seconds before a whole request's client is watched for a disconnect


class ResponseAborted(Exception):
    """Raised to the ASGI server to abort a response that had already started."""


class _Signal:
    """A local event in an exchange's inbox, beside the messages from the Node."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_PEER_LOST = _Signal("peer lost")
_TOO_LARGE = _Signal("body too large")
_CLIENT_GONE = _Signal("client gone")
_NO_ACK = _Signal("no ack in time")


class Distributor:
    """An ASGI 3 app that hands every HTTP and WebSocket connection to a Node through Redis.

    ``routes`` maps regular expressions to key templates (see ``RouteTable``); ``key`` sends
    everything to one list. Redis is reached through ``url`` or ``host``/``port``/``db``/
    ``username``/``password``/``ssl``/``unix_socket``.

    ``worker_timeout``: seconds to wait for a Node to ack (the seed's 5 s); then the client gets
    ``no_worker_status`` (405, the seed's documented error; 503 is the usual choice for new
    deployments). ``response_timeout``: optional bound on the whole response after the ack.

    Operations (see ``admission``): ``fail_fast`` answers ``no_node_status`` (503) at once when
    no Node listens on the request's key, instead of after ``worker_timeout``; ``max_queue``
    bounds a queue's length (an int for every key, or a mapping from key to bound, ``"*"`` for
    the others) and ``max_in_flight`` the requests this process relays at once: over either,
    503 at once. These refusals carry ``Retry-After: retry_after``. ``ops_prefix`` (e.g.
    ``"/-/"``) answers ``healthz``, ``readyz`` and ``metrics`` under that path, never routed.
    ``access_log`` (``"text"`` or ``"json"``) logs a line per request on ``minidasgi.access``.
    """

    def __init__(
        self,
        routes: RouteTable | Mapping[Any, str] | Iterable[tuple[Any, str]] | None = None,
        *,
        key: str | None = None,
        url: str | None = None,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        username: str | None = None,
        password: str | None = None,
        ssl: Any = None,
        unix_socket: str | None = None,
        worker_timeout: float = 5.0,
        no_worker_status: int = 405,
        response_timeout: float | None = None,
        max_body_size: int | None = DEFAULT_MAX_BODY_SIZE,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        liveness_interval: float = 1.0,
        startup_wait: float = 2.0,
        channel_prefix: str = "minidasgi",
        parser: str | None = None,
        fail_fast: bool = False,
        no_node_status: int = 503,
        max_queue: int | Mapping[str, int | None] | None = None,
        max_in_flight: int | None = None,
        retry_after: int = 1,
        ops_prefix: str | None = None,
        access_log: str | None = None,
    ) -> None:
        if (routes is None) == (key is None):
            raise TypeError("give a distributor exactly one of routes= or key=")
        if key is not None:
            check_key(key)
            self.routes: RouteTable | None = None
            self.key: str | None = key
        else:
            assert routes is not None
            self.routes = routes if isinstance(routes, RouteTable) else RouteTable(routes)
            self.key = None
        self.params = make_params(
            url,
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            ssl=ssl,
            unix_socket=unix_socket,
        )
        self.worker_timeout = worker_timeout
        self.no_worker_status = no_worker_status
        self.response_timeout = response_timeout
        self.max_body_size = max_body_size
        self.max_header_size = max_header_size
        self.liveness_interval = liveness_interval
        self.startup_wait = startup_wait
        self.channel = wire.new_channel(channel_prefix, self.params.db, "dist")
        self.channel_prefix = channel_prefix
        self.no_node_status = no_node_status
        self.retry_after = retry_after
        self.admission = admission.Admission(
            channel_prefix=channel_prefix,
            db=self.params.db,
            fail_fast=fail_fast,
            max_queue=max_queue,
            max_in_flight=max_in_flight,
        )
        if ops_prefix is not None and not (ops_prefix.startswith("/") and ops_prefix.endswith("/")):
            raise ValueError(f"ops_prefix must start and end with '/', not {ops_prefix!r}")
        self.ops_prefix = ops_prefix
        self.access_log = None if access_log is None else accesslog.AccessLog(access_log)
        self.metrics = metrics.DistributorMetrics(
            in_flight=lambda: len(self._exchanges),
            redis_connected=lambda: self.ready,
            credit_pool=lambda: (self.credit_pool.in_flight, self.credit_pool.budget),
        )
        self._started_at = stats.process_started()
        self._parser = parser
        self._exchanges: dict[str, _Exchange] = {}
        self.credit_pool = wire.CreditPool()  # bounds what Nodes may have sent us unread
        self._client: Client | None = None
        self._subscriber: Subscriber | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<Distributor {self.params.address} exchanges={len(self._exchanges)}>"

    @property
    def ready(self) -> bool:
        """True while both Redis connections are up."""
        return bool(
            self._client is not None
            and self._client.connected
            and self._subscriber is not None
            and self._subscriber.connected
        )

    async def startup(self) -> None:
        """Connect to Redis (in the background) and wait up to ``startup_wait`` for it."""
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        self._client = Client(self.params, name="distributor", parser=self._parser)
        self._subscriber = Subscriber(
            params=self.params,
            on_message=self._on_message,
            on_connection_lost=self._on_subscriber_lost,
            parser=self._parser,
        )
        self._client.start()
        subscribing = asyncio.ensure_future(
            self._subscriber.subscribe(
                self.channel, wire.stats_channel(self.channel_prefix, self.params.db)
            )
        )
        self._background.add(subscribing)
        subscribing.add_done_callback(self._background.discard)
        self._monitor = asyncio.get_running_loop().create_task(self._watch_peers())
        try:
            await asyncio.wait_for(
                asyncio.gather(asyncio.shield(subscribing), self._client.wait_connected()),
                self.startup_wait,
            )
        except (asyncio.TimeoutError, RespError) as exc:
            logger.warning(
                "Redis at %s is not reachable yet (%s); answering 503 until it is",
                self.params.address,
                exc or "timed out",
            )

    async def shutdown(self) -> None:
        """Close the Redis connections; requests still in flight fail."""
        for exchange in list(self._exchanges.values()):
            exchange.inbox.put_nowait(_PEER_LOST)
        if self._monitor is not None:
            self._monitor.cancel()
        for task in list(self._background):
            task.cancel()
        if self._subscriber is not None:
            await self._subscriber.close()
        if self._client is not None:
            await self._client.close()
        self._starting = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind not in ("http", "websocket"):
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")
        if self.ops_prefix is not None and scope.get("path", "").startswith(self.ops_prefix):
            await self._operations(scope, receive, send)
            return
        if self._starting is None:
            await self.startup()
        started = time.monotonic()
        key = self._key_or_refusal(scope)
        if not isinstance(key, str):
            status, text = key
            await _refuse(scope, receive, send, status, text)
            if status == 503:
                self.metrics.refused(metrics.UNREACHABLE)
            self._finished(scope, None, None, status, started)
            return
        if self.admission.over_capacity(len(self._exchanges)):
            await self._refuse_for_now(scope, receive, send, "too many requests in flight\n")
            self.metrics.refused(metrics.IN_FLIGHT)
            self.admission.log_refusal(metrics.IN_FLIGHT, key)
            self._finished(scope, key, None, self.no_node_status, started)
            return
        exchange = _Exchange(self, key, scope, receive, send)
        self._exchanges[exchange.id] = exchange
        try:
            await exchange.run()
        finally:
            exchange.received.close()
            del self._exchanges[exchange.id]
            self._finished(scope, key, exchange, exchange.status, started)

    def _finished(
        self,
        scope: Scope,
        key: str | None,
        exchange: _Exchange | None,
        status: int,
        started: float,
    ) -> None:
        """Count a request at its end and write its access-log line."""
        end = time.monotonic()
        queue_wait = response = None
        if exchange is not None and exchange.acked_at:
            queue_wait = exchange.acked_at - exchange.pushed_at
            response = end - exchange.acked_at
        self.metrics.finished(key or "", status, queue_wait, response, end - started)
        log = self.access_log
        if log is not None and log.enabled():
            log.write(
                method=scope.get("method", "WEBSOCKET"),
                path=scope.get("path", ""),
                key=key,
                node=None if exchange is None else exchange.node,
                status=status,
                queue_wait=queue_wait,
                total=end - started,
            )

    async def _refuse_for_now(
        self, scope: Scope, receive: Receive | None, send: Send, text: str
    ) -> None:
        """A refusal the client may retry shortly: ``no_node_status`` with ``Retry-After``."""
        headers = [(b"retry-after", str(self.retry_after).encode())]
        await _refuse(scope, receive, send, self.no_node_status, text, headers=headers)

    async def _operations(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a probe or a scrape under ``ops_prefix``: never routed to a Node."""
        assert self.ops_prefix is not None
        if self._starting is None:  # a probe before any lifespan or request: connect now
            self.spawn(self.startup())
        name = scope.get("path", "")[len(self.ops_prefix) :]
        if scope["type"] != "http":
            await _refuse(scope, receive, send, 404, "")
            return
        await health.respond(send, name, ready=lambda: self.ready, registry=self.metrics.registry)

    def _answer_stats(self, request_id: str, args: list[Any]) -> None:
        reply = stats.reply_channel(self.channel_prefix, self.params.db, args)
        if reply is None:
            return
        refused = {k[0]: int(v) for k, v in self.metrics.refusals.values.items()}
        payload = stats.distributor_payload(
            channel=self.channel,
            in_flight=len(self._exchanges),
            served=self.metrics.served,
            refused=refused,
            started=self._started_at,
        )
        self.spawn(self.publish(reply, wire.pack(wire.STATS_REPLY, request_id, payload)))

    def _key_or_refusal(self, scope: Scope) -> str | tuple[int, str]:
        """The list for this request, or the answer to give without Redis."""
        path = scope.get("path", "")
        if self.routes is None:
            assert self.key is not None
            key = self.key
        else:
            try:
                found = self.routes.key_for(path)
            except InvalidKey as exc:
                return 400, f"{exc}\n"
            if found is None:
                return 404, f"no route for path {path[:200]!r}\n"
            key = found
        header_size = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
        if header_size > self.max_header_size:
            return 431, "request headers too large\n"
        if self.max_body_size is not None and scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                too_large = value.isdigit() and int(value) > self.max_body_size
                if too_large and name.lower() == b"content-length":
                    return 413, "request body too large\n"
        if not self.ready:
            return 503, "the request queue (Redis) is unreachable\n"
        return key

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def publish(self, channel: str, message: bytes) -> int:
        """PUBLISH for the exchanges; 0 when Redis is unreachable."""
        if self._client is None:
            return 0
        return await self._client.try_publish(channel, message)

    async def cancel_on(self, node: str, request_id: str) -> None:
        """Tell a Node to stop a request. Unlike other messages, a cancel outlives a lost
        connection: without it the Node's job could wait for credit forever, since the Node
        still sees this distributor alive. It is retried once Redis is reachable again."""
        message = wire.pack(wire.CANCEL, request_id)
        for _ in range(3):
            if self._client is None:
                return
            try:
                await self._client.wait_connected(self.startup_wait * 5)
                await self._client.publish(node, message)
                return
            except (RespError, asyncio.TimeoutError):
                await asyncio.sleep(0.1)
        logger.warning("could not tell a Node to stop request %s", request_id)

    def spawn(self, coroutine: Any) -> None:
        """Run a fire-and-forget coroutine, keeping a reference until it ends."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            kind, request_id, args = wire.unpack(data)
        except (CodecError, wire.WireError) as exc:
            logger.warning("dropped a malformed message on the reply channel: %s", exc)
            return
        if kind == wire.PING:
            return
        if kind == wire.STATS:
            self._answer_stats(request_id, args)
            return
        exchange = self._exchanges.get(request_id)
        if exchange is None:
            node = _acking_node(kind, args)
            if node is not None:
                # A Node took a request this side gave up on: tell it to stop.
                self.spawn(self.cancel_on(node, request_id))
            return
        if kind == wire.CREDIT:
            if args and type(args[0]) is int:
                exchange.window.grant(args[0])
        elif kind in (wire.ACK, wire.SEND, wire.DONE):
            exchange.inbox.put_nowait((kind, args))
        else:
            logger.warning("dropped an unexpected %r message for request %s", kind, request_id)

    def _on_subscriber_lost(self) -> None:
        # Messages from Nodes may have been lost while the subscriber was away.
        for exchange in list(self._exchanges.values()):
            exchange.inbox.put_nowait(_PEER_LOST)

    async def _watch_peers(self) -> None:
        while True:
            await asyncio.sleep(self.liveness_interval)
            nodes = {e.node for e in self._exchanges.values() if e.node is not None}
            for node in nodes:
                if await self.publish(node, wire.PING_MESSAGE) == 0:
                    for exchange in list(self._exchanges.values()):
                        if exchange.node == node:
                            exchange.inbox.put_nowait(_PEER_LOST)


class _Exchange:
    """One HTTP request or WebSocket connection relayed to a Node."""

    def __init__(
        self, distributor: Distributor, key: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.distributor = distributor
        self.key = key
        self.id = wire.new_request_id()
        self.scope = scope
        self.kind: str = scope["type"]
        self._receive = receive
        self._send = send
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.window = wire.SendWindow()  # replaced by the window the Node's ack grants
        self.received = wire.ReceiveWindow(
            distributor.credit_pool.open(), distributor.credit_pool, self._grant_later
        )
        self.pieces = wire.Reassembler(wire.MAX_WEBSOCKET_MESSAGE)
        self.node: str | None = None
        self.started = False  # the response (or the WebSocket handshake answer) started
        self.complete = False
        self.node_done = False  # the Node's side ended by itself: nothing to cancel there
        self.body_size = 0
        self.status = 0  # the status answered, for metrics and the access log
        self.pushed_at = 0.0  # monotonic times of the LPUSH and of the ack
        self.acked_at = 0.0

    async def run(self) -> None:
        d = self.distributor
        first = await self._receive()
        if first["type"] in ("http.disconnect", "websocket.disconnect"):
            return
        if self._too_large(first):
            await self._refuse(413, "request body too large\n")
            return
        key = self.key
        envelope = wire.Envelope(
            id=self.id,
            reply=d.channel,
            deadline=time.time() + d.worker_timeout,
            queued=time.time(),
            scope=_portable_scope(self.scope),
            events=[dict(first)],
            window=self.received.window,
        )
        try:
            data = envelope.encode()
        except CodecError as exc:  # a server or middleware put something odd in the scope
            logger.error("request %s cannot travel to a Node: %s", self.id, exc)
            await self._refuse(500, "Internal Server Error\n")
            return
        try:
            assert d._client is not None
            self.pushed_at = time.monotonic()
            refusal = await d.admission.push(d._client.connection(), key, data)
        except RespError as exc:
            logger.warning("cannot queue a request on %r: %s", key, exc)
            d.metrics.refused(metrics.UNREACHABLE)
            await self._refuse(503, "the request queue (Redis) is unreachable\n")
            return
        if refusal is not None:
            await self._take_back(key, data)
            d.metrics.refused(refusal)
            d.admission.log_refusal(refusal, key)
            full = refusal == metrics.QUEUE_FULL
            text = "the request queue is full\n" if full else "no worker serves this request\n"
            self.status = d.no_node_status
            await d._refuse_for_now(self.scope, None, self._send, text)
            self.complete = True
            return
        # A timer rather than wait_for(), which costs a task per request before Python 3.12.
        timer = asyncio.get_running_loop().call_later(
            d.worker_timeout, self.inbox.put_nowait, _NO_ACK
        )
        item = await self.inbox.get()
        timer.cancel()
        node = None if isinstance(item, _Signal) else _acking_node(*item)
        if node is None:
            await self._take_back(key, data)
            if item is _NO_ACK:
                d.metrics.refused(metrics.NO_ACK)
                d.admission.log_refusal(metrics.NO_ACK, key)
                text = f"no worker answered within {d.worker_timeout:g} seconds\n"
                await self._refuse(d.no_worker_status, text)
            else:
                await self._refuse(502, "lost contact with the worker\n")
            return
        self.node = node
        self.acked_at = time.monotonic()
        ack_args = item[1]
        if len(ack_args) > 1 and type(ack_args[1]) is int and 1 <= ack_args[1] <= 1024:
            self.window = wire.SendWindow(ack_args[1])
        more = first.get("more_body", False) or self.kind == "websocket"
        pumps: list[asyncio.Task[None]] = []

        def start_pump() -> None:
            pumps.append(asyncio.ensure_future(self._forward_client(more)))

        # Relaying the client's side starts at once when it has more to send; for a request
        # already whole it only watches for a disconnect, which can wait a moment: most
        # responses are done by then, and spare a task per request.
        delayed = None if more else asyncio.get_running_loop().call_later(_WATCH_AFTER, start_pump)
        if more:
            start_pump()
        try:
            await self._relay()
        finally:
            if delayed is not None:
                delayed.cancel()
            for pump in pumps:
                pump.cancel()
                pump.add_done_callback(_log_pump_failure)
            if not self.node_done and self.node is not None:
                d.spawn(d.cancel_on(self.node, self.id))

    def _grant_later(self, credit: int) -> None:
        """Credit owed since the pool was full, now that it has room."""
        if self.node is not None and not self.complete:
            self.distributor.spawn(self._publish_credit(credit))

    async def _publish_credit(self, credit: int) -> None:
        assert self.node is not None
        message = wire.pack(wire.CREDIT, self.id, credit)
        if await self.distributor.publish(self.node, message) == 0:
            self.inbox.put_nowait(_PEER_LOST)  # a lost credit would stall the transfer

    async def _take_back(self, key: str, data: bytes) -> None:
        """Undo the LPUSH of a request answered without a Node: nothing is left behind, and
        nothing runs after its client was answered."""
        d = self.distributor
        # If no Node popped it, LREM takes it back; if one did, its deadline stops it and its
        # ack (now or later) is answered with a cancel.
        with contextlib.suppress(RespError):
            assert d._client is not None
            await d._client.execute("LREM", key, 1, data)
        while not self.inbox.empty():  # an ack that came just too late: stop that Node
            item = self.inbox.get_nowait()
            node = None if isinstance(item, _Signal) else _acking_node(*item)
            if node is not None:
                d.spawn(d.cancel_on(node, self.id))

    def _too_large(self, event: Message) -> bool:
        limit = self.distributor.max_body_size
        if event["type"] != "http.request" or limit is None:
            return False
        self.body_size += len(event.get("body", b""))
        return self.body_size > limit

    async def _refuse(self, status: int, text: str) -> None:
        self.status = status
        await _refuse(self.scope, None, self._send, status, text, accepted=self.started)
        self.complete = True

    async def _relay(self) -> None:
        """Relay the Node's messages until the exchange is complete."""
        d = self.distributor
        timeout = d.response_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while not self.complete:
            try:
                if deadline is None:
                    item = await self.inbox.get()
                else:
                    remaining = deadline - asyncio.get_running_loop().time()
                    item = await asyncio.wait_for(self.inbox.get(), max(remaining, 0))
            except asyncio.TimeoutError:
                await self._fail(504, "the worker did not answer in time\n")
                return
            if item is _CLIENT_GONE:
                # The Node was told through the disconnect event; its app decides what to do.
                self.complete = self.node_done = True
                return
            if item is _PEER_LOST:
                await self._fail(502, "lost contact with the worker\n")
                return
            if item is _TOO_LARGE:
                await self._fail(413, "request body too large\n")
                return
            if isinstance(item, _Signal):  # e.g. an ack deadline that fired with the ack
                continue
            kind, args = item
            if kind == wire.SEND and args and isinstance(args[0], list):
                await self._send_events(args[0])
            elif kind == wire.DONE:
                self.node_done = True
                await self._fail(500, "Internal Server Error\n")
                return

    async def _send_events(self, events: list[Any]) -> None:
        for event in events:
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ResponseAborted("the worker sent a malformed event")
            kind = event["type"]
            if kind in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
                self.started = True
                status = event.get("status", 101 if kind == "websocket.accept" else 0)
                self.status = status if type(status) is int else 0
            if kind == "websocket.send":
                try:
                    whole = self.pieces.add(event)
                except wire.WireError as exc:
                    raise ResponseAborted(str(exc)) from None
                if whole is None:
                    continue
                event = whole
            try:
                await self._send(event)
            except OSError:  # the client went away (uvicorn's ClientDisconnected)
                self.complete = True
                return
            if (
                (kind == "http.response.body" or kind == "websocket.http.response.body")
                and not (event.get("more_body", False))
            ) or kind == "websocket.close":
                self.complete = self.node_done = True
        credit = self.received.consumed()
        if credit and not self.complete:
            await self._publish_credit(credit)

    async def _fail(self, status: int, text: str) -> None:
        """End the exchange on an error: a plain answer if nothing was sent, else an abort."""
        if self.kind == "http" and self.started:
            self.complete = False
            raise ResponseAborted(text.strip())
        if self.kind == "websocket" and self.started:
            await self._send({"type": "websocket.close", "code": 1011})
            self.complete = True
            return
        await self._refuse(status, text)

    async def _forward_client(self, more: bool) -> None:
        """Relay what the client sends after the envelope, under the Node's credit."""
        d = self.distributor
        assert self.node is not None
        while True:
            event = await self._receive()
            kind = event["type"]
            if kind in ("http.disconnect", "websocket.disconnect"):
                await d.publish(self.node, wire.pack(wire.EVENT, self.id, dict(event)))
                self.inbox.put_nowait(_CLIENT_GONE)
                return
            if not more:
                continue  # uvicorn sends nothing else once the body is complete
            if self._too_large(event):
                self.inbox.put_nowait(_TOO_LARGE)
                return
            pieces = wire.split_message(dict(event)) if kind == "websocket.receive" else [event]
            for piece in pieces:
                await self.window.acquire()
                if await d.publish(self.node, wire.pack(wire.EVENT, self.id, dict(piece))) == 0:
                    self.inbox.put_nowait(_PEER_LOST)
                    return
            if kind == "http.request" and not event.get("more_body", False):
                more = False


def _log_pump_failure(pump: asyncio.Task[None]) -> None:
    if not pump.cancelled() and pump.exception() is not None:
        logger.debug("relaying a client failed: %r", pump.exception())


def _acking_node(kind: str, args: list[Any]) -> str | None:
    """The Node channel an ACK names, if the message is a well-formed ACK."""
    if kind != wire.ACK or not args:
        return None
    channel = args[0]
    return channel if isinstance(channel, str) and 0 < len(channel) <= 256 else None


# Scope keys whose values an ASGI server gives as str, bytes, int, lists and tuples of those,
# or the small "asgi" dict: they travel without being checked one by one.
_PLAIN_SCOPE_KEYS = frozenset(
    {
        "type",
        "asgi",
        "http_version",
        "method",
        "scheme",
        "path",
        "raw_path",
        "query_string",
        "root_path",
        "headers",
        "client",
        "server",
        "subprotocols",
    }
)


def _portable_scope(scope: Scope) -> dict[str, Any]:
    """The scope minus what cannot or must not travel (``state``, objects in extensions)."""
    portable: dict[str, Any] = {}
    for name, value in scope.items():
        if name in _PLAIN_SCOPE_KEYS:
            portable[name] = value
        elif name == "extensions" and isinstance(value, dict):
            portable[name] = {k: v for k, v in value.items() if codec.is_portable(v)}
        elif name not in ("state", "app") and codec.is_portable(value):
            portable[name] = value
    return portable


async def _refuse(
    scope: Scope,
    receive: Receive | None,
    send: Send,
    status: int,
    text: str,
    *,
    accepted: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer by ourselves: a plain-text response, or a refused/closed WebSocket."""
    if scope["type"] == "websocket":
        if receive is not None:
            await receive()  # websocket.connect
        # Closing before accepting refuses the handshake (the client sees 403).
        await send({"type": "websocket.close", "code": 1011 if accepted else 1000})
        return
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_path_distributor(
    host: str = "localhost",
    port: int = 6379,
    db: int = 0,
    password: str | None = None,
    routes: Mapping[Any, str] | Iterable[tuple[Any, str]] | None = None,
    **options: Any,
) -> Distributor:
    """The seed's entry point: an ASGI app routing by path to Redis lists.

    ``routes`` maps regular expressions to key templates, tried in order; the first pattern
    that matches anywhere in the path gives the key (``\\1`` back-references allowed).
    Other options as for ``Distributor`` (``url=``, ``username=``, ``worker_timeout=``, ...).
    """
    if routes is None:
        routes = {".*": "ALL-WEBSITE-TRAFFIC"}
    if "url" in options:
        return Distributor(routes, **options)
    return Distributor(routes, host=host, port=port, db=db, password=password, **options)


def create_distributor(
    host: str = "localhost",
    port: int = 6379,
    db: int = 0,
    password: str | None = None,
    *,
    key: str,
    **options: Any,
) -> Distributor:
    """An ASGI app sending every request to one Redis list, ``key``."""
    if "url" in options:
        return Distributor(key=key, **options)
    return Distributor(key=key, host=host, port=port, db=db, password=password, **options)
