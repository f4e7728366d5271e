"""``python -m minidasgi``: the command line (see ``minidasgi.cli``)."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
