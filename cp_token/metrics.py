"""Prometheus metrics of the CP service, in a registry of their own (no globals).

No label ever carries an identity (username, pod) or a token.

Collaborators record through the narrow protocols below (:class:`KubeMetrics`,
:class:`CacheMetrics`, ...) and always receive an object: :class:`Metrics` in the service,
:data:`NO_METRICS` (records nothing) where a test builds them alone. The series are the
shared primitives of :mod:`cp_token.runtime.metrics` (plain numbers on the event loop, where
every request is recorded and ``/metrics`` is served: the hot path records a request with two
dictionary lookups and no lock); ``prometheus_client`` keeps the registry, the ``process_*``
collector, the build info and the exposition (content negotiation, OpenMetrics), reading the
primitives through :class:`SharedFamilies` at scrape time. The injector does the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Info,
    ProcessCollector,
    generate_latest,
    make_asgi_app,
)
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
from cp_token.runtime.metrics import Counter, Family, Gauge, Histogram

__all__ = [
    "LATENCY_BUCKETS",
    "NO_METRICS",
    "CacheMetrics",
    "IdPMetrics",
    "KubeMetrics",
    "Metrics",
    "NullMetrics",
    "RequestMetrics",
    "ReviewMetrics",
    "SharedFamilies",
]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


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


class SharedFamilies:
    """A ``prometheus_client`` collector over shared primitives (:mod:`cp_token.runtime.metrics`),
    exposed in the order given: each counter and histogram series with its ``_created``
    sample as the library's own metrics have, each gauge as read now (an unlabelled gauge
    that reads None is left out)."""

    def __init__(self, families: Sequence[Family], registry: CollectorRegistry) -> None:
        self._families = list(families)
        registry.register(self)

    @staticmethod
    def _empty(family: Family) -> Metric:
        labels = list(family.labelnames)
        if family.kind == "counter":
            return CounterMetricFamily(family.name, family.documentation, labels=labels)
        if family.kind == "histogram":
            return HistogramMetricFamily(family.name, family.documentation, labels=labels)
        return GaugeMetricFamily(family.name, family.documentation, labels=labels)

    def describe(self) -> list[Metric]:
        """The families, without samples (for the registry's name checks)."""
        return [self._empty(family) for family in self._families]

    def collect(self) -> list[Metric]:
        """The families with every series, read now."""
        out: list[Metric] = []
        for family in self._families:
            metric = self._empty(family)
            if isinstance(family, Counter):
                assert isinstance(metric, CounterMetricFamily)
                for values, counter in family.series():
                    metric.add_metric(values, counter.value, created=counter.created)
            elif isinstance(family, Histogram):
                assert isinstance(metric, HistogramMetricFamily)
                names = family.labelnames
                les = [floatToGoString(b) for b in family.bounds]  # type: ignore[no-untyped-call]
                for values, hist in family.series():
                    buckets = [(le, n) for le, (_, n) in zip(les, hist.cumulative(), strict=True)]
                    metric.add_metric(values, buckets, hist.sum)
                    named = dict(zip(names, values, strict=True))
                    metric.samples.append(Sample(f"{family.name}_created", named, hist.created))
            elif isinstance(family, Gauge):
                assert isinstance(metric, GaugeMetricFamily)
                read = family.values()
                if read is None:
                    continue
                for values, value in read:
                    metric.add_metric(values, value)
            out.append(metric)
        return out


class Metrics:
    """Every metric the CP exports, ``process_*`` (open file descriptors and their limit,
    memory, CPU) included."""

    def __init__(self, *, authn: str = "", minter: str = "", min_ttl: float | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_open_fds / process_max_fds and the rest, read from /proc at each scrape
        ProcessCollector(registry=r)
        # read at scrape time, from callbacks the service hands over once built (watch)
        self.ready: Callable[[], bool] = lambda: True
        self.idp_token_expiry: Callable[[], float | None] | None = None
        self.min_ttl = min_ttl
        self._reviews_in_flight = 0
        self._dependency_up: dict[str, float] = {}
        self.requests = Counter(
            "cp_token_requests", "Token requests by outcome and reason", ("outcome", "reason")
        )
        self.request_latency = Histogram(
            "cp_token_request_duration_seconds",
            "Latency of a token request",
            LATENCY_BUCKETS,
            ("outcome",),
        )
        self.kube_calls = Counter(
            "cp_token_kube_api_calls", "Kubernetes API calls by call and result", ("call", "result")
        )
        self.kube_latency = Histogram(
            "cp_token_kube_api_duration_seconds",
            "Kubernetes API call latency",
            LATENCY_BUCKETS,
            ("call",),
        )
        self.idp_calls = Counter(
            "cp_token_idp_calls", "Upstream IdP token calls by result", ("result",)
        )
        self.idp_latency = Histogram(
            "cp_token_idp_duration_seconds",
            "Upstream IdP call latency",
            LATENCY_BUCKETS,
            series=[()],
        )
        self.cache_lookups = Counter(
            "cp_token_cache_lookups", "Cache lookups by cache and result", ("cache", "result")
        )
        self.minted = Counter("cp_token_tokens_issued", "Tokens handed out")
        SharedFamilies(
            [
                Gauge(
                    "cp_token_ready",
                    "1 while this replica is ready (/readyz answers 200)",
                    lambda: 1.0 if self.ready() else 0.0,
                ),
                Gauge(
                    "cp_token_min_ttl_seconds",
                    "CP_TOKEN_MIN_TTL: no token is handed out with less lifetime left",
                    lambda: self.min_ttl,
                ),
                Gauge(
                    "cp_token_idp_token_expiry_timestamp_seconds",
                    "Unix time the upstream token the oidc minter holds expires (oidc minter, "
                    "after its first success)",
                    lambda: None if self.idp_token_expiry is None else self.idp_token_expiry(),
                ),
                self.requests,
                self.request_latency,
                self.kube_calls,
                self.kube_latency,
                self.idp_calls,
                self.idp_latency,
                self.cache_lookups,
                Gauge(
                    "cp_token_reviews_in_flight",
                    "Token reviews currently in flight",
                    lambda: float(self._reviews_in_flight),
                ),
                Gauge(
                    "cp_token_dependency_up",
                    "1 when the last call to a dependency succeeded",
                    lambda: [((name,), up) for name, up in self._dependency_up.items()],
                    ("dependency",),
                ),
                self.minted,
            ],
            r,
        )
        info = Info("cp_token_build", "Build information", registry=r)
        info.info({"version": __version__, "authn": authn, "minter": minter})

    def watch(
        self,
        *,
        ready: Callable[[], bool],
        idp_token_expiry: Callable[[], float | None] | None = None,
    ) -> None:
        """Hand over what the readiness and upstream-token gauges read at scrape time."""
        self.ready = ready
        self.idp_token_expiry = idp_token_expiry

    def kube_call(self, call: str, result: str, seconds: float) -> None:
        """Record one Kubernetes API call."""
        self.kube_calls.inc(call, result)
        self.kube_latency.observe(seconds, call)
        up = result.isdigit() and (result.startswith("2") or result == "404")
        self._dependency_up["kubernetes"] = 1.0 if up else 0.0

    def idp_call(self, result: str, seconds: float) -> None:
        """Record one IdP call."""
        self.idp_calls.inc(result)
        self.idp_latency.observe(seconds)

    def dependency(self, name: str, up: bool) -> None:
        """Record a dependency's health."""
        self._dependency_up[name] = 1.0 if up else 0.0

    def cache(self, cache: str, hit: bool) -> None:
        """Record a cache lookup."""
        self.cache_lookups.inc(cache, "hit" if hit else "miss")

    def review_started(self) -> None:
        """One more review in flight."""
        self._reviews_in_flight += 1

    def review_finished(self) -> None:
        """One review fewer in flight."""
        self._reviews_in_flight -= 1

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
