"""Unit tests for how ``minidasgi.resp.connection`` reads Redis URLs and keyword parameters,
and where its reading protocol reads a subscriber's bytes.

No network: these build ``ConnectionParams``, or drive the protocol as a transport would. A
password must never show up in a ``repr`` or in an error message.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
from typing import Any
from urllib.parse import quote

import pytest

from minidasgi.resp.connection import (
    Connection,
    ConnectionParams,
    ReplyReader,
    _ReadingProtocol,
    _redact,
    _ReplyCallback,
    make_params,
    parse_url,
)
from minidasgi.resp.directread import DirectReads
from minidasgi.resp.protocol import NEED_DATA

SECRET = "sekrit"


def test_parse_url_plain_host_gets_the_defaults() -> None:
    params = parse_url("redis://localhost")
    assert params == ConnectionParams(host="localhost", port=6379, db=0)
    assert params.username is None
    assert params.password is None
    assert params.ssl is None
    assert params.unix_socket is None


def test_parse_url_reads_port_and_db() -> None:
    params = parse_url("redis://h:6390/3")
    assert (params.host, params.port, params.db) == ("h", 6390, 3)


def test_parse_url_percent_decodes_the_password() -> None:
    params = parse_url("redis://:p%40ss@h")
    assert params.password == "p@ss"
    assert params.username is None
    assert (params.host, params.port, params.db) == ("h", 6379, 0)


def test_parse_url_reads_user_password_port_and_db() -> None:
    params = parse_url("redis://user:pw@h:1/2")
    assert (params.username, params.password) == ("user", "pw")
    assert (params.host, params.port, params.db) == ("h", 1, 2)


def test_parse_url_percent_decodes_the_username() -> None:
    params = parse_url("redis://us%3Aer:pw@h")
    assert (params.username, params.password) == ("us:er", "pw")


def test_parse_url_user_without_password() -> None:
    params = parse_url("redis://user@h")
    assert (params.username, params.password) == ("user", None)


def test_parse_url_rediss_turns_tls_on() -> None:
    params = parse_url("rediss://h")
    assert params.ssl is True
    assert (params.host, params.port) == ("h", 6379)


def test_parse_url_redis_leaves_tls_off() -> None:
    assert not parse_url("redis://h").ssl


def test_parse_url_reads_db_from_the_query() -> None:
    assert parse_url("redis://h?db=5").db == 5


def test_parse_url_ignores_a_bare_trailing_slash() -> None:
    assert parse_url("redis://h/").db == 0


def test_parse_url_reads_an_ipv6_host() -> None:
    params = parse_url("redis://[::1]:7000")
    assert (params.host, params.port) == ("::1", 7000)
    assert params.address == "[::1]:7000"


def test_parse_url_unix_socket_with_db() -> None:
    params = parse_url("unix:///tmp/r.sock?db=4")
    assert params.unix_socket == "/tmp/r.sock"
    assert params.db == 4
    assert params.password is None
    assert params.address == "unix:/tmp/r.sock"


def test_parse_url_unix_socket_with_password() -> None:
    params = parse_url("unix://:pw@/tmp/r.sock")
    assert params.unix_socket == "/tmp/r.sock"
    assert params.password == "pw"
    assert params.db == 0


@pytest.mark.parametrize(
    "url",
    [
        f"http://u:{SECRET}@h",
        f"redis://:{SECRET}@h:notaport",
        f"redis://:{SECRET}@h:99999",
        f"redis://:{SECRET}@h:-1",
        f"redis://:{SECRET}@h/abc",
        f"redis://:{SECRET}@h/-1",
        f"redis://u:{SECRET}@h?db=x",
        f"rediss://u:{SECRET}@h/1x",
        f"unix://:{SECRET}@",
        f"unix://:{SECRET}@/tmp/r.sock?db=nope",
        f"redis://u:{SECRET}@extra@h/abc",  # an unencoded '@' in the password
    ],
)
def test_parse_url_error_never_shows_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="invalid Redis URL") as caught:
        parse_url(url)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


def test_parse_url_takes_a_password_with_an_unencoded_slash() -> None:
    params = parse_url("redis://:ab/cd+ef==@h:6379/0")
    assert (params.password, params.host, params.port, params.db) == ("ab/cd+ef==", "h", 6379, 0)


# Passwords holding every character a URL treats as a delimiter. Each piece between them is
# distinctive, so a message quoting any part of one (as "Port could not be cast to integer
# value as 'Xq7'" once did) is caught, not only one quoting the whole password.
HOSTILE = [
    "Xq7#Zk9",
    "Xq7/Zk9",
    "Xq7?Zk9",
    "Xq7@Zk9",
    "Xq7%Zk9",
    "Xq7#Zk9/Wm3?Vb2@Nc5%Lp8",
    "#Xq7@/Zk9?",
    "Xq7@@Zk9##Wm3//",
    "Xq7%zzZk9%",
]


def _pieces(password: str) -> list[str]:
    return [piece for piece in re.split(r"[#/?@%:]", password) if len(piece) >= 3]


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is not None and item not in seen:
            seen.append(item)
            todo += [item.__cause__, item.__context__]
    return seen


def _assert_hidden(password: str, text: str) -> None:
    for secret in (password, quote(password, safe=""), *_pieces(password)):
        assert secret not in text


@pytest.mark.parametrize("password", HOSTILE)
@pytest.mark.parametrize("user", ["", "alice"])
def test_parse_url_takes_an_unencoded_password_up_to_the_last_at(password: str, user: str) -> None:
    for url, where in [
        (f"redis://{user}:{password}@h:7000/3", ("h", 7000, None, 3)),
        (f"rediss://{user}:{password}@[::1]:7001?db=4", ("::1", 7001, None, 4)),
        (f"unix://{user}:{password}@/run/r.sock?db=5", ("localhost", 6379, "/run/r.sock", 5)),
    ]:
        params = parse_url(url)
        assert (params.host, params.port, params.unix_socket, params.db) == where
        assert params.username == (user or None)
        assert params.password == password
        _assert_hidden(password, repr(params) + _redact(url))


@pytest.mark.parametrize("password", HOSTILE)
def test_parse_url_takes_a_percent_encoded_password(password: str) -> None:
    url = f"redis://alice:{quote(password, safe='')}@h:7000/3"
    params = parse_url(url)
    assert (params.username, params.password, params.db) == ("alice", password, 3)
    _assert_hidden(password, repr(params) + _redact(url))


@pytest.mark.parametrize("password", HOSTILE)
@pytest.mark.parametrize("encode", [False, True])
@pytest.mark.parametrize(
    "template",
    [
        "redis://alice:{}@h:notaport/0",
        "redis://:{}@h:99999",
        "redis://:{}@h/abc",
        "rediss://alice:{}@h?db=x",
        "http://alice:{}@h",
        "{}@h",
        "unix://:{}@/tmp/r.sock?db=nope",
        "unix://:{}@relative.sock",
        "redis://{}@h:bad",  # no ':': the secret reads as a username, which is hidden
    ],
)
def test_parse_url_error_never_holds_the_password(
    password: str, encode: bool, template: str
) -> None:
    url = template.format(quote(password, safe="") if encode else password)
    with pytest.raises(ValueError, match="invalid Redis URL") as caught:
        parse_url(url)
    for exc in _chain(caught.value):
        _assert_hidden(password, f"{exc} {exc!r} {exc.args!r}")
    _assert_hidden(password, _redact(url))


def test_parse_url_error_names_the_problem() -> None:
    with pytest.raises(ValueError) as caught:
        parse_url("redis://:Xq7#Zk9@h:notaport/0")
    assert str(caught.value) == (
        "invalid Redis URL redis://:***@h:notaport/0: "
        "Port could not be cast to integer value as 'notaport'"
    )


def test_parse_url_takes_a_colon_in_the_password() -> None:
    params = parse_url("redis://:Xq7:Zk9@h")
    assert (params.username, params.password) == (None, "Xq7:Zk9")
    _assert_hidden("Xq7:Zk9", repr(params) + _redact("redis://:Xq7:Zk9@h"))


def test_parse_url_a_unix_socket_path_may_hold_an_at_sign() -> None:
    assert parse_url("unix:///tmp/a@b.sock").unix_socket == "/tmp/a@b.sock"
    params = parse_url("unix://:pw@/tmp/a%40b.sock")  # after credentials, it is encoded
    assert (params.password, params.unix_socket) == ("pw", "/tmp/a@b.sock")


def test_repr_hides_a_username_that_may_be_a_misplaced_password() -> None:
    params = parse_url("redis://Xq7@Zk9:pw@h")  # meant ':Xq7@Zk9:pw', forgot the colon
    assert params.username == "Xq7@Zk9"
    _assert_hidden("Xq7@Zk9", repr(params) + _redact("redis://Xq7@Zk9:pw@h"))
    assert "username='alice'" in repr(parse_url("redis://alice:pw@h"))


@pytest.mark.parametrize("url", ["ftp://h", "redis+tls://h", "localhost:6379", ""])
def test_parse_url_refuses_other_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="scheme"):
        parse_url(url)


def test_parse_url_refuses_a_unix_url_without_a_path() -> None:
    with pytest.raises(ValueError, match="path"):
        parse_url("unix://")


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@h",
        f"redis://user:{SECRET}@h:1/2",
        f"rediss://user:{SECRET}@h",
        f"unix://:{SECRET}@/tmp/r.sock",
    ],
)
def test_repr_of_parsed_params_never_shows_the_password(url: str) -> None:
    params = parse_url(url)
    assert params.password == SECRET
    assert SECRET not in repr(params)
    assert SECRET not in str(params)
    assert "***" in repr(params)


def test_repr_of_connection_params_never_shows_the_password() -> None:
    params = ConnectionParams(host="h", username="u", password=SECRET, ssl=True)
    assert SECRET not in repr(params)
    assert (
        repr(params) == "ConnectionParams('h:6379', db=0, username='u', password='***', ssl=True)"
    )


def test_repr_without_a_password_does_not_mention_one() -> None:
    assert "password" not in repr(ConnectionParams())


def test_repr_with_an_empty_password_still_hides_it() -> None:
    assert "password='***'" in repr(ConnectionParams(password=""))


def test_make_params_keywords_override_the_url() -> None:
    params = make_params("redis://u:old@h:1/2", port=7000, password="new")
    assert (params.host, params.port, params.db) == ("h", 7000, 2)
    assert (params.username, params.password) == ("u", "new")


def test_make_params_overrides_every_field() -> None:
    context = ssl.create_default_context()
    params = make_params(
        "redis://u:pw@h:1/2",
        host="other",
        port=7001,
        db=9,
        username="admin",
        password="pw2",
        unix_socket="/run/redis.sock",
        ssl=context,
        connect_timeout=0.5,
    )
    assert params == ConnectionParams(
        host="other",
        port=7001,
        unix_socket="/run/redis.sock",
        db=9,
        username="admin",
        password="pw2",
        ssl=context,
        connect_timeout=0.5,
    )


def test_make_params_keeps_url_values_for_keywords_left_out() -> None:
    assert make_params("rediss://u:pw@h:1/2") == parse_url("rediss://u:pw@h:1/2")


def test_make_params_keyword_zero_db_overrides_the_url() -> None:
    assert make_params("redis://h/5", db=0).db == 0


def test_make_params_empty_host_means_localhost() -> None:
    assert make_params(host="").host == "localhost"


def test_make_params_without_anything_gives_the_defaults() -> None:
    assert make_params() == ConnectionParams()
    assert make_params(None) == ConnectionParams()


def test_make_params_checks_the_url() -> None:
    with pytest.raises(ValueError, match="invalid Redis URL"):
        make_params(f"redis://:{SECRET}@h:bad", password="other")


def test_parse_url_reads_the_timeouts_from_the_query() -> None:
    params = parse_url("redis://h:1/2?reply_timeout=2.5&connect_timeout=1")
    assert (params.reply_timeout, params.connect_timeout, params.db) == (2.5, 1.0, 2)
    assert parse_url("redis://h").reply_timeout == 10.0  # the default bound
    assert parse_url("redis://h?reply_timeout=0").reply_timeout is None  # no bound
    assert parse_url("unix:///tmp/r.sock?db=1&reply_timeout=3").reply_timeout == 3.0


@pytest.mark.parametrize(
    "query", ["reply_timeout=soon", "reply_timeout=-1", "reply_timeout=inf", "connect_timeout=0"]
)
def test_parse_url_refuses_bad_timeouts(query: str) -> None:
    with pytest.raises(ValueError, match="number of seconds") as info:
        parse_url(f"redis://:{SECRET}@h?{query}")
    assert SECRET not in str(info.value)


def test_make_params_reply_timeout_keyword() -> None:
    assert make_params("redis://h?reply_timeout=4", reply_timeout=1).reply_timeout == 1
    assert make_params("redis://h?reply_timeout=4").reply_timeout == 4


async def test_a_subscriber_reads_each_large_push_in_one_read_once_it_has_a_buffer() -> None:
    # What the transport does with a subscriber's protocol: a read into get_buffer()'s
    # buffer, then buffer_updated(). A push that a sender wrote in one go is in the socket
    # whole: after the first payload (its header read into the connection's buffer, the rest
    # into a buffer of its own), each is read in one system call and one turn of the loop.
    got: list[bytes] = []
    direct = DirectReads(b"message")

    def sink(data: Any) -> None:
        direct.feed(data)
        while (reply := direct.gets()) is not NEED_DATA:
            got.append(bytes(reply[2]))  # the consumer lets go of each payload at once

    protocol = _ReadingProtocol(ReplyReader(sink, lambda error: None, direct))
    payloads = [bytes([i]) * 1_000_000 for i in range(4)]
    reads = []
    for payload in payloads:
        push = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$%d\r\n%b\r\n" % (len(payload), payload)
        position = count = 0
        while position < len(push):
            buffer = protocol.get_buffer(-1)
            n = min(len(buffer), len(push) - position)
            buffer[:n] = push[position : position + n]
            del buffer
            protocol.buffer_updated(n)
            position += n
            count += 1
        reads.append(count)
    assert got == payloads
    assert reads == [2, 1, 1, 1]


async def test_a_read_goes_to_the_readers_sink_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # Through StreamReaderProtocol.data_received, the weak reference to the reader and its
    # feed_data, each read cost three calls more (two reads per request on a distributor).
    got: list[bytes] = []
    protocol = _ReadingProtocol(ReplyReader(lambda data: got.append(bytes(data)), print))

    def forbidden(self: Any, data: Any) -> None:
        raise AssertionError("read through data_received")

    monkeypatch.setattr(asyncio.StreamReaderProtocol, "data_received", forbidden)
    monkeypatch.setattr(ReplyReader, "feed_data", forbidden)
    for chunk in (b"+OK\r\n", b":1\r\n"):
        buffer = protocol.get_buffer(-1)
        buffer[: len(chunk)] = chunk
        del buffer
        protocol.buffer_updated(len(chunk))
    protocol.buffer_updated(0)  # hands nothing over, as feed_data did with an empty read
    assert got == [b"+OK\r\n", b":1\r\n"]


async def test_a_plain_stream_reader_is_still_fed_through_its_feed_data() -> None:
    reader = asyncio.StreamReader()
    protocol = _ReadingProtocol(reader)
    buffer = protocol.get_buffer(-1)
    buffer[:5] = b"+OK\r\n"
    del buffer
    protocol.buffer_updated(5)
    assert await reader.readline() == b"+OK\r\n"


@pytest.mark.parametrize("kind", ["python", "hiredis"])
async def test_a_read_of_one_reply_costs_its_parser_two_calls(kind: str) -> None:
    # feed_gets (the bytes, and the first reply) and the gets that finds no more: before,
    # feed, gets and gets, a Python call more per read (two reads per request on each side).
    if kind == "hiredis":
        pytest.importorskip("hiredis")
    connection = Connection(ConnectionParams(), parser=kind)
    parser_type = type(connection._parser)
    got: list[Any] = []
    called: list[str] = []

    def profile(frame: Any, event: str, _: Any) -> None:
        if event == "call" and frame.f_locals.get("self").__class__ is parser_type:
            called.append(frame.f_code.co_name)

    connection._waiters.append(_ReplyCallback(got.append))
    sys.setprofile(profile)
    try:
        connection._on_data(b":1\r\n")
    finally:
        sys.setprofile(None)
    assert got == [1]
    public = [name for name in called if not name.startswith("_")]
    assert public == ["feed_gets", "gets"], called


class _Transport:
    """Takes every write at once (a transport with nothing buffered)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return 0


async def test_a_command_with_a_callback_passes_through_no_helper_of_its_waiter() -> None:
    # The PUBLISH or LPUSH of a batch, one per request on each side: queued without a call
    # to _queue_waiter, its reply handed to the callback without the waiter's done and
    # set_result (three Python calls per command before).
    connection = Connection(ConnectionParams(reply_timeout=None), parser="python")
    transport = _Transport()
    connection._transport = transport  # type: ignore[assignment]
    got: list[Any] = []
    called: list[str] = []

    def profile(frame: Any, event: str, _: Any) -> None:
        if event == "call":
            called.append(frame.f_code.co_qualname)

    sys.setprofile(profile)
    try:
        connection.send_packed_to(b"*1\r\n$4\r\nPING\r\n", got.append)
        connection._on_data(b"+PONG\r\n")
    finally:
        sys.setprofile(None)
    assert got == [b"PONG"] and transport.written == [b"*1\r\n$4\r\nPING\r\n"]
    helpers = {"Connection._queue_waiter", "_ReplyCallback.done", "_ReplyCallback.set_result"}
    assert not helpers & set(called), called
    connection._on_data(b"+PONG\r\n")  # a reply nobody asked for: the connection ends
    assert connection.is_closed
