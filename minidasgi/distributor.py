"""The front ASGI app: routes each connection to a Redis list and relays it to a Node.

Owns the distributor's two Redis connections (commands, and a subscriber on its own reply
channel), the table of exchanges in flight, and the answers it gives by itself: 404 (no
route), 400 (a refused key), 431 (headers too large), 413 (body too large), 408 (the client
stalled its upload), 503 (Redis unreachable), the seed's "no worker" error (405 by default) and
502 (the Node died or messages were lost). It never runs application code and never retries a
request.

For each request it reads the body up to a bound (``buffering``: a slow client holds no Node
slot), LPUSHes an envelope, waits ``worker_timeout`` for an ack (which may come inside the
response's first message: ``wire.ACK_SEND``, handled as the ack then the message), then
relays the Node's events to the ASGI server and the client's events to the Node, under
credit-based flow control in both directions (a Node that sends more than the credit granted
fails the request).
A request sent with ``Expect: 100-continue`` is queued without its body, which is read (and
the client told to continue) only once the Node's app asks for it (``wire.CONTINUE``).

The no-worker answer is given only for a request provably never run: at ``worker_timeout``
without an ack the distributor takes the envelope back (``LREM`` from the tail); if that
removed it, no Node ever popped it. If it did not, a Node has it: the distributor waits another
``worker_timeout`` for the ack, then answers 504 (and a later ack gets a CANCEL). A GONE before
the ack (the Node found the envelope expired) also means the app never ran. An envelope that
could not be taken back because Redis was unreachable (its client answered all the same, 502),
or whose LPUSH failed without a reply (the link may have failed after Redis ran it; 503), is
taken back once Redis is reachable again (``take_back_later``), until a Node would drop it as
expired anyway: a request answered so must not run afterwards.

A Node that pops a request in its recovery window (``confirmation``: after a Redis restart or
a failover, the envelope may be a leftover whose client was answered, or that ran elsewhere)
asks in its ACK for a confirmation before running it. Only the first ACK of a request still
waiting for one gets ``CONFIRM``; a request answered already is unknown here, so its ACK gets a
CANCEL, and a second ACK (another copy popped elsewhere) gets one too. Envelopes say that this
distributor confirms (``confirms``), so Nodes never wait for a distributor that would not.

After the ack, liveness is per request (``liveness.PeerTracker``): every ``liveness_interval``
the distributor PINGs each Node it shares requests with, naming them; the Node answers GONE for
those it does not run, and the distributor answers 502 (or aborts a started response) on a
GONE. A Node not heard from at all for ``peer_timeout`` loses its requests the same way, and
a PUBLISH that reaches nobody does so at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from . import (
    accesslog,
    admission,
    buffering,
    codec,
    draining,
    health,
    metrics,
    responsereader,
    stats,
    wire,
)
from .asgi import Message, Receive, Scope, Send
from .buffering import BodyBuffer, BodyIdle
from .codec import CodecError, Gathered, UnsupportedVersion
from .deadlines import Deadlines
from .envelopewriter import PLAIN_SCOPE_KEYS
from .gathering import gather_body
from .inbox import Inbox
from .link import MAX_FRAME as _LINK_MAX_FRAME
from .link import TOKEN_SIZE as _LINK_TOKEN_SIZE
from .link import LinkError, LinkListener, UploadSender, make_offer
from .liveness import PeerTracker, RoundErrors, check_settings
from .outbox import Outbox
from .resp import RedisConnectionError, ReplyError, RespError, topology
from .resp.connection import Connection, make_params
from .resp.sentinel import SentinelSpec
from .routing import InvalidKey, RouteTable, check_key

__all__ = [
    "AppFailed",
    "Distributor",
    "ResponseAborted",
    "create_distributor",
    "create_path_distributor",
]

logger = logging.getLogger("minidasgi.distributor")

DEFAULT_MAX_BODY_SIZE = 1024**3
DEFAULT_MAX_HEADER_SIZE = 64 * 1024
_WATCH_AFTER = 0.05  # seconds before a whole request's client is watched for a disconnect
_UNTAKEN_BUDGET = 16 * 1024 * 1024  # bytes of envelopes kept to take back once reconnected
_SLOW_CLIENT = "the client did not read the response within response_timeout\n"
_UNQUEUED_LOG_INTERVAL = 10.0  # seconds between two lines about requests that could not be queued


class ResponseAborted(Exception):
    """Raised to the ASGI server to abort a response that had already started."""


class AppFailed(Exception):
    """Raised to the ASGI server when the app on the Node raised before answering a WebSocket
    handshake, so that the server answers the client as it does when its own app raises
    (uvicorn and hypercorn: HTTP 500)."""


class _Refusal(NamedTuple):
    """The answer to a request given without Redis (``Distributor._key_or_refusal``)."""

    status: int
    text: str


class _Signal:
    """A local event in an exchange's inbox, beside the messages from the Node."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_PEER_LOST = _Signal("peer lost")
_PEER_SILENT = _Signal("nothing heard from the Node")
_TOO_LARGE = _Signal("body too large")
_CLIENT_GONE = _Signal("client gone")
_CLIENT_IDLE = _Signal("client stalled its upload")
_NO_ACK = _Signal("no ack in time")
_GRACE_OVER = _Signal("no ack from the Node that took the request")
_VIOLATION = _Signal("flow-control violation")
# An envelope to take back once Redis is reachable (``take_back_later``): its key, bytes,
# the time past which no Node runs it, and who waits for the outcome.
_Untaken = tuple[str, bytes, float, "Callable[[bool, object], None] | None"]
# A take-back in the background (``take_back_later``) removed the request, unpopped, from the
# server its LPUSH went to: it never ran.
_TAKEN_BACK = _Signal("taken back unpopped")
_LINK_BROKEN = _Signal("the worker's link broke")


class _Pushed(_Signal):
    """The LPUSH's reply, when it stops the request: a refusal (a ``metrics`` reason: no Node
    listens, the queue is full) or the error that failed the command."""

    def __init__(self, refusal: str = "", error: BaseException | None = None) -> None:
        super().__init__("push refused" if error is None else "push failed")
        self.refusal = refusal
        self.error = error


class Distributor:
    """An ASGI 3 app that hands every HTTP and WebSocket connection to a Node through Redis.

    ``routes`` maps regular expressions to key templates (see ``RouteTable``); ``key`` sends
    everything to one list. Redis is reached through ``url`` or ``host``/``port``/``db``/
    ``username``/``password``/``ssl``/``unix_socket``, or found through Sentinel
    (``redis+sentinel://`` URLs, or ``sentinel=SentinelSpec(...)``): see README, "Scaling past
    one Redis".

    ``worker_timeout``: seconds to wait for a Node to ack (the seed's 5 s); then the client gets
    ``no_worker_status`` (405, the seed's documented error; 503 is the usual choice for new
    deployments); it is given only when the request was taken back from the list unrun. A
    request a Node popped but did not ack within another ``worker_timeout`` gets 504.
    ``response_timeout``: optional bound on the whole response after the ack.
    ``channel_prefix`` starts this process' pub/sub channel name: give each tenant sharing a
    Redis its own, with ACL users confined to it (README, "Security and trust").

    ``request_buffer_size``: bytes of a request body read before the request is queued
    (1 MiB; 0 queues at once): a request whose body fits travels whole in its envelope, and a
    client that stalls its upload holds no Node slot. A larger body is queued once this much
    arrived and streams the rest. ``request_buffer_budget``: bytes all requests being buffered
    may hold together (64 MiB); a request beyond it is queued with what it has and streams
    the rest. ``body_idle_timeout``: seconds a client may let pass between two pieces of its
    body (30 s; None: no bound), else it gets 408 (and the Node's app, if the request was
    queued, an ``http.disconnect``). A request with ``Expect: 100-continue`` is not buffered:
    it is queued at once and its body read only when the Node's app asks for it. A response
    that ends with the body not all received (the app did not read it, or the request was
    refused) sends its end at once, while a task reads and discards the rest for at most
    ``draining.DRAIN_TIME`` seconds (see ``draining``): under uvicorn nothing changes (it
    discards such a body itself); under hypercorn the connection is closed (it keeps only
    one whose request was read to its end) instead of hanging, so a client still uploading
    may get its response or a reset.

    ``health_check_interval``: seconds of silence after which each Redis connection is checked
    with a PING; one left unanswered past the reply bound (``?reply_timeout=`` in the URL,
    10 s by default) or, for the subscriber, a second interval, is taken for a dead peer and
    replaced. Until it is, requests get 503.

    ``liveness_interval``: seconds between the PINGs sent to each Node with requests in flight
    (none while idle). ``peer_timeout``: seconds of silence from such a Node (no message of any
    kind) after which its requests fail (502, or an abort once the response started); it must
    exceed the Nodes' ``liveness_interval`` by a good margin.

    Operations (see ``admission``): ``fail_fast`` answers ``no_node_status`` (503) at once when
    no Node listens on the request's key, instead of after ``worker_timeout``; ``max_queue``
    bounds a queue's length (an int for every key, or a mapping from key to bound, ``"*"`` for
    the others) and ``max_in_flight`` the requests this process relays at once: over either,
    503 at once. These refusals carry ``Retry-After: retry_after``. ``ops_prefix`` (e.g.
    ``"/-/"``) answers ``healthz``, ``readyz`` and ``metrics`` under that path, never routed.
    ``access_log`` (``"text"`` or ``"json"``) logs a line per request on ``minidasgi.access``.

    ``wire_format``: the format written to Nodes: 3 (this release's, the default) or 1 (the
    first release's), for a fleet whose Nodes are not all upgraded yet (README, "Upgrading a
    fleet"). Nodes of this release answer each request in the format it came in.

    ``link`` (``"HOST[:PORT]"``, off by default) listens there (port 0 or none: an ephemeral
    one) for direct TCP connections from Nodes, offered in every envelope: the rest of a
    streamed response body (after its first piece) then comes on its own connection instead
    of through Redis (``minidasgi.link``; README, "Large responses off Redis"). Nodes connect
    to ``link_advertise`` (``"HOST"``, or ``"HOST:PORT"`` for a port forwarded to the
    listener's) instead of HOST when given (needed for a wildcard HOST). The link is
    plaintext TCP, authenticated by a random per-process token that travels in the envelopes:
    beside a TLS Redis (``rediss://``) it is refused unless ``link_plaintext=True``.
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
        sentinel: SentinelSpec | None = None,
        worker_timeout: float = 5.0,
        no_worker_status: int = 405,
        response_timeout: float | None = None,
        max_body_size: int | None = DEFAULT_MAX_BODY_SIZE,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        request_buffer_size: int = buffering.DEFAULT_REQUEST_BUFFER_SIZE,
        request_buffer_budget: int = buffering.DEFAULT_REQUEST_BUFFER_BUDGET,
        body_idle_timeout: float | None = buffering.DEFAULT_BODY_IDLE_TIMEOUT,
        liveness_interval: float = 1.0,
        health_check_interval: float = 5.0,
        peer_timeout: float = 10.0,
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
        wire_format: int = codec.FAST,
        link: str | None = None,
        link_advertise: str | None = None,
        link_plaintext: bool = False,
    ) -> None:
        if wire_format not in (codec.FAST, codec.RELEASED):
            raise ValueError(
                f"wire_format must be {codec.FAST} or {codec.RELEASED}, not {wire_format!r}"
            )
        self.wire_format = wire_format
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
            sentinel=sentinel,
        )
        self._link_bind = _link_address(link, link_advertise, link_plaintext, self.params)
        self._link_advertise = link_advertise
        self._link_token = secrets.token_bytes(_LINK_TOKEN_SIZE) if link else b""
        self._link_listener: LinkListener | None = None
        self.link_offer = ""  # "host:port:token" once listening: in every envelope
        self.worker_timeout = worker_timeout
        self.no_worker_status = no_worker_status
        self.response_timeout = response_timeout
        self.max_body_size = max_body_size
        self.max_header_size = max_header_size
        self.request_buffer_size = request_buffer_size
        self.buffer_budget = buffering.BufferBudget(request_buffer_budget)
        self.body_idle_timeout = body_idle_timeout
        self.liveness_interval = liveness_interval
        if not health_check_interval > 0:
            raise ValueError("health_check_interval must be a positive number of seconds")
        check_settings(liveness_interval, peer_timeout)
        self.health_check_interval = health_check_interval
        self.peer_timeout = peer_timeout
        self.peers = PeerTracker(peer_timeout)  # the Nodes we share requests with
        # Nodes with a PING still being published, and when it was sent (``tick``: while
        # Redis answers none, silence proves nothing).
        self._pinging: dict[str, float] = {}
        self.startup_wait = startup_wait
        self.channel = wire.new_channel(channel_prefix, self.params.db, "dist")
        self.channel_prefix = channel_prefix
        self.no_node_status = no_node_status
        self.retry_after = retry_after
        self.admission = admission.Admission(
            channel_prefix=channel_prefix,
            db=self.params.db,
            cluster=self.params.cluster is not None,
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
        self._client: topology.CommandClient | None = None
        # Eager: each callback of the distributor posts one message (a client's, a credit), or
        # says ``more`` (the pieces of a large one): a lone message leaves in the loop turn
        # it was posted in, not in a flush one iteration later.
        self.outbox = Outbox(lambda: self._client, eager=True)
        self.ack_deadlines = Deadlines(worker_timeout)  # one timer for every request's wait
        self.watch_deadlines = Deadlines(_WATCH_AFTER)  # and one for the disconnect watches
        self._subscriber: topology.AnySubscriber | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the connections use
        self._thread = 0  # the thread that runs it
        # Whether that loop's clock is ``time.monotonic()`` (asyncio's own loops): a time
        # read from it then serves the loop's deadlines too.
        self._monotonic_loop = False
        # Envelopes answered for but not taken back (Redis was unreachable): (key, envelope,
        # monotonic time after which no Node runs it any more), taken back once reconnected.
        self._untaken: list[_Untaken] = []
        self._untaken_size = 0
        # When a request that could not be queued was last logged, and how many since.
        self._unqueued_logged = (-_UNQUEUED_LOG_INTERVAL, 0)
        # The same for requests Redis refused to give back (LREM refused: an ACL, say).
        self._kept_logged = (-_UNQUEUED_LOG_INTERVAL, 0)
        # Requests not yet in flight waiting for a connection Redis closed (``_reopened``).
        self._reopen_waiting = 0
        self._taking_back = False
        # Set by a message dropped, malformed or unexpected: the rest of its batch goes too
        # (``wire.drop_rest``).
        self._dropped = False

    def __repr__(self) -> str:
        return f"<Distributor {self.params.address} exchanges={len(self._exchanges)}>"

    @property
    def ready(self) -> bool:
        """True while both Redis connections are up, the subscription confirmed by Redis."""
        client, subscriber = self._client, self._subscriber
        return (
            client is not None
            and subscriber is not None
            and client.connected
            and subscriber.connected
        )

    async def startup(self) -> None:
        """Connect to Redis (in the background) and wait up to ``startup_wait`` for it."""
        if asyncio.get_running_loop() is not self._loop:
            self._bind_loop()
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        if self._link_bind is not None and self._link_listener is None:
            await self._listen_for_links(*self._link_bind)
        self._client = topology.command_client(
            self.params,
            name="distributor",
            parser=self._parser,
            health_check_interval=self.health_check_interval,
        )
        self._subscriber = topology.subscriber(
            self.params,
            health_check_interval=self.health_check_interval,
            on_message=self._on_message,
            on_connection_lost=self._on_subscriber_lost,
            parser=self._parser,
            # Large payloads as memoryviews, a body piece's body read apart as bytes of its own
            # where the process allows it (``read_tails_apart``; split_frame, unpack take
            # either).
            direct_reads=wire.tail_size,
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

    async def _listen_for_links(self, host: str, port: int) -> None:
        """Listen for Nodes' links (``link=``), and offer the listener in every envelope."""
        listener = LinkListener(
            host,
            port,
            self._link_token,
            self._exchanges.__contains__,
            on_bytes=self.metrics.link_bytes,
            on_upload=self._upload_arrived,
            upload_heartbeat=self.liveness_interval if self.liveness_interval > 0 else 1.0,
        )
        try:
            await listener.start()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen for links on {host}:{port}: {exc}") from exc
        self._link_listener = listener
        advertised, port = self._link_advertise or host, listener.port
        head, sep, tail = advertised.rpartition(":")
        if sep and tail.isdigit() and (":" not in head or head.endswith("]")):
            advertised, port = head, int(tail)  # a port forwarded to the listener's
        if ":" in advertised and not advertised.startswith("["):
            advertised = f"[{advertised}]"  # an IPv6 address
        self.link_offer = make_offer(advertised, port, self._link_token)
        logger.info("listening for links on %s:%d", host, listener.port)

    def _upload_arrived(self, request_id: str, sender: UploadSender) -> bool:
        """A Node's upload link for ``request_id``: its exchange takes it if its client's
        body is still coming (``_Exchange.take_upload``)."""
        exchange = self._exchanges.get(request_id)
        return exchange is not None and exchange.take_upload(sender)

    @property
    def link_port(self) -> int | None:
        """The port the link listener has (an ephemeral one chosen at start), or None."""
        listener = self._link_listener
        return None if listener is None else listener.port

    def _on_bound_loop(self) -> bool:
        """Whether this runs on the loop the connections use, found without asking asyncio
        (``get_running_loop()`` costs a ``getpid()`` system call on Python 3.11): that loop
        runs, in this thread, and a thread runs one event loop at a time."""
        loop = self._loop
        return loop is not None and self._thread == threading.get_ident() and loop.is_running()

    def _bind_loop(self) -> None:
        """Serve the running event loop from now on: connections belong to the loop that
        opened them, and test clients (Starlette's ``TestClient`` outside a ``with`` block)
        run each request in a loop of its own, closed afterwards."""
        loop = asyncio.get_running_loop()
        old = self._loop
        if old is not None and not old.is_closed() and old.is_running():
            raise RuntimeError(
                "this Distributor is serving another event loop, still running (in another "
                "thread?): a Distributor serves one event loop at a time; create one per loop"
            )
        if old is not None:
            logger.info("the distributor's event loop is gone: reconnecting from the new one")
            # Nothing of the old loop can run any more. Its end cancelled the liveness
            # monitor, which closed the connections; a loop merely stopped, never torn down,
            # leaves them to be closed when collected.
            self._exchanges.clear()
            self._client = self._subscriber = None
            self._monitor = self._starting = None
            self._background = set()
            self.credit_pool = wire.CreditPool()
            self.outbox.reset()
            self.ack_deadlines.reset()
            self.watch_deadlines.reset()
            self.admission.pushes.reset()
            self.peers = PeerTracker(self.peer_timeout)
            self._pinging = {}
            self._untaken, self._untaken_size, self._taking_back = [], 0, False
            self._link_listener, self.link_offer = None, ""  # the old loop's, gone with it
        self._loop = loop
        self._thread = threading.get_ident()
        self._monotonic_loop = type(loop).time is asyncio.BaseEventLoop.time

    async def shutdown(self) -> None:
        """Close the Redis connections; requests still in flight fail."""
        logger.info("distributor coalescing: %s", self.batch_sizes())
        for exchange in list(self._exchanges.values()):
            exchange.inbox.put_nowait(_PEER_LOST)
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
        for task in list(self._background):
            task.cancel()
        await self._close_connections()
        listener, self._link_listener = self._link_listener, None
        if listener is not None:
            listener.close()
            self.link_offer = ""
        self._starting = None

    async def _close_connections(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.close()
        if self._client is not None:
            await self._client.close()

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
        if self._starting is None or not self._on_bound_loop():
            await self.startup()
        started = time.monotonic()
        routed = self._key_or_refusal(scope)
        if isinstance(routed, _Refusal):
            if routed[0] == 503 and await self._reopened():
                routed = self._key_or_refusal(scope)
            if isinstance(routed, _Refusal):
                status, text = routed
                await _refuse(scope, receive, send, status, text)
                if status == 503:
                    self.metrics.refused(metrics.UNREACHABLE)
                self._finished(scope, None, status, started)
                return
        key, expecting = routed
        limit = self.admission.max_in_flight  # over_capacity(), inline: one per request
        if limit is not None and len(self._exchanges) >= limit:
            await self._refuse_for_now(scope, receive, send, "too many requests in flight\n")
            self.metrics.refused(metrics.IN_FLIGHT)
            self.admission.log_refusal(metrics.IN_FLIGHT, key)
            self._finished(scope, key, self.no_node_status, started)
            return
        exchange = _Exchange(self, key, scope, receive, send, expecting)
        self._exchanges[exchange.id] = exchange
        try:
            await exchange.run()
        finally:
            if exchange.aborted:
                # The client saw the Node's status (or the WebSocket accepted) but not the
                # response's end: counted and logged apart, so that an operator tells it
                # from a complete response.
                self.metrics.aborted(key)
            exchange.close_window()
            del self._exchanges[exchange.id]
            if self._link_listener is not None:
                # Linked or not: a link that arrived for it, its marker not yet read (the
                # client gone, a timeout), is closed now rather than at its wait's end.
                self._link_listener.discard(exchange.id)
                if exchange.uplink is not None:  # after its last frame: its tail, bounded
                    exchange.uplink.release()
            if not exchange.inbox.empty():  # seldom: an ACK came too late, or a signal
                exchange.cancel_late_acks()
            if exchange.tracked:
                assert exchange.node is not None
                self.peers.discard(exchange.node, exchange.id)
            # ``_finished``'s, inline with the exchange's times: one call fewer per request.
            end = time.monotonic()
            acked_at = exchange.acked_at
            queue_wait = response = None
            if acked_at:
                queue_wait = acked_at - exchange.pushed_at
                response = end - acked_at
            # No response started (the app raised before it, the relay aborted, the client
            # left): the server answers 500, or nothing to a client gone. Counted and logged
            # as 500, never as a status 0 that no client ever sees.
            status = exchange.status
            if status == 0:
                status = 500
            self.metrics.finished(key, status, queue_wait, response, end - started)
            log = self.access_log
            if log is not None and log.enabled():
                self._log_access(log, scope, key, exchange, status, queue_wait, end - started)

    def batch_sizes(self) -> str:
        """The coalescing seen so far: messages per PUBLISH, envelopes per LPUSH."""
        return _batch_sizes(publish=self.outbox.batcher, lpush=self.admission.pushes)

    def _finished(self, scope: Scope, key: str | None, status: int, started: float) -> None:
        """Count a request refused before any exchange at its end and write its access-log
        line (an exchange's end does the same inline, in ``__call__``)."""
        end = time.monotonic()
        self.metrics.finished(key or "", status, None, None, end - started)
        log = self.access_log
        if log is not None and log.enabled():
            self._log_access(log, scope, key, None, status, None, end - started)

    @staticmethod
    def _log_access(
        log: accesslog.AccessLog,
        scope: Scope,
        key: str | None,
        exchange: _Exchange | None,
        status: int,
        queue_wait: float | None,
        total: float,
    ) -> None:
        """Write a request's access-log line."""
        log.write(
            method=scope.get("method", "WEBSOCKET"),
            path=scope.get("path", ""),
            key=key,
            node=None if exchange is None else exchange.node,
            status=status,
            queue_wait=queue_wait,
            total=total,
            aborted=exchange is not None and exchange.aborted,
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
        self.outbox.post(reply, wire.pack(wire.STATS_REPLY, request_id, payload))

    async def _reopened(self, *, in_flight: bool = False) -> bool:
        """Whether the distributor is ready once the command connection, if Redis just closed
        it cleanly, is replaced (``Client.wait_reopened``, at most ``REOPEN_WAIT``): Redis
        closes an idle connection when its ``timeout`` is set, and a request arriving at that
        moment is served, not answered 503 while Redis is up. Otherwise (Redis or the path to
        it gone) the answer is immediate.

        ``in_flight``: the request is counted among the exchanges already. One that is not
        waits only while the requests in flight and those waiting here stay under
        ``max_in_flight``: what piles up during the wait is bounded as the rest is."""
        client = self._client
        if client is None:
            return False
        if in_flight:
            return await client.wait_reopened() and self.ready
        limit = self.admission.max_in_flight
        if limit is not None and len(self._exchanges) + self._reopen_waiting >= limit:
            return False
        self._reopen_waiting += 1
        try:
            return await client.wait_reopened() and self.ready
        finally:
            self._reopen_waiting -= 1

    def _key_or_refusal(self, scope: Scope) -> tuple[str, bool] | _Refusal:
        """The list for this request and whether it expects "100 Continue" before sending
        its body, or the answer to give without Redis (status, text)."""
        path = scope.get("path", "")
        if self.routes is None:
            assert self.key is not None
            key = self.key
        else:
            try:
                found = self.routes.key_for(path)
            except InvalidKey as exc:
                return _Refusal(400, f"{exc}\n")
            if found is None:
                return _Refusal(404, f"no route for path {path[:200]!r}\n")
            key = found
        http = scope["type"] == "http"
        limit = self.max_body_size if http else None
        header_size = 0  # a plain loop: a generator under sum() costs more per request
        too_large = expecting = False
        for name, value in scope.get("headers", ()):  # one pass for both bounds and Expect
            header_size += len(name) + len(value)
            if limit is not None and value.isdigit() and name.lower() == b"content-length":
                # More digits than the limit has is larger, without int(): Python refuses
                # to convert more than 4,300 digits (ValueError, a 500).
                digits = value.lstrip(b"0")
                if len(digits) > len(str(limit)) or int(digits or b"0") > limit:
                    too_large = True
            # The length first: most names are not six bytes long, and it spares their lower().
            elif len(name) == 6 and http and name.lower() == b"expect":
                expecting = expecting or value.lower() == b"100-continue"
        if header_size > self.max_header_size:
            return _Refusal(431, "request headers too large\n")
        if too_large:
            return _Refusal(413, "request body too large\n")
        if not self.ready:
            return _Refusal(503, "the request queue (Redis) is unreachable\n")
        return key, expecting

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
        """PUBLISH (coalesced: ``outbox``) for the exchanges; 0 when Redis is unreachable."""
        return await self.outbox.publish(channel, message)

    async def cancel_on(self, node: str, request_id: str) -> None:
        """Tell a Node to stop a request. Unlike other messages, a cancel outlives a lost
        connection: without it the Node's job could wait for credit forever, since the Node
        still sees this distributor alive. It is retried once Redis is reachable again."""
        message = wire.pack(wire.CANCEL, request_id, version=self.wire_format)
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

    def log_unqueued(self, key: str, exc: BaseException) -> None:
        """Log a request that could not be queued (answered 503): the first of a series, then
        a line per ``_UNQUEUED_LOG_INTERVAL`` at most, with the count left out, so that a
        Redis refusing every LPUSH (out of memory, say) does not log a line per request."""
        now = time.monotonic()
        last, unlogged = self._unqueued_logged
        if now - last < _UNQUEUED_LOG_INTERVAL:
            self._unqueued_logged = (last, unlogged + 1)
            return
        self._unqueued_logged = (now, 0)
        more = f" (and {unlogged} more since the last line)" if unlogged else ""
        if isinstance(exc, ReplyError):
            logger.warning("Redis refused to queue a request on %r: %s%s", key, exc, more)
        else:
            logger.warning("cannot queue a request on %r: %s%s", key, exc, more)

    def log_kept(self, key: str, request_id: str, exc: ReplyError) -> None:
        """Log a request Redis refused to take back (its ``LREM``): rate-limited as
        ``log_unqueued``, since an ACL user without ``LREM`` fails every request that waits
        out ``worker_timeout`` (twice: at the timeout, and once the grace after it ended)."""
        now = time.monotonic()
        last, unlogged = self._kept_logged
        if now - last < _UNQUEUED_LOG_INTERVAL:
            self._kept_logged = (last, unlogged + 1)
            return
        self._kept_logged = (now, 0)
        more = f" (and {unlogged} more refusals since the last line)" if unlogged else ""
        hint = " (the distributor's ACL user needs LREM)" if exc.code == "NOPERM" else ""
        logger.warning(
            "cannot take request %s back from %r: %s%s; it stays queued (a Node that pops it "
            "drops it unrun) and its client gets 504, not the no-worker answer%s",
            request_id,
            key,
            exc,
            hint,
            more,
        )

    def take_back_later(
        self,
        key: str,
        data: bytes,
        until: float,
        then: Callable[[bool, object], None] | None = None,
    ) -> None:
        """An envelope whose client was answered, but which could not be taken back (Redis
        unreachable): take it back once Redis is reachable again, if no Node popped it
        meanwhile, so that it does not run after its answer. Kept until ``until`` (monotonic
        time), past which a Node drops it as expired anyway; within a bound on memory.

        ``then``: told whether the ``LREM`` removed it, and the connection it ran on (one
        not yet answered, waiting for the outcome)."""
        if self._untaken_size + len(data) > _UNTAKEN_BUDGET:
            logger.warning("too many requests to take back: one may run after its answer")
            return
        self._untaken.append((key, data, until, then))
        self._untaken_size += len(data)
        if not self._taking_back:
            self._taking_back = True
            self.spawn(self._take_back_untaken())

    async def _take_back_untaken(self) -> None:
        try:
            while self._untaken and self._client is not None:
                now = time.monotonic()
                self._untaken = [entry for entry in self._untaken if entry[2] > now]
                self._untaken_size = sum(len(entry[1]) for entry in self._untaken)
                if not self._untaken:
                    return
                try:
                    last = max(entry[2] for entry in self._untaken)
                    await self._client.wait_connected(last - now)
                    while self._untaken:
                        key, data, _, then = self._untaken[0]
                        connection = self._client.connection()
                        removed = await connection.execute("LREM", key, -1, data)
                        self._untaken.pop(0)
                        self._untaken_size -= len(data)
                        if then is not None:
                            then(bool(removed), connection)
                        elif removed:
                            logger.info("took back a request answered while Redis was away")
                except asyncio.TimeoutError:
                    continue  # all expired now: dropped above
                except RespError as exc:
                    logger.debug("cannot take requests back yet: %s", exc)
                    await asyncio.sleep(0.1)
        finally:
            self._taking_back = False

    def _on_message(self, channel: bytes, data: bytes | memoryview) -> None:
        if data and data[0] != wire.BATCH_FRAME:
            # One message (at one request in flight, every one): ``split_frame`` would make
            # ``[data]`` of it, a call and a list for nothing.
            self._on_one_message(data)
            return
        try:
            messages = wire.split_frame(data)
        except wire.WireError as exc:
            logger.warning("dropped a malformed batch on the reply channel: %s", exc)
            return
        self._dropped = False
        for index, message in enumerate(messages):
            self._on_one_message(message)
            if self._dropped:
                wire.drop_rest(logger, messages, index, "the reply channel")
                return

    def _on_one_message(self, data: Any) -> None:
        # The usual small response, read first, as ``wire.unpack`` would: an ACK_SEND whose
        # reader admits only events and an ACK that ``wire.ack_of_ack_send`` accepts (a
        # list of events, a Node channel, no confirmation asked), taken as they are (the
        # check and the call: about 3k instructions per request). The start's header pairs
        # come as tuples, as the server is handed them, and its SEND is of a shape the relay
        # knows without looking (``_USUAL_SEND``).
        # Its parts as the reader has them (``try_parts``): the events and the ACK's
        # arguments (a tuple), with no list of the message made and sliced in two.
        parts = responsereader.try_parts(data, max_size=wire.MAX_MESSAGE_SIZE, tuples=True)
        if parts is not None:
            request_id, events, ack_args = parts
            exchange = self._exchanges.get(request_id)
            self._on_ack_send(exchange, request_id, (events,), ack_args, len(data), _USUAL_SEND)
            return
        try:
            kind, request_id, args = wire.unpack_general(data)
        except UnsupportedVersion as exc:
            logger.error(
                "dropped a message on the reply channel: %s (upgrade this distributor)", exc
            )
            self._dropped = True
            return
        except (CodecError, wire.WireError) as exc:
            logger.warning("dropped a malformed message on the reply channel: %s", exc)
            self._dropped = True
            return
        if kind == wire.PING:
            self._on_ping(args)
            return
        if kind == wire.STATS:
            self._answer_stats(request_id, args)
            return
        exchange = self._exchanges.get(request_id)
        if kind == wire.ACK_SEND:
            try:
                ack = wire.ack_of_ack_send(args)  # the SEND's arguments: ``args``, events first
            except wire.WireError as exc:
                logger.warning("dropped a malformed message on the reply channel: %s", exc)
                self._dropped = True
                return
            self._on_ack_send(exchange, request_id, args, ack, len(data))
            return
        if exchange is None:
            node = _acking_node(kind, args)
            if node is not None:
                # A Node took a request this side gave up on: tell it to stop.
                self.spawn(self.cancel_on(node, request_id))
            return
        if exchange.node is not None:
            assert self._loop is not None
            self.peers.heard(exchange.node, self._loop.time())
        if kind == wire.CREDIT:
            # Before there is a window (made once the ACK is handled and the client has more
            # to send: ``_open_window``) nothing sent yet needs credit, and a window starts full.
            if args and type(args[0]) is int and exchange.window is not None:
                exchange.window.grant(args[0])
        elif kind == wire.SEND:
            _on_send(exchange, args, len(data))
        elif kind in (wire.ACK, wire.DONE, wire.GONE):
            # A request gets one of each at most, and they take no credit: repeats are forged
            # (or a second GONE, answering a PING) and must not pile up behind a slow client.
            if kind in exchange.seen:
                if kind == wire.ACK:
                    self._second_ack(exchange, args)
                return
            exchange.seen += (kind,)
            if kind == wire.ACK:
                exchange.acked_by = _acking_node(kind, args)
                if exchange.unit and len(args) > 5 and type(args[5]) is int:
                    # The Node knows credit units (it announces its own), so it counts what
                    # it sends us in ours: so must we, from its first SEND on, which may come
                    # in this very batch, before run() sees the ACK.
                    exchange.receiving().count_units(exchange.unit)
            exchange.inbox.put_nowait((kind, args))
        elif kind == wire.CONTINUE:
            exchange.body_wanted()
        else:
            # Well-formed, but no Node sends it (a forged one, under the Redis credentials):
            # dropped as a malformed one is, with the rest of its batch in one line.
            logger.warning("dropped an unexpected %r message for request %s", kind, request_id)
            self._dropped = True

    def _on_ack_send(
        self,
        exchange: _Exchange | None,
        request_id: str,
        args: Sequence[Any],
        ack: Sequence[Any],
        size: int,
        kind: str = wire.SEND,
    ) -> None:
        """An ACK and the response's first SEND in one message (``wire.ACK_SEND``, ``size``
        bytes; ``args``, the SEND's arguments, events first, and ``ack``, the ACK's, as
        ``wire.ack_of_ack_send`` checks them): the ACK handled as one, then the SEND as one,
        if the ACK was the request's first. ``kind``: the SEND's kind in the inbox
        (``_USUAL_SEND`` for ``responsereader``'s)."""
        node = ack[0]
        if exchange is None:
            # A Node took a request this side gave up on: tell it to stop.
            self.spawn(self.cancel_on(node, request_id))
            return
        if exchange.node is not None:
            assert self._loop is not None
            self.peers.heard(exchange.node, self._loop.time())
        if wire.ACK in exchange.seen:
            # Another copy of the request ran: its response is not this client's.
            self._second_ack(exchange, ack)
            return
        exchange.seen += (wire.ACK,)
        exchange.acked_by = node
        exchange.inbox.put_nowait((wire.ACK, ack))
        if exchange.received is None and not exchange._arrived and self.response_timeout is None:
            # The response's first message (``_on_send``'s first, which a window always has
            # credit for), kept for the relay to take before the inbox: it comes right after
            # the ACK whichever way the ACK is taken, and an exchange that ends before its
            # relay starts drops it, as it would the inbox's. One inbox item per ACK_SEND, not
            # two. Not with a ``response_timeout``: that relay waits for every item within it.
            exchange._arrived = True
            exchange._first = (kind, args)
        else:
            _on_send(exchange, args, size, kind)

    def _second_ack(self, exchange: _Exchange, args: Sequence[Any]) -> None:
        """Another ACK for a request already acked: a second copy of its envelope was popped
        (a replica promoted with it, a Redis restarted from its files). Only one may run: the
        one acked first. The other Node is told to stop (if it asked for a confirmation, it
        has not started the app); a plain repeat from the same Node is ignored."""
        node = _acking_node(wire.ACK, args)
        if node is not None and (node != exchange.acked_by or wire.asks_confirmation(args)):
            logger.warning("request %s: popped again by a worker; cancelled there", exchange.id)
            self.spawn(self.cancel_on(node, exchange.id))

    def _on_subscriber_lost(self) -> None:
        # Messages from Nodes may have been lost while the subscriber was away: not for a
        # request still being buffered (not queued, so no Node knows it), which would else
        # fail with 502 once queued, however long after the subscription came back.
        for exchange in list(self._exchanges.values()):
            if exchange.pushed_at:
                exchange.inbox.put_nowait(_PEER_LOST)

    def _on_ping(self, args: list[Any]) -> None:
        """A Node names the requests it runs for this distributor: those this side no longer
        has get a CANCEL (it gave them up, or never had them)."""
        ping = wire.parse_ping(args)
        if ping is None:
            return  # an old id-less PING: nothing to answer
        node, request_ids = ping
        self.peers.heard(node, asyncio.get_running_loop().time())
        unknown = [i for i in request_ids if i not in self._exchanges]
        for request_id in unknown[: wire.MAX_PING_ANSWERS]:  # the rest at the next PING
            self.spawn(self.cancel_on(node, request_id))

    async def _watch_peers(self) -> None:
        loop = asyncio.get_running_loop()
        errors = RoundErrors()
        try:
            while True:
                await asyncio.sleep(self.liveness_interval)
                pinging, now = self._pinging, loop.time()
                try:
                    lost = self.peers.tick(
                        now,
                        self.liveness_interval,
                        unanswered_since=min(pinging.values()) if pinging else None,
                    )
                    for _, request_ids in lost:
                        for request_id in request_ids:
                            exchange = self._exchanges.get(request_id)
                            if exchange is not None:
                                exchange.inbox.put_nowait(_PEER_SILENT)
                    for node, request_ids in self.peers.peers():
                        if node not in self._pinging:
                            # Not awaited: a PING stuck on a stalled link must not stop the
                            # checks.
                            self._pinging[node] = now
                            self.spawn(self._ping(node, request_ids))
                except Exception as exc:
                    # A bug (nothing raises here today): the next round may still find the
                    # dead Nodes, and without the checks their requests would wait forever.
                    message = errors.report(exc, loop.time())
                    if message is not None:
                        logger.error(message, exc_info=exc)
        finally:
            if self._monitor is asyncio.current_task():
                # Cancelled, not by shutdown(), but by the end of its event loop (asyncio.run,
                # a test client's loop per request): the connections must not outlive it,
                # nor the link listener (a fixed port would stay bound for the next loop).
                listener, self._link_listener = self._link_listener, None
                if listener is not None:
                    listener.close()
                    self.link_offer = ""
                await self._close_connections()

    async def _ping(self, node: str, request_ids: list[str]) -> None:
        try:
            for message in wire.ping_messages(self.channel, request_ids, version=self.wire_format):
                if await self.publish(node, message) == 0:
                    for exchange in list(self._exchanges.values()):
                        if exchange.node == node:
                            exchange.inbox.put_nowait(_PEER_LOST)
                    return
            sent = self._pinging.get(node)
            if sent is not None:  # how long Redis took to answer: deaf meanwhile
                self.peers.unserved(sent, asyncio.get_running_loop().time())
        finally:
            self._pinging.pop(node, None)


_TRANSIENT_ERRORS = frozenset(
    {"BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN"}
)
"""Error replies that say "not now" rather than "never": a take-back they refuse is retried."""

_NOT_RUN_ERRORS = _TRANSIENT_ERRORS | frozenset(
    {"OOM", "MISCONF", "NOREPLICAS", "NOAUTH", "NOPERM", "WRONGTYPE", "CROSSSLOT"}
)
"""Error replies that prove an LPUSH did not run: Redis gives them in ``processCommand``,
before running a command (memory, a failing disk, too few replicas, the ACL, a replica or a
loading server, a cluster slot), or, for WRONGTYPE, before the command changes anything. Any
other error may come from a proxy in front of Redis after it forwarded the command (twemproxy,
Envoy: "-ERR Connection timed out"): that LPUSH may have run, and is taken back."""


class _Exchange:
    """One HTTP request or WebSocket connection relayed to a Node."""

    # What most requests never change: read from the class until an exchange sets its own
    # (an attribute set per request costs more than the lookup that finds it here).
    window: wire.SendWindow | None = None  # the window the Node's ack grants (made when used)
    piece = wire.CHUNK_SIZE  # the largest piece the Node reads: its ack may say more
    pieces: wire.Reassembler | None = None  # made at the first WebSocket message
    node: str | None = None
    started = False  # the response (or the WebSocket handshake answer) started
    trailers = False  # the response announced trailers: they complete it
    complete = False
    aborted = False  # the response started (or the WebSocket was accepted), then was cut
    node_done = False  # the Node's side ended by itself: nothing to cancel there
    violated = False  # the Node sent more than the credit granted
    seen: tuple[str, ...] = ()  # the ACK, DONE and GONE kinds already queued
    acked_by: str | None = None  # the Node channel of the first ACK
    body_size = 0
    _wants_body = False  # the Node's app asked for the body (CONTINUE)
    _more = False  # the client has more to send than the envelope carries (not yet received)
    _pumps: tuple[asyncio.Task[None], ...] = ()
    _delayed: list[Any] | None = None  # an entry of watch_deadlines
    _watch_later = False  # the client is to be watched once the relay waits for the Node
    tracked = False  # counted in flight with its Node for the liveness checks (``_track``)
    status = 0  # the status answered, for metrics and the access log
    _credits: wire.CreditMessages | None = None  # made at the first credit
    _holding_credit = False  # a credit waits to ride with the next message (WebSocket)
    pushed_at = 0.0  # monotonic times of the LPUSH and of the ack
    _pushing = False  # the LPUSH's reply may still stop the request (``_Pushed``)
    _pushed_on: object = None  # the connection the LPUSH went out on (a cluster's router)
    _taken_on: object = None  # the connection of the last take-back's LREM
    acked_at = 0.0
    _ack: Sequence[Any] = ()  # the ACK's arguments, once it came
    unit = 0  # the credit unit announced in the envelope (a WebSocket's): 0, none
    received: wire.ReceiveWindow | None = None  # the window of the Node's messages, once made
    _arrived = False  # whether the Node's first message arrived before that window was made
    _first: tuple[str, Any] | None = None  # that message, if it came with the ACK (ACK_SEND)
    _released = False  # whether the credits went back to the pool with no window made
    linked = False  # the rest of the body comes on a link (``minidasgi.link``)
    uplink: UploadSender | None = None  # the Node's upload link, once taken (``take_upload``)
    uplinked = False  # the client's body goes on it from the marker on
    link_done = False  # its last frame has been read (it is in the inbox)

    def __init__(
        self,
        distributor: Distributor,
        key: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        expecting: bool = False,
    ) -> None:
        self.distributor = distributor
        self.key = key
        self.id = wire.new_request_id()
        self.scope = scope
        self.kind: str = scope["type"]
        self._receive = receive
        self._send = send
        self.inbox: Inbox[Any] = Inbox(distributor._loop)
        # The window for what the Node sends: its credits taken from the pool now (the
        # envelope announces them), the window itself made only once a message needs it
        # (``receiving``): the usual response comes whole in one message, which the first
        # credit always covers, and leaves the window unmade.
        self._pool = pool = distributor.credit_pool
        self.credits: int  # what the envelope announces: the Node's messages sent unread
        self._piece: int  # and the bytes each may weigh
        if self.kind == "http" and distributor.wire_format != codec.RELEASED:
            self.credits, self._piece = pool.reserve()  # large pieces if there is room
        else:
            # Nodes of the first release send 128 KiB pieces; a WebSocket, long-lived and
            # seldom bulky, must not hold the room for large pieces (CreditPool.window).
            self.credits, self._piece = pool.open(), wire.CHUNK_SIZE
        if self.kind == "websocket" and distributor.wire_format != codec.RELEASED:
            # A WebSocket's credit may count bytes (``wire.CREDIT_UNIT``): announced in the
            # envelope, used once the Node's ACK announces a unit too.
            self.unit = wire.CREDIT_UNIT
        # Expect: 100-continue (found with the header bounds, ``_key_or_refusal``): the body
        # is read once the Node's app asks for it, not before.
        self.expecting = expecting

    async def run(self) -> None:
        d = self.distributor
        buffered: BodyBuffer | None = None
        try:
            if self.expecting:
                # Asking receive() for anything would make the server send "100 Continue".
                events: list[dict[str, Any]] = []
                self._more = True
            else:
                first = await self._receive()
                if first["type"] in ("http.disconnect", "websocket.disconnect"):
                    return
                if self._too_large(first):
                    self._more = self.kind == "http" and first.get("more_body", False)
                    await self._refuse(413, "request body too large\n")
                    return
                events = [dict(first)]
                self._more = first.get("more_body", False) or self.kind == "websocket"
                if self.kind == "http" and self._more and d.request_buffer_size > 0:
                    buffered = BodyBuffer(first, d.request_buffer_size, d.buffer_budget)
                    if not await self._buffer(buffered):
                        return
                    events = [buffered.event()]
                    self._more = events[0]["more_body"]
            key, scope = self.key, self.scope
            # In whole milliseconds, rounded down (the deadline only ever earlier): the
            # envelope's writer writes such a time from the ints, at half the cost of repr.
            now_ms = int(time.time() * 1000)
            timeout_ms = d.worker_timeout * 1000
            deadline: float
            queued: float
            if timeout_ms < 1e15:  # both in ms
                deadline, queued, millis = now_ms + int(timeout_ms), now_ms, True
            else:  # not finite (or absurd): in seconds, as it is
                queued, millis = now_ms / 1000, False
                deadline = queued + d.worker_timeout
            try:
                data = wire.encode_envelope(
                    self.id,
                    d.channel,
                    deadline,
                    scope if type(scope) is dict else _portable_scope(scope),
                    events,
                    window=self.credits,
                    piece=self._piece,
                    liveness=d.liveness_interval,
                    queued=queued,
                    confirms=True,
                    ack_send=True,
                    link=d.link_offer,
                    version=d.wire_format,
                    unit=self.unit,
                    portable=_portable_scope,  # not called for uvicorn's scope: no copy
                    millis=millis,
                )
            except CodecError as exc:  # a server or middleware put something odd in the scope
                logger.error("request %s cannot travel to a Node: %s", self.id, exc)
                await self._refuse(500, "Internal Server Error\n")
                return
            del events
            client, subscriber = d._client, d._subscriber
            # ``ready``, checked again (inline: one per request): buffering the body may have
            # taken long, and while the subscriber is away an ack would be lost (and the Node
            # drop the request). A command connection Redis just closed (its idle ``timeout``)
            # is waited for while it is replaced.
            if not (
                client is not None
                and subscriber is not None
                and client.connected
                and subscriber.connected
            ) and not await d._reopened(in_flight=True):
                d.metrics.refused(metrics.UNREACHABLE)
                await self._refuse(503, "the request queue (Redis) is unreachable\n")
                return
            try:
                assert d._client is not None
                self.pushed_at = time.monotonic()
                # Not awaited: the task wakes once, for the ack, not also for the LPUSH's
                # reply before it. Only a reply that stops the request wakes it (``_Pushed``),
                # told from the code that reads the reply (no loop handle per request).
                self._pushing = True
                self._pushed_on = connection = d._client.connection()
                d.admission.send(connection, key, data, self._pushed)
            except RespError as exc:
                self._pushing = False
                self._unqueued(key, exc)
                await self._refuse(503, "the request queue (Redis) is unreachable\n")
                return
        finally:
            if buffered is not None:
                buffered.release()
        # The ack's deadline counted from the LPUSH's time when that is the loop's clock
        # too: no second read of it (a call to ``loop.time()``, about 0.7k instructions).
        # ``_wait_ack(_NO_ACK, ...)``, inline: a coroutine that waits once, one per request.
        inbox = self.inbox
        timer = d.ack_deadlines.add(
            inbox.put_nowait, _NO_ACK, self.pushed_at if d._monotonic_loop else None
        )
        try:
            while (item := self._answer(_NO_ACK)) is None:
                await inbox.arrival()
        finally:
            Deadlines.cancel(timer)
        if type(item) is _Pushed and item.error is not None:
            item = await self._pushed_again(key, data, item)
        self._pushing = False  # whatever came first decides; a later reply changes nothing
        taken: bool | None = False  # what a take-back found, before a wait for the ack
        if type(item) is _Pushed:
            if item.error is not None:
                error = item.error
                self._unqueued(key, error)
                code = error.code if isinstance(error, ReplyError) else None
                if code in _NOT_RUN_ERRORS:
                    # Refused by Redis before it ran (``-OOM`` past its ``maxmemory``, say):
                    # nothing to take back. A server failing over or loading is unreachable
                    # for now; any other refusal says so.
                    if code in _TRANSIENT_ERRORS:
                        text = "the request queue (Redis) is unreachable\n"
                    elif code == "OOM":
                        text = "the request queue (Redis) is out of memory\n"
                    else:
                        text = "the request queue (Redis) refused the request\n"
                    await self._refuse(503, text)
                    return
                # The link may have failed after Redis ran the LPUSH, or a proxy answered an
                # error after forwarding it: the request may wait in the list, for a Node to
                # run after this answer. Taken back (at once if Redis is reachable).
                d.take_back_later(key, data, self.pushed_at + 2 * d.worker_timeout)
                text = "is unreachable" if code is None else "refused the request"
                await self._refuse(503, f"the request queue (Redis) {text}\n")
                return
            refusal = item.refusal
            taken = await self._take_back(key, data, keep_ack=True)
            if not taken:
                # A Node popped it before the LREM (or the LREM failed, and one may have): it
                # runs there. A 503 (which invites a retry) would have it run twice: relay it
                # as if admitted, unless a take-back in the background finds it unpopped once
                # Redis is back (``_TAKEN_BACK``): then it never ran.
                logger.info(
                    "request %s refused (%s), but a Node may have taken it", self.id, refusal
                )
                item = await self._wait_ack(_GRACE_OVER)
            if taken or item is _TAKEN_BACK:
                d.metrics.refused(refusal)
                d.admission.log_refusal(refusal, key)
                full = refusal == metrics.QUEUE_FULL
                text = "the request queue is full\n" if full else "no worker serves this request\n"
                self.status = d.no_node_status
                await d._refuse_for_now(self.scope, self._unread(), self._send, text)
                self.complete = True
                return
        if item is _NO_ACK:
            # The no-worker answer only for a request provably never run: taken back unpopped.
            taken = await self._take_back(key, data, keep_ack=True)
            if taken:
                d.metrics.refused(metrics.NO_ACK)
                d.admission.log_refusal(metrics.NO_ACK, key)
                text = f"no worker answered within {d.worker_timeout:g} seconds\n"
                await self._refuse(d.no_worker_status, text)
                return
            # A Node popped it: it is in that Node's hands, and its ack may be on its way.
            # (Or the LREM failed: a take-back in the background may find it unpopped.)
            item = await self._wait_ack(_GRACE_OVER)
        if item is _TAKEN_BACK or (
            item is _GRACE_OVER
            and await self._take_back(key, data)  # a later ack: a cancel
            and taken is None
            and self._same_server(self._taken_on)
        ):
            # The LREM that failed then works now, on the same server, and finds it
            # unpopped: it never ran.
            d.metrics.refused(metrics.NO_ACK)
            d.admission.log_refusal(metrics.NO_ACK, key)
            text = f"no worker answered within {d.worker_timeout:g} seconds\n"
            await self._refuse(d.no_worker_status, text)
            return
        if item is _GRACE_OVER:
            # Waited for after a failed take-back (``taken`` None) or one that found the
            # request popped (False): only then is it known that a worker took it.
            if taken is None:  # the LREM's error is logged (``log_kept``, ``take_back_later``)
                text = (
                    "no worker answered in time, and the request could not be taken back from "
                    "the queue (Redis refused or was unreachable): a worker may have it\n"
                )
            else:
                text = "the worker that took the request did not answer in time\n"
            await self._refuse(504, text)
            return
        if item is _VIOLATION:  # forged SENDs past the credit, before any ack
            logger.warning("request %s: more messages than the credit granted", self.id)
            await self._take_back(key, data)
            await self._refuse(502, "the worker broke flow control\n")
            return
        if isinstance(item, _Signal):  # lost contact: messages from the Node may be lost
            await self._take_back(key, data)
            await self._refuse(502, "lost contact with the worker\n")
            return
        if item[0] == wire.GONE:  # the Node dropped it unrun (expired when popped)
            reason = item[1][0] if item[1] and isinstance(item[1][0], str) else ""
            if reason.startswith("unsupported wire format"):
                logger.error(
                    "a worker on %r cannot read this distributor's requests (%s): upgrade it, "
                    "or run the distributors with --wire-format %d until it is",
                    key,
                    reason[:100],
                    codec.RELEASED,
                )
            text = f"no worker answered within {d.worker_timeout:g} seconds\n"
            await self._refuse(d.no_worker_status, text)
            return
        ack_args = item[1]
        node = ack_args[0]
        self.node = node
        self.acked_at = time.monotonic()
        assert d._loop is not None  # bound when the request came in
        # Counted in flight with the Node only once the relay may wait for it (``_track``).
        # Heard from: that matters only to a Node with requests in flight here (a response
        # that comes whole with its ack, the usual small one, leaves none): the loop's
        # clock is read only then.
        if d.peers.knows(node):
            d.peers.heard(node, d._loop.time())
        self._ack = ack_args  # the window it grants is made once the client has more to send
        if len(ack_args) > 3 and ack_args[3] is True:  # wire.asks_confirmation, inline
            # The Node waits to run it until told: this is the first ACK, and the client has
            # not been answered (``confirmation``).
            d.outbox.post(node, self._pack(wire.CONFIRM), lost=self._check_reached)
        self._node_known()
        try:
            answer = self._first
            if (
                answer is not None
                and answer[0] is _USUAL_SEND
                and not answer[1][0][1].get("more_body", False)
                and not self.complete
            ):
                # The usual small response, whole with its ack: ``_relay``'s first step for
                # it (its ``_USUAL_SEND`` branch with no deadline: ``_first`` is kept only
                # then), taken here without the relay's coroutine (about 1.1k instructions):
                # keep the two alike.
                start, body = answer[1][0]
                self.started = True
                self.status = start["status"]
                try:
                    await self._send(start)
                    if self._more:  # seldom: the app answered without reading all the body
                        await self._send_final(body)
                    else:
                        await self._send(body)
                except asyncio.TimeoutError:  # first: an OSError too since Python 3.11
                    await self._fail(504, _SLOW_CLIENT)
                    return
                except OSError:  # the client went away (uvicorn's ClientDisconnected)
                    self.complete = True
                    return
                self.complete = self.node_done = True
            else:
                await self._relay()
        except asyncio.CancelledError:
            self._more = False  # nothing more is read from the client
            raise
        finally:
            if self._delayed is not None:
                Deadlines.cancel(self._delayed)
            for pump in self._pumps:
                pump.cancel()
                pump.add_done_callback(_log_pump_failure)
            if not self.node_done and self.node is not None:
                d.spawn(d.cancel_on(self.node, self.id))
            if self._more and (self.started or not self.expecting or self._wants_body):
                # Ended with the body unread and no final message sent (an abort, say): the
                # abort goes on at once while a bounded task reads the body, else hypercorn,
                # closing the stream, waits for room in its full queue for good. Not before
                # a response started for a body nobody asked for: uvicorn would say "100
                # Continue" just for it.
                receive = self._unread()
                if receive is not None:
                    draining.read_in_background(receive)

    async def _buffer(self, buffered: BodyBuffer) -> bool:
        """Read the body into ``buffered`` up to its bound; False if the exchange is over
        (the client left, stalled, or sent too much), answered if need be."""
        timeout = self.distributor.body_idle_timeout
        while buffered.wanted:
            try:
                event = await buffering.receive_within(self._receive, timeout)
            except BodyIdle:
                await self._refuse(408, "request body timed out\n")
                return False
            if event["type"] == "http.disconnect":
                self._more = False
                return False
            if self._too_large(event):
                await self._refuse(413, "request body too large\n")
                return False
            buffered.add(event)
        return True

    def _node_known(self) -> None:
        """The Node acked: start relaying the client's side to it.

        That starts at once when the client has more to send; for a request already whole
        it only watches for a disconnect, which can wait a moment: most responses are done by
        then, and spare a task per request. The moment is counted from the relay's first wait
        for the Node (``_watch_later``): a response that came whole with the ack (the usual
        small one) is relayed without waiting, and costs no deadline at all (nor the timer's
        wake-up it would arm). A request expecting 100-continue waits for its Node's app to
        ask for the body (``body_wanted``): reading it would solicit it."""
        if self.expecting and not self._wants_body:
            return
        if self._more:
            self._start_pump()
        else:
            self._watch_later = True

    def _track(self) -> None:
        """Count the request in flight with its Node for the liveness checks (the PINGs that
        name it, the Node's silence timed), from the moment the relay may wait for the Node:
        before it waits, or before it relays what does not end the response. A response that
        came whole with the ack (the usual small one) needs nothing more from the Node: it is
        never counted nor forgotten (add and discard: about 5k instructions per request).
        Nothing is awaited between the ack and this call: no message from the Node was
        missed meanwhile, and the Node was heard from at the ack."""
        self.tracked = True
        d = self.distributor
        ack = self._ack
        pings = len(ack) > 2 and type(ack[2]) in (int, float) and ack[2] > 0
        assert d._loop is not None and self.node is not None
        d.peers.add(self.node, self.id, d._loop.time(), pings=pings)

    def _watch_client(self) -> None:
        """The relay waits for the Node: watch the client for a disconnect in a moment."""
        self._watch_later = False
        self._delayed = self.distributor.watch_deadlines.add(_Exchange._start_pump, self)

    def _open_window(self) -> None:
        """The window (and the piece size) the Node's ACK grants, for what the client sends
        after the envelope. Made only then: most requests travel whole in their envelope.
        A CREDIT before it has nothing to add to: a window starts full."""
        ack_args = self._ack
        if len(ack_args) > 4:
            self.piece = wire.piece_size(ack_args[4])
        unit = wire.credit_unit(ack_args[5], self.piece) if len(ack_args) > 5 else 0
        if len(ack_args) > 1 and type(ack_args[1]) is int and 1 <= ack_args[1] <= 1024:
            self.window = wire.SendWindow(ack_args[1], unit=unit, piece=self.piece)
        else:
            self.window = wire.SendWindow(unit=unit, piece=self.piece)

    def body_wanted(self) -> None:
        """The Node's app asked for the body of a request queued without it (CONTINUE)."""
        if not self.expecting or self._wants_body:
            return
        self._wants_body = True
        if self.node is not None and not self.complete:
            self._start_pump()  # else once the ack is handled

    def _start_pump(self) -> None:
        self._pumps += (asyncio.ensure_future(self._forward_client(self._more)),)

    def receiving(self) -> wire.ReceiveWindow:
        """The window of what the Node sends, made at the first need: the credits the
        envelope announced (taken from the pool when the exchange was made), with the
        first message counted in if it arrived before. Never after ``close_window``."""
        window = self.received
        if window is None:
            assert not self._released, "a window made after its credits went back"
            window = self.received = wire.ReceiveWindow(
                self.credits, self._pool, self._grant_later, self._piece
            )
            if self._arrived:
                window.arrived()
        return window

    def close_window(self) -> None:
        """The exchange is over: the pool gets back every credit its window holds, or, with
        no window made, the credits taken for it (once)."""
        window = self.received
        if window is not None:
            window.close()
        elif not self._released:
            self._released = True
            self._pool.release(self.credits, self._piece)

    def _grant_later(self, credit: int) -> None:
        """Credit owed since the pool was full, now that it has room."""
        if self.node is not None and not self.complete:
            self._post_credit(credit)

    def _post_credit(self, credit: int, *, hold: bool = False) -> None:
        assert self.node is not None
        credits = self._credits
        if credits is None:
            credits = self._credits = wire.CreditMessages(self.id, self.distributor.wire_format)
        message = credits.pack(credit)
        # Not awaited: relaying goes on; a lost credit would stall the transfer, so a count
        # of 0 fails the exchange (in the batch's callback: no task, no wait).
        posted = self.distributor.outbox.post(
            self.node, message, hold=hold, lost=self._check_reached
        )
        if hold:
            self._holding_credit = True
            posted.add_done_callback(self._credit_out)

    def _may_hold_credit(self, credit: int) -> bool:
        """True if a WebSocket's credit may wait a moment (the outbox's hold time) for the
        client's next message to the Node and ride in its PUBLISH: in a conversation going
        back and forth, every few messages would else cost a PUBLISH (and its reply) of their
        own. Only while the Node still has credit to go on sending with, and never two in a
        row: a Node streaming to the client then waits at most for this side to consume what
        it sent already (whose credit takes the held one along), never for the hold timer."""
        return (
            self.kind == "websocket"
            and not self._holding_credit
            and self.receiving().outstanding - credit >= self.receiving().largest
        )

    def _credit_out(self, posted: asyncio.Future[int]) -> None:
        self._holding_credit = False

    def _check_reached(self, posted: asyncio.Future[int]) -> None:
        """A callback on a message not awaited: the Node is gone if nobody got it."""
        if posted.cancelled() or posted.exception() is not None or posted.result() == 0:
            self.inbox.put_nowait(_PEER_LOST)

    async def _pushed_again(self, key: str, data: bytes, failed: _Pushed) -> Any:
        """What ends the wait for the ack after the LPUSH ``failed``: ``failed`` itself (the
        caller answers 503 as ever), an ack (or other answer) come meanwhile, or, if the
        request was pushed again, what ends the wait for its ack.

        Only for a connection Redis closed cleanly before answering the LPUSH (its idle
        ``timeout``, ``CLIENT KILL``, a proxy's close), and only once its replacement comes
        at once (``Client.wait_reopened``). Then ``LREM`` takes back a copy that did run,
        and the request is pushed again only on proof that no other copy can run:
        - the LPUSH was never written, the connection found closed (``unsent``);
        - the LREM removed it: it ran and was still queued, and now nobody can pop it.
        Otherwise (the LREM removed none) a Node may have popped a copy whose ack is late,
        or Redis never read the LPUSH (its idle ``timeout`` closed the connection with it
        unread): the two cannot be told apart from here, and pushing again might run it
        twice, so the client gets 503 as before. An ack that comes during the wait or the
        LREM is used: the request runs."""
        d = self.distributor
        connection = self._pushed_on
        # A reset, a reply watchdog or an error reply: as before. So for a cluster, whose
        # router (``Connection`` of none) says nothing of how its connections ended.
        if not (isinstance(connection, Connection) and connection.closed_by_server):
            return failed
        reopened = await d._reopened(in_flight=True)
        if (answer := self._answer(_NO_ACK)) is not None:  # an ack for a copy that ran
            return answer
        if not reopened:
            return failed
        try:
            assert d._client is not None
            removed = await d._client.execute("LREM", key, -1, data)
        except RespError:
            answer = self._answer(_NO_ACK)
            return failed if answer is None else answer
        if (answer := self._answer(_NO_ACK)) is not None:
            return answer
        error = failed.error
        if not removed and not (isinstance(error, RedisConnectionError) and error.unsent):
            logger.info(
                "request %s: Redis closed the connection before answering its LPUSH, which "
                "may have run: not pushed again",
                self.id,
            )
            return failed
        try:
            self.pushed_at = time.monotonic()
            self._pushed_on = connection = d._client.connection()
            d.admission.send(connection, key, data, self._pushed)
        except RespError as exc:
            return _Pushed(error=exc)
        logger.info(
            "request %s pushed again: Redis closed the connection before answering its LPUSH",
            self.id,
        )
        return await self._wait_ack(_NO_ACK)

    def _pushed(self, outcome: Any, index: int) -> None:
        """The LPUSH's outcome (or the exception that failed it), this request at ``index`` in
        its batch: wake the exchange only if it refuses or failed the request, and only while
        that still matters (no ack, GONE, deadline or lost peer came first)."""
        if not self._pushing:
            return
        if isinstance(outcome, BaseException):  # RespError, or a failure before the command
            self.inbox.put_nowait(_Pushed(error=outcome))
            return
        try:
            refusal = self.distributor.admission.verdict(self.key, index, outcome)
        except Exception as exc:  # an error reply to the LPUSH
            self.inbox.put_nowait(_Pushed(error=exc))
            return
        if refusal is not None:
            self.inbox.put_nowait(_Pushed(refusal=refusal))

    def _unqueued(self, key: str, exc: BaseException) -> None:
        self.distributor.log_unqueued(key, exc)
        # A failover or a restart (READONLY, LOADING, ...) counts as unreachable, where
        # alerts look for it; only other error replies as refused.
        refused = isinstance(exc, ReplyError) and exc.code not in _TRANSIENT_ERRORS
        self.distributor.metrics.refused(metrics.REDIS_REFUSED if refused else metrics.UNREACHABLE)

    async def _wait_ack(self, timeout: _Signal) -> Any:
        """The next ACK or GONE, or a signal: ``timeout`` after ``worker_timeout`` from the
        loop's time now, or a lost peer (``_answer``). ``run`` does the same inline for its
        first wait, from the LPUSH's time."""
        # One timer for all requests rather than wait_for() (a task per request before
        # Python 3.12) or a call_later each.
        inbox = self.inbox
        timer = self.distributor.ack_deadlines.add(inbox.put_nowait, timeout)
        try:
            while (item := self._answer(timeout)) is None:
                await inbox.arrival()
            return item
        finally:
            Deadlines.cancel(timer)

    def _answer(self, timeout: _Signal) -> Any:
        """What the inbox holds that ends a wait for the ack (the ACK, a GONE, ``timeout``, a
        lost peer, a violation, the LPUSH's refusal), or None once it is empty. Anything else
        before an ack can only be forged, and is dropped."""
        inbox = self.inbox
        while True:
            item = inbox.get_or(None)  # items are never None
            if item is None:
                return None
            if item is timeout or item is _PEER_LOST or item is _VIOLATION:
                # A violation is signalled once, and everything after it dropped: lost
                # here, the request would wait for messages that are never kept.
                return item
            if isinstance(item, _Signal):
                if (type(item) is _Pushed and self._pushing) or item is _TAKEN_BACK:
                    return item
                continue  # e.g. a deadline of the previous wait
            kind, args = item
            if kind == wire.GONE:
                return item
            if kind == wire.ACK and args:  # _acking_node(*item), inline: one per request
                channel = args[0]
                if isinstance(channel, str) and 0 < len(channel) <= 256:
                    return item
            # Before the ACK, on the same connection, a Node sends nothing: forged.
            if kind == wire.SEND or kind is _USUAL_SEND:
                self.receiving().dropped()
            logger.warning("dropped a %r message before the ack of %s", kind, self.id)

    async def _take_back(self, key: str, data: bytes, *, keep_ack: bool = False) -> bool | None:
        """Undo the LPUSH of a request answered without a Node; True if it was still in the
        list (then no Node ever popped it, and none ever will), False if it was not (a Node
        popped it), None if the LREM failed (Redis refused it or was unreachable: either may
        be so).

        ``keep_ack``: if it was not in the list, leave an ack that arrived meanwhile for the
        caller, who then waits for it rather than answering."""
        d = self.distributor
        removed: bool | None = None
        # Waiting for the outcome (``keep_ack``): told of a take-back in the background.
        then = self._taken_later if keep_ack else None
        try:
            assert d._client is not None
            self._taken_on = connection = d._client.connection()
            # From the tail, where the oldest requests wait (Nodes pop that end).
            removed = bool(await connection.execute("LREM", key, -1, data))
        except ReplyError as exc:
            if exc.code in _TRANSIENT_ERRORS:  # a server busy, loading or failing over
                d.take_back_later(key, data, self.pushed_at + 2 * d.worker_timeout, then)
            else:  # not allowed, say: trying again would not help
                d.log_kept(key, self.id, exc)
        except RespError:
            # Redis unreachable: whatever the answer, it must not run after it (a Node pops
            # it until its deadline, by a Node's clock: twice the wait covers skew).
            d.take_back_later(key, data, self.pushed_at + 2 * d.worker_timeout, then)
        if keep_ack and not removed:
            return removed  # a Node may have it: its ack, even one that landed meanwhile, counts
        self.cancel_late_acks()
        return removed

    def _taken_later(self, removed: bool, connection: object) -> None:
        """``take_back_later``'s outcome for a request still waiting for its ack: one removed
        from the server its LPUSH went to never ran (``_same_server``)."""
        if removed and self._same_server(connection):
            self.inbox.put_nowait(_TAKEN_BACK)

    def _same_server(self, connection: object) -> bool:
        """Whether ``connection`` goes to the server the LPUSH went to: by its address, which
        a failover under Sentinel changes (the promoted replica may hold the LPUSH but not a
        pop that ran on the old master, unreplicated). A cluster's router, unknown: no."""
        pushed = self._pushed_on
        if not (isinstance(pushed, Connection) and isinstance(connection, Connection)):
            return False
        was, now = pushed.params, connection.params
        return (was.host, was.port, was.unix_socket) == (now.host, now.port, now.unix_socket)

    def cancel_late_acks(self) -> None:
        """Tell every Node whose ACK waits unread in the inbox (it came just too late, or
        while the client was being answered) to stop: one that asked for a confirmation
        would otherwise wait for it until its next PING is answered."""
        d = self.distributor
        while not self.inbox.empty():
            item = self.inbox.get_nowait()
            node = None if isinstance(item, _Signal) else _acking_node(*item)
            if node is not None and node != self.node:
                d.spawn(d.cancel_on(node, self.id))

    def _too_large(self, event: Message) -> bool:
        limit = self.distributor.max_body_size
        if event["type"] != "http.request" or limit is None:
            return False
        self.body_size += len(event.get("body", b""))
        return self.body_size > limit

    async def _refuse(self, status: int, text: str) -> None:
        self.status = status
        receive = self._unread()
        await _refuse(self.scope, receive, self._send, status, text, accepted=self.started)
        self.complete = True

    async def _relay(self) -> None:
        """Relay the Node's messages until the exchange is complete."""
        d = self.distributor
        timeout = d.response_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        inbox = self.inbox
        # The response's first message, come with the ACK: taken before the inbox.
        first: Any = self._first
        item: Any
        while not self.complete:
            if first is not None:
                item, first = first, None
            elif deadline is None:
                item = inbox.get_or(None)  # items are never None
                if item is None:  # the relay waits for the Node
                    if self._watch_later:
                        self._watch_client()
                    if not self.tracked:
                        self._track()
                    await inbox.arrival()
                    continue
            else:  # bounded even while messages keep coming
                if self._watch_later and inbox.empty():
                    self._watch_client()
                if not self.tracked:
                    self._track()  # wait_for() awaits even for a message already there
                try:
                    remaining = deadline - asyncio.get_running_loop().time()
                    item = await asyncio.wait_for(inbox.get(), max(remaining, 0))
                except asyncio.TimeoutError:
                    await self._fail(504, "the worker did not answer in time\n")
                    return
            if type(item) is tuple:  # a message from the Node, the usual item
                kind, args = item
            elif item is _CLIENT_GONE:
                # The Node was told through the disconnect event; its app decides what to do.
                self.complete = self.node_done = True
                return
            elif item is _PEER_LOST:
                if self.link_done:  # the rest of the response is in the inbox already
                    continue
                await self._fail(502, "lost contact with the worker\n")
                return
            elif item is _PEER_SILENT:
                if self.link_done:
                    continue
                logger.warning(
                    "request %s: nothing heard from its worker for %g s",
                    self.id,
                    d.peer_timeout,
                )
                await self._fail(502, "lost contact with the worker\n")
                return
            elif item is _LINK_BROKEN:
                await self._fail(502, "the worker's link broke\n")
                return
            elif item is _VIOLATION:
                logger.warning("request %s: the worker sent more than the credit granted", self.id)
                await self._fail(502, "the worker broke flow control\n")
                return
            elif item is _TOO_LARGE:
                await self._fail(413, "request body too large\n")
                return
            elif item is _CLIENT_IDLE:
                self.node_done = True  # told through the disconnect event, as for _CLIENT_GONE
                await self._fail(408, "request body timed out\n")
                return
            else:  # another signal: e.g. an ack deadline that fired with the ack
                continue
            if kind is _USUAL_SEND:
                # What the general branch below does with these events, without looking at
                # them: ``responsereader`` read them so (a start with an int status, header
                # pairs as tuples and no trailers, then a body), as the response's first
                # message (about 150 opcodes fewer for the usual response). ``run`` sends
                # such a response itself when it is whole and no deadline bounds it: keep
                # the two alike.
                start, body = args[0]
                more = body.get("more_body", False)
                if more and not self.tracked:
                    self._track()  # relaying may wait (a slow client): the Node has more
                self.started = True
                self.status = start["status"]
                try:
                    if deadline is None:
                        await self._send(start)
                        if not more and self._more:  # seldom: the body is not all read
                            await self._send_final(body)
                        else:
                            await self._send(body)
                    else:
                        try:
                            await self._send_by(start, deadline)
                        except asyncio.TimeoutError:
                            # Not sent (a server writes nothing of a start it waited to
                            # send): the plain 504, not an abort.
                            self.started = False
                            raise
                        await self._send_by(body, deadline, final=not more)
                except asyncio.TimeoutError:  # first: an OSError too since Python 3.11
                    await self._fail(504, _SLOW_CLIENT)
                    return
                except OSError:  # the client went away (uvicorn's ClientDisconnected)
                    self.complete = True
                    return
                if not more:
                    self.complete = self.node_done = True
                    return
                credit = self.receiving().consumed()
                if credit:
                    self._post_credit(credit, hold=self._may_hold_credit(credit))
                continue
            if kind == wire.SEND:
                if not (args and isinstance(args[0], list)):
                    self.receiving().dropped()
                    continue
                # The events relayed here, not by a coroutine of their own: one that never
                # waits (the usual response, sent at once) costs about 1.1k instructions.
                events = args[0]
                if not self.tracked:
                    # Relaying may wait (a slow client): only a SEND that ends the response
                    # (its last event a complete body, and no trailers announced below)
                    # leaves nothing to wait for from the Node meanwhile.
                    last = events[-1] if events else None
                    if not (
                        type(last) is dict
                        and last.get("type") == "http.response.body"
                        and not last.get("more_body", False)
                    ):
                        self._track()
                for event in events:
                    what = event.get("type") if isinstance(event, dict) else None
                    if not isinstance(what, str):
                        # Before the start the server answers its own 500: no abort.
                        self.aborted = self.started
                        raise ResponseAborted("the worker sent a malformed event")
                    if what == "http.response.body":
                        if event.get("link") is True:  # the body continues on the link
                            self._take_link()
                            continue
                    elif what in _STARTS:
                        _tuple_headers(event)
                        self.started = True
                        status = event.get("status", 101 if what == "websocket.accept" else 0)
                        self.status = status if type(status) is int else 0
                        if event.get("trailers", False):
                            if _offers(self.scope, "http.response.trailers"):
                                self.trailers = True
                                if not self.tracked:  # the trailers are still to come
                                    self._track()
                            else:  # the Node completes without them: so must the server
                                event = {k: v for k, v in event.items() if k != "trailers"}
                    elif what == "http.response.trailers":
                        _tuple_headers(event)
                    elif what == "websocket.send":
                        pieces = self.pieces
                        if pieces is None:
                            pieces = self.pieces = wire.Reassembler(wire.MAX_WEBSOCKET_MESSAGE)
                        try:
                            whole = pieces.add(event)
                        except wire.WireError as exc:
                            self.aborted = self.started
                            raise ResponseAborted(str(exc)) from None
                        if whole is None:
                            continue
                        event = whole
                    # The response's final message, with the body not all read (seldom): sent
                    # while the rest is read (``_send_final``). Not a last body when trailers
                    # were announced: the app may read the body before sending them.
                    final = self._more and (
                        (
                            what == "http.response.body"
                            and not self.trailers
                            and not event.get("more_body", False)
                        )
                        or (
                            what == "http.response.trailers"
                            and not event.get("more_trailers", False)
                        )
                    )
                    try:
                        await self._send_relayed(event, deadline, final)
                    except asyncio.TimeoutError:  # first: an OSError too since Python 3.11
                        if what == "http.response.start":
                            self.started = False  # not sent: the plain 504, not an abort
                        await self._fail(504, _SLOW_CLIENT)
                        return
                    except OSError:  # the client went away (uvicorn's ClientDisconnected)
                        self.complete = True
                        return
                    if what == "http.response.body":
                        if not self.trailers and not event.get("more_body", False):
                            self.complete = self.node_done = True
                    elif (
                        (
                            what == "websocket.http.response.body"
                            and not event.get("more_body", False)
                        )
                        or what == "websocket.close"
                        or (
                            what == "http.response.trailers"
                            and not event.get("more_trailers", False)
                        )
                    ):
                        self.complete = self.node_done = True
                if not self.complete:
                    # Once complete, nothing more comes through the window: it closes as the
                    # exchange ends, giving the pool every credit it holds (all that consuming
                    # would give back first).
                    credit = self.receiving().consumed()
                    if credit:
                        self._post_credit(credit, hold=self._may_hold_credit(credit))
            elif kind is _LINK_BODY:
                body, more = args
                event = {"type": "http.response.body", "body": body, "more_body": more}
                final = self._more and not more  # a link never carries a trailers response
                try:
                    await self._send_relayed(event, deadline, final)
                except asyncio.TimeoutError:  # first: an OSError too since Python 3.11
                    await self._fail(504, _SLOW_CLIENT)
                    return
                except OSError:  # the client went away (uvicorn's ClientDisconnected)
                    self.complete = True
                    return
                if not more:
                    self.complete = self.node_done = True
                    return
                reader = self.distributor._link_listener
                reader_of = None if reader is None else reader.reader(self.id)
                if reader_of is not None:
                    reader_of.consumed(len(body))
            elif self.linked and (kind == wire.DONE or kind == wire.GONE):
                # The body's end travels on the link, behind frames a DONE or a GONE through
                # Redis can overtake (the Node, done, answers a PING with "unknown"): the
                # link's last frame ends the exchange, or its break (a Node whose app
                # failed, or that gave the request up, drops its link).
                continue
            elif kind == wire.DONE:
                self.node_done = True
                if self.kind == "websocket" and not self.started:
                    # The handshake is unanswered: leave the answer to the server, as when
                    # its own app ends so (uvicorn and hypercorn answer 500, not 403).
                    self.complete = True
                    if args and args[0] is True:
                        raise AppFailed("the app on the worker raised before accepting")
                    return
                await self._fail(500, "Internal Server Error\n")
                return
            elif kind == wire.GONE:
                self.node_done = True  # nothing to cancel there
                reason = args[0] if args and isinstance(args[0], str) else "?"
                logger.warning("request %s: its worker dropped it (%s)", self.id, reason[:100])
                await self._fail(502, "the worker dropped the request\n")
                return

    def _take_link(self) -> None:
        """The Node's marker: the rest of the body comes on its link, as inbox items."""
        d = self.distributor
        listener = d._link_listener
        if listener is None or self.linked or self.trailers or self.kind != "http":
            self.aborted = self.started
            raise ResponseAborted("the worker sent a link marker this request cannot take")
        self.linked = True
        d.metrics.linked()
        if not self.tracked:
            self._track()
        put = self.inbox.put_nowait
        request_id = self.id

        def on_frame(body: bytes, more: bool) -> None:
            if not more:
                # The whole response is in hand, in the inbox: the Node may go now (a
                # graceful stop), and its loss must not abort what remains to be relayed.
                self.link_done = True
            put((_LINK_BODY, (body, more)))

        def on_lost(why: str) -> None:
            logger.warning("request %s: %s", request_id, why)
            put(_LINK_BROKEN)

        def on_silent(why: str) -> None:
            logger.warning("request %s: %s", request_id, why)
            put(_LINK_BROKEN)

        listener.take(request_id, on_frame, on_lost, on_silent, d.peer_timeout, d.liveness_interval)

    def take_upload(self, sender: UploadSender) -> bool:
        """The Node opened an upload link: the client's body continues on it, from a piece
        boundary of the pump's choosing (``_upload``). Refused (False) unless the body is
        still coming and no link was taken yet."""
        if self.kind != "http" or not self._more or self.uplink is not None or self.complete:
            return False
        self.uplink = sender
        request_id = self.id

        def on_lost(why: str) -> None:
            if self.uplinked:  # the body was on it: what is lost cannot be sent again
                logger.warning("request %s: %s", request_id, why)
                self.inbox.put_nowait(_LINK_BROKEN)
            else:  # not used yet: the body goes on through Redis, as if it never came
                self.uplink = None

        sender.on_lost = on_lost
        return True

    async def _upload(self, event: Message) -> bool | None:
        """Send a client's ``http.request`` on the upload link: True if sent, None if the
        link was gone before the marker (the caller sends it through Redis), False if it
        broke after (the exchange told: ``_LINK_BROKEN``). The first one is preceded by the
        marker (an empty body with ``"link": True``), through Redis under credit behind every
        piece sent there: the Node reads all of those, then the link."""
        uplink = self.uplink
        if not self.uplinked:
            window = self.window
            assert window is not None and self.node is not None
            if uplink is None or uplink.closed:  # lost before: no credit taken for it
                self.uplink = None
                return None
            if not window.try_take(1):
                await window.acquire(1)
            if uplink.closed:  # lost while waiting for credit
                # The marker's credit back: never spent, the Node would never grant it again
                # (with a window of one credit, a Node short of budget, the pump waited for
                # ever).
                window.grant(1)
                self.uplink = None
                return None
            marker = {"type": "http.request", "body": b"", "more_body": True, "link": True}
            d = self.distributor
            message = wire.pack_parts(wire.EVENT, self.id, marker, version=d.wire_format)
            d.outbox.post(self.node, message, lost=self._check_reached)
            self.uplinked = True
            d.metrics.uploads.inc()
        assert uplink is not None
        more = bool(event.get("more_body", False))
        pieces = _body_pieces(event, _LINK_MAX_FRAME)
        last = len(pieces) - 1
        try:
            for index, piece in enumerate(pieces):
                body = piece.get("body", b"")
                parts = body.parts if isinstance(body, Gathered) else [body]
                await uplink.send(parts, more or index < last)
                self.distributor.metrics.upload_bytes.inc((), sum(map(len, parts)))
        except (ConnectionError, LinkError):
            if not uplink.closed:  # else told already (``on_lost``), or the exchange ends
                uplink.abort()  # on_lost is not called after: told here
                self.inbox.put_nowait(_LINK_BROKEN)
            return False
        return True

    async def _send_relayed(self, event: Message, deadline: float | None, final: bool) -> None:
        """Send a relayed message (from Redis or the link) to the client: by ``deadline`` if
        ``response_timeout`` set one, and as the response's final message (``_send_final``:
        an unread body read meanwhile) if ``final``."""
        if deadline is not None:
            await self._send_by(event, deadline, final=final)
        elif final:
            await self._send_final(event)
        else:
            await self._send(event)

    async def _send_by(self, event: Message, deadline: float, *, final: bool = False) -> None:
        """Send ``event`` to the client by ``deadline`` (``response_timeout``'s, the loop's
        time), else ``asyncio.TimeoutError``: a client that stops reading holds the relay in
        the server's flow control, out of reach of the inbox's wait for that deadline, and the
        app on the Node in its wait for credit. Past the deadline already, nothing is sent:
        ``wait_for`` with no time left would cancel the send before it starts (the start of a
        response lost so, the server would answer its own 500 rather than this 504)."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise asyncio.TimeoutError
        if final and self._more:
            await asyncio.wait_for(self._send_final(event), remaining)
        else:
            await asyncio.wait_for(self._send(event), remaining)

    async def _send_final(self, event: Message) -> None:
        """Send the response's final message, the request's body not all received: at
        once, the rest read and discarded meanwhile (``draining``), so that hypercorn's
        full queue of body events cannot hold the send."""
        receive = self._unread()
        if receive is None:
            await self._send(event)
        else:
            await draining.send_draining(receive, self._send, event)

    def _unread(self) -> Receive | None:
        """The client's ``receive`` if its body may still come unread (None if not), the
        pumps that read it stopped: from now on it is read only to be discarded."""
        if not self._more or self.kind != "http":
            return None
        self._more = False
        for pump in self._pumps:
            pump.cancel()
        return self._receive

    async def _fail(self, status: int, text: str) -> None:
        """End the exchange on an error: a plain answer if nothing was sent, else an abort."""
        if self.kind == "http" and self.started:
            self.complete = False
            self.aborted = True
            raise ResponseAborted(text.strip())
        if self.kind == "websocket" and self.started:
            self.aborted = True  # cut by this side (1011), not ended by the app
            await self._send({"type": "websocket.close", "code": 1011})
            self.complete = True
            return
        await self._refuse(status, text)

    def _pack(self, kind: str, *args: Any) -> bytes:
        return wire.pack(kind, self.id, *args, version=self.distributor.wire_format)

    async def _forward_client(self, more: bool) -> None:
        """Relay what the client sends after the envelope, under the Node's credit."""
        d = self.distributor
        assert self.node is not None
        if more and self.window is None:
            self._open_window()
        idle = self.distributor.body_idle_timeout if self.kind == "http" else None
        left_over: Message | None = None  # received while gathering a piece, not part of it
        data: wire.WebSocketData | None = None  # a WebSocket's messages, made at its first
        while True:
            try:
                if left_over is not None:
                    event, left_over = left_over, None
                elif idle is None or not more:  # no bound: no timer, nor a coroutine for it
                    event = await self._receive()
                else:
                    event = await buffering.receive_within(self._receive, idle)
            except BodyIdle:
                # The app sees the client gone; the client, if nothing was sent yet, a 408.
                disconnect = {"type": "http.disconnect"}
                await d.publish(self.node, self._pack(wire.EVENT, disconnect))
                self.inbox.put_nowait(_CLIENT_IDLE)
                return
            kind = event["type"]
            if kind in ("http.disconnect", "websocket.disconnect"):
                self._more = False
                await d.publish(self.node, self._pack(wire.EVENT, dict(event)))
                self.inbox.put_nowait(_CLIENT_GONE)
                return
            if not more:
                continue  # uvicorn sends nothing else once the body is complete
            if kind == "http.request":
                event, left_over = await gather_body(self._receive, event, self.piece)
                if not event.get("more_body", False) or (
                    left_over is not None and left_over["type"] == "http.disconnect"
                ):
                    self._more = False  # all received: nothing left to drain
            if self._too_large(event):
                self.inbox.put_nowait(_TOO_LARGE)
                return
            if self.uplink is not None and kind == "http.request":
                sent = await self._upload(event)
                if sent is False:
                    # The link broke (the relay ends the exchange: ``_LINK_BROKEN``), or the
                    # app ended before the body's end (``UPLOAD_DONE``: closed quietly).
                    return
                if sent:
                    if not event.get("more_body", False):
                        more = False
                    continue
            window = self.window
            assert window is not None
            pieces: Sequence[Mapping[str, Any]]
            websocket = kind == "websocket.receive"
            if websocket:
                pieces = wire.split_message(dict(event), window.piece)
                if data is None:
                    data = wire.WebSocketData(self.id, d.wire_format)
            else:
                pieces = _body_pieces(event, self.piece)
            last = len(pieces) - 1
            for index, piece in enumerate(pieces):
                if data is not None and websocket:
                    message = data.event(piece)  # a dict of its own (split_message's)
                else:
                    message = wire.pack_parts(
                        wire.EVENT, self.id, dict(piece), version=d.wire_format
                    )
                # Encoded first: counting bytes (a WebSocket's credit unit), its size is its cost.
                cost = window.cost(wire.packed_size(message)) if window.unit else 1
                if not window.try_take(cost):
                    await window.acquire(cost)
                # Pipelined within the window: the receiver count is checked in a callback,
                # one per batch for all of its messages.
                d.outbox.post(self.node, message, lost=self._check_reached, more=index < last)
            if kind == "http.request" and not event.get("more_body", False):
                more = False


def _body_pieces(event: Mapping[str, Any], size: int) -> list[Mapping[str, Any]]:
    """An ``http.request`` event as pieces of at most ``size`` bytes of body (the server may
    hand over more at once than the Node reads in one piece)."""
    body = event.get("body", b"")
    if type(body) is not bytes or len(body) <= size:
        return [event]
    more = bool(event.get("more_body", False))
    view = memoryview(body)  # each piece is copied once, into its message
    return [
        {
            "type": "http.request",
            "body": view[i : i + size],
            "more_body": more or i + size < len(body),
        }
        for i in range(0, len(body), size)
    ]


def _batch_sizes(**batchers: Any) -> str:
    parts = []
    for command, batcher in batchers.items():
        mean = batcher.items / batcher.batches if batcher.batches else 0.0
        parts.append(f"{batcher.items} {command} items in {batcher.batches} commands ({mean:.2f})")
    return ", ".join(parts)


_STARTS = ("http.response.start", "websocket.accept", "websocket.http.response.start")
_USUAL_SEND = "send (the usual response)"
_LINK_BODY = "a body frame from the link"
"""The inbox's kind for a body read from the Node's link: ``(body, more)``."""
"""The inbox's kind for a SEND read by ``responsereader`` (``wire.SEND``'s arguments): a
response start and its body, of the shape that reader admits, for the relay's short path."""


def _tuple_headers(event: dict[str, Any]) -> None:
    """Header pairs as the app sent them (the fast format delivers tuples as lists): an ASGI
    server takes either, but an app served directly sends tuples almost always. In place:
    the list is the decoder's, made for this event alone; a plain loop costs less than
    converting in C for a response's few headers (valgrind, two headers: 5.5k -> 3.4k
    instructions)."""
    headers = event.get("headers")
    if type(headers) is list:
        for index, pair in enumerate(headers):
            if type(pair) is list:
                headers[index] = tuple(pair)


def _log_pump_failure(pump: asyncio.Task[None]) -> None:
    if not pump.cancelled() and pump.exception() is not None:
        logger.debug("relaying a client failed: %r", pump.exception())


def _on_send(exchange: _Exchange, args: Sequence[Any], size: int, kind: str = wire.SEND) -> None:
    """A SEND of ``size`` encoded bytes for ``exchange``: counted even before run() has seen
    the ACK (both may come in one read). Past the credit granted nothing more is kept: the
    exchange fails once the relay gets to the violation (it may be waiting on a slow
    client). ``kind``: ``wire.SEND``, or ``_USUAL_SEND`` for one of that shape."""
    if exchange.violated:
        return
    if exchange.received is None and not exchange._arrived:
        # The first: a window has at least one credit, counting messages until made
        # (``receiving``). The usual response is this one message: no window is made.
        exchange._arrived = True
        exchange.inbox.put_nowait((kind, args))
    elif exchange.receiving().arrived(size):
        exchange.inbox.put_nowait((kind, args))
    else:
        exchange.violated = True
        exchange.inbox.put_nowait(_VIOLATION)


def _acking_node(kind: str, args: Sequence[Any]) -> str | None:
    """The Node channel an ACK names, if the message is a well-formed ACK."""
    if kind != wire.ACK or not args:
        return None
    channel = args[0]
    return channel if isinstance(channel, str) and 0 < len(channel) <= 256 else None


_PLAIN_SCOPE_KEYS_AND_STATE = PLAIN_SCOPE_KEYS | {"state"}


def _offers(scope: Scope, extension: str) -> bool:
    extensions = scope.get("extensions")
    return isinstance(extensions, dict) and extension in extensions


def _portable_scope(scope: Scope) -> dict[str, Any]:
    """The scope minus what cannot or must not travel (``state``, extensions a Node cannot
    honour end to end: see ``wire.RELAYED_EXTENSIONS``)."""
    if scope.keys() <= _PLAIN_SCOPE_KEYS_AND_STATE:
        # The usual scope (uvicorn's, hypercorn's): one copy and no key checked in Python.
        portable = dict(scope)
        portable.pop("state", None)
        return portable
    portable = {}
    for name, value in scope.items():
        if name in PLAIN_SCOPE_KEYS:
            portable[name] = value
        elif name == "extensions" and isinstance(value, dict):
            portable[name] = {
                k: v
                for k, v in value.items()
                if k in wire.RELAYED_EXTENSIONS and codec.is_portable(v)
            }
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
    """Answer by ourselves: a plain-text response, or a refused/closed WebSocket.

    For HTTP, ``receive`` is given when the request's body may still come unread: if the
    request may have one (``_may_have_body``), it is read and discarded while the response
    is sent (``draining.send_draining``); a bodiless request costs nothing more."""
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
    end = {"type": "http.response.body", "body": body}
    if receive is None or not _may_have_body(scope):
        await send(end)
    else:
        await draining.send_draining(receive, send, end)


def _may_have_body(scope: Scope) -> bool:
    """Whether the request may have a body: over HTTP/1, only with a ``Content-Length``
    other than 0 or a ``Transfer-Encoding``; over HTTP/2 (and 3), whose requests need
    neither (hypercorn gives no sign of a body in the scope), unless ``Content-Length: 0``."""
    length = None
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            length = value
    if length is not None:
        return length.strip() not in (b"0", b"")
    return scope.get("http_version") not in ("1.1", "1.0")


def _link_address(
    link: str | None, advertise: str | None, plaintext: bool, params: Any
) -> tuple[str, int] | None:
    """The address to listen on for links (``Distributor(link=...)``), checked."""
    if not link:
        return None
    host, port = link, 0
    head, sep, tail = link.rpartition(":")
    if sep and tail.isdigit() and (not head.count(":") or head.endswith("]")):
        host, port = head, int(tail)
    host = host.strip("[]")
    if not host or not 0 <= port < 65536:
        raise ValueError(f"link must be HOST or HOST:PORT, not {link!r}")
    if host in ("0.0.0.0", "::") and not advertise:
        raise ValueError(
            f"link={link!r} listens on every address: give link_advertise, the host the "
            "Nodes should connect to"
        )
    if advertise is not None and not (
        advertise and advertise.isascii() and advertise.isprintable() and " " not in advertise
    ):
        raise ValueError(f"link_advertise must be a host name or address, not {advertise!r}")
    if getattr(params, "ssl", None) and not plaintext:
        raise ValueError(
            "Redis is reached over TLS, but a link carries response bodies in plaintext TCP: "
            "give link_plaintext=True to allow it, or leave link off"
        )
    return host, port


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
