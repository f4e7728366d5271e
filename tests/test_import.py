"""Importing minidasgi pulls in nothing but the standard library (and never hiredis)."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK_IMPORTS = r"""
import pkgutil
import sys

import minidasgi
import minidasgi.resp

names = [
    info.name
    for info in pkgutil.walk_packages(minidasgi.__path__, prefix="minidasgi.")
    # Importing __main__ would run the command line.
    if info.name != "minidasgi.__main__"
]
for name in names:
    __import__(name)

foreign = sorted(
    name
    for name in sys.modules
    if (top := name.partition(".")[0]) not in sys.stdlib_module_names
    and top != "minidasgi"
    and top != "encodings"
    and not top.startswith("_")
)
print("imported:", " ".join(names))
print("foreign:", " ".join(foreign))
"""


def run_import_check() -> tuple[list[str], list[str]]:
    env = {key: value for key, value in os.environ.items() if key != "MINIDASGI_RESP_PARSER"}
    result = subprocess.run(
        [sys.executable, "-c", CHECK_IMPORTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    return lines["imported"].split(), lines["foreign"].split()


def test_importing_every_module_pulls_in_only_the_standard_library() -> None:
    imported, foreign = run_import_check()
    assert "minidasgi.resp.protocol" in imported
    assert "minidasgi.cli" in imported
    assert foreign == []
