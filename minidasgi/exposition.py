"""The Prometheus text exposition format (version 0.0.4), written by hand.

Owns turning a ``metrics.Registry`` into the text a Prometheus server scrapes: ``# HELP`` and
``# TYPE`` lines, escaped label values, cumulative histogram buckets with ``+Inf``, ``_sum``
and ``_count``. It must never do I/O or depend on a Prometheus library: the project has no
runtime dependency (the tests check the output with the reference parser).
"""

from __future__ import annotations

import math

from .metrics import Counter, Gauge, HistogramFamily, Labels, Registry

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The ``Content-Type`` of a scrape's answer."""


def render(*registries: Registry) -> str:
    """The exposition of every family of ``registries``, in order."""
    lines: list[str] = []
    for registry in registries:
        for family in registry.families:
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            if isinstance(family, HistogramFamily):
                for labels, histogram in family.samples():
                    pairs = list(zip(family.labelnames, labels, strict=True))
                    for bound, count in histogram.cumulative():
                        le = [*pairs, ("le", _number(bound))]
                        lines.append(f"{family.name}_bucket{_labels(le)} {count}")
                    lines.append(f"{family.name}_sum{_labels(pairs)} {_number(histogram.sum)}")
                    lines.append(f"{family.name}_count{_labels(pairs)} {histogram.count}")
            elif isinstance(family, (Counter, Gauge)):
                for labels, value in family.samples():
                    lines.append(
                        f"{family.name}{_series(family.labelnames, labels)} {_number(value)}"
                    )
    lines.append("")
    return "\n".join(lines)


def _series(names: Labels, values: Labels) -> str:
    return _labels(list(zip(names, values, strict=True)))


def _labels(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{name}="{_escape_value(value)}"' for name, value in pairs)
    return "{" + inner + "}"


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
