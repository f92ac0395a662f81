"""Read the service's ``/metrics`` and turn two scrapes into server-side step statistics.

A load step is bracketed by two scrapes; counters and histogram buckets are cumulative, so the
step's own distribution is the difference of the two. Percentiles are estimated from the
bucket counts the way Prometheus' ``histogram_quantile`` does: linear interpolation inside the
bucket holding the rank, the lower edge of the first bucket taken as 0, and the highest finite
bound when the rank falls in the ``+Inf`` bucket. Their resolution is the bucket layout (the
service's latency buckets run 0.5 ms … 1 s, see :mod:`service.metrics`).

Example:
    >>> before = parse_metrics('''
    ... # TYPE lat_seconds histogram
    ... lat_seconds_bucket{le="0.01",model="a"} 10
    ... lat_seconds_bucket{le="0.02",model="a"} 10
    ... lat_seconds_bucket{le="+Inf",model="a"} 10
    ... lat_seconds_count{model="a"} 10
    ... lat_seconds_sum{model="a"} 0.05
    ... ''')
    >>> after = parse_metrics('''
    ... # TYPE lat_seconds histogram
    ... lat_seconds_bucket{le="0.01",model="a"} 60
    ... lat_seconds_bucket{le="0.02",model="a"} 110
    ... lat_seconds_bucket{le="+Inf",model="a"} 110
    ... lat_seconds_count{model="a"} 110
    ... lat_seconds_sum{model="a"} 1.30
    ... ''')
    >>> buckets = histogram_delta(before, after, "lat_seconds", model="a")
    >>> buckets
    [(0.01, 50.0), (0.02, 100.0), (inf, 100.0)]
    >>> histogram_quantile(0.5, buckets), round(histogram_quantile(0.99, buckets), 4)
    (0.01, 0.0198)
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


class ScrapeError(RuntimeError):
    """``/metrics`` could not be read or parsed."""


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition: ``{(name, sorted labels): value}``."""
    out: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    except ValueError as e:
        raise ScrapeError(f"cannot parse the metrics text: {e}") from None
    return out


def scrape(base_url: str, timeout_s: float = 5.0) -> Samples:
    """GET ``{base_url}/metrics`` and parse it."""
    url = base_url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return parse_metrics(resp.read().decode())
    except (OSError, urllib.error.URLError) as e:
        raise ScrapeError(f"cannot scrape {url}: {e}") from None


def _matches(labels: Labels, want: Mapping[str, str]) -> bool:
    d = dict(labels)
    return all(d.get(k) == v for k, v in want.items())


def counter_delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """Increase of a counter (summed over the label sets matching ``labels``)."""
    total = 0.0
    for (n, lab), v in after.items():
        if n == name and _matches(lab, labels):
            total += v - before.get((n, lab), 0.0)
    return total


def histogram_delta(before: Samples, after: Samples, name: str,
                    **labels: str) -> list[tuple[float, float]]:
    """Cumulative bucket counts ``[(le, count), ...]`` added between two scrapes.

    Buckets of every label set matching ``labels`` are summed (for example all versions of a
    model); ``le`` ascends and ends with ``inf``.
    """
    sums: dict[float, float] = {}
    bucket = name + "_bucket"
    for (n, lab), v in after.items():
        if n != bucket or not _matches(lab, labels):
            continue
        d = dict(lab)
        le = float(d["le"])
        sums[le] = sums.get(le, 0.0) + v - before.get((n, lab), 0.0)
    return sorted(sums.items())


def histogram_count_sum(before: Samples, after: Samples, name: str,
                        **labels: str) -> tuple[float, float]:
    """(count, sum) added between two scrapes."""
    return (counter_delta(before, after, name + "_count", **labels),
            counter_delta(before, after, name + "_sum", **labels))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile (0 <= q <= 1) of cumulative buckets; None when they are empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > prev_count:
            if math.isinf(le):
                return prev_le  # beyond the last finite bound: report that bound
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = (le if not math.isinf(le) else prev_le), count
    return prev_le
