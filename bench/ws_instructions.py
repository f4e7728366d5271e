"""Instructions per WebSocket echo round trip: direct uvicorn, the distributor and the Node.

Run ``python bench/ws_instructions.py [--messages 800] [--warmup 200] [--sockets 1,16]``. It
needs ``valgrind``. CPU time per message moves by 10-30% between runs on a shared machine; the
number of instructions a process executes does not, so this is the figure to compare two
versions of the code by, one after the other (``bench/instructions.py`` does the same for
HTTP requests).

The stack is ``bench/websocket.py``'s (the same echo app, uvicorn serving it directly and
serving the distributor, one Node), each of the three processes under ``valgrind
--tool=cachegrind --cache-sim=no``. Clients (raw sockets speaking just enough of RFC 6455, in
threads of this process, which valgrind does not count) each open one socket to each server
and do lockstep round trips of a 64-character text message: ``warmup`` round trips per socket
in one run, ``warmup + messages`` in another; the difference of the two runs' counts over the
round trips it adds is what one costs, start-up and shutdown cancelled out. At one socket a
message travels alone, so the figure is the per-message path, exactly; at several, what the
distributor and the Node send each other coalesces into batches whose sizes depend on timing
(under valgrind as on a loaded machine), so the figure moves with them: the batch sizes of
each run are printed beside it. Valgrind runs the processes about 50 times slower: a run takes
a few minutes.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from measure import free_port

from minidasgi.testing import RedisServer

HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent
# bench/instructions.py, loaded by path (as it loads bench/http.py): its valgrind command
# line, its roles, and how it stops the processes and reads their counts.
_spec = importlib.util.spec_from_file_location("bench_instructions", HERE / "instructions.py")
assert _spec is not None and _spec.loader is not None
bench_instructions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_instructions)
VALGRIND = bench_instructions.VALGRIND
ROLES = bench_instructions.ROLES
PAYLOAD = b"x" * 64


class _Socket:
    """One client WebSocket: the handshake, masked text frames out, unmasked frames in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=300)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection in the handshake")
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {answer[:40]!r}")
        self.buffer = answer.split(b"\r\n\r\n", 1)[1]

    def round_trip(self) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(PAYLOAD))
        self.sock.sendall(bytes([0x81, 0x80 | len(PAYLOAD)]) + mask + masked)
        while len(self.buffer) < 2 + len(PAYLOAD):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk
        if self.buffer[:2] != bytes([0x81, len(PAYLOAD)]):
            raise ConnectionError(f"unexpected frame {self.buffer[:2]!r}")
        if self.buffer[2 : 2 + len(PAYLOAD)] != PAYLOAD:
            raise ConnectionError("the echo does not match")
        self.buffer = self.buffer[2 + len(PAYLOAD) :]

    def close(self) -> None:
        mask = os.urandom(4)
        code = struct.pack(">H", 1000)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(code))
        self.sock.sendall(bytes([0x88, 0x82]) + mask + masked)
        self.sock.close()


def _lockstep(port: int, sockets: int, count: int) -> None:
    """``count`` round trips on each of ``sockets`` sockets, all at once (in threads)."""
    errors: list[BaseException] = []
    opened = [_Socket(port) for _ in range(sockets)]

    def run(ws: _Socket) -> None:
        try:
            for _ in range(count):
                ws.round_trip()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(ws,)) for ws in opened]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ws in opened:
        ws.close()
    if errors:
        raise errors[0]


def _wait_up(port: int, deadline: float = 180.0) -> None:
    """Until the server echoes a message (valgrind makes start-up slow)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            _lockstep(port, 1, 1)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"nothing echoed on port {port} within {deadline:.0f} s")


def _run(count: int, sockets: int, tmp: str) -> tuple[dict[str, int], dict[str, str]]:
    """Instructions each process executed, ``count`` round trips per socket to each server,
    and the batch sizes the distributor's and the Node's outboxes reported."""
    redis = RedisServer()
    redis.start()
    script = str(HERE / "websocket.py")
    direct_port, dist_port = free_port(HOST), free_port(HOST)
    argv = {
        "direct": ["--role", "direct", "--port", str(direct_port)],
        "distributor": ["--role", "distributor", "--port", str(dist_port), "--redis", redis.url],
        "node": ["--role", "node", "--redis", redis.url],
    }
    logs = {role: os.path.join(tmp, f"{role}-{count}.valgrind") for role in ROLES}
    processes = {
        role: subprocess.Popen(
            [*VALGRIND, f"--log-file={logs[role]}", sys.executable, script, *argv[role]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        for role in ROLES
    }
    batches = {}
    try:
        for process in processes.values():
            assert process.stdout is not None
            if b"ready" not in process.stdout.readline():
                raise RuntimeError("a child did not start")
        _wait_up(direct_port)
        _wait_up(dist_port)
        # One more round trip each (_wait_up's), in both runs alike: the difference is exact.
        _lockstep(direct_port, sockets, count)
        _lockstep(dist_port, sockets, count)
        for role in ("distributor", "node"):
            process = processes[role]
            assert process.stdout is not None
            process.send_signal(signal.SIGUSR1)
            _, items, published = process.stdout.readline().split()
            batches[role] = f"{int(items) / max(1, int(published)):.2f}"
    finally:
        bench_instructions.stop(processes.values(), signal.SIGTERM)
        redis.close()
    return bench_instructions.instruction_counts(logs), batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=800, help="round trips counted")
    parser.add_argument("--warmup", type=int, default=200, help="round trips in both runs")
    parser.add_argument("--sockets", default="1,16", help="comma-separated socket counts")
    args = parser.parse_args(argv)
    print(
        f"instructions per WebSocket echo round trip of {len(PAYLOAD)} characters (valgrind;"
        f" {args.messages} round trips counted, minus the first {args.warmup}):"
    )
    for sockets in [int(n) for n in args.sockets.split(",") if n.strip()]:
        if args.warmup % sockets or args.messages % sockets:
            parser.error("--warmup and --messages must be multiples of each socket count")
        with tempfile.TemporaryDirectory(prefix="minidasgi-bench-ws-instructions-") as tmp:
            short, _ = _run(args.warmup // sockets, sockets, tmp)
            long, batches = _run((args.warmup + args.messages) // sockets, sockets, tmp)
        per = {role: (long[role] - short[role]) / args.messages for role in ROLES}
        line = f"  {sockets:>3} sockets:"
        for role in ROLES:
            line += f" {role} {per[role] / 1000:.1f}k"
            if role == "distributor":
                line += f" ({per[role] / per['direct']:.2f}x direct)"
            line += ","
        line += (
            f" messages per PUBLISH: distributor {batches['distributor']}, node {batches['node']}"
        )
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
