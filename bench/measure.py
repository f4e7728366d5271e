"""What a benchmark reads off its processes: CPU time and page faults from ``/proc``, command
counts from Redis' ``INFO commandstats``; and a free loopback port for the servers it starts.
Shared by the scripts in this folder (run as ``python bench/NAME.py``, which puts this folder
on ``sys.path``; those that keep it off, lest ``http.py`` shadow the stdlib, put it last)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from minidasgi.testing import RedisServer

_TICK = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a server a benchmark starts (never 6379: a
    redis-server the machine runs may be stopped for a moment, and must find it again)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port != 6379:
            return port


def _stat(pid: int) -> list[str]:
    """``/proc/PID/stat``'s fields after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of a process so far (fields 14 and 15), with that of its reaped
    children (16 and 17) if ``children``."""
    fields = _stat(pid)
    return sum(int(f) for f in fields[11 : 15 if children else 13]) / _TICK


def waiting_seconds(pid: int) -> float | None:
    """Seconds the threads of a process have spent runnable but not running, waiting for a
    CPU (the second field of ``/proc/PID/task/TID/schedstat``), or None where the kernel does
    not keep it. Next to CPU over wall time it tells a process that waited for work (idle)
    from one that waited for a core."""
    if not os.path.exists(f"/proc/{pid}/schedstat"):
        return None
    total = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{thread}/schedstat").read_text().split()[1])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return total / 1e9


def system_seconds(pid: int) -> float:
    """System (kernel) CPU time of a process so far (field 15): for a transfer, mostly the
    kernel's copies into and out of its sockets."""
    return int(_stat(pid)[12]) / _TICK


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (field 10): a fresh large buffer per message
    shows here (the allocator hands large blocks back to the system)."""
    return int(_stat(pid)[7])


def commandstats(redis: RedisServer) -> dict[str, int]:
    """Calls per command since the server started (or since ``CONFIG RESETSTAT``)."""
    info = redis.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    calls = {}
    for line in info.decode().splitlines():
        match = re.match(r"cmdstat_([a-z|]+):calls=(\d+)", line)
        if match:
            calls[match.group(1)] = int(match.group(2))
    return calls
