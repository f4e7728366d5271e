"""A fault-injecting TCP proxy owned by the tests, to reproduce what real networks do.

``FaultProxy(port)`` listens on a free loopback port and relays every connection to
``127.0.0.1:port`` (a private redis-server). A test can then, without closing anything:

* ``stall(up=True, down=True)``: stop relaying one or both directions on the connections open
  now (a NAT table that forgot the flow, a stalled link); ``resume()`` relays again, and what
  was held back is delivered late, in order, as after a blip. New connections are relayed
  normally unless ``stall_new=True``, the way a fresh flow gets a fresh NAT entry.
* ``throttle(down=...)``: relay at most that many bytes a second towards the clients of the
  connections open now (a slow or congested link: the bytes keep coming, slowly); ``resume()``
  lifts it.
* ``reset()``: abort every connection with a TCP RST.
* ``ProxiedConnection.close_at_next_command()``: once the client next sends something, close
  that connection cleanly (a FIN each way) without passing it on, as Redis closing an idle
  connection (its ``timeout``) just as a command arrives, unread.
* ``reset_new(count, within=...)``: abort each of the next ``count`` connections with a TCP RST
  a random moment (up to ``within`` seconds) after accepting it, as a server does that goes
  down or refuses work just after its accept; ``resets`` counts them. Later ones are relayed.
* pick connections one by one: ``connections()`` lists them with the port the proxy uses
  towards Redis (``upstream_port``), which Redis shows in ``CLIENT LIST`` as ``addr``.

It runs in a thread of its own, so a test's event loop (or a blocking call in the test) never
slows it, and it only ever talks to loopback. ``close()`` stops it and closes everything.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import struct
import threading
import time
from types import TracebackType

_READ = 64 * 1024
_HELD_LIMIT = 4 * 1024 * 1024  # stop reading a side whose peer does not take its bytes
_SLICE_GAP = 0.01  # seconds between two slices sent to a throttled client


class ProxiedConnection:
    """One client connection and its upstream twin."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self._proxy = proxy
        self.client = client
        self.upstream = upstream
        self.upstream_port: int = upstream.getsockname()[1]
        self.up_stalled = False  # client -> Redis
        self.down_stalled = False  # Redis -> client
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        self.down_rate = 0  # bytes a second towards the client, 0: as fast as it goes
        self.down_next = 0.0  # when the next throttled slice may go (time.monotonic)
        self.closed = False
        self.close_at_command = False  # close cleanly at the client's next bytes, unsent
        # Relay the client's next bytes, wait for Redis to answer, drop the answer and close
        # cleanly: a command that ran, its reply never seen.
        self.close_after_command = False

    def __repr__(self) -> str:
        return (
            f"<ProxiedConnection :{self.upstream_port} up_stalled={self.up_stalled} "
            f"down_stalled={self.down_stalled}>"
        )

    def stall(self, *, up: bool = True, down: bool = True) -> None:
        """Stop relaying the chosen directions of this connection."""
        with self._proxy._lock:
            self.up_stalled = self.up_stalled or up
            self.down_stalled = self.down_stalled or down
        self._proxy._wake()

    def resume(self, *, up: bool = True, down: bool = True) -> None:
        """Relay the chosen directions again (both by default), delivering what was held
        back; a throttle is lifted with the direction towards the client."""
        with self._proxy._lock:
            if up:
                self.up_stalled = False
            if down:
                self.down_stalled = False
                self.down_rate = 0
        self._proxy._wake()

    def close_at_next_command(self) -> None:
        """Close this connection cleanly once the client sends its next bytes, which never
        reach Redis."""
        with self._proxy._lock:
            self.close_at_command = True
        self._proxy._wake()

    def close_after_next_command(self) -> None:
        """Relay the client's next bytes to Redis, which runs them, then close this
        connection cleanly (a FIN) once Redis answers, the answer dropped: what a proxy or
        load balancer closing a connection as it forwards a command looks like (or a
        ``CLIENT KILL`` between a command's run and its reply)."""
        with self._proxy._lock:
            self.close_after_command = True
        self._proxy._wake()

    def held_up(self) -> int:
        """How many bytes towards Redis this connection holds back now: those in the
        proxy's buffer, and those its client sent while it was stalled that way (left
        unread, in the socket; counted by a peek, at most one read's worth)."""
        with self._proxy._lock:
            held = len(self.to_upstream)
            if self.up_stalled:
                with contextlib.suppress(OSError):  # nothing there (BlockingIOError)
                    held += len(self.client.recv(_READ, socket.MSG_PEEK))
        return held

    def reset(self) -> None:
        """Abort both sides with a TCP RST."""
        with self._proxy._lock:
            self._proxy._drop(self, rst=True)
        self._proxy._wake()


class FaultProxy:
    """A TCP proxy to ``127.0.0.1:target_port`` that can stall, resume and reset links."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[ProxiedConnection] = []
        self._stall_new_up = False
        self._stall_new_down = False
        self._reset_new = 0  # connections still to be reset as they come
        self._reset_within = 0.0
        self.resets = 0  # connections reset by ``reset_new``
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    def url(self, password: str | None = None) -> str:
        """A redis:// URL that goes through the proxy."""
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def connections(self) -> list[ProxiedConnection]:
        """The connections open now, oldest first."""
        with self._lock:
            return [c for c in self._conns if not c.closed]

    def connection_to(self, upstream_port: int) -> ProxiedConnection:
        """The open connection whose upstream side uses ``upstream_port``."""
        for conn in self.connections():
            if conn.upstream_port == upstream_port:
                return conn
        raise LookupError(f"no proxied connection on upstream port {upstream_port}")

    def stall(self, *, up: bool = True, down: bool = True, stall_new: bool = False) -> None:
        """Stop relaying the chosen directions on every open connection (and on new ones with
        ``stall_new``), closing nothing."""
        with self._lock:
            for conn in self._conns:
                conn.up_stalled = conn.up_stalled or up
                conn.down_stalled = conn.down_stalled or down
            if stall_new:
                self._stall_new_up, self._stall_new_down = up, down
        self._wake()

    def stall_new(self, *, up: bool = True, down: bool = True) -> None:
        """Stall the chosen directions of connections opened from now on only: the open ones
        go on relaying (a process whose one connection was reset reconnects into silence)."""
        with self._lock:
            self._stall_new_up, self._stall_new_down = up, down
        self._wake()

    def throttle(self, *, down: int) -> None:
        """Relay at most ``down`` bytes a second towards the client on every open connection,
        in slices every ``_SLICE_GAP`` seconds, closing nothing (``resume`` lifts it). A
        direction towards the client that was stalled relays again, at that rate: a test can
        let bytes gather (``stall``) and have them come slowly from their first byte."""
        with self._lock:
            for conn in self._conns:
                conn.down_rate = down
                conn.down_stalled = False
        self._wake()

    def held_down(self) -> int:
        """How many bytes towards the clients the proxy holds back now: those in its buffers,
        and those Redis sent on a connection stalled towards its client (left unread, in the
        socket; counted by a peek, at most one read's worth per connection)."""
        held = 0
        with self._lock:
            for conn in self._conns:
                held += len(conn.to_client)
                if conn.down_stalled:
                    with contextlib.suppress(OSError):  # nothing there (BlockingIOError)
                        held += len(conn.upstream.recv(_READ, socket.MSG_PEEK))
        return held

    def reset_new(self, count: int, *, within: float = 0.0003) -> None:
        """Abort each of the next ``count`` connections with a TCP RST, a random moment up to
        ``within`` seconds after accepting it (the moment decides what the client was doing:
        still connecting, setting its socket up, or saying hello)."""
        with self._lock:
            self._reset_new, self._reset_within = count, within
        self._wake()

    def resume(self) -> None:
        """Relay everything again; held-back bytes are delivered in order."""
        with self._lock:
            for conn in self._conns:
                conn.up_stalled = conn.down_stalled = False
                conn.down_rate = 0
            self._stall_new_up = self._stall_new_down = False
        self._wake()

    def reset(self) -> None:
        """Abort every open connection with a TCP RST."""
        with self._lock:
            for conn in list(self._conns):
                self._drop(conn, rst=True)
        self._wake()

    def close(self) -> None:
        """Stop the proxy and close every connection."""
        self._stopping = True
        self._wake()
        self._thread.join(5)
        with self._lock:
            for conn in list(self._conns):
                self._drop(conn, rst=False)
        self._listener.close()
        self._waker_r.close()
        self._waker_w.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # The relay thread.

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._waker_w.send(b"x")

    def _drop(self, conn: ProxiedConnection, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock in (conn.client, conn.upstream):
            if rst:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()
        self._conns.remove(conn)

    def _forward_and_close(self, conn: ProxiedConnection, data: bytes) -> None:
        """``close_after_next_command``'s work: the bytes relayed, the first bytes of the
        answer awaited (at most 5 s; Redis answers a read's commands together) and dropped,
        then a clean close of both sides."""
        upstream = conn.upstream
        with contextlib.suppress(OSError):
            upstream.setblocking(True)
            upstream.settimeout(5)
            upstream.sendall(bytes(conn.to_upstream) + data)
            upstream.recv(_READ)
        self._drop(conn, rst=False)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        if self._reset_new:
            self._reset_new -= 1
            self.resets += 1
            # A busy wait: a sleep's granularity is coarser than the moments that matter here.
            until = time.perf_counter() + random.uniform(0, self._reset_within)
            while time.perf_counter() < until:
                pass
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ProxiedConnection(self, client, upstream)
        conn.up_stalled, conn.down_stalled = self._stall_new_up, self._stall_new_down
        self._conns.append(conn)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            while not self._stopping:
                with self._lock:
                    selector.register(self._listener, selectors.EVENT_READ, None)
                    selector.register(self._waker_r, selectors.EVENT_READ, None)
                    timeout = 1.0
                    for conn in self._conns:
                        timeout = min(timeout, self._register(selector, conn))
                events = selector.select(timeout)
                with self._lock:
                    for key, mask in events:
                        sock = key.fileobj
                        if sock is self._listener:
                            self._accept()
                        elif sock is self._waker_r:
                            with contextlib.suppress(OSError):
                                self._waker_r.recv(4096)
                        else:
                            conn = key.data
                            if not conn.closed:
                                self._service(conn, sock, mask)  # type: ignore[arg-type]
                for key in list(selector.get_map().values()):
                    selector.unregister(key.fileobj)
        finally:
            selector.close()

    @staticmethod
    def _register(selector: selectors.BaseSelector, conn: ProxiedConnection) -> float:
        """Register what ``conn`` waits for; return how soon it must be looked at again
        (a throttled client's next slice), at most a second."""
        wants: dict[socket.socket, int] = {conn.client: 0, conn.upstream: 0}
        timeout = 1.0
        if not conn.up_stalled and len(conn.to_upstream) < _HELD_LIMIT:
            wants[conn.client] |= selectors.EVENT_READ
        if not conn.down_stalled and len(conn.to_client) < _HELD_LIMIT:
            wants[conn.upstream] |= selectors.EVENT_READ
        if conn.to_upstream and not conn.up_stalled:
            wants[conn.upstream] |= selectors.EVENT_WRITE
        if conn.to_client and not conn.down_stalled:
            wait = conn.down_next - time.monotonic() if conn.down_rate else 0.0
            if wait > 0:  # throttled: not before its next slice is due
                timeout = wait
            else:
                wants[conn.client] |= selectors.EVENT_WRITE
        for sock, mask in wants.items():
            if mask:
                selector.register(sock, mask, conn)
        return timeout

    def _service(self, conn: ProxiedConnection, sock: socket.socket, mask: int) -> None:
        # What this socket reads goes to the other side; what waits for it is its outbox.
        if sock is conn.client:
            inbox, outbox, stalled = conn.to_upstream, conn.to_client, conn.up_stalled
        else:
            inbox, outbox, stalled = conn.to_client, conn.to_upstream, conn.down_stalled
        try:
            # A stall is kept from the moment ``stall`` returns: the events in hand may date
            # from before it (the selector is set up again only on the next turn).
            if mask & selectors.EVENT_READ and not stalled:
                data = sock.recv(_READ)
                if not data:  # an orderly close: pass it on by closing both
                    self._drop(conn, rst=False)
                    return
                if sock is conn.client and conn.close_at_command:  # read: a FIN, not a RST
                    self._drop(conn, rst=False)
                    return
                if sock is conn.client and conn.close_after_command:
                    self._forward_and_close(conn, data)
                    return
                inbox += data
            if mask & selectors.EVENT_WRITE and outbox:
                if sock is conn.client and conn.down_rate:
                    if time.monotonic() < conn.down_next:
                        return
                    sent = sock.send(outbox[: max(1, int(conn.down_rate * _SLICE_GAP))])
                    conn.down_next = time.monotonic() + _SLICE_GAP
                else:
                    sent = sock.send(outbox)
                del outbox[:sent]
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn, rst=True)
