"""Unit tests for ``minidasgi.resp.sentinel``: the URL form, the sentinel address list and
the checks on what a sentinel answers (the failovers themselves run against real servers in
``tests/integration/test_sentinel.py``)."""

from __future__ import annotations

import pytest

from minidasgi.resp import parse_url
from minidasgi.resp.connection import make_params
from minidasgi.resp.sentinel import SentinelSpec, _address, parse_hosts


def test_url_names_the_sentinels_the_master_and_the_db() -> None:
    params = parse_url("redis+sentinel://:s3cret@h1:26380,h2,[::1]:5/mymaster/3?reply_timeout=2")
    assert params.sentinel == SentinelSpec(
        service_name="mymaster", sentinels=(("h1", 26380), ("h2", 26379), ("::1", 5))
    )
    assert params.unresolved
    assert params.db == 3
    assert params.password == "s3cret"  # the master's: sentinels get none by default
    assert params.sentinel.password is None
    assert params.reply_timeout == 2.0
    assert params.address == "master 'mymaster' via sentinels h1:26380,h2:26379,[::1]:5"
    assert "s3cret" not in repr(params)


def test_tls_sentinel_url_and_keywords() -> None:
    params = make_params("rediss+sentinel://user:pw@h1/m", db=2)
    assert params.ssl is True and params.db == 2 and params.username == "user"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://h1:26379", "names the master"),
        ("redis+sentinel://h1:26379/", "names the master"),
        ("redis+sentinel:///m", "no host address"),
        ("redis+sentinel://h1:x/m", "invalid port"),
        ("redis+sentinel://h1:0/m", "invalid port"),
        ("redis+sentinel://:pw@h1/m/x", "db must be a number"),
    ],
)
def test_bad_sentinel_urls_say_why_and_hide_the_password(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_url(url)
    assert "pw@" not in str(caught.value)


def test_resolved_params_show_the_server() -> None:
    from dataclasses import replace

    params = replace(parse_url("redis+sentinel://h1/m"), host="10.0.0.2", port=6380)
    assert not params.unresolved
    assert params.address == "10.0.0.2:6380"


def test_spec_hides_a_username_that_may_be_a_misplaced_password() -> None:
    """As ``ConnectionParams`` does: a username that does not look like one is hidden."""
    spec = SentinelSpec("m", (("h", 1),), username="Xq7@Zk9 pw", password="hidden")
    assert "Xq7" not in repr(spec) and "hidden" not in repr(spec)
    assert "username='alice'" in repr(SentinelSpec("m", (("h", 1),), username="alice"))


def test_spec_hides_its_password_and_bounds_its_list() -> None:
    spec = SentinelSpec("m", (("h", 1),), username="u", password="hidden")
    assert "hidden" not in repr(spec)
    with pytest.raises(ValueError):
        SentinelSpec("m", ())
    with pytest.raises(ValueError):
        SentinelSpec("", (("h", 1),))
    with pytest.raises(ValueError):
        SentinelSpec("m", tuple(("h", p) for p in range(1, 100)))


def test_parse_hosts() -> None:
    assert parse_hosts("a,b:2, [::1] ,") == (("a", 26379), ("b", 2), ("::1", 26379))
    with pytest.raises(ValueError):
        parse_hosts(":5")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ([b"127.0.0.1", b"6380"], ("127.0.0.1", 6380)),
        (None, None),  # the sentinel knows no such master
        ([b"h"], None),
        ([b"h", b"-1"], None),
        ([b"h", b"70000"], None),
        ([b"", b"1"], None),
        ([b"h" * 300, b"1"], None),
        ([1, b"1"], None),
        (b"h:1", None),
    ],
)
def test_what_a_sentinel_answers_is_checked(reply: object, expected: object) -> None:
    assert _address(reply) == expected


def test_distributor_and_node_take_a_spec_as_keyword() -> None:
    from minidasgi import Node, create_distributor

    spec = SentinelSpec("m", (("h1", 26379),))
    app = create_distributor(key="q", sentinel=spec)
    node = Node(app=lambda *a: None, key="q", sentinel=spec)
    for params in (app.params, node.params):
        assert params.sentinel == spec and params.unresolved


async def test_a_switch_drops_the_connections_to_the_old_master_only() -> None:
    from minidasgi.resp import sentinel

    params = parse_url("redis+sentinel://127.0.0.1:1/m")
    monitor = sentinel._Monitor(params.sentinel, params)  # type: ignore[arg-type]
    monitor.master = ("10.0.0.1", 6379)
    monitor._listen = _no_listening  # type: ignore[method-assign]
    lost: list[str] = []
    monitor.watch(("10.0.0.1", 6379), lambda exc: lost.append(f"old: {exc}"))
    monitor.watch(("10.0.0.2", 6379), lambda exc: lost.append("other"))  # at once: not master
    assert lost == ["other"]
    monitor._on_message(b"+switch-master", b"other-name 10.0.0.1 6379 10.0.0.3 6379")
    assert monitor.master == ("10.0.0.1", 6379)  # another master's switch: ignored
    monitor._on_message(b"+switch-master", b"m 10.0.0.1 6379 10.0.0.3 6379")
    assert monitor.master == ("10.0.0.3", 6379)
    assert lost[1] == "old: the master 'm' moved from 10.0.0.1:6379 to 10.0.0.3:6379"
    for junk in (b"", b"m a", b"m 1 2 3 x", b"m 1 2 3 70000", b"m " * 100):
        monitor._on_message(b"+switch-master", junk)
    assert monitor.master == ("10.0.0.3", 6379)


async def _no_listening() -> None:
    pass
