"""Prometheus metrics of the CP service, in a registry of their own (no globals).

No label ever carries an identity (username, pod) or a token.

Collaborators record through the narrow protocols below (:class:`KubeMetrics`,
:class:`CacheMetrics`, ...) and always receive an object: :class:`Metrics` in the service,
:data:`NO_METRICS` (records nothing) where a test builds them alone. Labelled children are
looked up once per label set and kept (a ``labels()`` call takes a lock and builds tuples;
the hot path records a request with two dictionary lookups).
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
    make_asgi_app,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp

from cp_token import __version__

__all__ = [
    "NO_METRICS",
    "CacheMetrics",
    "IdPMetrics",
    "KubeMetrics",
    "LoopCounter",
    "LoopHistogram",
    "Metrics",
    "NullMetrics",
    "RequestMetrics",
    "ReviewMetrics",
    "ServiceState",
]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Distinct label sets remembered per metric: label values are fixed words (outcomes, reasons,
# routes, status codes), never input, so this is far above what a process ever sees.
MAX_CHILDREN = 4096

M = TypeVar("M", bound=MetricWrapperBase)


class KubeMetrics(Protocol):
    """What the Kubernetes client records."""

    def kube_call(self, call: str, result: str, seconds: float) -> None:
        """One Kubernetes API call: its name, result (status code or ``error``), latency."""
        ...


class CacheMetrics(Protocol):
    """What a cache records."""

    def cache(self, cache: str, hit: bool) -> None:
        """One lookup in ``cache``."""
        ...


class ReviewMetrics(CacheMetrics, Protocol):
    """What the review cache records: lookups, and reviews in flight."""

    def review_started(self) -> None:
        """An upstream review started."""
        ...

    def review_finished(self) -> None:
        """An upstream review ended (whatever its result)."""
        ...


class IdPMetrics(Protocol):
    """What the ``oidc`` minter records."""

    def idp_call(self, result: str, seconds: float) -> None:
        """One IdP call and its result (a status code, ``timeout``, ``bad_answer``...)."""
        ...

    def dependency(self, name: str, up: bool) -> None:
        """A dependency's health after a call."""
        ...


class RequestMetrics(Protocol):
    """What the token doors record."""

    def request(self, outcome: str, reason: str, seconds: float) -> None:
        """One token request: its outcome, reason and latency."""
        ...


class NullMetrics:
    """Records nothing: the default of every collaborator built without the service."""

    def kube_call(self, call: str, result: str, seconds: float) -> None:
        """Nothing."""

    def cache(self, cache: str, hit: bool) -> None:
        """Nothing."""

    def review_started(self) -> None:
        """Nothing."""

    def review_finished(self) -> None:
        """Nothing."""

    def idp_call(self, result: str, seconds: float) -> None:
        """Nothing."""

    def dependency(self, name: str, up: bool) -> None:
        """Nothing."""

    def request(self, outcome: str, reason: str, seconds: float) -> None:
        """Nothing."""


NO_METRICS = NullMetrics()


def _children(metric: M) -> Callable[..., M]:
    """``metric.labels`` with the children kept in a dict (bounded, see MAX_CHILDREN)."""
    known: dict[tuple[str, ...], M] = {}

    def child(*values: str) -> M:
        found = known.get(values)
        if found is None:
            found = metric.labels(*values)
            if len(known) < MAX_CHILDREN:
                known[values] = found
        return found

    return child


class LoopCounter:
    """A labelled counter updated and read on the event loop only (the token path, the
    caches, the Kubernetes client all record there, and ``/metrics`` is served there): a
    dictionary of numbers, turned into a metric family when scraped. prometheus_client's
    own counter takes a lock per increment."""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], registry: CollectorRegistry
    ) -> None:
        self._name, self._doc, self._labels = name, documentation, labels
        self._values: dict[tuple[str, ...], list[float]] = {}  # labels -> [value, created]
        registry.register(self)

    def inc(self, *labels: str) -> None:
        """Add one to the series of ``labels``."""
        series = self._values.get(labels)
        if series is None:
            series = self._values[labels] = [0.0, time.time()]
        series[0] += 1

    def value(self, *labels: str) -> float:
        """The series' count so far (0 before its first increment)."""
        series = self._values.get(labels)
        return 0.0 if series is None else series[0]

    def describe(self) -> list[Metric]:
        """The family, without samples (for the registry's name checks)."""
        return [CounterMetricFamily(self._name, self._doc, labels=self._labels)]

    def collect(self) -> list[Metric]:
        """The family with every series."""
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for labels, (value, created) in list(self._values.items()):
            family.add_metric(labels, value, created=created)
        return [family]


class LoopHistogram:
    """A labelled histogram updated and read on the event loop only (see
    :class:`LoopCounter`): per series, a count per bucket and the sum."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._doc, self._labels = name, documentation, labels
        self._bounds = (*buckets, math.inf)
        self._les: list[str] = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        # labels -> counts per bucket, then the sum, then the series' creation time
        self._series: dict[tuple[str, ...], list[float]] = {}
        registry.register(self)

    def observe(self, value: float, *labels: str) -> None:
        """Count ``value`` in the series of ``labels``."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self._bounds) + 1) + [time.time()]
        series[bisect.bisect_left(self._bounds, value)] += 1
        series[-2] += value

    def describe(self) -> list[Metric]:
        """The family, without samples."""
        return [HistogramMetricFamily(self._name, self._doc, labels=self._labels)]

    def collect(self) -> list[Metric]:
        """The family with every series (cumulative buckets)."""
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labels)
        for labels, series in list(self._series.items()):
            cumulative = list(itertools.accumulate(series[:-2]))
            family.add_metric(labels, list(zip(self._les, cumulative, strict=True)), series[-2])
            named = dict(zip(self._labels, labels, strict=True))
            family.samples.append(Sample(f"{self._name}_created", named, series[-1]))
        return [family]


class ServiceState:
    """Gauges read when scraped, from callbacks the service hands over once built
    (:meth:`Metrics.watch`): readiness, ``CP_TOKEN_MIN_TTL``, and the expiry of the upstream
    token the ``oidc`` minter holds. The alerts compare them (docs/operating.md)."""

    def __init__(self, registry: CollectorRegistry, min_ttl: float | None) -> None:
        self.min_ttl = min_ttl
        self.ready: Callable[[], bool] = lambda: True
        self.idp_token_expiry: Callable[[], float | None] | None = None
        registry.register(self)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "cp_token_ready", "1 while this replica is ready (/readyz answers 200)"
            ),
            GaugeMetricFamily(
                "cp_token_min_ttl_seconds",
                "CP_TOKEN_MIN_TTL: no token is handed out with less lifetime left",
            ),
            GaugeMetricFamily(
                "cp_token_idp_token_expiry_timestamp_seconds",
                "Unix time the upstream token the oidc minter holds expires (oidc minter, "
                "after its first success)",
            ),
        )

    def describe(self) -> list[Metric]:
        """The families, without samples."""
        return list(self._families())

    def collect(self) -> list[Metric]:
        """Read the callbacks now."""
        ready, min_ttl, expiry = self._families()
        ready.add_metric([], 1.0 if self.ready() else 0.0)
        out: list[Metric] = [ready]
        if self.min_ttl is not None:
            min_ttl.add_metric([], self.min_ttl)
            out.append(min_ttl)
        expires = None if self.idp_token_expiry is None else self.idp_token_expiry()
        if expires is not None:
            expiry.add_metric([], expires)
            out.append(expiry)
        return out


class Metrics:
    """Every metric the CP exports, ``process_*`` (open file descriptors and their limit,
    memory, CPU) included."""

    def __init__(self, *, authn: str = "", minter: str = "", min_ttl: float | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_open_fds / process_max_fds and the rest, read from /proc at each scrape
        ProcessCollector(registry=r)
        self.state = ServiceState(r, min_ttl)
        self.requests = LoopCounter(
            "cp_token_requests", "Token requests by outcome and reason", ("outcome", "reason"), r
        )
        self.request_latency = LoopHistogram(
            "cp_token_request_duration_seconds",
            "Latency of a token request",
            ("outcome",),
            LATENCY_BUCKETS,
            r,
        )
        self.kube_calls = LoopCounter(
            "cp_token_kube_api_calls",
            "Kubernetes API calls by call and result",
            ("call", "result"),
            r,
        )
        self.kube_latency = LoopHistogram(
            "cp_token_kube_api_duration_seconds",
            "Kubernetes API call latency",
            ("call",),
            LATENCY_BUCKETS,
            r,
        )
        self.idp_calls = Counter(
            "cp_token_idp_calls", "Upstream IdP token calls by result", ["result"], registry=r
        )
        self.idp_latency = Histogram(
            "cp_token_idp_duration_seconds",
            "Upstream IdP call latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_lookups = LoopCounter(
            "cp_token_cache_lookups", "Cache lookups by cache and result", ("cache", "result"), r
        )
        self.reviews_in_flight = Gauge(
            "cp_token_reviews_in_flight", "Token reviews currently in flight", registry=r
        )
        self.dependency_up = Gauge(
            "cp_token_dependency_up",
            "1 when the last call to a dependency succeeded",
            ["dependency"],
            registry=r,
        )
        self.minted = LoopCounter("cp_token_tokens_issued", "Tokens handed out", (), r)
        info = Info("cp_token_build", "Build information", registry=r)
        info.info({"version": __version__, "authn": authn, "minter": minter})
        self._idp_calls = _children(self.idp_calls)
        self._dependency_up = _children(self.dependency_up)

    def watch(
        self,
        *,
        ready: Callable[[], bool],
        idp_token_expiry: Callable[[], float | None] | None = None,
    ) -> None:
        """Hand over what :class:`ServiceState` reads at scrape time."""
        self.state.ready = ready
        self.state.idp_token_expiry = idp_token_expiry

    def kube_call(self, call: str, result: str, seconds: float) -> None:
        """Record one Kubernetes API call."""
        self.kube_calls.inc(call, result)
        self.kube_latency.observe(seconds, call)
        up = result.isdigit() and (result.startswith("2") or result == "404")
        self._dependency_up("kubernetes").set(1 if up else 0)

    def idp_call(self, result: str, seconds: float) -> None:
        """Record one IdP call."""
        self._idp_calls(result).inc()
        self.idp_latency.observe(seconds)

    def dependency(self, name: str, up: bool) -> None:
        """Record a dependency's health."""
        self._dependency_up(name).set(1 if up else 0)

    def cache(self, cache: str, hit: bool) -> None:
        """Record a cache lookup."""
        self.cache_lookups.inc(cache, "hit" if hit else "miss")

    def review_started(self) -> None:
        """One more review in flight."""
        self.reviews_in_flight.inc()

    def review_finished(self) -> None:
        """One review fewer in flight."""
        self.reviews_in_flight.dec()

    def request(self, outcome: str, reason: str, seconds: float) -> None:
        """Record one token request (either door); an issued one counts as minted too."""
        self.requests.inc(outcome, reason)
        self.request_latency.observe(seconds, outcome)
        if outcome == "issued":
            self.minted.inc()

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)

    def asgi_app(self) -> ASGIApp:
        """The library's own ``/metrics`` ASGI app over this registry (content negotiation,
        OpenMetrics, gzip: all prometheus_client's)."""
        app: ASGIApp = make_asgi_app(self.registry)
        return app
