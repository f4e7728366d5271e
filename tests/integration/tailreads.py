"""What a subscriber's socket hands over when it reads large payloads' tails apart
(``resp.directread``): shared by the RESP tests and the relay's."""

from __future__ import annotations

import os
import socket

import pytest

from minidasgi.resp import connection as resp_connection


def recording_tail_reads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Tails read apart from now on, as in a process the library owns (``read_tails_apart``,
    undone after the test; the allocator's tuning it makes is not); and what every
    subscriber's ``recv`` of a tail returns (the connection's duplicate of its socket, made by
    ``_duplicate``, records them)."""
    monkeypatch.setattr(resp_connection, "_tails_apart", False)  # restored after the test
    resp_connection.read_tails_apart()
    reads: list[bytes] = []

    class Recording(socket.socket):
        def recv(self, size: int, flags: int = 0) -> bytes:
            data = super().recv(size, flags)
            reads.append(data)
            return data

    def duplicate(fileno: int) -> socket.socket:
        sock = Recording(fileno=os.dup(fileno))
        sock.setblocking(False)
        return sock

    monkeypatch.setattr(resp_connection, "_duplicate", duplicate, raising=False)
    return reads
