"""The sidecar's Prometheus metrics, rendered in the text exposition format (0.0.4).

A dozen fixed series do not need a metrics library: ``prometheus_client`` costs every
session pod about a MiB of resident memory and a lock per increment on the ``/token`` hot
path. The primitives and the exposition are the ones every process shares
(:mod:`cp_token.runtime.metrics`). No token or identity is ever a label; every label value
here is a fixed word.
"""

from __future__ import annotations

import cp_token
from cp_token.runtime.metrics import CONTENT_TYPE as TEXT_CONTENT_TYPE
from cp_token.runtime.metrics import Counter, Family, Gauge, Histogram, Registry
from cp_token.runtime.process_metrics import process_families

from .holder import State, TokenHolder

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "FETCH_OUTCOMES",
    "REQUEST_OUTCOMES",
    "SidecarMetrics",
]

CONTENT_TYPE = TEXT_CONTENT_TYPE.encode()
REQUEST_OUTCOMES = ("ok", "refused", "bad_request", "rejected", "unavailable", "not_allowed")
FETCH_OUTCOMES = ("ok", "transient", "rejected", "error")
# prometheus_client's default buckets, so dashboards built on them keep working
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_METHODS = ("GET", "POST", "other")


class SidecarMetrics:
    """Counters for requests, CP fetches and token file writes, plus the holder's gauges
    (read at scrape time); other parts of the sidecar :meth:`add` theirs (sealed mode's
    proxied calls)."""

    def __init__(self, holder: TokenHolder) -> None:
        self._holder = holder
        self.registry = r = Registry()
        # Every series made now: the /token hot path only increments.
        self.requests = r.register(
            Counter(
                "cp_token_sidecar_token_requests",
                "Requests to /token by method and outcome.",
                ("method", "outcome"),
                series=[(m, o) for m in _METHODS for o in REQUEST_OUTCOMES],
            )
        )
        self.fetches = r.register(
            Counter(
                "cp_token_sidecar_upstream_fetches",
                "Fetches from the CP by outcome.",
                ("outcome",),
                series=[(o,) for o in FETCH_OUTCOMES],
            )
        )
        self.fetch_seconds = r.register(
            Histogram(
                "cp_token_sidecar_upstream_fetch_seconds",
                "Latency of fetches from the CP.",
                DEFAULT_BUCKETS,
                series=[()],
            )
        )
        self.file_writes = r.register(
            Counter(
                "cp_token_sidecar_token_file_writes",
                "Writes (and removals) of SIDECAR_TOKEN_FILE by outcome.",
                ("outcome",),
                series=[(o,) for o in ("ok", "error", "removed")],
            )
        )
        build = [((cp_token.__version__,), 1.0)]
        r.register(
            Gauge("cp_token_sidecar_build_info", "Build information.", lambda: build, ("version",))
        )
        r.register(
            Gauge(
                "cp_token_sidecar_token_expires_in_seconds",
                "Seconds the held token has left (0 when none is held; -1 when unknown).",
                self._expires_in,
            )
        )
        r.register(
            Gauge(
                "cp_token_sidecar_ready",
                "1 while an unexpired token is held.",
                lambda: float(holder.current() is not None),
            )
        )
        r.register(
            Gauge(
                "cp_token_sidecar_token_state",
                "1 for the holder's current state.",
                lambda: [((s.value,), float(s is holder.state)) for s in State],
                ("state",),
            )
        )
        r.register(
            Gauge(
                "cp_token_sidecar_upstream_consecutive_failures",
                "Failed CP fetches since the last success.",
                lambda: float(holder.failures),
            )
        )
        # process_* as every exporter names them (memory per pod, CPU, file descriptors)
        for family in process_families():
            r.register(family)

    def _expires_in(self) -> float:
        remaining = self._holder.remaining()
        held = self._holder.current() is not None
        return -1.0 if held and remaining is None else max(0.0, remaining or 0.0)

    def request(self, method: str, outcome: str) -> None:
        """Count one /token request."""
        self.requests.inc(method if method in ("GET", "POST") else "other", outcome)

    def add(self, family: Family) -> None:
        """Expose ``family`` too, after the sidecar's own."""
        self.registry.register(family)

    def render(self) -> bytes:
        """Every series in the text exposition format."""
        return self.registry.render()
