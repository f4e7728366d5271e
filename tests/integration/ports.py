"""Ports for the servers the tests start: a port handed to a test is one its own server listens
on, never another process's.

``free_port`` asks the kernel for a free port and lets go of it; the server binds it only
later, seconds later for a child process on a loaded machine. In that gap another process (say
another suite's redis-server, which picks its ports the same way) may take it, and then a
connection to the port still succeeds: it proves only that *something* listens there. So:

* a server in this process listens on a socket bound here (``bound_socket``): the port is
  never free in between;
* a child process is given a port, and handed out only once it is seen listening on it itself
  (``listens``, from ``/proc``); a child that exits before is started again on another port
  only if its own port is now another process's (``taken``: its bind was refused), and is a
  failure otherwise: a crash at startup must not pass for bad luck with a port
  (``listening_child``, ``alistening_child`` in an event loop).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Protocol, TypeVar

PORT_TRIES = 5
"""How many ports a child is started on, each found taken by another process after the child
exited, before the helper gives up."""
LISTEN_TIMEOUT = 15.0
"""Seconds a child may take to listen (a Python child's imports, on a loaded machine)."""
_POLL = 0.05


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (nothing holds it now: see above)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bound_socket() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1, not yet listening, for a server in this
    process (uvicorn's ``sockets=``, hypercorn's ``fd://``): the port is its from the start.

    Made with ``IPPROTO_TCP``, as a server binding its own socket makes it (getaddrinfo's
    protocol): asyncio sets ``TCP_NODELAY`` only on accepted sockets whose ``proto`` says TCP,
    and the sockets ``accept`` makes inherit the listener's. With ``socket.socket()``'s 0,
    uvicorn's header and body writes waited for the client's delayed ACK: 40 ms a request on
    every kept-alive connection of the suite, which uvicorn binding its own port does not pay."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind(("127.0.0.1", 0))
    except BaseException:
        sock.close()
        raise
    return sock


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself has a TCP socket listening on 127.0.0.1:``port``
    (Linux: its socket inodes, looked up in ``/proc/net/tcp``)."""
    wanted = f"0100007F:{port:04X}"
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":  # 0A: TCP_LISTEN
            listening.add(f"socket:[{fields[9]}]")
    if not listening:
        return False
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:  # exited meanwhile
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in listening:
                return True
        except FileNotFoundError:  # closed meanwhile
            continue
    return False


def taken(port: int) -> bool:
    """Whether a bind of 127.0.0.1:``port`` as a server's (``SO_REUSEADDR``, as uvicorn's and
    redis-server's) is refused now: another socket listens there, or holds it bound."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


class Child(Protocol):
    """What ``listening_child`` needs of a started child: ``subprocess.Popen`` has it."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float) -> int: ...


C = TypeVar("C", bound=Child)


class NotListening(RuntimeError):
    """The child never listened on its port: it exited while nothing else held its port (its
    own failure), it exited on every port tried with each taken by another process, or it
    neither listened nor exited in time (then it is killed). ``child`` is the last one
    started."""

    def __init__(self, message: str, child: Child) -> None:
        super().__init__(message)
        self.child = child


def listening_child(start: Callable[[int], C], *, timeout: float = LISTEN_TIMEOUT) -> tuple[C, int]:
    """``start(port)`` on a free port; return the child and its port once the child listens
    there itself. One that exits first is started again on another port if its port is now
    another process's (``PORT_TRIES`` ports in all); one that exits while its port is free is
    a failure at once; one that takes more than ``timeout`` seconds is killed. Raises
    ``NotListening``."""
    steps = _listening_child(start, timeout)
    try:
        while True:
            next(steps)
            time.sleep(_POLL)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        steps.close()  # an interruption (pytest-timeout's) kills the child under way


async def alistening_child(
    start: Callable[[int], C], *, timeout: float = LISTEN_TIMEOUT
) -> tuple[C, int]:
    """``listening_child`` in an event loop: it turns while the child starts."""
    steps = _listening_child(start, timeout)
    try:
        while True:
            next(steps)
            await asyncio.sleep(_POLL)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        steps.close()  # a cancellation kills the child under way


def _listening_child(
    start: Callable[[int], C], timeout: float
) -> Generator[None, None, tuple[C, int]]:
    """The attempts of ``listening_child``, yielding whenever it waits (the caller sleeps)."""
    ports = []
    for _ in range(PORT_TRIES):
        port = free_port()
        ports.append(port)
        child = start(port)
        try:
            deadline = time.monotonic() + timeout
            while child.poll() is None and not listens(child.pid, port):
                if time.monotonic() > deadline:
                    what = f"pid {child.pid} did not listen on port {port} within {timeout} s"
                    raise NotListening(what, child)
                yield
        except BaseException:
            child.kill()
            child.wait(10)
            raise
        code = child.poll()
        if code is None:
            return child, port
        # It exited. Its bind refused (another process took the port since free_port) is the
        # one exit that says nothing about the child, and then the port is still taken: the
        # child is gone, so whatever holds it is another process. Any other exit (a crash at
        # startup, or right after it listened) is the child's own, however it would do on
        # another port.
        if not taken(port):
            what = f"pid {child.pid} exited ({code}) before listening on port {port}"
            raise NotListening(f"{what}, which no other process holds", child)
    what = f"pid {child.pid} exited ({code}) before listening"
    raise NotListening(f"{what}, on each of ports {ports}, each another process's", child)
