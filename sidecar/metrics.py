"""The sidecar's Prometheus metrics, in its own registry. No token or identity as a label."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import cp_token

from .holder import State, TokenHolder

__all__ = ["REQUEST_OUTCOMES", "SidecarMetrics"]

REQUEST_OUTCOMES = ("ok", "refused", "bad_request", "rejected", "unavailable", "not_allowed")
FETCH_OUTCOMES = ("ok", "transient", "rejected", "error")


class _HolderCollector(Collector):
    """Reads the holder at scrape time: remaining lifetime, readiness, state."""

    def __init__(self, holder: TokenHolder) -> None:
        self._holder = holder

    def collect(self) -> Iterable[Metric]:
        remaining = self._holder.remaining()
        held = self._holder.current() is not None
        expires = GaugeMetricFamily(
            "cp_token_sidecar_token_expires_in_seconds",
            "Seconds the held token has left (0 when none is held; -1 when unknown).",
        )
        expires.add_metric([], -1.0 if held and remaining is None else max(0.0, remaining or 0.0))
        yield expires
        yield GaugeMetricFamily(
            "cp_token_sidecar_ready",
            "1 while an unexpired token is held.",
            value=1.0 if held else 0.0,
        )
        state = GaugeMetricFamily(
            "cp_token_sidecar_token_state", "1 for the holder's current state.", labels=["state"]
        )
        current = self._holder.state
        for s in State:
            state.add_metric([s.value], 1.0 if s is current else 0.0)
        yield state
        yield GaugeMetricFamily(
            "cp_token_sidecar_upstream_consecutive_failures",
            "Failed CP fetches since the last success.",
            value=float(self._holder.failures),
        )


class SidecarMetrics:
    """Counters for requests and CP fetches, plus the holder's live gauges."""

    def __init__(self, holder: TokenHolder, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        requests = Counter(
            "cp_token_sidecar_token_requests",
            "Requests to /token by method and outcome.",
            ["method", "outcome"],
            registry=self.registry,
        )
        # Children resolved once: the /token hot path only increments.
        self.requests = {
            (method, outcome): requests.labels(method, outcome)
            for method in ("GET", "POST", "other")
            for outcome in REQUEST_OUTCOMES
        }
        fetches = Counter(
            "cp_token_sidecar_upstream_fetches",
            "Fetches from the CP by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.fetches = {outcome: fetches.labels(outcome) for outcome in FETCH_OUTCOMES}
        self.fetch_seconds = Histogram(
            "cp_token_sidecar_upstream_fetch_seconds",
            "Latency of fetches from the CP.",
            registry=self.registry,
        )
        file_writes = Counter(
            "cp_token_sidecar_token_file_writes",
            "Writes (and removals) of SIDECAR_TOKEN_FILE by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.file_writes = {o: file_writes.labels(o) for o in ("ok", "error", "removed")}
        Info("cp_token_sidecar_build", "Build information.", registry=self.registry).info(
            {"version": cp_token.__version__}
        )
        self.registry.register(_HolderCollector(holder))

    def request(self, method: str, outcome: str) -> None:
        """Count one /token request."""
        key = method if method in ("GET", "POST") else "other"
        self.requests[(key, outcome)].inc()
