"""Counters, gauges and histograms that the distributor and the Node feed, and their sets.

Owns the numbers an operator reads (``exposition`` turns them into Prometheus text, ``stats``
into a status payload). Feeding one is a dict update or a ``bisect`` into a bucket list: no
lock (one event loop owns them), no task, no timer, no I/O. It must never import the
distributor or the Node: they pass it plain values, and read-at-scrape gauges are callables.

Label values that come from requests (the queue key a route templated from a path) are
bounded: past ``MAX_SERIES`` label sets a family counts the rest under ``"other"``, so a
client cannot grow a process' memory or its scrape without end.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_SERIES",
    "Counter",
    "DistributorMetrics",
    "Family",
    "Gauge",
    "Histogram",
    "HistogramFamily",
    "NodeMetrics",
    "Registry",
]

MAX_SERIES = 1000
"""Label sets one family keeps apart before counting the rest as ``other``."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Upper bounds, in seconds, of the latency histograms' buckets (``+Inf`` is implied)."""

Labels = tuple[str, ...]


class Family:
    """What every metric family has: a name, a help text, a type and label names."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames: Labels = tuple(labelnames)

    def _bounded(self, series: Mapping[Labels, object], labels: Labels) -> Labels:
        """``labels`` if the family may keep it apart, else the overflow label set."""
        if len(series) < MAX_SERIES or labels in series:
            return labels
        return ("other",) * len(self.labelnames)


class Counter(Family):
    """A count that only goes up, per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), amount: float = 1) -> None:
        """Add ``amount`` to the series named by ``labels`` (values in ``labelnames`` order)."""
        values = self.values
        if labels not in values:
            labels = self._bounded(values, labels)
        values[labels] = values.get(labels, 0) + amount

    def get(self, labels: Labels = ()) -> float:
        """The current count of one series (0 if never fed)."""
        return self.values.get(labels, 0)

    def total(self) -> float:
        """The sum over every series."""
        return sum(self.values.values())

    def samples(self) -> Iterator[tuple[Labels, float]]:
        """``(labels, value)`` pairs, for exposition."""
        return iter(list(self.values.items()))


class Gauge(Family):
    """A value read when asked for: ``read`` returns ``{labels: value}`` at scrape time."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], dict[Labels, float]],
        labelnames: Sequence[str] = (),
    ) -> None:
        super().__init__(name, help, labelnames)
        self.read = read

    def samples(self) -> Iterator[tuple[Labels, float]]:
        """``(labels, value)`` pairs, for exposition."""
        return iter(list(self.read().items()))


class Histogram:
    """Observations counted into buckets: cumulative only when exposed."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last bucket is +Inf
        self.sum = 0.0

    @property
    def count(self) -> int:
        """Observations so far: the buckets' sum, worked out when read (a scrape), not
        counted at each observation (several per request)."""
        return sum(self.counts)

    def observe(self, value: float) -> None:
        """Count one observation (``le`` semantics: a value on a bound is in its bucket)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, ending with ``(inf, count)``."""
        pairs = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            pairs.append((bound, running))
        return pairs


class HistogramFamily(Family):
    """A histogram per label set."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        bounds: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help, labelnames)
        self.bounds = tuple(bounds)
        self.series: dict[Labels, Histogram] = {}

    def observe(self, value: float, labels: Labels = ()) -> None:
        """Count ``value`` in the histogram named by ``labels``."""
        histogram = self.series.get(labels)
        if histogram is None:
            labels = self._bounded(self.series, labels)
            histogram = self.series.get(labels)
            if histogram is None:
                histogram = self.series[labels] = Histogram(self.bounds)
        histogram.observe(value)

    def histogram(self, labels: Labels) -> Histogram:
        """The histogram of ``labels``, made if need be (``labels`` not bounded here)."""
        histogram = self.series.get(labels)
        if histogram is None:
            histogram = self.series[labels] = Histogram(self.bounds)
        return histogram

    def samples(self) -> Iterator[tuple[Labels, Histogram]]:
        """``(labels, histogram)`` pairs, for exposition."""
        return iter(list(self.series.items()))


AnyFamily = Counter | Gauge | HistogramFamily


class Registry:
    """An ordered set of families, exposed together."""

    def __init__(self, families: Iterable[AnyFamily] = ()) -> None:
        self.families: list[AnyFamily] = list(families)

    def add(self, family: AnyFamily) -> AnyFamily:
        """Add a family; its name must be new."""
        if any(f.name == family.name for f in self.families):
            raise ValueError(f"a metric named {family.name!r} is already registered")
        self.families.append(family)
        return family


# The refusals a distributor counts apart (label ``reason``).
NO_NODE = "no_node"
QUEUE_FULL = "queue_full"
NO_ACK = "no_ack"
IN_FLIGHT = "max_in_flight"
UNREACHABLE = "redis_unreachable"
REDIS_REFUSED = "redis_refused"  # an error reply to the LPUSH: -OOM past maxmemory, say


class DistributorMetrics:
    """What one distributor process counts. The distributor calls ``refused`` and
    ``finished``; gauges (in flight, Redis connected, credit pool) are read at scrape time
    through the callables it gives."""

    def __init__(
        self,
        *,
        in_flight: Callable[[], int],
        redis_connected: Callable[[], bool],
        credit_pool: Callable[[], tuple[int, int]],
    ) -> None:
        self.requests = Counter(
            "minidasgi_distributor_requests_total",
            "Requests answered, by queue key and status (refusals included).",
            ("key", "status"),
        )
        self.refusals = Counter(
            "minidasgi_distributor_refusals_total",
            "Requests refused without a Node's answer, by reason.",
            ("reason",),
        )
        self.aborts = Counter(
            "minidasgi_distributor_aborted_total",
            "Responses aborted after they started, and WebSockets closed with 1011 after they "
            "were accepted (counted in requests_total with the status the client saw, but cut "
            "short: the Node lost, a timeout), by queue key. A client that went away, or a "
            "server that cancelled the call, is not counted here.",
            ("key",),
        )
        self.queue_wait = HistogramFamily(
            "minidasgi_distributor_queue_wait_seconds",
            "Time from the LPUSH of a request to the ack of the Node that took it.",
            ("key",),
        )
        self.response_time = HistogramFamily(
            "minidasgi_distributor_response_seconds",
            "Time from a Node's ack to the end of the response (app time plus relay).",
            ("key",),
        )
        self.total_time = HistogramFamily(
            "minidasgi_distributor_request_seconds",
            "Time from the request's arrival to the end of its response.",
            ("key",),
        )
        self.links = Counter(
            "minidasgi_distributor_links_total",
            "Responses whose body continued on a direct link from the Node (``link=``).",
        )
        self.link_bytes_counter = Counter(
            "minidasgi_distributor_link_bytes_total",
            "Response body bytes read from Nodes' links.",
        )
        self.uploads = Counter(
            "minidasgi_distributor_upload_links_total",
            "Request bodies whose rest went on an upload link to the Node (``link=``).",
        )
        self.upload_bytes = Counter(
            "minidasgi_distributor_upload_bytes_total",
            "Request body bytes written on upload links.",
        )
        self.registry = Registry(
            [
                self.requests,
                self.refusals,
                self.aborts,
                self.links,
                self.link_bytes_counter,
                self.uploads,
                self.upload_bytes,
                self.queue_wait,
                self.response_time,
                self.total_time,
                Gauge(
                    "minidasgi_distributor_in_flight",
                    "Requests being relayed now.",
                    lambda: {(): in_flight()},
                ),
                Gauge(
                    "minidasgi_redis_connected",
                    "1 while the process' Redis connections (and subscription) are up.",
                    lambda: {(): 1 if redis_connected() else 0},
                ),
                _credit_gauge(credit_pool),
            ]
        )
        # Per queue key: its request counts' label sets already counted, by status, and its
        # three histograms (``_series_for``).
        self._series: dict[str, tuple[dict[int, Labels], Histogram, Histogram, Histogram]] = {}
        for reason in (NO_NODE, QUEUE_FULL, NO_ACK, IN_FLIGHT, UNREACHABLE, REDIS_REFUSED):
            self.refusals.values[(reason,)] = 0  # every reason visible, even before the first

    @property
    def served(self) -> int:
        """Requests answered so far (by a Node or by the distributor itself)."""
        return int(self.requests.total())

    def linked(self) -> None:
        """Count one response whose body continues on a link."""
        self.links.inc()

    def link_bytes(self, size: int) -> None:
        """Count body bytes read from a link."""
        self.link_bytes_counter.inc((), size)

    def refused(self, reason: str) -> None:
        """Count one refusal (``NO_NODE``, ``QUEUE_FULL``, ``NO_ACK``, ...)."""
        self.refusals.values[(reason,)] = self.refusals.values.get((reason,), 0) + 1

    def aborted(self, key: str) -> None:
        """Count one response (or accepted WebSocket) aborted after it started (``finished``
        counts it too)."""
        self.aborts.inc((key,))

    def finished(
        self, key: str, status: int, queue_wait: float | None, response: float | None, total: float
    ) -> None:
        """Count one request at its end. ``queue_wait``/``response``: None without an ack."""
        series = self._series.get(key)
        if series is None:
            series = self._series_for(key)
        statuses, wait, answer, whole = series
        labels = statuses.get(status)
        if labels is not None:
            # Counter.inc, inline for a series already counted, found by the status (an int)
            # without making and hashing its label set to look it up first.
            self.requests.values[labels] += 1
        else:
            labels = (key, _STATUS_LABELS.get(status) or "0")
            self.requests.inc(labels)
            if (
                type(status) is int
                and (status in _STATUS_LABELS or status == 0)
                and labels in self.requests.values
            ):
                # Counted as itself (not as "other"): found by its status from now on. Only
                # statuses with a label of their own: each other int, all counted as "0",
                # would add an entry (a Node's app, untrusted, chooses it), without bound.
                # So at most the counter's label sets, its bound (``MAX_SERIES``).
                statuses[status] = labels
        # Histogram.observe's two lines, inline for each: one call per request, not five.
        if queue_wait is not None:
            wait.counts[bisect_left(wait.bounds, queue_wait)] += 1
            wait.sum += queue_wait
        if response is not None:
            answer.counts[bisect_left(answer.bounds, response)] += 1
            answer.sum += response
        whole.counts[bisect_left(whole.bounds, total)] += 1
        whole.sum += total

    def _series_for(self, key: str) -> tuple[dict[int, Labels], Histogram, Histogram, Histogram]:
        """The label sets by status (empty, to be filled) and the three histograms of ``key``
        (one lookup per request instead of four), kept if ``key`` is counted as itself."""
        wait, response, total = self.queue_wait, self.response_time, self.total_time
        labels = total._bounded(total.series, (key,))  # total is fed for every request
        statuses: dict[int, Labels] = {}
        series = (
            statuses,
            wait.histogram(labels),
            response.histogram(labels),
            total.histogram(labels),
        )
        if labels == (key,):
            self._series[key] = series
        return series


class NodeMetrics:
    """What one Node counts. The Node calls ``finished`` once per request it ran."""

    def __init__(
        self,
        *,
        in_flight: Callable[[], int],
        concurrency: int,
        redis_connected: Callable[[], bool],
        credit_pool: Callable[[], tuple[int, int]],
    ) -> None:
        self.requests = Counter(
            "minidasgi_node_requests_total",
            "Requests run, by queue key and the status the app answered (0: none).",
            ("key", "status"),
        )
        self.failures = Counter(
            "minidasgi_node_failures_total",
            "Requests whose app raised, by queue key.",
            ("key",),
        )
        self.app_time = HistogramFamily(
            "minidasgi_node_app_seconds",
            "Time from a Node's ack to the end of the app.",
            ("key",),
        )
        self._app_times: dict[str, Histogram] = {}  # app_time's series, by key
        self.links = Counter(
            "minidasgi_node_links_total",
            "Responses whose body continued on a direct link to the distributor.",
        )
        self.link_fallbacks = Counter(
            "minidasgi_node_link_fallbacks_total",
            "Responses offered a link that went on through Redis: the link could not be "
            "opened, or its address failed in the last 30 s.",
        )
        self.link_bytes = Counter(
            "minidasgi_node_link_bytes_total",
            "Response body bytes written on links.",
        )
        self.upload_links = Counter(
            "minidasgi_node_upload_links_total",
            "Request bodies offered an upload link that the Node opened (their rest on it).",
        )
        self.upload_fallbacks = Counter(
            "minidasgi_node_upload_fallbacks_total",
            "Request bodies offered an upload link that went on through Redis: the link was "
            "refused, could not be opened, or its address failed in the last 30 s.",
        )
        self.upload_bytes = Counter(
            "minidasgi_node_upload_bytes_total",
            "Request body bytes read from upload links.",
        )
        self.registry = Registry(
            [
                self.requests,
                self.failures,
                self.links,
                self.link_fallbacks,
                self.link_bytes,
                self.upload_links,
                self.upload_fallbacks,
                self.upload_bytes,
                self.app_time,
                Gauge(
                    "minidasgi_node_in_flight",
                    "Requests being run now.",
                    lambda: {(): in_flight()},
                ),
                Gauge(
                    "minidasgi_node_concurrency",
                    "Requests the Node runs at most at once.",
                    lambda: {(): concurrency},
                ),
                Gauge(
                    "minidasgi_redis_connected",
                    "1 while the process' Redis connections (and subscription) are up.",
                    lambda: {(): 1 if redis_connected() else 0},
                ),
                _credit_gauge(credit_pool),
            ]
        )

    @property
    def served(self) -> int:
        """Requests run to their end."""
        return int(self.requests.total())

    @property
    def failed(self) -> int:
        """Requests whose app raised."""
        return int(self.failures.total())

    def finished(self, key: str, status: int, failed: bool, app_time: float) -> None:
        """Count one request the app ran (``status`` 0 when it answered none)."""
        labels = (key, _STATUS_LABELS.get(status) or "0")
        counts = self.requests.values
        if labels in counts:  # Counter.inc, inline for a series already counted
            counts[labels] += 1
        else:
            self.requests.inc(labels)
        if failed:
            self.failures.inc((key,))
        histogram = self._app_times.get(key)
        if histogram is None:
            histogram = self._app_time_for(key)
        # Histogram.observe's two lines, inline: one call per request, not five.
        histogram.counts[bisect_left(histogram.bounds, app_time)] += 1
        histogram.sum += app_time

    def _app_time_for(self, key: str) -> Histogram:
        """The app-time histogram of ``key``, kept by key once its label set is its own
        (bounded as ``HistogramFamily.observe`` bounds it)."""
        family = self.app_time
        labels = family._bounded(family.series, (key,))
        histogram = family.histogram(labels)
        if labels == (key,):
            self._app_times[key] = histogram
        return histogram


def _credit_gauge(credit_pool: Callable[[], tuple[int, int]]) -> Gauge:
    def read() -> dict[Labels, float]:
        used, budget = credit_pool()
        return {("used",): used, ("budget",): budget}

    return Gauge(
        "minidasgi_credit_pool",
        "Flow-control credits peers hold on this process (used) and the pool's budget.",
        read,
        ("kind",),
    )


_STATUS_LABELS = {n: str(n) for n in range(100, 600)}  # anything else counts as "0"
