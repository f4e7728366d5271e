"""The Prometheus text format, checked with the reference parser (prometheus_client)."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from minidasgi import exposition
from minidasgi.metrics import Counter, Gauge, HistogramFamily, Registry


def _parse(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_counter_gauge_and_histogram_parse() -> None:
    counter = Counter("req_total", "Requests.\nTwo lines \\ and a backslash.", ("key", "status"))
    counter.inc(('we"ird\\key\nx', "200"), 3)
    histogram = HistogramFamily("wait_seconds", "Waits.", ("key",), bounds=(0.01, 0.1))
    for value in (0.005, 0.05, 0.5):
        histogram.observe(value, ("k",))
    gauge = Gauge("up", "Up.", lambda: {(): 1.5})
    text = exposition.render(Registry([counter, histogram, gauge]))
    families = _parse(text)
    (sample,) = families["req"].samples  # type: ignore[attr-defined]
    assert sample.name == "req_total" and sample.value == 3
    assert sample.labels == {"key": 'we"ird\\key\nx', "status": "200"}
    assert families["req"].documentation == "Requests.\nTwo lines \\ and a backslash."  # type: ignore[attr-defined]
    samples = {
        (s.name, s.labels.get("le")): s.value
        for s in families["wait_seconds"].samples  # type: ignore[attr-defined]
    }
    assert samples[("wait_seconds_bucket", "0.01")] == 1
    assert samples[("wait_seconds_bucket", "0.1")] == 2
    assert samples[("wait_seconds_bucket", "+Inf")] == 3
    assert samples[("wait_seconds_count", None)] == 3
    assert math.isclose(samples[("wait_seconds_sum", None)], 0.555)
    assert families["up"].samples[0].value == 1.5  # type: ignore[attr-defined]
    assert text.endswith("\n")


def test_empty_families_still_parse() -> None:
    text = exposition.render(Registry([Counter("none_total", "Nothing yet.", ("key",))]))
    assert "# TYPE none_total counter" in text
    assert list(_parse(text)["none"].samples) == []  # type: ignore[attr-defined]


def test_numbers() -> None:
    assert exposition._number(3) == "3"
    assert exposition._number(2.0) == "2"
    assert exposition._number(0.25) == "0.25"
    assert exposition._number(float("inf")) == "+Inf"
    assert exposition._number(float("-inf")) == "-Inf"
    assert exposition._number(float("nan")) == "NaN"
