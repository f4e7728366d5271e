"""The distributor's access log: one line per request, as text or as one JSON object.

Owns the line's fields and formats, on the ``minidasgi.access`` logger (INFO). It formats
nothing unless that logger is enabled for INFO, and never logs a query string, a header or
a body: paths can be long, so they are cut at ``MAX_PATH`` characters.
"""

from __future__ import annotations

import json
import logging

__all__ = ["FORMATS", "MAX_PATH", "AccessLog"]

logger = logging.getLogger("minidasgi.access")

FORMATS = ("text", "json")
MAX_PATH = 512


class AccessLog:
    """Writes access-log lines in ``format`` (``"text"`` or ``"json"``)."""

    def __init__(self, format: str = "text") -> None:
        if format not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}")
        self.format = format

    def enabled(self) -> bool:
        """True if a line would be written (else the caller may skip gathering fields)."""
        return logger.isEnabledFor(logging.INFO)

    def write(
        self,
        *,
        method: str,
        path: str,
        key: str | None,
        node: str | None,
        status: int,
        queue_wait: float | None,
        total: float,
        aborted: bool = False,
    ) -> None:
        """Log one request. Times in seconds; ``queue_wait`` is None without an ack.
        ``aborted``: the response started (``status`` is what the client saw), then was cut
        short; a text line then ends with ``aborted=true``, a JSON object says it always."""
        path = path[:MAX_PATH]
        if self.format == "json":
            line = json.dumps(
                {
                    "method": method,
                    "path": path,
                    "key": key,
                    "node": node,
                    "status": status,
                    "queue_wait_ms": None if queue_wait is None else round(queue_wait * 1e3, 3),
                    "total_ms": round(total * 1e3, 3),
                    "aborted": aborted,
                },
                separators=(",", ":"),
            )
        else:
            wait = "-" if queue_wait is None else f"{queue_wait * 1e3:.3f}"
            # repr() quotes the path and escapes what a client could use to forge lines.
            line = (
                f"{method} {path!r} key={key or '-'} node={node or '-'} status={status} "
                f"queue_wait_ms={wait} total_ms={total * 1e3:.3f}"
            )
            if aborted:
                line += " aborted=true"
        logger.info("%s", line)
