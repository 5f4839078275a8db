"""Prometheus metrics of the injector, in a registry of their own (no globals).

Labels carry only the result, never a pod, namespace or user. The series are the shared
primitives of :mod:`cp_token.runtime.metrics`, exposed through ``prometheus_client``'s
registry beside its ``process_*`` collector and the build info, as the CP's are.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Info, ProcessCollector, generate_latest

from cp_token import __version__
from cp_token.metrics import LATENCY_BUCKETS, SharedFamilies
from cp_token.runtime.metrics import Counter, Histogram

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
        every = [(result,) for result in RESULTS]  # every series exists from the start, at 0
        self.requests = Counter(
            "cp_token_inject_requests",
            "Admission requests to /mutate by result",
            ("result",),
            series=every,
        )
        self.latency = Histogram(
            "cp_token_inject_request_duration_seconds",
            "Latency of POST /mutate, as the injector measures it",
            LATENCY_BUCKETS,
            ("result",),
            series=every,
        )
        SharedFamilies([self.requests, self.latency], self.registry)
        info = Info("cp_token_inject_build", "Build information", registry=self.registry)
        info.info({"version": __version__})

    def request(self, result: str, seconds: float) -> None:
        """Record one request."""
        self.requests.inc(result)
        self.latency.observe(seconds, result)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
