"""Instructions per hello-world request: direct uvicorn, the distributor and the Node.

Run ``python bench/instructions.py [--requests 800] [--warmup 200] [--connections 8]
[--fast]``. It needs ``valgrind``. CPU time per request moves by 10-30% between runs on a
shared machine; the number of instructions a process executes does not (it repeats to a few
thousand per request whatever else the machine does), so this is the figure to compare two
versions of the code by, one after the other.

The stack is ``bench/http.py``'s (the same app, the same uvicorn flags, one Node on asyncio's
own loop; with ``--fast``, that of ``bench/http.py --fast``: httptools and uvloop), each of
the three processes under ``valgrind --tool=cachegrind --cache-sim=no``.
Keep-alive clients (raw sockets, in threads of this process, which valgrind does not count)
send ``warmup`` requests to each server in one run and ``warmup + requests`` in another; the
difference of the two runs' counts over ``requests`` is what one request costs, start-up and
shutdown cancelled out. Valgrind runs the processes about 50 times slower: a run takes a few
minutes.

``--download MIB`` counts downloads of ``MIB`` MiB (the app's 1 MiB chunks, or ``--chunk
KIB``) instead of hello-world requests, one connection: ``--requests`` downloads counted,
``--warmup`` in both runs, and prints instructions per MiB. Valgrind counts user space only:
the kernel's copies and TCP work, most of what a download costs, are not in these figures (CPU
time from ``/proc`` is).

``--upload MIB`` counts uploads of ``MIB`` MiB likewise (one connection, sent in 1 MiB
writes, the app reading the body and answering its length), and prints instructions per MiB.

``--vary`` gives each hello-world request its own path (``/item/CONNECTION/NUMBER``) and its
own ``X-Request-Id`` value, as a proxy's or a browser's keep-alive requests differ: what a
request costs when the distributor's per-connection keeps (``envelopewriter``) miss.

``--callgrind DIR`` runs one process (the distributor, or the one ``--callgrind-role`` names)
under ``valgrind --tool=callgrind`` instead (its instruction count is the same) and keeps its
profiles of both runs in ``DIR`` (``<role>-<requests>.callgrind``): read them with
``callgrind_annotate --inclusive=yes``, the difference of the two is what the counted requests
cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from measure import free_port

from minidasgi.testing import RedisServer

_HERE = Path(__file__).resolve().parent
# bench/http.py, loaded by path: its name would shadow the stdlib's http package on sys.path.
_spec = importlib.util.spec_from_file_location("bench_http", _HERE / "http.py")
assert _spec is not None and _spec.loader is not None
bench_http = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_http)

VALGRIND = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
CALLGRIND = ["valgrind", "--tool=callgrind"]
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
ROLES = ("direct", "distributor", "node")


def _varied(connection: int, number: int) -> bytes:
    """The ``number``-th request of a connection with ``--vary``: its own path and its own
    ``X-Request-Id`` value, as a proxy's or a browser's keep-alive requests differ."""
    return (
        f"GET /item/{connection}/{number} HTTP/1.1\r\nHost: bench\r\n"
        f"X-Request-Id: {connection:04d}-{number:08d}\r\n\r\n"
    ).encode()


def _client(
    port: int, count: int, errors: list[BaseException], vary: bool = False, connection: int = 0
) -> None:
    """``count`` requests on one keep-alive connection, each answer read in full (each
    request its own path and header value with ``vary``)."""
    try:
        with socket.create_connection((bench_http.HOST, port), timeout=120) as sock:
            for number in range(count):
                sock.sendall(_varied(connection, number) if vary else REQUEST)
                answer = b""
                while not answer.endswith(b"Hello World!"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("the server closed the connection")
                    answer += chunk
    except BaseException as exc:  # reported by the caller
        errors.append(exc)


def _downloads(port: int, count: int, size: int, chunk: int = 0) -> None:
    """``count`` downloads of ``size`` bytes on one keep-alive connection, each read in full
    (sent by the app in chunks of ``chunk`` bytes, if given, else 1 MiB)."""
    query = f"{size},{chunk}" if chunk else str(size)
    with socket.create_connection((bench_http.HOST, port), timeout=600) as sock:
        for _ in range(count):
            sock.sendall(f"GET /download?{query} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                received += chunk
            got = len(received.partition(b"\r\n\r\n")[2])
            while got < size:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                got += len(chunk)
            if got != size:
                raise RuntimeError(f"{got} bytes of body instead of {size}")


def _uploads(port: int, count: int, size: int) -> None:
    """``count`` uploads of ``size`` bytes on one keep-alive connection, each answered with
    its length (``bench_http.APPS``' ``/upload``)."""
    piece = b"u" * (1 << 20)
    expected = str(size).encode()
    with socket.create_connection((bench_http.HOST, port), timeout=600) as sock:
        for _ in range(count):
            sock.sendall(
                f"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n\r\n".encode()
            )
            left = size
            while left:
                sent = piece[: min(left, len(piece))]
                sock.sendall(sent)
                left -= len(sent)
            answer = b""
            while not answer.endswith(b"\r\n\r\n" + expected):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                answer += chunk


def _load(
    port: int,
    total: int,
    connections: int,
    download: int = 0,
    chunk: int = 0,
    upload: int = 0,
    vary: bool = False,
) -> None:
    if download:
        _downloads(port, total, download << 20, chunk)
        return
    if upload:
        _uploads(port, total, upload << 20)
        return
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_client, args=(port, total // connections, errors, vary, index))
        for index in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _wait_up(port: int, deadline: float = 600.0) -> None:
    """Until the server answers a request (valgrind makes start-up slow: past 3 minutes on
    a machine whose two cores run a dozen other processes)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            _load(port, 1, 1)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"nothing answered on port {port} within {deadline:.0f} s")


def _valgrind(
    role: str, total: int, callgrind: str | None, profiled: str = "distributor"
) -> list[str]:
    """The valgrind command line for ``role``'s process in the run of ``total`` requests
    (callgrind for the ``profiled`` role when a ``callgrind`` directory is given)."""
    if callgrind is not None and role == profiled:
        out = os.path.join(callgrind, f"{role}-{total}.callgrind")
        return [*CALLGRIND, f"--callgrind-out-file={out}"]
    return VALGRIND


def _run(
    total: int,
    connections: int,
    tmp: str,
    fast: bool,
    callgrind: str | None = None,
    download: int = 0,
    chunk: int = 0,
    profiled: str = "distributor",
    upload: int = 0,
    vary: bool = False,
) -> dict[str, int]:
    """Instructions each process executed, with ``total`` requests sent to each server (the
    ``profiled`` role under callgrind, its profile kept in the directory ``callgrind``, if
    given)."""
    redis = RedisServer()
    redis.start()
    url = f"redis://{bench_http.HOST}:{redis.port}"
    env = dict(os.environ, BENCH_REDIS_URL=url)
    direct_port, dist_port = free_port(bench_http.HOST), free_port(bench_http.HOST)
    logs = {role: os.path.join(tmp, f"{role}-{total}.valgrind") for role in ROLES}
    flags = bench_http.uvicorn_flags(fast)
    commands = bench_http.commands(tmp, url, direct_port, dist_port, flags, fast)
    processes = {
        role: subprocess.Popen(
            [*_valgrind(role, total, callgrind, profiled), f"--log-file={logs[role]}", *command],
            env=env,
        )
        for role, command in commands.items()
    }
    try:
        _wait_up(direct_port)
        _wait_up(dist_port)
        # One more request each (_wait_up's), in both runs alike: the difference is exact.
        _load(direct_port, total, connections, download, chunk, upload, vary)
        _load(dist_port, total, connections, download, chunk, upload, vary)
    finally:
        stop(processes.values(), signal.SIGINT)
        redis.close()
    return instruction_counts(logs)


def stop(processes: Iterable[subprocess.Popen[bytes]], signum: int) -> None:
    """Send each process ``signum``, then wait for each (valgrind writes its counts as the
    process exits), killing one that has not stopped within 2 minutes."""
    processes = list(processes)
    for process in processes:
        process.send_signal(signum)
    for process in processes:
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def instruction_counts(logs: dict[str, str]) -> dict[str, int]:
    """The instructions each role's process executed, read from its valgrind log."""
    counts = {}
    for role, log in logs.items():
        match = re.search(r"I\s+refs:\s+([\d,]+)", Path(log).read_text())
        if match is None:
            raise RuntimeError(f"no instruction count in {log}")
        counts[role] = int(match.group(1).replace(",", ""))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=800, help="requests counted")
    parser.add_argument("--warmup", type=int, default=200, help="requests in both runs")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    parser.add_argument(
        "--callgrind",
        metavar="DIR",
        help="run one process under callgrind and keep its profiles in DIR",
    )
    parser.add_argument(
        "--callgrind-role",
        choices=ROLES,
        default="distributor",
        help="with --callgrind: the process profiled (default: the distributor)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="all three on uvloop, uvicorn with --http httptools"
    )
    parser.add_argument(
        "--download",
        type=int,
        default=0,
        metavar="MIB",
        help="count downloads of MIB MiB (one connection) instead of hello-world requests",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=0,
        metavar="KIB",
        help="with --download: the app sends in chunks of KIB KiB (default 1024)",
    )
    parser.add_argument(
        "--upload",
        type=int,
        default=0,
        metavar="MIB",
        help="count uploads of MIB MiB (one connection) instead of hello-world requests",
    )
    parser.add_argument(
        "--vary",
        action="store_true",
        help="each hello-world request its own path and X-Request-Id value (as real traffic)",
    )
    args = parser.parse_args(argv)
    if args.download and args.upload:
        parser.error("--download or --upload, not both")
    if args.download or args.upload:
        args.connections = 1
    if args.warmup % args.connections or args.requests % args.connections:
        parser.error("--warmup and --requests must be multiples of --connections")
    with tempfile.TemporaryDirectory(prefix="minidasgi-bench-instructions-") as tmp:
        Path(tmp, "bench_apps.py").write_text(bench_http.APPS)
        if args.callgrind is not None:
            os.makedirs(args.callgrind, exist_ok=True)
        chunk = args.chunk << 10
        short, long = (
            _run(
                count,
                args.connections,
                tmp,
                args.fast,
                args.callgrind,
                args.download,
                chunk,
                args.callgrind_role,
                args.upload,
                args.vary,
            )
            for count in (args.warmup, args.warmup + args.requests)
        )
    per_request = {role: (long[role] - short[role]) / args.requests for role in ROLES}
    if args.download:
        mib = args.requests * args.download
        print(
            f"instructions per MiB downloaded ({args.requests} downloads of {args.download} MiB"
            f"{f' in {args.chunk} KiB chunks' if args.chunk else ''}"
            f" minus the first {args.warmup}; valgrind, user space only"
            f"{'; httptools, uvloop' if args.fast else ''}):"
        )
        for role in ROLES:
            print(f"  {role:<12} {(long[role] - short[role]) / mib / 1000:8.1f}k")
        return 0
    if args.upload:
        mib = args.requests * args.upload
        print(
            f"instructions per MiB uploaded ({args.requests} uploads of {args.upload} MiB"
            f" minus the first {args.warmup}; valgrind, user space only"
            f"{'; httptools, uvloop' if args.fast else ''}):"
        )
        for role in ROLES:
            print(f"  {role:<12} {(long[role] - short[role]) / mib / 1000:8.1f}k")
        return 0
    print(
        f"instructions per hello-world request ({args.requests} requests over"
        f" {args.connections} connections, minus the first {args.warmup}; valgrind"
        f"{'; httptools, uvloop' if args.fast else ''}"
        f"{'; each its own path and X-Request-Id' if args.vary else ''}):"
    )
    for role in ROLES:
        line = f"  {role:<12} {per_request[role] / 1000:8.1f}k"
        if role == "distributor":
            line += f"   ({per_request[role] / per_request['direct']:.2f}x direct)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
