"""Running the real thing in tests: a distributor under uvicorn, Nodes in-process or in a
subprocess, against a private redis-server.

``serve_app`` runs any ASGI app under a real uvicorn server in this event loop
(``serve_hypercorn`` under hypercorn, which also speaks HTTP/2 over cleartext); ``run_node``
runs a Node in this loop; ``NodeProcess`` runs one in a child process (for kill -9). Every
helper stops what it started, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import pytest
import uvicorn

import minidasgi
from minidasgi import Node

from .ports import alistening_child, bound_socket, listens

HERE = Path(__file__).resolve().parent
_PACKAGE_ROOT = Path(minidasgi.__file__).resolve().parent.parent  # holds the package
SERVER = os.environ.get("MINIDASGI_TEST_SERVER", "uvicorn")
"""The ASGI server ``serve_app`` runs: uvicorn, or hypercorn when CI runs the suite again."""
uvicorn_only = pytest.mark.skipif(
    SERVER != "uvicorn", reason="asserts what uvicorn itself does, not what the relay does"
)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, which stops once told to (``stop``) instead of at the end of its
    current 0.1 s tick, and without the 0.1 s it gives open connections to close when none is
    open: each was 90-100 ms more for every ``serve_app``, a few hundred a run. The ticks are
    the same timers as uvicorn's (one a tick), for the tests that count handles."""

    _tick: asyncio.Future[None] | None = None

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            self._tick = tick = loop.create_future()
            timer = loop.call_later(0.1, _end_tick, tick)
            try:
                await tick
            finally:
                timer.cancel()
            should_exit = await self.on_tick(counter)

    def stop(self) -> None:
        """Stop serving now (``should_exit``, and the tick under way ends)."""
        self.should_exit = True
        _end_tick(self._tick)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.server_state.connections or self.server_state.tasks:
            await super().shutdown(sockets)  # uvicorn's graceful shutdown, as it is
            return
        # What uvicorn's shutdown does when nothing is open, without its sleep.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        if not self.force_exit:
            await self.lifespan.shutdown()


def _end_tick(tick: asyncio.Future[None] | None) -> None:
    if tick is not None and not tick.done():
        tick.set_result(None)


@contextlib.asynccontextmanager
async def serve_app(app: Any, *, lifespan: str = "on", **config: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free port; yields its base URL.

    With ``MINIDASGI_TEST_SERVER=hypercorn`` in the environment, hypercorn serves instead
    (``root_path`` and ``backlog`` carry over; hypercorn always tries the lifespan), so CI
    runs the same tests under a second server."""
    if SERVER == "hypercorn":
        async with serve_hypercorn(app, **config) as base:
            yield base
        return
    # Bound here: uvicorn binds only after the app's lifespan startup, and a port taken
    # meanwhile was its exit (sys.exit, from its task).
    sock = bound_socket()
    port = sock.getsockname()[1]
    server = _Uvicorn(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan=lifespan,
            log_level="warning",
            **config,
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before starting")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        try:
            await asyncio.wait_for(task, 10)
        except asyncio.TimeoutError:
            server.force_exit = True
            task.cancel()
        sock.close()


@contextlib.asynccontextmanager
async def serve_hypercorn(app: Any, **config: Any) -> AsyncIterator[str]:
    """Serve ``app`` with hypercorn (HTTP/1.1, and h2c with prior knowledge) on a free port;
    yields its base URL."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config, Sockets

    sock = bound_socket()
    port = sock.getsockname()[1]
    settings = Config()
    # Hypercorn's once it made a socket of it (``create_sockets``): its server closes it.
    # Until then it is this helper's, to close if hypercorn fails before (a broken config).
    fd = sock.detach()
    taken = False
    create_sockets = settings.create_sockets

    def take_over() -> Sockets:
        nonlocal taken
        taken = True
        return create_sockets()

    settings.create_sockets = take_over  # type: ignore[method-assign]
    settings.bind = [f"fd://{fd}"]
    settings.loglevel = "WARNING"
    settings.graceful_timeout = 5
    stop = asyncio.Event()
    task: asyncio.Future[None] | None = None
    try:
        for name, value in config.items():
            setattr(settings, name, value)
        task = asyncio.ensure_future(serve(app, settings, shutdown_trigger=stop.wait))
        deadline = time.monotonic() + 10
        while not listens(os.getpid(), port):
            if task.done():
                task.result()
                raise RuntimeError("hypercorn stopped before starting")
            if time.monotonic() > deadline:
                raise TimeoutError("hypercorn did not start")
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        if task is not None and not task.done():
            stop.set()
            try:
                await asyncio.wait_for(task, 10)
            except asyncio.TimeoutError:
                task.cancel()
        if not taken and (task is None or task.done()):
            os.close(fd)


@contextlib.asynccontextmanager
async def run_node(node: Node) -> AsyncIterator[Node]:
    """Run ``node`` in this event loop until the block ends."""
    task = asyncio.ensure_future(node.serve())
    started = asyncio.ensure_future(node.wait_started())
    try:
        await asyncio.wait([task, started], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        if not started.done():
            raise TimeoutError("node did not start")
        yield node
    finally:
        started.cancel()
        node.stop()
        try:
            await asyncio.wait_for(task, 15)
        except asyncio.TimeoutError:
            task.cancel()


@contextlib.asynccontextmanager
async def distributor_process(
    url: str, key: str, *options: str
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """The distributor in a child process (``python -m minidasgi distributor``), sending
    everything to ``key``; yields ``(base_url, process)`` once it listens itself on its port
    (``ports.alistening_child``) and kills it at the end if it still runs."""

    def start(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "minidasgi", "--log-level", "warning", "distributor",
             "--key", key, "--redis", url, "--port", str(port), *options],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    process, port = await alistening_child(start)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
        await asyncio.to_thread(process.wait, 10)


async def poll(check: Any, timeout: float, interval: float = 0.05) -> bool:
    """Call ``check()`` (awaiting its result if need be) until it is true or ``timeout``
    seconds pass; return whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


def redis_keys(server: Any) -> list[bytes]:
    """The keys in ``server`` (a ``RedisServer``), sorted: a test's workload must leave none."""
    keys = server.command("KEYS", "*")
    assert isinstance(keys, list)
    return sorted(keys)


def ws_url(base: str) -> str:
    """The WebSocket URL of a server's HTTP base URL."""
    return "ws" + base.removeprefix("http")


def peak_rss_mib(pid: int) -> float:
    """The peak resident memory of a process (Linux ``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _first_line(stream: IO[bytes], timeout: float) -> tuple[bytes, bool]:
    """The first line ``stream`` (a child's pipe) gives within ``timeout`` seconds, and
    whether the time ran out first (the line is then what came of it by then). Read from its
    file descriptor, never past that line, so that the rest stays for whoever reads the
    stream next."""
    fd = stream.fileno()
    poller = select.poll()  # not select(): a descriptor may be past 1023 in a long run
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            return line, True
        byte = os.read(fd, 1)  # one at a time: a few bytes, once per child
        if not byte:  # the child closed it (it ended)
            break
        line += byte
    return line, False


class NodeProcess:
    """A Node in a child process running an app from ``tests/integration/apps.py``."""

    start_timeout = 30.0
    """Seconds the child has to say "ready" (its imports and its Node's start, on a loaded
    machine); past them it is killed, and ``start`` raises with all it said."""

    def __init__(self, url: str, key: str, app: str = "apps:hello", *extra: str) -> None:
        self.args = [
            sys.executable,
            str(HERE / "node_process.py"),
            "--redis",
            url,
            "--key",
            key,
            "--app",
            app,
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.health_port: int | None = None
        """The port its health server listens on, once started (``--health-port``; with 0,
        the kernel's choice: no other process can have it)."""

    def start(self) -> NodeProcess:
        # The apps from here, and the very minidasgi this process imported (a checkout under
        # test, say, rather than the one installed): a test checked against other code
        # otherwise passes or fails for the children's code, not its own.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(_PACKAGE_ROOT)]))
        self.process = subprocess.Popen(
            self.args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert self.process.stdout is not None
        line, late = _first_line(self.process.stdout, self.start_timeout)
        if b"ready" not in line:
            if late:  # hung (Redis unreachable, say): it would never say more
                self.kill()
                why = f"not ready within {self.start_timeout:g} s, killed"
            else:
                why = "did not start"
                try:  # it ends of itself once serve() failed: let it finish saying why
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.stop()
            with self.process.stdout:  # all it said: the reason is rarely on the first line
                output = (line + self.process.stdout.read()).decode(errors="replace")
            code = self.process.returncode
            raise RuntimeError(f"node process {why} (exit {code}):\n{output}")
        _, _, port = line.partition(b"ready")
        self.health_port = int(port) if port.strip() else None
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def output(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        return self.process.stdout.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
