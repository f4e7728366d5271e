"""Per-request liveness: which requests each peer shares with this process, and when that peer
was last heard from.

A peer (a Node seen by a distributor, a distributor seen by a Node) can forget a request while
its channel stays subscribed: its subscriber reconnected, a publish failed, a cancel arrived.
A "is the channel there" ping cannot see that. So, while two processes share requests, each
publishes to the other, every ``liveness_interval``, a PING naming the requests it has in
flight with that peer; the receiver answers the ids it does not know (a Node with GONE, a
distributor with CANCEL). And a peer that this process has heard nothing at all from for
``peer_timeout`` while requests are in flight with it (its link stalled, its process stopped)
counts as lost: those requests fail.

Silence counts against a peer only while this process could have heard it. Not while its own
event loop did not run (a process stopped or blocked: its periodic check comes late), nor, up to
a bound, while Redis did not serve it (a PING it published to a peer waited for its reply: Redis
was stopped or its link stalled, and whatever the peer sent most likely waited there too).

A check's lateness is the loop's, not proof that nothing was read: a stop (SIGSTOP, a blocking
call, a suspended machine) reads nothing, but a loop that is merely busy makes every check late
while it goes on reading between them. So the longest single span this process did not run
within a peer's silence is excused whole (a stop of any length: what came meanwhile may be read
only after the check that ends it, as the caller's loop orders them, and the peer gets
``timeout`` of this process' running time after it), and the rest of those spans, with Redis'
waits, for ``timeout`` at most. Redis' waits are evidence, not proof (on a Cluster the peer's
messages travel on another shard than this process' PUBLISH; a slow link may still deliver), and
a loop late at every check by far more than ``interval`` would otherwise excuse nearly all of a
peer's silence, however long. So a peer silent throughout is lost within twice ``timeout`` plus
this process' longest stop, whether Redis keeps answering slowly or the loop keeps coming late.
Round trips of a healthy Redis count too, but they are a few milliseconds.

A round of those checks that raises (a bug: nothing raises there today) must not end them:
the caller logs the error and goes on with the next round, and ``RoundErrors`` says when to
log it, so an operator sees each error at once and its repeats counted once a minute, and
the log is not flooded every ``liveness_interval``.

This module is pure bookkeeping on a clock given by the caller. It owns ``PeerTracker`` and
``RoundErrors``; it must never do I/O, start tasks or read a clock of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["PeerTracker", "RoundErrors", "check_settings"]


def check_settings(liveness_interval: float, peer_timeout: float) -> None:
    """Refuse settings that would turn liveness off unannounced: a process that pings every
    0 s announces that it does not ping (its peers never time it out), and a ``peer_timeout``
    of 0 or less would fail every request at once."""
    if not liveness_interval > 0:
        raise ValueError("liveness_interval must be a positive number of seconds")
    if not peer_timeout > 0:
        raise ValueError("peer_timeout must be a positive number of seconds")


class _Peer:
    __slots__ = ("heard", "pings", "requests")

    def __init__(self, now: float) -> None:
        self.heard = now
        self.requests: dict[str, None] = {}  # in order of arrival
        # Whether the peer announced that it pings: a peer of an older version does not, and
        # silence from it proves nothing.
        self.pings = False


class PeerTracker:
    """Requests in flight per peer channel, and when each peer was last heard from.

    ``timeout``: seconds of silence after which a peer with requests in flight counts as lost.
    The caller reports every message it gets from a peer (``heard``), registers and forgets
    requests (``add``/``discard``), and calls ``tick`` from its periodic check.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._peers: dict[str, _Peer] = {}
        self._last_tick: float | None = None
        # Spans (start, end) in which this process did not run, and in which Redis did not
        # serve it (``unserved``), merged and ordered at each tick; those older than every
        # peer's last word are dropped there.
        self._paused: list[tuple[float, float]] = []
        self._unserved: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return sum(1 for state in self._peers.values() if state.requests)

    def add(self, peer: str, request_id: str, now: float, *, pings: bool) -> None:
        """``request_id`` is in flight with ``peer``, which was heard from at ``now`` (the
        request came from it, or its ack did). A caller may tell it late, with that earlier
        time: a word heard since is kept."""
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer(now)
        elif now > state.heard:
            state.heard = now
        state.requests[request_id] = None
        state.pings = state.pings or pings

    def discard(self, peer: str, request_id: str) -> None:
        """``request_id`` is no longer in flight with ``peer`` (a no-op if it was not)."""
        state = self._peers.get(peer)
        if state is None:
            return
        state.requests.pop(request_id, None)
        # An idle peer is nothing to ping nor to time (``peers``, ``tick`` pass it over), and
        # forgotten at the next tick: kept until then for its next request, which usually
        # follows at once (one request at a time: no peer state made and dropped per request).

    def knows(self, peer: str) -> bool:
        """Whether ``peer`` has a state here (requests in flight with it, or had some since
        the last ``tick``): ``heard`` changes nothing for any other, and a caller may spare
        reading its clock for it."""
        return peer in self._peers

    def heard(self, peer: str, now: float) -> None:
        """Anything at all arrived from ``peer``."""
        state = self._peers.get(peer)
        if state is not None:
            state.heard = now

    def requests(self, peer: str) -> list[str]:
        """The requests in flight with ``peer``."""
        state = self._peers.get(peer)
        return [] if state is None else list(state.requests)

    def peers(self) -> Iterator[tuple[str, list[str]]]:
        """Each peer with requests in flight, with those requests (a snapshot)."""
        return iter(
            [(peer, list(state.requests)) for peer, state in self._peers.items() if state.requests]
        )

    def unserved(self, sent: float, answered: float) -> None:
        """A PING this process published at ``sent`` got its reply only at ``answered``:
        Redis did not serve it meanwhile (stopped, or its link stalled), so most likely
        nothing a peer sent reached this process either (excused up to a bound: see the
        module's docstring)."""
        self._unserved.append((sent, answered))

    def tick(
        self, now: float, interval: float, *, unanswered_since: float | None = None
    ) -> list[tuple[str, list[str]]]:
        """The periodic check, due every ``interval`` seconds: return the peers lost (silent
        for ``timeout`` with requests in flight) with their requests, and forget them.

        If this process itself was not running for a while (its event loop blocked, the
        process stopped, the machine suspended), it was not listening either: the time the
        check comes late is not counted against any peer, so a paused process does not
        blame its peers for its own pause (what arrived meanwhile may be read only after this
        check). Its longest such pause within a peer's silence is excused whole, the others
        (with Redis' waits) for ``timeout`` at most: see the module's docstring.
        ``unanswered_since``: when the oldest PING this process published and still
        waits the reply of was sent (see ``unserved``); None if there is none.
        """
        last, self._last_tick = self._last_tick, now
        if last is not None and now - last > interval:
            self._paused.append((last + interval, now))
        paused = self._paused = _union(self._paused) if self._paused else self._paused
        unserved = self._unserved = _union(self._unserved) if self._unserved else self._unserved
        if unanswered_since is not None and unanswered_since < now:
            # Unserved up to now, for this check only: the whole span is kept once answered.
            unserved = _union([*unserved, (unanswered_since, now)])
        either = _union([*paused, *unserved]) if paused and unserved else paused or unserved
        timeout = self.timeout
        lost = []
        oldest = now  # the earliest last word of a peer that may still be lost
        for peer, state in self._peers.items():
            if not (state.requests and state.pings):
                continue
            heard = state.heard
            silence = now - heard
            if either:
                # The longest stop whole; what the other late checks and Redis' waits add to
                # it, ``timeout`` at most.
                longest = _longest(paused, heard) if paused else 0.0
                silence -= longest + min(_covered(either, heard) - longest, timeout)
            if silence > timeout:
                lost.append((peer, list(state.requests)))
            elif heard < oldest:
                oldest = heard
        for peer, _ in lost:
            del self._peers[peer]
        for peer in [peer for peer, state in self._peers.items() if not state.requests]:
            del self._peers[peer]  # idle since the last tick: forgotten
        # What no peer's silence reaches back to any more is of no use.
        if paused:
            self._paused = [span for span in paused if span[1] > oldest]
        if self._unserved:
            self._unserved = [span for span in self._unserved if span[1] > oldest]
        return lost


class RoundErrors:
    """The errors a periodic check's rounds raised, to report each distinct one once, then
    its repeats at most once per ``repeat_every`` seconds, counted.

    Two errors are the same when they are of the same type and raised at the same line (the
    same bug, whatever request or value its message names): a map bounded by the code, not
    by the traffic. A bug that fails every round stops every check, so its repeats are
    reported too, if rarely: an operator must see that it goes on.
    """

    def __init__(self, repeat_every: float = 60.0) -> None:
        self.repeat_every = repeat_every
        # Per distinct error: when it was last reported, and its repeats since.
        self._seen: dict[tuple[type[BaseException], str, int], list[float]] = {}

    def report(self, error: BaseException, now: float) -> str | None:
        """What to log of ``error`` (raised at ``now``, the caller's clock), or None when it
        was reported less than ``repeat_every`` seconds ago."""
        traceback = error.__traceback__
        while traceback is not None and traceback.tb_next is not None:
            traceback = traceback.tb_next
        where = (
            ("", 0)
            if traceback is None
            else (traceback.tb_frame.f_code.co_filename, traceback.tb_lineno)
        )
        kind = (type(error), *where)
        seen = self._seen.get(kind)
        if seen is None:
            self._seen[kind] = [now, 0]
            return "a liveness check failed; the checks go on"
        seen[1] += 1
        since = now - seen[0]
        if since < self.repeat_every:
            return None
        repeats = int(seen[1])
        seen[0], seen[1] = now, 0
        return f"a liveness check failed again, {repeats} times in {since:.0f} s; the checks go on"


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The spans merged where they overlap, in order."""
    merged: list[tuple[float, float]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1]:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def _longest(spans: list[tuple[float, float]], start: float) -> float:
    """The longest part since ``start`` of one of the merged, ordered ``spans``."""
    longest = 0.0
    for first, last in reversed(spans):
        if last <= start:
            break
        longest = max(longest, last - max(first, start))
    return longest


def _covered(spans: list[tuple[float, float]], start: float) -> float:
    """How much of the time since ``start`` the merged, ordered ``spans`` cover."""
    covered = 0.0
    for first, last in reversed(spans):
        if last <= start:
            break
        covered += last - max(first, start)
    return covered
