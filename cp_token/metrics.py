"""Prometheus metrics of the CP service, in a registry of their own (no globals).

No label ever carries an identity (username, pod) or a token.

Collaborators record through the narrow protocols below (:class:`KubeMetrics`,
:class:`CacheMetrics`, ...) and always receive an object: :class:`Metrics` in the service,
:data:`NO_METRICS` (records nothing) where a test builds them alone. Labelled children are
looked up once per label set and kept (a ``labels()`` call takes a lock and builds tuples;
the hot path records a request with two dictionary lookups).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    make_asgi_app,
)
from prometheus_client.metrics import MetricWrapperBase
from starlette.types import ASGIApp

from cp_token import __version__

__all__ = [
    "NO_METRICS",
    "CacheMetrics",
    "IdPMetrics",
    "KubeMetrics",
    "Metrics",
    "NullMetrics",
    "RequestMetrics",
    "ReviewMetrics",
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


class Metrics:
    """Every metric the CP exports."""

    def __init__(self, *, authn: str = "", minter: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cp_token_requests",
            "Token requests by outcome and reason",
            ["outcome", "reason"],
            registry=r,
        )
        self.request_latency = Histogram(
            "cp_token_request_duration_seconds",
            "Latency of GET /token",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kube_calls = Counter(
            "cp_token_kube_api_calls",
            "Kubernetes API calls by call and result",
            ["call", "result"],
            registry=r,
        )
        self.kube_latency = Histogram(
            "cp_token_kube_api_duration_seconds",
            "Kubernetes API call latency",
            ["call"],
            buckets=LATENCY_BUCKETS,
            registry=r,
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
        self.cache_lookups = Counter(
            "cp_token_cache_lookups",
            "Cache lookups by cache and result",
            ["cache", "result"],
            registry=r,
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
        self.minted = Counter("cp_token_tokens_issued", "Tokens handed out", registry=r)
        info = Info("cp_token_build", "Build information", registry=r)
        info.info({"version": __version__, "authn": authn, "minter": minter})
        self._requests = _children(self.requests)
        self._request_latency = _children(self.request_latency)
        self._kube_calls = _children(self.kube_calls)
        self._kube_latency = _children(self.kube_latency)
        self._idp_calls = _children(self.idp_calls)
        self._cache_lookups = _children(self.cache_lookups)
        self._dependency_up = _children(self.dependency_up)

    def kube_call(self, call: str, result: str, seconds: float) -> None:
        """Record one Kubernetes API call."""
        self._kube_calls(call, result).inc()
        self._kube_latency(call).observe(seconds)
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
        self._cache_lookups(cache, "hit" if hit else "miss").inc()

    def review_started(self) -> None:
        """One more review in flight."""
        self.reviews_in_flight.inc()

    def review_finished(self) -> None:
        """One review fewer in flight."""
        self.reviews_in_flight.dec()

    def request(self, outcome: str, reason: str, seconds: float) -> None:
        """Record one token request (either door); an issued one counts as minted too."""
        self._requests(outcome, reason).inc()
        self._request_latency(outcome).observe(seconds)
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
