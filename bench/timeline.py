"""One hello-world request at one keep-alive connection, hop by hop: where the latency the
distributor adds goes (issue 10).

Run ``python bench/timeline.py [--requests 400] [--pause-ms 0]``. It starts a private
redis-server and, in child processes, uvicorn serving the distributor, one Node and uvicorn
serving the same app directly (``bench/http.py``'s apps and flags). Each child loads a hook
(a ``sitecustomize`` module in a temporary folder put first on its ``PYTHONPATH``) that stamps
every socket read and write (before and after the call), every return from the event loop's
``epoll`` wait (a new loop turn) and every garbage collection, with ``time.perf_counter_ns``
(``CLOCK_MONOTONIC`` on Linux: one clock for every process) and the CPU it ran on
(``sched_getcpu``). This process then sends the requests one after the other on one
connection, stamped the same way, first to the distributor and then directly, and prints for
each step of a request the median time since the step before it (with the quartiles), how
often a hop from one process to the next stayed on the same CPU, how long the writes took
(a write that wakes the reader on the same CPU may return only once the reader has run), and
the collections per request.

The hook costs about a microsecond per stamp: the figures are a little slower than
``bench/http.py``'s, and only their differences count. Linux only; Redis itself is not
stamped (its work lies between the write of a command and the read of its effect).
"""

from __future__ import annotations

import os
import sys

# This folder goes last on sys.path: http.py in it would shadow the stdlib's http package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import ast
import contextlib
import importlib.util
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from bisect import bisect_left
from pathlib import Path
from typing import Any

from measure import free_port

from minidasgi.testing import RedisServer

HOST = "127.0.0.1"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

# Loaded by every child before anything else. Each stamp: (ns, cpu, what, fd, first bytes).
HOOK = """
import atexit, ctypes, gc, os, selectors, socket, time

_OUT = os.environ.get("TIMELINE_OUT")
if _OUT:
    _clock = time.perf_counter_ns
    try:
        _cpu = ctypes.CDLL(None).sched_getcpu
    except (AttributeError, OSError):
        _cpu = lambda: -1
    _log = []
    _add = _log.append

    def _reader(name, original):
        def read(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            data = args[0][:24] if name == "recv_into" else result[:24]
            _add((_clock(), _cpu(), "recv", self.fileno(), bytes(data)))
            return result
        return read

    def _writer(original):
        def write(self, data, *args, **kwargs):
            head = bytes(data[:24])
            _add((_clock(), _cpu(), "send>", self.fileno(), head))
            result = original(self, data, *args, **kwargs)
            _add((_clock(), _cpu(), "send<", self.fileno(), head))
            return result
        return write

    socket.socket.recv = _reader("recv", socket.socket.recv)
    socket.socket.recv_into = _reader("recv_into", socket.socket.recv_into)
    socket.socket.send = _writer(socket.socket.send)
    socket.socket.sendall = _writer(socket.socket.sendall)
    _writev = os.writev

    def _stamped_writev(fd, parts):
        head = bytes(parts[0][:24]) if parts else b""
        _add((_clock(), _cpu(), "send>", fd, head))
        result = _writev(fd, parts)
        _add((_clock(), _cpu(), "send<", fd, head))
        return result

    os.writev = _stamped_writev
    _select = selectors.EpollSelector.select

    def _stamped_select(self, timeout=None):
        ready = _select(self, timeout)
        _add((_clock(), _cpu(), "turn", -1, b""))
        return ready

    selectors.EpollSelector.select = _stamped_select

    def _collected(phase, info):
        mark = "gc>" if phase == "start" else "gc<"
        # At the end, the unreachable objects found (cyclic garbage) in the fd's place.
        _add((_clock(), _cpu(), mark + str(info["generation"]), info.get("collected", -1), b""))

    gc.callbacks.append(_collected)

    def _dump():
        with open(_OUT, "w") as out:
            for stamp in _log:
                out.write(repr(stamp) + "\\n")

    atexit.register(_dump)
"""


def _bench_http() -> Any:
    """``bench/http.py`` as a module (its apps, flags and command lines)."""
    spec = importlib.util.spec_from_file_location("bench_http", os.path.join(_HERE, "http.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requests(port: int, count: int, pause: float) -> list[tuple[int, int]]:
    """Send ``count`` requests one after the other on one connection: (sent, answered) ns."""
    clock = time.perf_counter_ns
    stamps = []
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = clock()
            sock.sendall(REQUEST)
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            while len(body) < length:
                body += sock.recv(65536)
            stamps.append((start, clock()))
            if pause:
                time.sleep(pause)
    return stamps


Stamp = tuple[int, int, str, int, bytes]

# (label, process, what, bytes the data starts with or contains)
DISTRIBUTED = [
    ("distributor reads the request", "distributor", "recv", b"GET "),
    ("  its next loop turn (the ASGI task)", "distributor", "turn", b""),
    ("  LPUSH written", "distributor", "send>", b"LPUSH"),
    ("Node reads the popped request", "node", "recv", b"*2\r\n"),
    ("  its next loop turn (the job)", "node", "turn", b""),
    ("  PUBLISH written", "node", "send>", b"PUBLISH"),
    ("distributor reads the response", "distributor", "recv", b"message"),
    ("  its next loop turn (the relay)", "distributor", "turn", b""),
    ("  response head written", "distributor", "send>", b"HTTP/1.1 "),
    ("  response body written", "distributor", "send>", b""),
]
DIRECT = [
    ("uvicorn reads the request", "direct", "recv", b"GET "),
    ("  its next loop turn (the ASGI task)", "direct", "turn", b""),
    ("  response head written", "direct", "send>", b"HTTP/1.1 "),
    ("  response body written", "direct", "send>", b""),
]


def _load(path: Path) -> list[Stamp]:
    if not path.exists():
        return []
    stamps = [ast.literal_eval(line) for line in path.read_text().splitlines() if line]
    stamps.sort()
    return stamps


def _find(stamps: list[Stamp], after: int, until: int, what: str, data: bytes) -> Stamp | None:
    for stamp in stamps[bisect_left(stamps, (after + 1,)) :]:  # strictly after
        if stamp[0] > until:
            return None
        if stamp[2] == what and (not data or data in stamp[4]):
            return stamp
    return None


def _report(
    title: str,
    steps: list[tuple[str, str, str, bytes]],
    stamps: dict[str, list[Stamp]],
    requests: list[tuple[int, int]],
) -> None:
    rows: list[list[Stamp]] = []
    for start, end in requests[len(requests) // 10 :]:  # the first tenth warms up
        row: list[Stamp] = [(start, -1, "client", -1, b"")]
        for _, process, what, data in steps:
            found = _find(stamps[process], row[-1][0], end, what, data)
            if found is None:
                break
            row.append(found)
        else:
            row.append((end, -1, "client", -1, b""))
            rows.append(row)
    print(f"\n{title}: {len(rows)} requests ({len(requests)} sent), microseconds")
    if not rows:
        return
    labels = ["client sends"] + [step[0] for step in steps] + ["client has the response"]
    processes = ["client"] + [step[1] for step in steps] + ["client"]
    print(f"{'step':40} {'+median':>8} {'p25':>7} {'p75':>7} {'at':>7}  same CPU as before")
    at = 0.0
    for i in range(1, len(labels)):
        gaps = [(row[i][0] - row[i - 1][0]) / 1e3 for row in rows]
        quartiles = statistics.quantiles(gaps, n=4) if len(gaps) > 1 else [gaps[0]] * 3
        at += statistics.median(gaps)
        same = ""
        if processes[i] != processes[i - 1] and "client" not in (processes[i], processes[i - 1]):
            shared = sum(1 for row in rows if row[i][1] == row[i - 1][1]) / len(rows)
            same = f"{shared:.0%}"
        print(
            f"{labels[i]:40} {statistics.median(gaps):8.1f} {quartiles[0]:7.1f}"
            f" {quartiles[2]:7.1f} {at:7.1f}  {same}"
        )
    total = [(row[-1][0] - row[0][0]) / 1e3 for row in rows]
    print(f"{'the whole request':40} {statistics.median(total):8.1f}")


def _writes(stamps: dict[str, list[Stamp]]) -> None:
    """How long each kind of write took (a write that wakes its reader on this CPU may not
    return before the reader ran)."""
    print("\nwrites, microseconds from call to return: median, p90")
    for process, logged in stamps.items():
        began: dict[int, int] = {}
        took: dict[bytes, list[float]] = {}
        for ns, _, what, fd, data in logged:
            if what == "send>":
                began[fd] = ns
            elif what == "send<" and fd in began:
                kind = data[:14]
                took.setdefault(kind, []).append((ns - began.pop(fd)) / 1e3)
        for kind, durations in sorted(took.items(), key=lambda kv: -len(kv[1])):
            if len(durations) >= 20:
                p90 = statistics.quantiles(durations, n=10)[-1]
                print(
                    f"  {process:12} {kind!r:22} {statistics.median(durations):7.1f}"
                    f" {p90:8.1f}  ({len(durations)})"
                )


def _collections(
    stamps: dict[str, list[Stamp]], requests: dict[str, list[tuple[int, int]]]
) -> None:
    """The collections while the requests were served (not those of the start-up)."""
    print(
        "\ngarbage collections per 1,000 requests (mean milliseconds each), by generation;"
        " cyclic garbage freed per request"
    )
    for process, logged in stamps.items():
        began = 0
        spent: dict[str, list[float]] = {}
        freed = 0
        served = requests["direct" if process == "direct" else "distributed"]
        first, last = served[0][0], served[-1][1]
        for ns, _, what, collected, _ in logged:
            if not first <= ns <= last:
                continue
            if what.startswith("gc>"):
                began = ns
            elif what.startswith("gc<") and began:
                spent.setdefault(what[3:], []).append((ns - began) / 1e6)
                freed += max(collected, 0)
        figures = ", ".join(
            f"gen{gen} {len(times) / len(served) * 1000:.1f} ({statistics.mean(times):.2f})"
            for gen, times in sorted(spent.items())
        )
        print(f"  {process:12} {figures or 'none'}; {freed / len(served):.1f} objects")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per side (default 400)")
    parser.add_argument(
        "--pause-ms", type=float, default=0.0, help="between requests (default none)"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the distributor and direct uvicorn on CPU 0, the Node and Redis on CPU 1",
    )
    args = parser.parse_args(argv)
    http = _bench_http()
    redis = RedisServer()
    processes = http.Processes()
    with tempfile.TemporaryDirectory(prefix="minidasgi-bench-timeline-") as tmp:
        Path(tmp, "bench_apps.py").write_text(http.APPS)
        hook = Path(tmp, "hook")
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(HOOK)
        url = f"redis://{HOST}:{redis.port}"
        path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, BENCH_REDIS_URL=url, PYTHONPATH=path)
        direct_port, dist_port = free_port(HOST), free_port(HOST)
        outputs = {role: Path(tmp, f"{role}.stamps") for role in ("direct", "distributor", "node")}
        try:
            redis.start()
            flags = http.uvicorn_flags(False)
            argvs = http.commands(tmp, url, direct_port, dist_port, flags, False)
            for role, command in argvs.items():
                processes.start(role, command, dict(env, TIMELINE_OUT=str(outputs[role])))
            http._wait_http(direct_port)
            http._wait_http(dist_port)
            if args.pin:
                for role, cpu in (("distributor", 0), ("direct", 0), ("node", 1)):
                    os.sched_setaffinity(processes.pids[role], {cpu})
                assert redis.pid is not None
                os.sched_setaffinity(redis.pid, {1})
            pause = args.pause_ms / 1000
            distributed = _requests(dist_port, args.requests, pause)
            direct = _requests(direct_port, args.requests, pause)
            # SIGINT: each child stops as on Ctrl-C and writes its stamps at exit.
            for child in processes.children:
                child.send_signal(signal.SIGINT)
            for child in processes.children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(15)
        finally:
            processes.stop()
            redis.close()
        stamps = {role: _load(output) for role, output in outputs.items()}
    if not all(stamps.values()):
        print("a child wrote no stamps", file=sys.stderr)
        return 1
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    _report("through the distributor and a Node", DISTRIBUTED, stamps, distributed)
    _report("uvicorn alone", DIRECT, stamps, direct)
    _writes(stamps)
    _collections(stamps, {"direct": direct, "distributed": distributed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
