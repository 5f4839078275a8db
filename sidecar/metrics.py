"""The sidecar's Prometheus metrics, rendered in the text exposition format (0.0.4).

A dozen fixed series do not need a metrics library: ``prometheus_client`` costs every
session pod about a MiB of resident memory and a lock per increment on the ``/token`` hot
path. No token or identity is ever a label; every label value here is a fixed word.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import cp_token

from .holder import State, TokenHolder

__all__ = [
    "CONTENT_TYPE",
    "REQUEST_OUTCOMES",
    "Counter",
    "Histogram",
    "SidecarMetrics",
    "counter_lines",
]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
REQUEST_OUTCOMES = ("ok", "refused", "bad_request", "rejected", "unavailable", "not_allowed")
FETCH_OUTCOMES = ("ok", "transient", "rejected", "error")
# prometheus_client's default buckets, so dashboards built on them keep working
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


def format_value(value: float) -> str:
    """A sample value or ``le`` bound as Prometheus (and Go) spell it."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    escaped = (
        (k, v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")) for k, v in pairs
    )
    return "{" + ",".join(f'{k}="{v}"' for k, v in escaped) + "}"


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> Iterator[str]:
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} {kind}"
    yield from samples


def _counters(
    name: str, help_text: str, labels: Sequence[str], children: Mapping[Any, Counter]
) -> Iterator[str]:
    """A counter family: one sample per child, keyed by its label value (a tuple of values
    for several labels)."""

    def sample(key: Any, counter: Counter) -> str:
        values = key if isinstance(key, tuple) else (key,)
        pairs = list(zip(labels, values, strict=True))
        return f"{name}{_labels(pairs)} {format_value(counter.value)}"

    return _family(name, "counter", help_text, (sample(k, c) for k, c in children.items()))


def counter_lines(
    name: str, help_text: str, labels: Sequence[str], children: Mapping[Any, Counter]
) -> Iterator[str]:
    """A counter family (one sample per child, keyed by its label values), for the series
    other parts of the sidecar add through :attr:`SidecarMetrics.extra`."""
    return _counters(name, help_text, labels, children)


class Counter:
    """A monotonically increasing count (one labelled child)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative)."""
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class Histogram:
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.bounds = (*sorted(buckets), math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def samples(self, name: str) -> Iterator[str]:
        """``_bucket`` (cumulative), ``_count`` and ``_sum`` lines."""
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            total += count
            yield f'{name}_bucket{{le="{format_value(bound)}"}} {format_value(total)}'
        yield f"{name}_count {format_value(total)}"
        yield f"{name}_sum {format_value(self.sum)}"


class SidecarMetrics:
    """Counters for requests and CP fetches, plus the holder's live gauges."""

    def __init__(self, holder: TokenHolder) -> None:
        self._holder = holder
        # Children made once: the /token hot path only increments.
        self.requests = {
            (method, outcome): Counter()
            for method in ("GET", "POST", "other")
            for outcome in REQUEST_OUTCOMES
        }
        self.fetches = {outcome: Counter() for outcome in FETCH_OUTCOMES}
        self.fetch_seconds = Histogram()
        self.file_writes = {o: Counter() for o in ("ok", "error", "removed")}
        # More series, rendered after these (sealed mode's proxied calls)
        self.extra: list[Callable[[], Iterable[str]]] = []

    def request(self, method: str, outcome: str) -> None:
        """Count one /token request."""
        key = method if method in ("GET", "POST") else "other"
        self.requests[(key, outcome)].inc()

    def render(self) -> bytes:
        """Every series in the text exposition format."""
        return ("\n".join(self._lines()) + "\n").encode()

    def _lines(self) -> Iterator[str]:
        yield from _counters(
            "cp_token_sidecar_token_requests_total",
            "Requests to /token by method and outcome.",
            ("method", "outcome"),
            self.requests,
        )
        yield from _counters(
            "cp_token_sidecar_upstream_fetches_total",
            "Fetches from the CP by outcome.",
            ("outcome",),
            self.fetches,
        )
        name = "cp_token_sidecar_upstream_fetch_seconds"
        yield from _family(
            name, "histogram", "Latency of fetches from the CP.", self.fetch_seconds.samples(name)
        )
        yield from _counters(
            "cp_token_sidecar_token_file_writes_total",
            "Writes (and removals) of SIDECAR_TOKEN_FILE by outcome.",
            ("outcome",),
            self.file_writes,
        )
        name = "cp_token_sidecar_build_info"
        version = _labels([("version", cp_token.__version__)])
        yield from _family(name, "gauge", "Build information.", [f"{name}{version} 1.0"])
        yield from self._holder_lines()
        for lines in self.extra:
            yield from lines()

    def _holder_lines(self) -> Iterator[str]:
        """Read at scrape time: remaining lifetime, readiness, state, failures."""
        holder = self._holder
        remaining = holder.remaining()
        held = holder.current() is not None
        expires = -1.0 if held and remaining is None else max(0.0, remaining or 0.0)
        name = "cp_token_sidecar_token_expires_in_seconds"
        yield from _family(
            name,
            "gauge",
            "Seconds the held token has left (0 when none is held; -1 when unknown).",
            [f"{name} {format_value(expires)}"],
        )
        name = "cp_token_sidecar_ready"
        yield from _family(
            name, "gauge", "1 while an unexpired token is held.", [f"{name} {float(held)!r}"]
        )
        name = "cp_token_sidecar_token_state"
        current = holder.state
        yield from _family(
            name,
            "gauge",
            "1 for the holder's current state.",
            (f"{name}{_labels([('state', s.value)])} {float(s is current)!r}" for s in State),
        )
        name = "cp_token_sidecar_upstream_consecutive_failures"
        yield from _family(
            name,
            "gauge",
            "Failed CP fetches since the last success.",
            [f"{name} {format_value(holder.failures)}"],
        )
