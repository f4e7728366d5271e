"""The command line without a network: argument parsing, environment variables, app loading,
exit codes, and that a Redis password never reaches the output.

``Node.run`` and ``uvicorn.run`` are replaced by recorders, so nothing here connects anywhere.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from minidasgi import cli
from minidasgi.cli import CLIError, _parse_routes, load_app, main
from minidasgi.node import Node
from minidasgi.resp import connection as resp_connection

APP_SOURCE = """
CALLS = []


async def app(scope, receive, send):
    pass


class Holder:
    class Inner:
        app = app


def make_app():
    CALLS.append("make_app")
    return app
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MINIDASGI_* variable from the caller's environment; sys.path restored afterwards."""
    for name in list(os.environ):
        if name.startswith("MINIDASGI_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv(cli._DISTRIBUTOR_ENV, raising=False)  # main() sets it; undo restores
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_app prepends --app-dir


@pytest.fixture
def app_module(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A fresh importable module in its own directory: yields ``(directory, module name)``."""
    name = f"cli_test_app_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(APP_SOURCE)
    importlib.invalidate_caches()
    try:
        yield str(tmp_path), name
    finally:
        sys.modules.pop(name, None)


@pytest.fixture
def nodes(monkeypatch: pytest.MonkeyPatch) -> list[Node]:
    """``Node.run`` records the Node instead of serving."""
    ran: list[Node] = []

    def run(self: Node, loop: str = "asyncio") -> None:
        self.__dict__["ran_on"] = loop  # the event loop it was asked to run on
        ran.append(self)

    monkeypatch.setattr(Node, "run", run)
    return ran


@pytest.fixture
def uvicorn_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """``uvicorn.run`` records its arguments instead of serving: the distributor it was given
    (or that a ``--workers`` process would build) as ``distributor``; for ``--workers``, the
    configuration file as ``config_file`` with its ``config`` and its and its directory's
    permission bits as ``modes``; the objects the collector leaves alone as ``frozen``, and
    whether bodies are read apart as ``tails_apart``, in the process that runs uvicorn
    (``collector.settle``: this test process' own are given back to it afterwards)."""
    import uvicorn

    runs: list[dict[str, Any]] = []

    def fake_run(app: Any, **kwargs: Any) -> None:
        run: dict[str, Any] = {"app": app, **kwargs, "frozen": gc.get_freeze_count()}
        run["tails_apart"] = resp_connection._tails_apart
        if isinstance(app, str):
            path = Path(os.environ[cli._DISTRIBUTOR_ENV])
            run["config_file"] = path
            run["config"] = json.loads(path.read_text())
            run["modes"] = (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777)
            gc.unfreeze()
            run["distributor"] = cli.distributor_from_env()  # what each worker builds
            run["worker_frozen"] = gc.get_freeze_count()
        else:
            run["distributor"] = app
        runs.append(run)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setattr(resp_connection, "_tails_apart", False)  # settle's, undone after
    try:
        yield runs
    finally:
        gc.unfreeze()


# -- help and usage errors ------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_distributor_command_freezes_its_start_up_heap_where_it_serves(
    uvicorn_runs: list[dict[str, Any]], workers: str
) -> None:
    # The command owns its processes: in the one that serves (this one, or each worker
    # process as it builds its distributor) the start-up's heap is frozen out of the
    # collector's way and bodies are read apart. A ``--workers`` parent only supervises: it
    # is left as it is (before, it was settled too).
    assert gc.get_freeze_count() == 0
    assert main(["distributor", "--key", "K", "--workers", workers]) == 0
    (run,) = uvicorn_runs
    if workers == "1":
        assert run["frozen"] > 1000, run["frozen"]  # modules, functions: thousands
        assert run["tails_apart"]  # its own process: bodies read apart
    else:
        assert run["frozen"] == 0 and not run["tails_apart"]  # the supervising parent
        assert run["worker_frozen"] > 1000, run["worker_frozen"]
        assert resp_connection._tails_apart  # set by the worker's settle


def test_help_exits_0_and_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: minidasgi" in out
    for command in ("node", "distributor", "demo"):
        assert command in out


def test_node_help_names_the_environment_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["node", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for variable in ("MINIDASGI_REDIS_URL", "MINIDASGI_KEY", "MINIDASGI_CONCURRENCY"):
        assert variable in out


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: minidasgi" in capsys.readouterr().out


def test_node_without_app_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node"]) == 2
    err = capsys.readouterr().err
    assert "minidasgi:" in err and "MODULE:ATTR" in err


def test_node_without_key_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "some_module:app"]) == 2
    assert "--key" in capsys.readouterr().err


def test_node_with_missing_module_returns_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "nomodule:app", "--key", "k"]) == 1
    assert "cannot import module 'nomodule'" in capsys.readouterr().err


def test_node_with_missing_parent_package_returns_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "nopackage_xyz.sub:app", "--key", "k"]) == 1
    assert "cannot import module 'nopackage_xyz.sub'" in capsys.readouterr().err


def test_node_with_spec_without_attribute_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "noattr", "--key", "k"]) == 2
    assert "MODULE:ATTRIBUTE" in capsys.readouterr().err


def test_node_with_bad_concurrency_returns_2(
    app_module: tuple[str, str], nodes: list[Node], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, name = app_module
    argv = ["node", f"{name}:app", "--key", "k", "--app-dir", directory, "--concurrency", "0"]
    assert main(argv) == 2
    assert "concurrency" in capsys.readouterr().err
    assert nodes == []


def test_bad_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--log-level", "loud", "node"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bad_log_level_in_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MINIDASGI_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as info:
        main(["node"])
    assert info.value.code == 2
    assert "MINIDASGI_LOG_LEVEL must be one of" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["distributor"],
        ["distributor", "--route", "/=K", "--key", "K"],
        ["distributor", "--route", "no-equals-sign"],
        ["distributor", "--route", "=K"],
        ["distributor", "--route", "/x="],
        ["distributor", "--route", "(=K"],  # not a regular expression
        ["distributor", "--route", r"/(a)=K-\2"],  # no group 2
        ["distributor", "--key", "K", "--wire-format", "2"],  # only 1 and 3 are written
        # each worker process needs a listener of its own: no fixed port with workers
        ["distributor", "--key", "K", "--workers", "2", "--link", "127.0.0.1:7000"],
        ["distributor", "--key", "K", "--link", "0.0.0.0"],  # where do Nodes connect?
        ["distributor", "--key", "K", "--redis", "rediss://127.0.0.1:1", "--link", "127.0.0.1"],
    ],
)
def test_distributor_usage_errors_return_2(
    argv: list[str], uvicorn_runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("minidasgi: ")
    assert "Traceback" not in err
    assert uvicorn_runs == []


# -- load_app --------------------------------------------------------------------------------


def test_load_app_module_attribute(app_module: tuple[str, str]) -> None:
    directory, name = app_module
    app = load_app(f"{name}:app", app_dir=directory)
    assert app is sys.modules[name].app  # type: ignore[attr-defined]
    assert sys.path[0] == directory


def test_load_app_dotted_attribute(app_module: tuple[str, str]) -> None:
    directory, name = app_module
    app = load_app(f"{name}:Holder.Inner.app", app_dir=directory)
    assert app is sys.modules[name].app  # type: ignore[attr-defined]


def test_load_app_factory(app_module: tuple[str, str]) -> None:
    directory, name = app_module
    app = load_app(f"{name}:make_app", factory=True, app_dir=directory)
    module = sys.modules[name]
    assert app is module.app  # type: ignore[attr-defined]
    assert module.CALLS == ["make_app"]  # type: ignore[attr-defined]
    assert load_app(f"{name}:make_app", app_dir=directory) is module.make_app  # type: ignore[attr-defined]


def test_load_app_from_a_package() -> None:
    import json.decoder

    assert load_app("json.decoder:JSONDecoder.decode") is json.decoder.JSONDecoder.decode


@pytest.mark.parametrize("spec", ["noattr", ":app", "module:", ""])
def test_load_app_bad_spec_is_a_usage_error(spec: str) -> None:
    with pytest.raises(CLIError) as info:
        load_app(spec)
    assert info.value.code == 2


def test_load_app_missing_attribute(app_module: tuple[str, str]) -> None:
    directory, name = app_module
    with pytest.raises(CLIError, match=r"has no attribute 'Holder\.nothing'") as info:
        load_app(f"{name}:Holder.nothing", app_dir=directory)
    assert info.value.code == 1


def test_load_app_missing_module() -> None:
    with pytest.raises(CLIError, match="cannot import module 'nomodule_xyz'") as info:
        load_app("nomodule_xyz:app")
    assert info.value.code == 1


def test_load_app_does_not_hide_an_import_error_inside_the_module(tmp_path: Path) -> None:
    """A module that exists but fails to import its own dependency shows the real error."""
    name = f"cli_test_broken_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("import dependency_that_is_missing_xyz\n")
    importlib.invalidate_caches()
    try:
        with pytest.raises(ModuleNotFoundError) as info:
            load_app(f"{name}:app", app_dir=str(tmp_path))
        assert info.value.name == "dependency_that_is_missing_xyz"
    finally:
        sys.modules.pop(name, None)


# -- routes ----------------------------------------------------------------------------------


def test_parse_routes() -> None:
    assert _parse_routes([r"/api/([a-z-]+)=API-\1"]) == {r"/api/([a-z-]+)": r"API-\1"}


def test_parse_routes_splits_at_the_last_equals_sign() -> None:
    """A regex may hold '=' (a query-like path, a lookahead); a key template may not."""
    assert _parse_routes([r"/q=(\w+)=Q-\1"]) == {r"/q=(\w+)": r"Q-\1"}
    assert _parse_routes([r"/(?=a)a=A"]) == {"/(?=a)a": "A"}


def test_parse_routes_keeps_the_order() -> None:
    routes = _parse_routes(["/api/x=X", "/api=API", "/=ALL"])
    assert list(routes.items()) == [("/api/x", "X"), ("/api", "API"), ("/", "ALL")]


@pytest.mark.parametrize("item", ["nothing", "=K", "/x=", "="])
def test_parse_routes_refuses(item: str) -> None:
    with pytest.raises(CLIError) as info:
        _parse_routes([item])
    assert info.value.code == 2


# -- node: options and environment -----------------------------------------------------------


def test_node_options(app_module: tuple[str, str], nodes: list[Node]) -> None:
    directory, name = app_module
    argv = [
        "node", f"{name}:app", "--app-dir", directory,
        "--key", "one", "--key", "two",
        "--redis", "redis://127.0.0.1:6390/3",
        "--concurrency", "5", "--lifespan", "off", "--shutdown-timeout", "2.5",
        "--health-check-interval", "2",
        "--peer-timeout", "7.5",
    ]  # fmt: skip
    assert main(argv) == 0
    (node,) = nodes
    assert node.keys == ["one", "two"]
    assert (node.params.host, node.params.port, node.params.db) == ("127.0.0.1", 6390, 3)
    assert node.concurrency == 5
    assert node.shutdown_timeout == 2.5
    assert node.health_check_interval == 2
    assert node.peer_timeout == 7.5


def test_node_loop_defaults_to_auto(app_module: tuple[str, str], nodes: list[Node]) -> None:
    directory, name = app_module
    assert main(["node", f"{name}:app", "--app-dir", directory, "--key", "k"]) == 0
    assert nodes[0].__dict__["ran_on"] == "auto"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "auto"])
def test_node_loop_option(app_module: tuple[str, str], nodes: list[Node], loop: str) -> None:
    directory, name = app_module
    assert main(["node", f"{name}:app", "--app-dir", directory, "--key", "k", "--loop", loop]) == 0
    assert nodes[0].__dict__["ran_on"] == loop


def test_node_loop_from_the_environment(
    app_module: tuple[str, str], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, name = app_module
    monkeypatch.setenv("MINIDASGI_LOOP", "asyncio")
    assert main(["node", f"{name}:app", "--app-dir", directory, "--key", "k"]) == 0
    assert nodes[0].__dict__["ran_on"] == "asyncio"


def test_node_unknown_loop_from_the_environment_returns_2(
    app_module: tuple[str, str],
    nodes: list[Node],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory, name = app_module
    monkeypatch.setenv("MINIDASGI_LOOP", "trio")
    assert main(["node", f"{name}:app", "--app-dir", directory, "--key", "k"]) == 2
    assert "MINIDASGI_LOOP must be one of auto, asyncio, uvloop" in capsys.readouterr().err
    assert nodes == []


def test_node_on_uvloop_without_uvloop_returns_3(
    app_module: tuple[str, str],
    nodes: list[Node],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory, name = app_module
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    argv = ["node", f"{name}:app", "--app-dir", directory, "--key", "k", "--loop", "uvloop"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "uvloop is not installed: pip install uvloop" in err
    assert nodes == []
    # auto falls back to asyncio's loop, silently
    assert main(["node", f"{name}:app", "--app-dir", directory, "--key", "k"]) == 0
    assert nodes[0].__dict__["ran_on"] == "auto"


def test_node_factory_option(app_module: tuple[str, str], nodes: list[Node]) -> None:
    directory, name = app_module
    assert (
        main(["node", f"{name}:make_app", "--factory", "--app-dir", directory, "--key", "k"]) == 0
    )
    assert sys.modules[name].CALLS == ["make_app"]  # type: ignore[attr-defined]
    assert len(nodes) == 1


def test_node_takes_everything_from_the_environment(
    app_module: tuple[str, str], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, name = app_module
    # Set before main() builds its parser: the defaults are read from the environment then.
    monkeypatch.setenv("MINIDASGI_APP", f"{name}:app")
    monkeypatch.setenv("MINIDASGI_APP_DIR", directory)
    monkeypatch.setenv("MINIDASGI_KEY", "a, b")
    monkeypatch.setenv("MINIDASGI_REDIS_URL", "redis://10.1.2.3:6391/2")
    monkeypatch.setenv("MINIDASGI_CONCURRENCY", "7")
    monkeypatch.setenv("MINIDASGI_SHUTDOWN_TIMEOUT", "1.5")
    monkeypatch.setenv("MINIDASGI_LIFESPAN", "off")
    monkeypatch.setenv("MINIDASGI_HEALTH_CHECK_INTERVAL", "3.5")
    monkeypatch.setenv("MINIDASGI_PEER_TIMEOUT", "12")
    assert main(["node"]) == 0
    (node,) = nodes
    assert node.keys == ["a", "b"]
    assert (node.params.host, node.params.port, node.params.db) == ("10.1.2.3", 6391, 2)
    assert node.concurrency == 7
    assert node.shutdown_timeout == 1.5
    assert node.health_check_interval == 3.5
    assert node.peer_timeout == 12


def test_node_command_line_overrides_the_environment(
    app_module: tuple[str, str], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, name = app_module
    monkeypatch.setenv("MINIDASGI_KEY", "a,b")
    monkeypatch.setenv("MINIDASGI_REDIS_URL", "redis://10.1.2.3:6391/2")
    monkeypatch.setenv("MINIDASGI_CONCURRENCY", "7")
    argv = ["node", f"{name}:app", "--app-dir", directory, "--key", "c"]
    argv += ["--redis", "redis://127.0.0.1:6392", "--concurrency", "3"]
    assert main(argv) == 0
    (node,) = nodes
    assert node.keys == ["c"]
    assert node.params.port == 6392
    assert node.concurrency == 3


@pytest.mark.parametrize(
    ("value", "factory"), [("1", True), ("true", True), ("0", False), ("", False)]
)
def test_node_factory_from_the_environment(
    value: str,
    factory: bool,
    app_module: tuple[str, str],
    nodes: list[Node],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory, name = app_module
    monkeypatch.setenv("MINIDASGI_FACTORY", value)
    assert main(["node", f"{name}:make_app", "--app-dir", directory, "--key", "k"]) == 0
    calls = sys.modules[name].CALLS  # type: ignore[attr-defined]
    assert calls == (["make_app"] if factory else [])


def test_bad_number_in_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MINIDASGI_CONCURRENCY", "many")
    with pytest.raises(SystemExit) as info:
        main(["node", "x:y", "--key", "k"])
    assert info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_bad_number_in_the_environment_only_matters_to_its_command(
    app_module: tuple[str, str], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, name = app_module
    monkeypatch.setenv("MINIDASGI_WORKERS", "several")  # a distributor option
    assert main(["node", f"{name}:app", "--app-dir", directory, "--key", "k"]) == 0
    assert len(nodes) == 1


# -- passwords ---------------------------------------------------------------------------------


@pytest.mark.parametrize("log_level", [[], ["--log-level", "debug"]])
def test_node_never_shows_the_password(
    log_level: list[str],
    app_module: tuple[str, str],
    nodes: list[Node],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    directory, name = app_module
    argv = [*log_level, "node", f"{name}:app", "--app-dir", directory, "--key", "k"]
    argv += ["--redis", "redis://:hunter2@127.0.0.1:1/0"]
    assert main(argv) == 0
    (node,) = nodes
    assert node.params.password == "hunter2"  # it was parsed, just never shown
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err
    assert "hunter2" not in caplog.text
    assert "hunter2" not in repr(node)
    assert "redis://:***@127.0.0.1:1/0" in caplog.text  # the startup line names the server


def test_node_never_shows_the_password_from_the_environment(
    app_module: tuple[str, str],
    nodes: list[Node],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    directory, name = app_module
    monkeypatch.setenv("MINIDASGI_REDIS_URL", "redis://user:hunter2@127.0.0.1:1/0")
    assert (
        main(["--log-level", "debug", "node", f"{name}:app", "--app-dir", directory, "--key", "k"])
        == 0
    )
    (node,) = nodes
    assert (node.params.username, node.params.password) == ("user", "hunter2")
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err + caplog.text


def test_bad_redis_url_error_hides_the_password(
    app_module: tuple[str, str], nodes: list[Node], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, name = app_module
    argv = ["node", f"{name}:app", "--app-dir", directory, "--key", "k"]
    argv += ["--redis", "redis://:hunter2@127.0.0.1:notaport/0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid Redis URL" in err
    assert "hunter2" not in err
    assert nodes == []


HOSTILE = "Xq7#Zk9/Wm3?Vb2@Nc5%Lp8"  # every URL delimiter, unencoded


def _node_argv(app_module: tuple[str, str]) -> list[str]:
    directory, name = app_module
    return ["--log-level", "debug", "node", f"{name}:app", "--app-dir", directory, "--key", "k"]


@pytest.mark.parametrize("encode", [False, True])
def test_node_takes_a_hostile_password_in_the_url(
    encode: bool,
    app_module: tuple[str, str],
    nodes: list[Node],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = quote(HOSTILE, safe="") if encode else HOSTILE
    argv = [*_node_argv(app_module), "--redis", f"redis://alice:{secret}@127.0.0.1:1/0"]
    assert main(argv) == 0
    (node,) = nodes
    assert (node.params.username, node.params.password) == ("alice", HOSTILE)
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text + repr(node) + repr(node.params)
    for piece in (HOSTILE, quote(HOSTILE, safe=""), "Xq7", "Zk9", "Wm3", "Vb2", "Nc5", "Lp8"):
        assert piece not in text
    assert "redis://alice:***@127.0.0.1:1/0" in caplog.text


def test_a_password_on_the_command_line_is_warned_about(
    app_module: tuple[str, str],
    nodes: list[Node],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    argv = [*_node_argv(app_module), "--redis", "redis://:hunter2@127.0.0.1:1/0"]
    assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("visible to every user" in w and "MINIDASGI_REDIS_PASSWORD" in w for w in warnings)
    assert "hunter2" not in caplog.text + "".join(capsys.readouterr())


def test_no_warning_without_a_password_on_the_command_line(
    app_module: tuple[str, str],
    nodes: list[Node],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("MINIDASGI_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    assert main(_node_argv(app_module)) == 0
    assert main([*_node_argv(app_module), "--redis", "redis://127.0.0.1:1/0"]) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_node_takes_the_password_from_the_environment_and_removes_it(
    app_module: tuple[str, str],
    nodes: list[Node],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MINIDASGI_REDIS_PASSWORD", HOSTILE)
    monkeypatch.setenv("MINIDASGI_REDIS_URL", "redis://alice:old@127.0.0.1:1/0")
    assert main(_node_argv(app_module)) == 0
    (node,) = nodes
    assert (node.params.username, node.params.password) == ("alice", HOSTILE)  # overrides
    # Nothing this process starts inherits either of them.
    assert "MINIDASGI_REDIS_PASSWORD" not in os.environ
    assert "MINIDASGI_REDIS_URL" not in os.environ  # it held a password too
    captured = capsys.readouterr()
    assert HOSTILE not in captured.out + captured.err + caplog.text


def test_a_bad_redis_url_in_the_environment_is_a_usage_error_and_removed(
    app_module: tuple[str, str],
    nodes: list[Node],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MINIDASGI_REDIS_URL", f"redis://:{HOSTILE}@127.0.0.1:notaport/0")
    assert main(_node_argv(app_module)) == 2
    err = capsys.readouterr().err
    assert "invalid Redis URL redis://:***@127.0.0.1:notaport/0" in err
    assert not any(piece in err for piece in ("Xq7", "Zk9", "Wm3", "Vb2", "Nc5", "Lp8"))
    assert "MINIDASGI_REDIS_URL" not in os.environ
    assert nodes == []


def test_a_redis_url_without_a_password_stays_in_the_environment(
    app_module: tuple[str, str], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINIDASGI_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(_node_argv(app_module)) == 0
    assert os.environ["MINIDASGI_REDIS_URL"] == "redis://127.0.0.1:1/0"


@pytest.mark.parametrize("ending", ["", "\n", "\r\n"])
def test_node_takes_the_password_from_a_file(
    ending: str,
    app_module: tuple[str, str],
    nodes: list[Node],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "redis-password"
    path.write_text(HOSTILE + ending, newline="")
    path.chmod(0o600)
    monkeypatch.setenv("MINIDASGI_REDIS_PASSWORD", "loses-to-the-file")
    argv = [*_node_argv(app_module), "--redis-password-file", str(path)]
    assert main([*argv, "--redis", "redis://alice@127.0.0.1:1/0"]) == 0
    (node,) = nodes
    assert (node.params.username, node.params.password) == ("alice", HOSTILE)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert HOSTILE not in caplog.text


def test_the_password_file_from_the_environment(
    app_module: tuple[str, str], nodes: list[Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "redis-password"
    path.write_text("from-a-file\n")
    monkeypatch.setenv("MINIDASGI_REDIS_PASSWORD_FILE", str(path))
    assert main(_node_argv(app_module)) == 0
    assert nodes[0].params.password == "from-a-file"


def test_a_password_file_others_can_read_is_warned_about(
    app_module: tuple[str, str],
    nodes: list[Node],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "redis-password"
    path.write_text("hunter2\n")
    path.chmod(0o644)
    assert main([*_node_argv(app_module), "--redis-password-file", str(path)]) == 0
    assert "can be read by other users" in caplog.text
    assert "hunter2" not in caplog.text


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read"), (b"", "is empty"), (b"\n", "is empty"), (b"Xq7\xff\xfe", "UTF-8")],
)
def test_a_bad_password_file_is_a_usage_error(
    content: bytes | None,
    problem: str,
    app_module: tuple[str, str],
    nodes: list[Node],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "redis-password"
    if content is not None:
        path.write_bytes(content)
    assert main([*_node_argv(app_module), "--redis-password-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert problem in err and str(path) in err
    assert "Xq7" not in err
    assert nodes == []


def test_node_channel_prefix(
    app_module: tuple[str, str], nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main([*_node_argv(app_module), "--channel-prefix", "tenant-a"]) == 0
    monkeypatch.setenv("MINIDASGI_CHANNEL_PREFIX", "tenant-b")
    assert main([*_node_argv(app_module), "--redis", "redis://h/2"]) == 0
    assert nodes[0].channel.startswith("tenant-a:0:node:")
    assert nodes[1].channel.startswith("tenant-b:2:node:")


@pytest.mark.parametrize("prefix", ["", "a b", "a\nb"])
def test_a_bad_channel_prefix_is_a_usage_error(
    prefix: str, app_module: tuple[str, str], nodes: list[Node]
) -> None:
    assert main([*_node_argv(app_module), "--channel-prefix", prefix]) == 2
    assert main(["distributor", "--key", "K", "--channel-prefix", prefix]) == 2
    assert nodes == []


def test_distributor_takes_the_password_from_a_file(
    uvicorn_runs: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "redis-password"
    path.write_text(HOSTILE + "\n")
    argv = ["distributor", "--key", "K", "--redis", "redis://alice@127.0.0.1:1/0"]
    assert main([*argv, "--redis-password-file", str(path)]) == 0
    assert main([*argv, "--redis-password-file", str(path), "--workers", "2"]) == 0
    one, two = uvicorn_runs
    assert one["distributor"].params.password == HOSTILE
    assert two["config"]["password"] == HOSTILE  # in the private file only
    assert two["distributor"].params.password == HOSTILE
    assert two["distributor"].params.username == "alice"


def test_demo_takes_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from minidasgi import demo

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: calls.append(kwargs) or 0)
    monkeypatch.setenv("MINIDASGI_REDIS_PASSWORD", "hunter2")
    assert main(["demo", "--redis", "redis://127.0.0.1:1"]) == 0
    assert calls == [{"redis_url": "redis://127.0.0.1:1", "port": 8000, "password": "hunter2"}]


# -- distributor -------------------------------------------------------------------------------


def test_distributor_options(
    uvicorn_runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    argv = [
        "--log-level", "debug", "distributor",
        "--route", r"/api/([a-z-]+)=API-\1", "--route", "/=ALL",
        "--redis", "redis://:hunter2@127.0.0.1:1/0",
        "--host", "0.0.0.0", "--port", "9999", "--workers", "3",
        "--worker-timeout", "2.5", "--no-worker-status", "503", "--max-body-size", "1000",
        "--health-check-interval", "1.5",
        "--peer-timeout", "4",
    ]  # fmt: skip
    assert main(argv) == 0
    (run,) = uvicorn_runs
    assert run["app"] == "minidasgi.cli:distributor_from_env"
    assert run["factory"] is True
    assert (run["host"], run["port"], run["workers"]) == ("0.0.0.0", 9999, 3)
    assert run["log_level"] == "debug"
    config = run["config"]
    assert config["routes"] == [[r"/api/([a-z-]+)", r"API-\1"], ["/", "ALL"]]
    assert config["key"] is None
    assert config["url"] == "redis://:hunter2@127.0.0.1:1/0"  # for the worker processes only
    assert (config["worker_timeout"], config["no_worker_status"]) == (2.5, 503)
    assert config["max_body_size"] == 1000
    # Only this user can read the file, in a directory only this user can enter; it is
    # gone once the command returns, and so is the variable naming it.
    assert run["modes"] == (0o600, 0o700)
    assert not run["config_file"].exists() and not run["config_file"].parent.exists()
    assert cli._DISTRIBUTOR_ENV not in os.environ
    assert run["distributor"].params.password == "hunter2"
    assert config["health_check_interval"] == 1.5
    assert config["peer_timeout"] == 4
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err + caplog.text
    assert "redis://:***@127.0.0.1:1/0" in caplog.text


def test_distributor_from_the_environment(
    uvicorn_runs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINIDASGI_ROUTE", "/api/([a-z-]+)=API-\\1\n\n/=ALL\n")
    monkeypatch.setenv("MINIDASGI_REDIS_URL", "redis://127.0.0.1:6393/1")
    monkeypatch.setenv("MINIDASGI_PORT", "9998")
    monkeypatch.setenv("MINIDASGI_WORKERS", "2")
    monkeypatch.setenv("MINIDASGI_WORKER_TIMEOUT", "1.25")
    monkeypatch.setenv("MINIDASGI_NO_WORKER_STATUS", "503")
    monkeypatch.setenv("MINIDASGI_CHANNEL_PREFIX", "tenant-a")
    monkeypatch.setenv("MINIDASGI_HEALTH_CHECK_INTERVAL", "7")
    monkeypatch.setenv("MINIDASGI_PEER_TIMEOUT", "20")
    assert main(["distributor"]) == 0
    (run,) = uvicorn_runs
    assert (run["port"], run["workers"]) == (9998, 2)
    config = run["config"]
    assert config["peer_timeout"] == 20
    assert config["routes"] == [[r"/api/([a-z-]+)", r"API-\1"], ["/", "ALL"]]
    assert config["url"] == "redis://127.0.0.1:6393/1"
    assert (config["worker_timeout"], config["no_worker_status"]) == (1.25, 503)
    assert run["distributor"].channel.startswith("tenant-a:1:dist:")
    assert config["health_check_interval"] == 7
    assert run["distributor"].health_check_interval == 7


def test_health_check_interval_must_be_positive(
    app_module: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, name = app_module
    argv = ["node", f"{name}:app", "--app-dir", directory, "--key", "k"]
    assert main([*argv, "--health-check-interval", "0"]) == 2
    assert "health_check_interval" in capsys.readouterr().err
    assert main(["distributor", "--key", "k", "--health-check-interval", "-1"]) == 2
    assert "health_check_interval" in capsys.readouterr().err


def test_distributor_single_key(uvicorn_runs: list[dict[str, Any]]) -> None:
    assert main(["distributor", "--key", "EVERYTHING"]) == 0
    (run,) = uvicorn_runs
    assert run["workers"] == 1
    distributor = run["app"]  # one process: the app itself, no configuration file
    assert (distributor.key, distributor.routes) == ("EVERYTHING", None)
    assert distributor.params.address == "localhost:6379"
    assert distributor.channel.startswith("minidasgi:0:dist:")
    assert cli._DISTRIBUTOR_ENV not in os.environ


def test_distributor_that_uvicorn_cannot_start_returns_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """uvicorn exits 3 when it cannot bind; that is a run-time failure (1), not a missing
    program (3)."""
    import uvicorn

    def fail(*args: Any, **kwargs: Any) -> None:
        sys.exit(3)

    monkeypatch.setattr(uvicorn, "run", fail)
    assert main(["distributor", "--key", "K", "--port", "9997"]) == 1
    assert "could not serve on 127.0.0.1:9997" in capsys.readouterr().err


def test_distributor_buffering_options(
    uvicorn_runs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [
        "distributor", "--key", "K", "--request-buffer-size", "4096",
        "--request-buffer-budget", "65536", "--body-idle-timeout", "2.5",
    ]  # fmt: skip
    assert main(argv) == 0
    distributor = uvicorn_runs[-1]["distributor"]
    assert distributor.request_buffer_size == 4096
    assert distributor.buffer_budget.limit == 65536
    assert distributor.body_idle_timeout == 2.5
    monkeypatch.setenv("MINIDASGI_REQUEST_BUFFER_SIZE", "0")
    monkeypatch.setenv("MINIDASGI_REQUEST_BUFFER_BUDGET", "1000")
    monkeypatch.setenv("MINIDASGI_BODY_IDLE_TIMEOUT", "0")
    assert main(["distributor", "--key", "K", "--workers", "2"]) == 0
    config = uvicorn_runs[-1]["config"]  # what each worker process reads
    assert config["request_buffer_size"] == 0
    assert config["request_buffer_budget"] == 1000
    assert config["body_idle_timeout"] is None


def test_distributor_link_options(uvicorn_runs: list[dict[str, Any]]) -> None:
    argv = ["distributor", "--key", "K", "--link", "0.0.0.0:7001"]
    assert main([*argv, "--link-advertise", "10.1.2.3", "--link-plaintext"]) == 0
    distributor = uvicorn_runs[-1]["app"]
    assert distributor._link_bind == ("0.0.0.0", 7001)
    assert distributor._link_advertise == "10.1.2.3"
    # With workers, an ephemeral port each (port 0 or none) is fine.
    assert main(["distributor", "--key", "K", "--workers", "2", "--link", "127.0.0.1:0"]) == 0
    assert uvicorn_runs[-1]["config"]["link"] == "127.0.0.1:0"
    assert main(["distributor", "--key", "K"]) == 0
    assert uvicorn_runs[-1]["app"]._link_bind is None


def test_distributor_link_options_from_the_environment(
    uvicorn_runs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINIDASGI_LINK", "0.0.0.0")
    monkeypatch.setenv("MINIDASGI_LINK_ADVERTISE", "node-facing.example")
    monkeypatch.setenv("MINIDASGI_LINK_PLAINTEXT", "1")
    monkeypatch.setenv("MINIDASGI_REDIS_URL", "rediss://127.0.0.1:6393/1")
    assert main(["distributor", "--key", "K"]) == 0  # TLS Redis: allowed by LINK_PLAINTEXT
    distributor = uvicorn_runs[-1]["app"]
    assert distributor._link_bind == ("0.0.0.0", 0)
    assert distributor._link_advertise == "node-facing.example"
