"""Prometheus metrics of the CP service, in a registry of their own (no globals).

No label ever carries an identity (username, pod) or a token.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from cp_token import __version__

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


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

    def kube_call(self, call: str, result: str, seconds: float) -> None:
        """Record one Kubernetes API call."""
        self.kube_calls.labels(call, result).inc()
        self.kube_latency.labels(call).observe(seconds)
        up = result.isdigit() and (result.startswith("2") or result == "404")
        self.dependency_up.labels("kubernetes").set(1 if up else 0)

    def idp_call(self, result: str, seconds: float) -> None:
        """Record one IdP call."""
        self.idp_calls.labels(result).inc()
        self.idp_latency.observe(seconds)

    def dependency(self, name: str, up: bool) -> None:
        """Record a dependency's health."""
        self.dependency_up.labels(name).set(1 if up else 0)

    def cache(self, cache: str, hit: bool) -> None:
        """Record a cache lookup."""
        self.cache_lookups.labels(cache, "hit" if hit else "miss").inc()

    def request(self, outcome: str, reason: str, seconds: float) -> None:
        """Record one /token request."""
        self.requests.labels(outcome, reason).inc()
        self.request_latency.labels(outcome).observe(seconds)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
