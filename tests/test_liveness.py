"""PeerTracker: requests per peer, silence, and a process that paused itself; RoundErrors."""

from __future__ import annotations

import pytest

from minidasgi import liveness
from minidasgi.liveness import PeerTracker, RoundErrors, check_settings


def test_a_peer_is_tracked_only_while_requests_are_in_flight() -> None:
    peers = PeerTracker(10)
    peers.add("n1", "a", 0.0, pings=True)
    peers.add("n1", "b", 0.0, pings=True)
    peers.add("n2", "c", 0.0, pings=True)
    assert sorted((p, sorted(ids)) for p, ids in peers.peers()) == [
        ("n1", ["a", "b"]),
        ("n2", ["c"]),
    ]
    peers.discard("n1", "a")
    peers.discard("n1", "b")
    peers.discard("n1", "b")  # twice is harmless
    peers.discard("n9", "x")  # unknown is harmless
    assert [p for p, _ in peers.peers()] == ["n2"]
    assert peers.requests("n1") == []
    assert len(peers) == 1


def test_a_silent_peer_is_lost_after_the_timeout_and_forgotten() -> None:
    peers = PeerTracker(10)
    peers.add("n1", "a", 0.0, pings=True)
    peers.add("n2", "b", 0.0, pings=True)
    for now in range(1, 11):
        peers.heard("n2", float(now))
        assert peers.tick(float(now), 1.0) == []
    assert peers.tick(11.0, 1.0) == [("n1", ["a"])]
    assert [p for p, _ in peers.peers()] == ["n2"]
    assert peers.tick(12.0, 1.0) == []


def test_hearing_from_a_peer_keeps_it() -> None:
    peers = PeerTracker(3)
    peers.add("n1", "a", 0.0, pings=True)
    for now in range(1, 30):
        peers.heard("n1", now - 0.5)
        assert peers.tick(float(now), 1.0) == []


def test_a_request_told_late_keeps_a_later_word_from_its_peer() -> None:
    # A Node tells its tracker of a request only once something looks (``Node._track``), as
    # of the request's arrival: a word heard from the peer since must not be lost by it.
    peers = PeerTracker(10)
    peers.add("n1", "a", 0.0, pings=True)
    peers.heard("n1", 9.0)
    peers.add("n1", "b", 1.0, pings=True)  # arrived at 1.0, told at 9.5
    for now in range(10, 20):
        assert peers.tick(float(now), 1.0) == []  # silent since 9.0, not since 1.0
    assert peers.tick(19.9, 1.0) == [("n1", ["a", "b"])]


def test_a_peer_that_does_not_ping_is_never_blamed_for_its_silence() -> None:
    peers = PeerTracker(3)
    peers.add("old", "a", 0.0, pings=False)
    assert all(peers.tick(float(now), 1.0) == [] for now in range(1, 21))
    peers.add("old", "b", 20.0, pings=True)  # a newer request says it pings
    assert [peers.tick(float(now), 1.0) for now in (21, 22, 23)] == [[]] * 3
    assert peers.tick(24.0, 1.0) == [("old", ["a", "b"])]  # timed from its pinging request


def test_a_process_that_paused_does_not_blame_its_peers() -> None:
    peers = PeerTracker(5)
    peers.add("n1", "a", 0.0, pings=True)
    assert peers.tick(1.0, 1.0) == []
    # The event loop was blocked for 20 s: nothing was read, so nothing proves silence.
    assert peers.tick(21.0, 1.0) == []
    assert peers.tick(22.0, 1.0) == []
    # Then real silence counts again.
    assert peers.tick(27.5, 1.0) == []  # late by 4.5 > interval: moved on again
    for now in range(28, 40):
        lost = peers.tick(float(now), 1.0)
        if lost:
            assert lost == [("n1", ["a"])]
            break
    else:
        raise AssertionError("never lost")


def test_a_check_late_by_less_than_an_interval_counts_its_lateness_as_a_pause() -> None:
    # A process stopped for 1.9 s just after a check finds the next one late by 0.9 s only:
    # before, lateness up to an interval counted against the peer (up to 2 s per pause).
    peers = PeerTracker(3)
    peers.add("n1", "a", 0.0, pings=True)
    assert peers.tick(1.0, 1.0) == []
    assert peers.tick(2.0, 1.0) == []
    assert peers.tick(3.9, 1.0) == []  # silent 3.9 s, 0.9 of them paused
    assert peers.tick(4.9, 1.0) == [("n1", ["a"])]


def test_a_loop_late_at_every_check_excuses_its_longest_pause_and_the_timeout_at_most() -> None:
    # A busy loop, not a stopped one: every check comes 99 s late (the loop runs, and reads,
    # between them). Each lateness was excused whole: silent 1 s per 100 s, the peer was lost
    # only at the fourth check (400 s). Now the longest lateness is excused whole and the rest
    # for the timeout at most: lost at the second check (silent 200 - 99 - 3 = 98 s > 3).
    peers = PeerTracker(3)
    peers.add("n1", "a", 0.0, pings=True)
    assert peers.tick(0.0, 1.0) == []
    assert peers.tick(100.0, 1.0) == []  # one stop of 99 s: excused whole
    assert peers.tick(200.0, 1.0) == [("n1", ["a"])]


def test_a_late_check_after_a_long_pause_is_excused_within_the_timeout() -> None:
    # Stopped 19 s, then the next check 9 s late while the peer says nothing: the stop is
    # excused whole, the lateness after it 3 s at most (it was excused whole: silent 3 s).
    peers = PeerTracker(3)
    peers.add("n1", "a", 0.0, pings=True)
    assert peers.tick(1.0, 1.0) == []
    assert peers.tick(21.0, 1.0) == []  # stopped from 2.0 to 21.0
    assert peers.tick(31.0, 1.0) == [("n1", ["a"])]  # silent 31 - 19 - min(9, 3) = 9


def test_silence_while_redis_answers_no_ping_is_not_the_peers() -> None:
    peers = PeerTracker(3)
    peers.add("n1", "a", 0.0, pings=True)
    assert peers.tick(1.0, 1.0) == []
    # A PING sent at 1.5 waits for its reply: Redis is stopped, nothing can come from anyone.
    assert [peers.tick(float(now), 1.0, unanswered_since=1.5) for now in (2, 3, 4)] == [[]] * 3
    peers.unserved(1.5, 4.5)  # answered at last
    assert [peers.tick(float(now), 1.0) for now in (5, 6)] == [[]] * 2  # silent 2.0, 3.0
    assert peers.tick(7.0, 1.0) == [("n1", ["a"])]


def test_a_ping_never_answered_excuses_the_silence_for_the_timeout_at_most() -> None:
    # A Redis that never answers (its reply bound turned off): the requests still end.
    peers = PeerTracker(3)
    peers.add("n1", "a", 0.0, pings=True)
    lost = [peers.tick(float(now), 1.0, unanswered_since=0.5) for now in range(1, 8)]
    assert lost == [[]] * 6 + [[("n1", ["a"])]]


def test_a_pause_and_an_unanswered_ping_at_once_are_excused_once() -> None:
    peers = PeerTracker(5)
    peers.add("n1", "a", 0.0, pings=True)
    assert peers.tick(1.0, 1.0) == []
    # Stopped from just after a PING sent at 1.0 until 5.0: paused and unanswered both.
    assert peers.tick(5.0, 1.0, unanswered_since=1.0) == []
    peers.unserved(1.0, 5.0)
    assert [peers.tick(float(now), 1.0) for now in (6, 7, 8, 9)] == [[]] * 4  # silent 2.0-5.0
    assert peers.tick(10.0, 1.0) == [("n1", ["a"])]


def test_pings_answered_slowly_one_after_another_excuse_the_timeout_at_most() -> None:
    # Redis answers every PING, each 0.9 s late, while the peer says nothing: its link may
    # drop what it sends while this one is merely slow. Lost within twice the timeout.
    peers = PeerTracker(3)
    peers.add("n1", "a", 0.0, pings=True)
    lost = []
    for now in range(1, 10):
        lost.append(peers.tick(float(now), 1.0, unanswered_since=now - 0.9))
        peers.unserved(now - 0.9, now + 0.0)
    assert lost == [[]] * 6 + [[("n1", ["a"])]] + [[]] * 2  # at 7: silent 7 - 3 s excused


def test_a_ping_waiting_for_one_peer_excuses_anothers_silence_for_the_timeout_at_most() -> None:
    # One peer is heard every second while a PING to it waits from 0.5 on; the other says
    # nothing. Redis' wait is evidence against this process' hearing, not proof: capped.
    peers = PeerTracker(3)
    peers.add("slow", "a", 0.0, pings=True)
    peers.add("dead", "b", 0.0, pings=True)
    lost = []
    for now in range(1, 9):
        peers.heard("slow", float(now))
        lost.append(peers.tick(float(now), 1.0, unanswered_since=0.5))
    assert lost == [[]] * 6 + [[("dead", ["b"])]] + [[]]  # at 7: silent 7 - 3 s excused


def test_deaf_spans_are_kept_only_while_a_peers_silence_reaches_them() -> None:
    peers = PeerTracker(3)
    peers.add("n1", "a", 0.0, pings=True)
    for now in range(1, 200):
        peers.heard("n1", now - 0.1)
        peers.unserved(now - 0.5, now - 0.2)
        assert peers.tick(now + 0.5, 1.0) == []  # each a little late, too
    assert len(peers._paused) <= 2 and len(peers._unserved) <= 2


@pytest.mark.parametrize("interval,timeout", [(0, 10), (-1, 10), (1, 0), (1, float("nan"))])
def test_settings_that_would_turn_liveness_off_are_refused(interval: float, timeout: float) -> None:
    with pytest.raises(ValueError, match="must be a positive number"):
        check_settings(interval, timeout)
    check_settings(1.0, 10.0)  # the defaults pass


def test_one_request_at_a_time_keeps_one_peer_state(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []

    class Counted(liveness._Peer):
        def __init__(self, now: float) -> None:
            made.append(self)
            super().__init__(now)

    monkeypatch.setattr(liveness, "_Peer", Counted)
    peers = PeerTracker(10)
    for i in range(10):
        peers.add("n1", f"r{i}", float(i), pings=True)
        assert [p for p, _ in peers.peers()] == ["n1"] and len(peers) == 1
        peers.discard("n1", f"r{i}")
        # Idle: nothing to ping, nothing to time out, and not counted.
        assert list(peers.peers()) == [] and len(peers) == 0
    assert len(made) == 1  # before: a state made and dropped per request
    assert peers.tick(100.0, 1.0) == []  # idle for long: not lost, only forgotten
    peers.add("n1", "r", 101.0, pings=True)
    assert len(made) == 2  # made again after the tick that forgot it
    # And timed from its new request, as a peer first seen then.
    assert [peers.tick(float(now), 1.0) for now in range(101, 113)] == [[]] * 11 + [[("n1", ["r"])]]


def test_a_peer_is_known_from_its_first_request_until_the_tick_after_its_last() -> None:
    # ``knows`` tells a caller whether ``heard`` would change anything (no need to read the
    # clock for it otherwise).
    peers = PeerTracker(10)
    assert not peers.knows("n1")
    peers.heard("n1", 1.0)  # nothing in flight: nothing kept
    assert not peers.knows("n1")
    peers.add("n1", "a", 2.0, pings=True)
    assert peers.knows("n1") and not peers.knows("n2")
    peers.discard("n1", "a")
    assert peers.knows("n1")  # kept until the next tick, for its next request
    peers.tick(3.0, 1.0)
    assert not peers.knows("n1")


def test_round_errors_are_reported_once_per_type_and_line_then_their_repeats_rarely() -> None:
    errors = RoundErrors(repeat_every=60.0)

    def fail(kind: type[Exception], name: str) -> Exception:
        try:
            raise kind(name)  # one line: the same place whatever the message
        except Exception as exc:
            return exc

    first = "a liveness check failed; the checks go on"
    assert errors.report(fail(KeyError, "a"), 0.0) == first
    assert errors.report(fail(KeyError, "b"), 1.0) is None  # the same bug, another request
    assert errors.report(fail(ValueError, "a"), 1.0) == first  # another type at the same line
    try:
        raise KeyError("a")
    except KeyError as exc:
        assert errors.report(exc, 2.0) == first  # another line
    assert errors.report(RuntimeError("never raised"), 2.0) == first  # no traceback
    assert errors.report(RuntimeError("never raised"), 3.0) is None
    # A bug that fails every round: its repeats counted, reported once a minute.
    for now in range(2, 60):
        assert errors.report(fail(KeyError, "c"), float(now)) is None
    assert errors.report(fail(KeyError, "c"), 60.0) == (
        "a liveness check failed again, 60 times in 60 s; the checks go on"
    )
    assert errors.report(fail(KeyError, "c"), 61.0) is None
    assert errors.report(fail(KeyError, "c"), 125.0) == (
        "a liveness check failed again, 2 times in 65 s; the checks go on"
    )
