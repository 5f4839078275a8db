"""Prometheus metrics of the injector, in a registry of their own (no globals).

Labels carry only the result, never a pod, namespace or user.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)

from cp_token import __version__
from cp_token.metrics import LATENCY_BUCKETS

__all__ = ["RESULTS", "InjectMetrics"]

# mutated / skipped / refused: the decision; error: a body that is not an AdmissionReview v1
# (400, 405, 413) or a failure of the injector itself.
RESULTS = ("mutated", "skipped", "refused", "error")


class InjectMetrics:
    """Requests to ``/mutate`` by result, and their latency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # process_open_fds / process_max_fds and the rest (the file-descriptor alert)
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "cp_token_inject_requests",
            "Admission requests to /mutate by result",
            ["result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cp_token_inject_request_duration_seconds",
            "Latency of POST /mutate, as the injector measures it",
            ["result"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for result in RESULTS:  # every series exists from the start, at 0
            self.requests.labels(result)
            self.latency.labels(result)
        info = Info("cp_token_inject_build", "Build information", registry=self.registry)
        info.info({"version": __version__})

    def request(self, result: str, seconds: float) -> None:
        """Record one request."""
        self.requests.labels(result).inc()
        self.latency.labels(result).observe(seconds)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
