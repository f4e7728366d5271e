"""Counters, gauges, histograms and the sets each side feeds."""

from __future__ import annotations

import pytest

from minidasgi import metrics
from minidasgi.metrics import Counter, DistributorMetrics, Histogram, HistogramFamily, NodeMetrics


def test_histogram_buckets_follow_le_semantics() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert histogram.count == 5
    assert histogram.sum == pytest.approx(8.65)


def test_counter_series_and_total() -> None:
    counter = Counter("c_total", "help", ("key", "status"))
    counter.inc(("a", "200"))
    counter.inc(("a", "200"), 2)
    counter.inc(("b", "503"))
    assert counter.get(("a", "200")) == 3
    assert counter.get(("nope", "200")) == 0
    assert counter.total() == 4


def test_label_sets_from_requests_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    counter = Counter("c_total", "help", ("key",))
    family = HistogramFamily("h_seconds", "help", ("key",))
    for i in range(10):
        counter.inc((f"k{i}",))
        family.observe(0.1, (f"k{i}",))
    assert len(counter.values) == 4  # three kept apart, the rest under "other"
    assert counter.get(("other",)) == 7
    assert counter.get(("k0",)) == 1  # a label set already known still counts as itself
    assert len(family.series) == 4 and family.series[("other",)].count == 7


def test_distributor_metrics() -> None:
    m = DistributorMetrics(
        in_flight=lambda: 2, redis_connected=lambda: True, credit_pool=lambda: (3, 64)
    )
    m.finished("k", 200, 0.001, 0.002, 0.004)
    m.finished("k", 405, None, None, 5.0)
    m.refused(metrics.NO_ACK)
    assert m.served == 2
    assert m.requests.get(("k", "200")) == 1 and m.requests.get(("k", "405")) == 1
    assert m.queue_wait.series[("k",)].count == 1
    assert m.total_time.series[("k",)].count == 2
    assert m.refusals.get((metrics.NO_ACK,)) == 1
    assert m.refusals.get((metrics.QUEUE_FULL,)) == 0  # shown before the first
    gauges = {f.name: dict(f.samples()) for f in m.registry.families if f.kind == "gauge"}
    assert gauges["minidasgi_distributor_in_flight"] == {(): 2}
    assert gauges["minidasgi_redis_connected"] == {(): 1}
    assert gauges["minidasgi_credit_pool"] == {("used",): 3, ("budget",): 64}


def test_node_metrics() -> None:
    m = NodeMetrics(
        in_flight=lambda: 0,
        concurrency=10,
        redis_connected=lambda: False,
        credit_pool=lambda: (0, 64),
    )
    m.finished("k", 200, False, 0.01)
    m.finished("k", 0, True, 0.02)
    m.finished("k", 999, False, 0.01)  # not an HTTP status: counted as none
    assert (m.served, m.failed) == (3, 1)
    assert m.requests.get(("k", "0")) == 2


def test_node_metrics_count_as_the_families_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    m = NodeMetrics(
        in_flight=lambda: 0,
        concurrency=10,
        redis_connected=lambda: True,
        credit_pool=lambda: (0, 64),
    )
    requests = Counter("r_total", "help", ("key", "status"))
    failures = Counter("f_total", "help", ("key",))
    app_time = HistogramFamily("a_seconds", "help", ("key",))
    samples = [("a", 200, False, 0.0005), ("a", 200, True, 0.3), ("b", 0, False, 40.0)]
    samples += [(f"k{i}", 500 + i, i % 2 == 1, 0.001 * i) for i in range(6)]  # past the bound
    for key, status, failed, elapsed in samples * 2:
        m.finished(key, status, failed, elapsed)
        requests.inc((key, str(status) if status else "0"))
        if failed:
            failures.inc((key,))
        app_time.observe(elapsed, (key,))
    assert m.requests.values == requests.values
    assert m.failures.values == failures.values
    assert m.app_time.series.keys() == app_time.series.keys()
    assert ("other",) in app_time.series
    for labels, histogram in app_time.series.items():
        got = m.app_time.series[labels]
        assert (got.counts, got.sum) == (histogram.counts, histogram.sum)


def test_names_are_unique_in_a_registry() -> None:
    registry = metrics.Registry([Counter("a_total", "x")])
    with pytest.raises(ValueError, match="already"):
        registry.add(Counter("a_total", "y"))


def test_distributor_metrics_count_as_the_histograms_observe() -> None:
    m = DistributorMetrics(
        in_flight=lambda: 0, redis_connected=lambda: True, credit_pool=lambda: (0, 64)
    )
    expected = [Histogram() for _ in range(3)]
    samples = [(0.0005, 0.001, 0.0015), (0.3, None, 2.5), (None, None, 40.0), (0.0, 0.0, 0.0)]
    for wait, response, total in samples * 2:
        m.finished("k", 200, wait, response, total)
        for histogram, value in zip(expected, (wait, response, total), strict=True):
            if value is not None:
                histogram.observe(value)
    assert m.requests.get(("k", "200")) == 8
    families = (m.queue_wait, m.response_time, m.total_time)
    for family, histogram in zip(families, expected, strict=True):
        got = family.series[("k",)]
        assert (got.counts, got.sum) == (histogram.counts, histogram.sum)
        assert got.count == histogram.count


def test_a_requests_count_is_found_by_its_status_once_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Per request, the count of a (key, status) already counted is found by the status, with
    # no label set made and hashed to look it up: each status's label set is kept per key,
    # only when counted as itself (not under "other"), so no more than the counter's bound.
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    m = DistributorMetrics(
        in_flight=lambda: 0, redis_connected=lambda: True, credit_pool=lambda: (0, 64)
    )
    for status in (200, 200, 404, 999, 200, 500, 503, 503, 404, 999):
        m.finished("k", status, None, None, 0.001)
    for status in range(600, 1600):  # not HTTP statuses, all counted as "0"
        m.finished("k", status, None, None, 0.001)
    statuses = m._series["k"][0]
    # A status without a label of its own is not kept: each would add an entry, unbounded.
    assert statuses == {200: ("k", "200"), 404: ("k", "404")}
    assert m.requests.values == {
        ("k", "200"): 3,
        ("k", "404"): 2,
        ("k", "0"): 1002,
        ("other", "other"): 3,  # 500 and 503: past the bound
    }
    assert m.served == 1010
