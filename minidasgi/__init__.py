"""minidasgi: spread ASGI traffic from front processes to worker processes through Redis."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
