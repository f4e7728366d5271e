"""The route table: which Redis list a request's path is pushed onto.

Owns the seed's routing rule and nothing else: routes are tried in order with ``re.search``
(a pattern may match anywhere in the path), and the first match's ``expand(template)`` is the
key, so templates may use ``\\1`` or ``\\g<name>`` back-references. It never touches Redis.

A key produced from a path is checked before use: a capture can carry whatever the client put
in the path, and a key must not be empty, huge, hold whitespace or control characters, or
contain ``..``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["MAX_KEY_BYTES", "InvalidKey", "RouteTable"]

MAX_KEY_BYTES = 512
_BAD_KEY = re.compile(r"[\s\x00-\x1f\x7f]|\.\.")
_Pattern = str | re.Pattern[str]
_GROUP_REF = re.compile(r"\\(?:(\d+)|g<([^>]*)>)")


class InvalidKey(ValueError):
    """A route produced a key that is refused (the client gets 400)."""


class RouteTable:
    """An ordered list of ``(pattern, key_template)`` routes.

    >>> RouteTable({r"/api/([a-z-]+)": r"API-\\1"}).key_for("/test/api/test2")
    'API-test'
    """

    def __init__(
        self,
        routes: Mapping[str | re.Pattern[str], str] | Iterable[tuple[str | re.Pattern[str], str]],
    ) -> None:
        items = routes.items() if isinstance(routes, Mapping) else routes
        self.routes: list[tuple[re.Pattern[str], str]] = []
        for pattern, template in items:
            compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
            if not isinstance(template, str):
                raise TypeError(f"key template for {compiled.pattern!r} must be a str")
            _check_template(compiled, template)
            self.routes.append((compiled, template))
        if not self.routes:
            raise ValueError("a route table needs at least one route")

    def __repr__(self) -> str:
        inner = ", ".join(f"{p.pattern!r}: {t!r}" for p, t in self.routes)
        return f"RouteTable({{{inner}}})"

    def key_for(self, path: str) -> str | None:
        """Return the key for ``path``, ``None`` when no route matches.

        Raise ``InvalidKey`` when the key produced is not acceptable.
        """
        for pattern, template in self.routes:
            match = pattern.search(path)
            if match is not None:
                key = match.expand(template)
                check_key(key)
                return key
        return None


def check_key(key: str) -> None:
    """Raise ``InvalidKey`` unless ``key`` is a sane Redis list name."""
    if not key:
        raise InvalidKey("the route produced an empty key")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"the route produced a key longer than {MAX_KEY_BYTES} bytes")
    if _BAD_KEY.search(key):
        raise InvalidKey("the route produced a key with whitespace, control characters or '..'")


def _check_template(pattern: re.Pattern[str], template: str) -> None:
    for number, name in _GROUP_REF.findall(template):
        if name.isdigit():  # \g<2> is group 2, as \2 is
            number, name = name, ""
        if number and int(number) > pattern.groups:
            raise ValueError(
                f"key template {template!r} refers to group {number}, "
                f"but {pattern.pattern!r} has {pattern.groups}"
            )
        if name and not name.isdigit() and name not in pattern.groupindex:
            raise ValueError(f"key template {template!r} refers to unknown group {name!r}")
