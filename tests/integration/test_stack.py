"""The helpers of ``stack`` and ``ports`` that run the real thing: what they hand a test is what it
asked for."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from . import apps, ports, stack
from .redis_server import RedisServer
from .stack import NodeProcess, distributor_process


async def test_distributor_process_is_never_someone_elses_port(
    redis_server: RedisServer, squatter: RedisServer
) -> None:
    """The port a distributor is given may be taken by another process before the child binds
    it (free_port lets go of it first; on a loaded machine the child takes seconds to start,
    while other suites start servers on free ports). Here another redis-server holds it: a
    probe's connection succeeds there all the same, and the test's request went to it, which
    closed the connection without a word (what Redis does with "Host:"). The helper must see
    its own child listen, and start it again on another port once the bind is refused."""
    with NodeProcess(redis_server.url, "q"):
        async with distributor_process(redis_server.url, "q") as (base, distributor):
            host, port = base.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            finally:
                writer.close()
            assert head.startswith(b"HTTP/1.1 200"), head
            assert base != f"http://127.0.0.1:{squatter.port}"
            assert distributor.poll() is None


async def test_serve_hypercorn_is_never_someone_elses_port(squatter: RedisServer) -> None:
    """The same for hypercorn in this process. A regression guard: the helper binds its port
    itself (``ports.bound_socket``) and no longer asks ``free_port``, so the squatter is in no
    way in its path today. It was when the helper took ``free_port``'s port and probed it: the
    probe reached the squatter before hypercorn had even tried to bind."""
    async with stack.serve_hypercorn(apps.hello) as base:
        assert base != f"http://127.0.0.1:{squatter.port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            response = await client.get("/")
        assert response.status_code == 200


# Hypercorn, failing, never awaits the helper's shutdown trigger: nothing of the helper's.
@pytest.mark.filterwarnings("ignore:coroutine 'Event.wait' was never awaited:RuntimeWarning")
async def test_serve_hypercorn_with_a_broken_config_raises_and_leaks_no_descriptor() -> None:
    """A config hypercorn refuses before it takes the helper's listening socket over (a
    ``startup_timeout`` that is no number fails its lifespan's start): the helper raises
    hypercorn's error and closes the socket itself. Before, its descriptor, detached for
    hypercorn, stayed open in this process for good."""
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(TypeError):
        async with stack.serve_hypercorn(apps.hello, startup_timeout="soon"):
            pass
    gc.collect()  # whatever only the collector closes is no leak
    assert len(os.listdir("/proc/self/fd")) == before


async def test_serve_app_is_never_someone_elses_port(squatter: RedisServer) -> None:
    """The same for uvicorn in this process, which binds only after the app's lifespan
    startup. A regression guard: the helper binds the port itself beforehand and no longer
    asks ``free_port``, so the squatter is in no way in its path today. When it took
    ``free_port``'s port, uvicorn's bind was refused there and it exited (SystemExit(3) from
    its task)."""
    async with stack.serve_app(apps.hello) as base:
        assert base != f"http://127.0.0.1:{squatter.port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            response = await client.get("/")
        assert response.status_code == 200


_LISTENER = """
import socket, sys, time
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
time.sleep(60)
"""


def test_listening_child_starts_again_on_another_port_when_its_own_is_taken(
    squatter: RedisServer,
) -> None:
    """``ports.listening_child``, the helper every child that serves goes through: the first
    port is another process's, the child started on it exits (its bind refused), and the one
    handed out is started again on another port, where it listens itself."""
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        started.append(subprocess.Popen([sys.executable, "-c", _LISTENER, str(port)]))
        return started[-1]

    child, port = ports.listening_child(start)
    try:
        assert port != squatter.port
        assert [p.returncode for p in started] == [1, None]
        assert ports.listens(child.pid, port)
        assert not ports.listens(child.pid, squatter.port)
    finally:
        child.kill()
        child.wait(10)


_CRASHES_ONCE = """
import os, socket, sys, time
marker = sys.argv[2]
if not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit("a startup crash that has nothing to do with the port")
sock = socket.socket()
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
time.sleep(60)
"""


def test_listening_child_fails_at_once_on_a_child_that_exits_of_itself(tmp_path: Path) -> None:
    """A child that exits while nothing else holds its port failed on its own (here a crash
    at startup, which its next start would not repeat): the helper says so, with its exit
    code, and starts no other. It used to start it again on another port, and handed out the
    second start as if nothing had happened."""
    started: list[subprocess.Popen[bytes]] = []
    marker = tmp_path / "crashed-once"

    def start(port: int) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-c", _CRASHES_ONCE, str(port), str(marker)]
        started.append(subprocess.Popen(args, stderr=subprocess.DEVNULL))
        return started[-1]

    try:
        with pytest.raises(ports.NotListening, match=r"exited \(1\) before listening on port"):
            ports.listening_child(start)
        assert [p.returncode for p in started] == [1]
    finally:
        for process in started:
            process.kill()
            process.wait(10)


def test_listening_child_gives_up_when_every_port_is_taken(
    squatter: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child whose port is another process's each time it is started (its bind refused
    each time) is started on ``PORT_TRIES`` ports, then the helper says so, with the last
    child."""
    monkeypatch.setattr(ports, "free_port", lambda: squatter.port)
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-c", _LISTENER, str(port)]
        started.append(subprocess.Popen(args, stderr=subprocess.DEVNULL))
        return started[-1]

    with pytest.raises(ports.NotListening, match="each another process's") as raised:
        ports.listening_child(start)
    assert raised.value.child is started[-1]
    assert [p.returncode for p in started] == [1] * ports.PORT_TRIES


def test_a_node_process_that_fails_to_start_says_so(
    redis_server: RedisServer, squatter: RedisServer
) -> None:
    """``NodeProcess.start`` waits for the child's first line: a Node that failed to start
    (here its health port is another process's) left the child waiting for ever, and the test
    with it, past pytest-timeout (its thread blocked the event loop's close)."""
    node = NodeProcess(redis_server.url, "q", "apps:hello", "--health-port", str(squatter.port))
    with pytest.raises(RuntimeError, match="node process did not start") as raised:
        node.start()
    assert node.process is not None and node.process.poll() is not None
    assert "address already in use" in str(raised.value)  # why, not only its first line
    assert node.process.stdout is not None and node.process.stdout.closed


def test_a_node_process_that_never_gets_ready_is_killed_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child whose Node waits for a Redis that never answers (nothing listens on its port)
    says nothing, ever: ``NodeProcess.start`` gives up at its deadline, kills it, and raises
    with all it said. Before, it read the child's first line with no bound, and hung for ever.
    ``start`` runs in a thread here, so that a hang fails the test instead of stalling it."""
    monkeypatch.setattr(NodeProcess, "start_timeout", 1.0, raising=False)
    # A port bound here and never listening: it refuses every connection, and no other
    # process (another suite's redis-server) can take it while the test runs.
    unanswered = ports.bound_socket()
    node = NodeProcess(f"redis://127.0.0.1:{unanswered.getsockname()[1]}", "never")
    raised: list[BaseException] = []

    def start() -> None:
        try:
            node.start()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(10)
    try:
        assert not thread.is_alive(), "start() still waits for the child's first line"
    finally:
        node.kill()  # (a child still waiting ends; its pipe with it, and the thread's read)
        thread.join(10)
        unanswered.close()
    (error,) = raised
    assert isinstance(error, RuntimeError)
    assert "not ready within 1 s, killed" in str(error)
    assert node.process is not None and node.process.poll() is not None
