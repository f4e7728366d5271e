"""Quick checks of the private redis-server fixtures themselves."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator

import pytest

from minidasgi.testing import (
    ClusterSetup,
    SentinelSetup,
    _bus_port,
    _cluster_node,
    find_redis_server,
)

from .redis_server import RedisFactory, RedisReplyError, RedisServer


def _raw_ping(server: RedisServer, *auth: str) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=2) as sock:
        replies = b""
        if auth:
            sock.sendall(b"AUTH " + " ".join(auth).encode() + b"\r\n")
            replies += sock.recv(64)
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return replies + sock.recv(64)


@contextlib.contextmanager
def _taken(port: int) -> Iterator[None]:
    """Hold ``port`` on loopback as another process would, listening, until the block ends."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        yield


def test_plain_server_answers_ping(redis_server: RedisServer) -> None:
    assert redis_server.port != 6379
    assert redis_server.command("PING") == b"PONG"
    assert redis_server.command("SET", "k", b"v") == b"OK"
    assert redis_server.command("GET", "k") == b"v"
    assert redis_server.command("RPUSH", "l", 1, 2) == 2
    assert redis_server.command("LRANGE", "l", 0, -1) == [b"1", b"2"]
    assert redis_server.command("GET", "missing") is None
    with pytest.raises(RedisReplyError, match="unknown command"):
        redis_server.command("NOSUCHCOMMAND")
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}"
    assert redis_server.unix_url == f"unix://{redis_server.unix_socket}?db=0"
    assert _raw_ping(redis_server) == b"+PONG\r\n"


def test_restart_keeps_port_and_socket(redis_server: RedisServer) -> None:
    port, path, pid = redis_server.port, redis_server.unix_socket, redis_server.pid
    redis_server.restart()
    assert (redis_server.port, redis_server.unix_socket) == (port, path)
    assert redis_server.pid != pid
    assert redis_server.command("PING") == b"PONG"
    redis_server.kill()
    assert not redis_server.running
    redis_server.start()
    assert redis_server.port == port
    assert redis_server.command("PING") == b"PONG"


def _bindable(port: int) -> bool:
    """Whether a socket binds ``port`` as ``free_port`` does (no SO_REUSEADDR): the kernel
    hands out for port 0 only ports it could bind."""
    with socket.socket() as other:
        try:
            other.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="the ports are kept on Linux only")
def test_a_server_s_ports_are_its_own_until_it_is_closed() -> None:
    """From the choice of its ports to close(), no other process's free port can be one of a
    server's: not before it binds them (another suite's redis-server took one in that gap),
    not while it is down before a restart on the same port (it then failed to start: 'Address
    already in use'). On the old code every port was free. (A cluster node's bus port:
    ``test_a_cluster_node_whose_bus_port_is_taken_moves_to_another``.)"""
    server = RedisServer(binary=find_redis_server())
    try:
        port = server.port
        assert not _bindable(port)  # chosen, not yet bound
        server.start()
        server.kill()
        assert not _bindable(port)  # down
        server.start()  # on the same port
        assert server.port == port
        assert _raw_ping(server) == b"+PONG\r\n"
    finally:
        server.close()
    assert _bindable(port)


def test_clean_redis_is_flushed(clean_redis: RedisServer) -> None:
    assert clean_redis.command("DBSIZE") == 0
    clean_redis.command("SET", "leftover", "x")


def test_password_variant(redis_factory: RedisFactory) -> None:
    server = redis_factory(password="s3cret/@:")
    assert _raw_ping(server).startswith(b"-NOAUTH")
    assert _raw_ping(server, "s3cret/@:") == b"+OK\r\n+PONG\r\n"
    assert server.command("PING") == b"PONG"
    assert server.url == f"redis://:s3cret%2F%40%3A@127.0.0.1:{server.port}"
    assert server.unix_url.startswith("unix://:s3cret%2F%40%3A@/tmp/")


def test_acl_user_variant(redis_factory: RedisFactory) -> None:
    server = redis_factory(acl_users={"alice": "wonderland"})
    assert _raw_ping(server, "alice", "wonderland") == b"+OK\r\n+PONG\r\n"
    assert _raw_ping(server, "alice", "wrong").startswith(b"-WRONGPASS")
    assert server.command("ACL", "WHOAMI") == b"default"


def test_tls_variant(redis_factory: RedisFactory) -> None:
    server = redis_factory(tls=True)
    assert server.tls_port is not None and server.ca_file is not None
    assert server.tls_url == f"rediss://127.0.0.1:{server.tls_port}"
    context = server.ssl_context()
    with (
        socket.create_connection((server.host, server.tls_port), timeout=2) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert tls.recv(64) == b"+PONG\r\n"
    assert server.command("PING") == b"PONG"  # plain port and unix socket stay open


def test_close_removes_process_and_dir() -> None:
    server = RedisServer().start()
    pid, tmpdir = server.pid, server.tmpdir
    assert pid is not None and tmpdir.is_dir()
    server.close()
    server.close()  # idempotent
    assert server.pid is None and not tmpdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.requires_server("7.0")  # --cluster-port
def test_a_cluster_node_whose_bus_port_is_taken_moves_to_another() -> None:
    """A cluster node's bus port is picked free, then bound by redis-server a moment later:
    another process may take it between the two (seen once in CI). The node starts all the
    same, on another bus port, as it does when its client port is taken."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = _cluster_node(find_redis_server(), ["--cluster-enabled", "yes"])
        server.extra_args[server.extra_args.index("--cluster-port") + 1] = str(port)
        try:
            server.start()
            assert _bus_port(server) != port
            assert _raw_ping(server) == b"+PONG\r\n"
            server.kill()
            if sys.platform == "linux":  # the new one is its own until close(), down or not
                assert not _bindable(_bus_port(server))
        finally:
            server.close()


@pytest.mark.requires_server("7.0")  # CLUSTER ADDSLOTSRANGE
def test_a_cluster_whose_replica_port_is_taken_starts_all_the_same() -> None:
    """A replica whose client port another process takes first starts on another port (as
    any server does): the cluster still pairs it with its master. It once looked its master up
    by the old port (a KeyError in CI, with four clusters starting at once)."""
    cluster = ClusterSetup(masters=1, replicas=1)
    try:
        replica = cluster.replicas[0]
        port = replica.port
        with _taken(port):
            cluster.start()
        assert replica.port != port
        role = replica.command("ROLE")
        assert isinstance(role, list) and role[0] == b"slave", role
        assert role[2] == cluster.masters[0].port
    finally:
        cluster.close()


def test_a_sentinel_setup_whose_master_port_is_taken_starts_all_the_same() -> None:
    """The master moves to another port when another process takes its own first; its
    replica and sentinels, configured before it started, are told its new port (they once
    pointed at the old one, and the setup never settled)."""
    setup = SentinelSetup(replicas=1, sentinels=1)
    try:
        master = setup.servers[0]
        port = master.port
        with _taken(port):
            setup.start(timeout=5)
        assert master.port != port
        role = setup.servers[1].command("ROLE")
        assert isinstance(role, list) and role[0] == b"slave" and role[2] == master.port, role
        assert setup.master() is master  # the sentinel monitors it where it is
    finally:
        setup.close()
