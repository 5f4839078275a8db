"""The injector's metrics, in a registry of their own: every result series exists at 0 from
the start (an alert on a rate needs the series), a request counts once in the counter and the
latency histogram of its result, and the build and process families are there."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cp_token import __version__
from cp_token.inject.metrics import RESULTS, InjectMetrics
from cp_token.metrics import LATENCY_BUCKETS


def samples(metrics: InjectMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered text, parsed back as Prometheus would."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_result_is_exposed_at_zero_from_the_start() -> None:
    seen = samples(InjectMetrics())
    for result in RESULTS:
        assert seen[("cp_token_inject_requests_total", (("result", result),))] == 0
        assert seen[("cp_token_inject_request_duration_seconds_count", (("result", result),))] == 0
    assert seen[("cp_token_inject_build_info", (("version", __version__),))] == 1
    assert any(name == "process_open_fds" for name, _ in seen)


def test_a_request_counts_in_its_result_only() -> None:
    metrics = InjectMetrics()
    metrics.request("mutated", 0.004)
    metrics.request("mutated", 20.0)
    metrics.request("refused", 0.0001)
    seen = samples(metrics)
    count = {r: seen[("cp_token_inject_requests_total", (("result", r),))] for r in RESULTS}
    assert count == {"mutated": 2, "skipped": 0, "refused": 1, "error": 0}
    bucket = "cp_token_inject_request_duration_seconds_bucket"
    le = str(LATENCY_BUCKETS[2])  # 0.005
    assert seen[(bucket, (("le", le), ("result", "mutated")))] == 1
    assert seen[(bucket, (("le", "+Inf"), ("result", "mutated")))] == 2  # 20 s: past every bound
    sums = seen[("cp_token_inject_request_duration_seconds_sum", (("result", "mutated"),))]
    assert abs(sums - 20.004) < 1e-9


def test_registries_are_not_shared() -> None:
    one, other = InjectMetrics(), InjectMetrics()
    one.request("error", 0.1)
    assert samples(other)[("cp_token_inject_requests_total", (("result", "error"),))] == 0
