"""The README's examples are the files in ``examples/``, and they run.

* The files run as the README says: ``uvicorn server:app`` for ``examples/server.py``,
  ``python worker.py`` and ``python starlette_worker.py`` for the workers, each a child
  process against a private redis-server (the files read ``MINIDASGI_REDIS_URL``).
* Each README code block that builds a distributor or a Node is the file the README names just
  above it, compared by syntax tree: the same imports, classes and functions, the same calls
  with the same arguments, except how to reach Redis. The README keeps the seed's
  ``host=``/``port=``/``db=``/``password=`` keywords; the files take
  ``url=os.environ.get("MINIDASGI_REDIS_URL", DEFAULT)``, and DEFAULT must name the same
  server the README's keywords do. The README's ``node.run()`` may sit under
  ``if __name__ == "__main__":`` in the file.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import time
from pathlib import Path

import httpx
import pytest

from minidasgi.resp import make_params

from .redis_server import RedisServer
from .test_cli import (
    Child,
    assert_redis_clean,
    child_env,
    children,
    start_popping,
    start_serving,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
README = REPO / "README.md"

SEED_CALLS = {"create_path_distributor", "Node"}
CONNECTION_KEYWORDS = {"host", "port", "db", "password", "username", "url"}
SEED_DEFAULTS = {"host": "localhost", "port": 6379, "db": 0, "password": None}


# -- the README's blocks are the files ---------------------------------------------------------


def readme_example_blocks() -> list[tuple[str, str]]:
    """``(file name, code)`` for each README python block that builds a distributor or a Node;
    the file is the ``examples/...`` named in the text just before the block."""
    text = README.read_text()
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        code = match.group(1)
        if not any(f"{name}(" in code for name in SEED_CALLS):
            continue
        before = text[: match.start()].rsplit("```", 1)[-1]  # the prose since the last block
        names = re.findall(r"`examples/([\w.]+\.py)`", before)
        assert names, f"no examples/ file named before the README block:\n{code}"
        found.append((names[-1], code))
    return found


def seed_call(node: ast.AST) -> ast.Call | None:
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
        func = node.value.func
        if isinstance(func, ast.Name) and func.id in SEED_CALLS:
            return node.value
    return None


def redis_params_of_readme(call: ast.Call) -> object:
    given = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in SEED_DEFAULTS}
    assert set(given) <= set(SEED_DEFAULTS)
    return make_params(**{**SEED_DEFAULTS, **given})


def redis_params_of_file(call: ast.Call) -> object:
    """The server named by ``url=os.environ.get("MINIDASGI_REDIS_URL", DEFAULT)``."""
    (url,) = [k.value for k in call.keywords if k.arg in CONNECTION_KEYWORDS]
    assert ast.unparse(url).startswith("os.environ.get('MINIDASGI_REDIS_URL', "), ast.unparse(url)
    assert isinstance(url, ast.Call)
    default = ast.literal_eval(url.args[1])
    return make_params(default)


def other_keywords(call: ast.Call) -> dict[str | None, str]:
    return {k.arg: ast.dump(k.value) for k in call.keywords if k.arg not in CONNECTION_KEYWORDS}


def test_readme_names_both_seed_examples() -> None:
    assert [name for name, _ in readme_example_blocks()] == ["server.py", "worker.py"]


@pytest.mark.parametrize(("name", "code"), readme_example_blocks())
def test_readme_block_is_the_example_file(name: str, code: str) -> None:
    block = ast.parse(code)
    source = ast.parse((EXAMPLES / name).read_text())
    top_level = {ast.dump(statement) for statement in source.body}
    anywhere = {ast.dump(node) for node in ast.walk(source) if isinstance(node, ast.stmt)}
    calls = {
        target.id: call
        for statement in source.body
        if (call := seed_call(statement)) is not None
        for target in statement.targets  # type: ignore[attr-defined]
        if isinstance(target, ast.Name)
    }
    for statement in block.body:
        shown = ast.unparse(statement)
        if isinstance(statement, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)):
            assert ast.dump(statement) in top_level, f"{name} lacks, as written:\n{shown}"
        elif (call := seed_call(statement)) is not None:
            (target,) = statement.targets  # type: ignore[attr-defined]
            assert target.id in calls, f"{name} has no `{target.id} = ...(...)`"
            ours = calls[target.id]
            assert ast.dump(ours.func) == ast.dump(call.func), shown
            assert not call.args and not ours.args, "keywords only, as the README shows"
            assert other_keywords(ours) == other_keywords(call), (
                f"{name}: arguments differ from the README's:\n{shown}\n{ast.unparse(ours)}"
            )
            assert redis_params_of_file(ours) == redis_params_of_readme(call), (
                f"{name}: its default Redis is not the README's:\n{shown}"
            )
        elif isinstance(statement, ast.Expr):  # node.run(): may be under `if __name__ ...`
            assert ast.dump(statement) in anywhere, f"{name} never runs:\n{shown}"
        else:
            pytest.fail(f"README statement this check does not know how to compare:\n{shown}")


# -- the files run -----------------------------------------------------------------------------


def start_uvicorn_server(started: list[Child], redis: RedisServer, log: Path) -> str:
    """``uvicorn server:app`` on ``examples/server.py``; its base URL once it listens."""
    # Any request would route ("/" matches all) and wait for a Node: wait for the socket.
    _, port = start_serving(
        started,
        lambda port: [sys.executable, "-m", "uvicorn", "server:app", "--app-dir", "examples",
                      "--port", str(port)],
        log,
        env=child_env(MINIDASGI_REDIS_URL=redis.url),
        cwd=REPO,
    )  # fmt: skip
    return f"http://127.0.0.1:{port}"


def start_example_worker(started: list[Child], redis: RedisServer, log: Path, file: str) -> Child:
    """``python FILE`` from ``examples/``, once its Node pops."""
    return start_popping(
        started,
        redis,
        [sys.executable, file],
        log,
        env=child_env(MINIDASGI_REDIS_URL=redis.url),
        cwd=EXAMPLES,
    )


def test_seed_worker_and_server_run(
    redis_server: RedisServer, tmp_path: Path, squatter: RedisServer
) -> None:
    # squatter: the first port given to uvicorn is another process's by the time it binds it.
    with children() as started:
        worker = start_example_worker(started, redis_server, tmp_path / "worker.log", "worker.py")
        assert "Starting worker" in worker.output()
        base = start_uvicorn_server(started, redis_server, tmp_path / "server.log")
        server = started[-1]
        assert base != f"http://127.0.0.1:{squatter.port}"
        response = httpx.get(f"{base}/api/testing", timeout=10)
        assert (response.status_code, response.text) == (200, "Hello World!")
        response = httpx.get(f"{base}/api/testing/38", timeout=10)  # the README's routing table
        assert (response.status_code, response.text) == (200, "Hello World!")
        assert worker.stop() == 0, worker.output()
        assert server.stop() == 0, server.output()
    assert_redis_clean(redis_server)


def test_starlette_worker_runs(redis_server: RedisServer, tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    with children() as started:
        worker = start_example_worker(
            started, redis_server, tmp_path / "worker.log", "starlette_worker.py"
        )
        base = start_uvicorn_server(started, redis_server, tmp_path / "server.log")
        server = started[-1]
        response = httpx.get(f"{base}/api/items/foo?x=1", timeout=10)
        assert response.status_code == 200, worker.output()
        assert response.headers["content-type"] == "application/json"
        assert json.loads(response.text) == {"item": "foo", "query": {"x": "1"}}

        events: list[tuple[float, str]] = []
        with httpx.stream("GET", f"{base}/api/items/ticks", timeout=10) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), line.removeprefix("data: ")))
        assert [data for _, data in events] == [f"tick {i}" for i in range(5)]
        # 0.1 s apart at the source: they arrive spread out, not in one buffered piece.
        assert events[-1][0] - events[0][0] > 0.2

        assert worker.stop() == 0, worker.output()
        assert server.stop() == 0, server.output()
    assert_redis_clean(redis_server)
