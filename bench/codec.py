"""Encode and decode cost of the released binary format (``codec.RELEASED``) and the fast one.

The fast format (``codec.FAST``, the default since the coalescing work) is ``jsoncodec``'s: the
C ``json`` module for the head, bodies in a binary tail.

Run ``python bench/codec.py [--rounds 7] [--seconds 0.2]``. For each message below it times
encode and decode of both formats, alternating the formats round by round so that a busy
machine penalises both alike, and prints the median of the rounds in microseconds per call
(CPU time of this process, so other processes on the machine disturb it less), the ratio
binary / fast and the size of each encoding:

- envelope: a request envelope with a uvicorn-like scope (10 headers) and an empty body;
- response: ``[send, id, [http.response.start, http.response.body]]`` with a 12-byte body;
- body-128k: ``[event, id, http.request]`` carrying a 128 KiB body piece;
- ws-text: ``[event, id, websocket.receive]`` with a 60-character text message.
"""

from __future__ import annotations

import os
import sys

# This folder holds http.py: keep it off sys.path, or it would shadow the stdlib's http package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from minidasgi import codec

REQUEST_ID = os.urandom(12).hex()


def envelope() -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
        (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        (b"accept-language", b"en-US,en;q=0.5"),
        (b"accept-encoding", b"gzip, deflate, br"),
        (b"connection", b"keep-alive"),
        (b"cookie", b"session=0123456789abcdef; theme=dark"),
        (b"upgrade-insecure-requests", b"1"),
        (b"sec-fetch-dest", b"document"),
        (b"cache-control", b"max-age=0"),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51234),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/hello",
        "raw_path": b"/hello",
        "query_string": b"",
        "headers": headers,
        "extensions": {},
    }
    return {
        "id": REQUEST_ID,
        "reply": f"minidasgi:0:distributor:{os.urandom(12).hex()}",
        "deadline": time.time() + 5.0,
        "scope": scope,
        "events": [{"type": "http.request", "body": b"", "more_body": False}],
        "window": 8,
    }


def response() -> list[Any]:
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"12")],
    }
    body = {"type": "http.response.body", "body": b"Hello World!", "more_body": False}
    return ["send", REQUEST_ID, [start, body]]


def body_piece() -> list[Any]:
    body = os.urandom(128 * 1024)
    return ["event", REQUEST_ID, {"type": "http.request", "body": body, "more_body": True}]


def websocket_text() -> list[Any]:
    text = "Hello over a WebSocket: a short chat message, as apps send."
    return ["event", REQUEST_ID, {"type": "websocket.receive", "text": text}]


MESSAGES: dict[str, Callable[[], Any]] = {
    "envelope": envelope,
    "response": response,
    "body-128k": body_piece,
    "ws-text": websocket_text,
}


def per_call(function: Callable[[], Any], seconds: float) -> float:
    """Microseconds of CPU per call of ``function``, over about ``seconds`` of CPU."""
    calls = 1
    while True:
        start = time.process_time()
        for _ in range(calls):
            function()
        elapsed = time.process_time() - start
        if elapsed >= seconds:
            return elapsed / calls * 1e6
        calls *= 2 if elapsed < seconds / 8 else max(2, int(seconds / max(elapsed, 1e-9)) + 1)


def measure(value: Any, rounds: int, seconds: float) -> dict[str, float]:
    data1 = codec.encode(value, version=codec.RELEASED)
    data2 = codec.encode(value)  # FAST: jsoncodec behind the version byte
    # Both formats must give the same value back (tuples as lists) before timing anything.
    assert data1[0] == codec.RELEASED and data2[0] == codec.FAST
    assert codec.decode(data2) == codec.decode(data1)
    timings: dict[str, list[float]] = {k: [] for k in ("enc1", "dec1", "enc2", "dec2")}
    for index in range(rounds):
        order = [1, 2] if index % 2 == 0 else [2, 1]
        for version in order:
            if version == 1:
                timings["enc1"].append(
                    per_call(lambda: codec.encode(value, version=codec.RELEASED), seconds)
                )
                timings["dec1"].append(per_call(lambda: codec.decode(data1), seconds))
            else:
                timings["enc2"].append(per_call(lambda: codec.encode(value), seconds))
                timings["dec2"].append(per_call(lambda: codec.decode(data2), seconds))
    result = {name: statistics.median(values) for name, values in timings.items()}
    result["size1"] = len(data1)
    result["size2"] = len(data2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per message (median)")
    parser.add_argument("--seconds", type=float, default=0.2, help="CPU seconds per timing")
    args = parser.parse_args(argv)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print("microseconds per call (median of rounds); v1 = released binary format, v3 = fast format")
    header = f"{'message':<10} {'v1 enc':>9} {'v3 enc':>9} {'ratio':>6}   "
    header += f"{'v1 dec':>9} {'v3 dec':>9} {'ratio':>6}   {'v1 bytes':>9} {'v3 bytes':>9}"
    print(header)
    for name, make in MESSAGES.items():
        r = measure(make(), args.rounds, args.seconds)
        print(
            f"{name:<10} {r['enc1']:9.2f} {r['enc2']:9.2f} {r['enc1'] / r['enc2']:5.2f}x   "
            f"{r['dec1']:9.2f} {r['dec2']:9.2f} {r['dec1'] / r['dec2']:5.2f}x   "
            f"{r['size1']:9d} {r['size2']:9d}"
        )


if __name__ == "__main__":
    main()
