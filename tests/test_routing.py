"""Unit tests for ``minidasgi.routing``: the seed's route rule and the checks on produced keys."""

from __future__ import annotations

import re

import pytest

from minidasgi.routing import MAX_KEY_BYTES, InvalidKey, RouteTable

SEED_ROUTES = {"/api/([a-z-]+)": r"API-\1"}

# Any path after "/k/" becomes the key, newlines included, so the key checks can be reached.
PASS_THROUGH = RouteTable({r"(?s)^/k/(.*)$": r"\1"})


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/api/test", "API-test"),
        ("/api/test/38", "API-test"),
        ("/api/banana", "API-banana"),
        # The seed's table says API-test2, a typo: ([a-z-]+) stops at the digit, and the seed's
        # own rule (re.search then expand) gives API-test.
        ("/test/api/test2", "API-test"),
    ],
)
def test_seed_path_key_table(path: str, key: str) -> None:
    assert RouteTable(SEED_ROUTES).key_for(path) == key


def test_seed_distributor_example_routes() -> None:
    table = RouteTable(
        {
            "/api/([a-z-]+)": r"ASGI-\1",
            "/worker/([0-9]+)": r"worker-queue-\1",
            "/": "ALL-WEBSITE-TRAFFIC",
        }
    )
    assert table.key_for("/api/testing") == "ASGI-testing"
    assert table.key_for("/worker/12/jobs") == "worker-queue-12"
    assert table.key_for("/index.html") == "ALL-WEBSITE-TRAFFIC"


def test_first_matching_route_wins() -> None:
    table = RouteTable({"/api/special": "SPECIAL", "/api/([a-z]+)": r"API-\1", "/": "ALL"})
    assert table.key_for("/api/special") == "SPECIAL"
    assert table.key_for("/api/other") == "API-other"
    assert table.key_for("/elsewhere") == "ALL"
    reversed_table = RouteTable({"/": "ALL", "/api/special": "SPECIAL"})
    assert reversed_table.key_for("/api/special") == "ALL"


@pytest.mark.parametrize("path", ["", "/", "/API/test", "/api/", "/api/123", "/ap/test"])
def test_no_match_returns_none(path: str) -> None:
    assert RouteTable(SEED_ROUTES).key_for(path) is None


def test_compiled_patterns_are_accepted() -> None:
    table = RouteTable({re.compile(r"/api/([a-z]+)", re.IGNORECASE): r"API-\1"})
    assert table.key_for("/API/Test") == "API-Test"
    assert table.routes[0][0].flags & re.IGNORECASE


def test_list_of_tuples_is_accepted_and_keeps_order() -> None:
    table = RouteTable([("/b", "B"), (re.compile("/a"), "A"), ("/", "ROOT")])
    assert [pattern.pattern for pattern, _ in table.routes] == ["/b", "/a", "/"]
    assert table.key_for("/a/b") == "B"
    assert table.key_for("/a") == "A"
    assert table.key_for("/c") == "ROOT"


def test_generator_of_tuples_is_accepted() -> None:
    table = RouteTable((f"/v{n}/", f"V{n}") for n in range(3))
    assert table.key_for("/v2/x") == "V2"


def test_named_group_templates() -> None:
    table = RouteTable({r"/(?P<service>[a-z]+)/(?P<shard>\d+)": r"svc-\g<service>-\g<shard>"})
    assert table.key_for("/users/7") == "svc-users-7"


def test_numbered_g_templates_and_whole_match() -> None:
    table = RouteTable({r"/api/([a-z]+)": r"\g<1>:\g<0>"})
    assert table.key_for("/x/api/abc") == "abc:/api/abc"


def test_template_without_references_is_used_as_is() -> None:
    assert RouteTable({"/": "STATIC"}).key_for("/anything") == "STATIC"


@pytest.mark.parametrize(
    ("pattern", "template"),
    [
        (r"/api/([a-z]+)", r"API-\2"),
        (r"/api/[a-z]+", r"API-\1"),
        (r"/api/([a-z]+)", r"API-\g<2>"),
        (r"/api/([a-z]+)", r"API-\g<name>"),
        (r"/api/(?P<service>[a-z]+)", r"API-\g<servce>"),
        (r"/api/([a-z]+)", r"API-\10"),
    ],
)
def test_template_referring_to_a_missing_group_raises_at_construction(
    pattern: str, template: str
) -> None:
    with pytest.raises(ValueError, match="refers to"):
        RouteTable({pattern: template})


def test_missing_group_is_found_in_any_route() -> None:
    with pytest.raises(ValueError):
        RouteTable([("/ok/(x)", r"\1"), ("/bad/(x)", r"\1\2")])


@pytest.mark.parametrize("routes", [{}, [], ()])
def test_empty_table_raises_value_error(routes: object) -> None:
    with pytest.raises(ValueError, match="at least one route"):
        RouteTable(routes)  # type: ignore[arg-type]


@pytest.mark.parametrize("template", [5, None, b"API", ["API"]])
def test_non_str_template_raises_type_error(template: object) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        RouteTable({"/api": template})  # type: ignore[dict-item]


def test_empty_key_is_invalid() -> None:
    with pytest.raises(InvalidKey, match="empty"):
        PASS_THROUGH.key_for("/k/")
    with pytest.raises(InvalidKey, match="empty"):
        RouteTable({"/api/([a-z]*)": r"\1"}).key_for("/api/")


def test_key_length_is_counted_in_bytes() -> None:
    assert PASS_THROUGH.key_for("/k/" + "a" * MAX_KEY_BYTES) == "a" * MAX_KEY_BYTES
    with pytest.raises(InvalidKey, match="longer"):
        PASS_THROUGH.key_for("/k/" + "a" * (MAX_KEY_BYTES + 1))
    # Two bytes each in UTF-8: 256 fit, 257 are 514 bytes in only 257 characters.
    assert PASS_THROUGH.key_for("/k/" + "é" * (MAX_KEY_BYTES // 2)) == "é" * (MAX_KEY_BYTES // 2)
    with pytest.raises(InvalidKey, match="longer"):
        PASS_THROUGH.key_for("/k/" + "é" * (MAX_KEY_BYTES // 2 + 1))
    # Four bytes each: 129 characters are 516 bytes.
    with pytest.raises(InvalidKey, match="longer"):
        PASS_THROUGH.key_for("/k/" + "🎉" * 129)


@pytest.mark.parametrize(
    "key",
    [
        "a b",
        "a\tb",
        "a\nb",
        "a\rb",
        "a\x00b",
        "a\x1bb",
        "a\x7fb",
        "a..b",
        "..",
        "../etc",
        "a\u00a0b",
        "a\u2028b",
        " ",
    ],
)
def test_keys_with_whitespace_control_characters_or_dot_dot_are_invalid(key: str) -> None:
    with pytest.raises(InvalidKey):
        PASS_THROUGH.key_for("/k/" + key)


@pytest.mark.parametrize(
    "key", ["API-test", "a.b", "a:b:c", "worker-queue-12", "ключ", "a/b", "x" * MAX_KEY_BYTES]
)
def test_ordinary_keys_are_valid(key: str) -> None:
    assert PASS_THROUGH.key_for("/k/" + key) == key


def test_invalid_key_is_a_value_error() -> None:
    assert issubclass(InvalidKey, ValueError)


def test_repr_lists_the_routes() -> None:
    assert repr(RouteTable(SEED_ROUTES)) == r"RouteTable({'/api/([a-z-]+)': 'API-\\1'})"
