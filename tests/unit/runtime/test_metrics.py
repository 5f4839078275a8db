"""The shared metric primitives and their text exposition (0.0.4): counter and histogram
semantics, gauges read at scrape time, the spelling of values and the escaping of labels
and help texts, checked line by line and with prometheus_client's own parser (also over
generated families and values)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from cp_token.runtime.metrics import (
    CONTENT_TYPE,
    MAX_SERIES,
    Counter,
    Gauge,
    Histogram,
    Registry,
    escape_help,
    escape_label_value,
    format_value,
    render,
)


def lines(*families: Any) -> list[str]:
    return render(families).decode().splitlines()


def parsed(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_values_are_spelled_as_prometheus_spells_them() -> None:
    spelled = [format_value(v) for v in (math.inf, -math.inf, math.nan, 3, 0.1, 1e-05, 2.5e20)]
    assert spelled == ["+Inf", "-Inf", "NaN", "3.0", "0.1", "1e-05", "2.5e+20"]
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_label_values_and_help_texts_are_escaped() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert escape_help('a\\b"c\nd') == 'a\\\\b"c\\nd'  # a quote stays as is in a help text
    counter = Counter("c", 'Help with \\ and "quotes"\nand a line', ("path",))
    counter.inc('C:\\dir "x"\nnext')
    assert lines(counter) == [
        '# HELP c_total Help with \\\\ and "quotes"\\nand a line',
        "# TYPE c_total counter",
        'c_total{path="C:\\\\dir \\"x\\"\\nnext"} 1.0',
    ]
    (family,) = text_string_to_metric_families(render([counter]).decode())
    assert family.documentation == 'Help with \\ and "quotes"\nand a line'
    assert family.samples[0].labels == {"path": 'C:\\dir "x"\nnext'}


def test_a_counter_counts_per_label_set_and_only_goes_up() -> None:
    counter = Counter("requests_total", "Requests", ("method", "outcome"), series=[("GET", "ok")])
    assert counter.name == "requests"  # exposed as requests_total
    assert counter.value("GET", "ok") == 0.0  # listed in series: there from the start
    counter.inc("POST", "refused")
    counter.inc("GET", "ok")
    counter["GET", "ok"].inc(2.5)
    counter.labels("GET", "ok").inc()
    assert counter.value("GET", "ok") == 4.5 and counter.value("POST", "refused") == 1.0
    assert counter.value("PUT", "ok") == 0.0  # never recorded: no series made
    assert [values for values, _ in counter.series()] == [("GET", "ok"), ("POST", "refused")]
    with pytest.raises(ValueError, match="only go up"):
        counter["GET", "ok"].inc(-1)
    with pytest.raises(ValueError, match="takes 2 label values"):
        counter.inc("GET")
    assert lines(counter) == [
        "# HELP requests_total Requests",
        "# TYPE requests_total counter",
        'requests_total{method="GET",outcome="ok"} 4.5',
        'requests_total{method="POST",outcome="refused"} 1.0',
    ]
    single = Counter("one", "One label", ("outcome",))
    single["ok"].inc()
    assert single.value("ok") == 1.0
    plain = Counter("plain", "No labels")
    assert lines(plain) == ["# HELP plain_total No labels", "# TYPE plain_total counter"]
    plain.inc()
    assert lines(plain)[-1] == "plain_total 1.0"


def test_series_creation_times_come_from_the_clock() -> None:
    now = [100.0]
    counter = Counter("c", "C", ("x",), series=[("a",)], clock=lambda: now[0])
    now[0] = 200.0
    counter.inc("b")
    assert [(values, s.created) for values, s in counter.series()] == [
        (("a",), 100.0),
        (("b",), 200.0),
    ]
    histogram = Histogram("h", "H", (1.0,), series=[()], clock=lambda: now[0])
    assert histogram.series()[0][1].created == 200.0


def test_label_sets_beyond_the_bound_are_counted_but_not_kept() -> None:
    counter = Counter("c", "C", ("x",))
    for i in range(MAX_SERIES + 10):
        counter.inc(str(i))
    assert len(counter.series()) == MAX_SERIES
    assert counter.value(str(MAX_SERIES + 1)) == 0.0


def test_histogram_buckets_are_cumulative_with_an_inf_bucket() -> None:
    histogram = Histogram("x", "Timed", (1.0, 0.1))  # sorted
    assert histogram.bounds == (0.1, 1.0, math.inf)
    assert lines(histogram) == ["# HELP x Timed", "# TYPE x histogram"]  # no series yet
    for value in (0.05, 0.1, 0.5, 3.0):  # 0.1 is on a bound: counted in that bucket
        histogram.observe(value)
    assert lines(histogram)[2:] == [
        'x_bucket{le="0.1"} 2.0',
        'x_bucket{le="1.0"} 3.0',
        'x_bucket{le="+Inf"} 4.0',
        "x_count 4.0",
        "x_sum 3.65",
    ]
    (series,) = [s for _, s in histogram.series()]
    assert series.count == 4 and series.cumulative()[-1] == (math.inf, 4)


def test_a_labelled_histogram_puts_le_last_and_nan_in_the_inf_bucket() -> None:
    histogram = Histogram("h", "H", (0.5,), ("outcome",), series=[("ok",)])
    histogram.observe(math.nan, "bad")
    assert lines(histogram)[2:] == [
        'h_bucket{outcome="ok",le="0.5"} 0.0',
        'h_bucket{outcome="ok",le="+Inf"} 0.0',
        'h_count{outcome="ok"} 0.0',
        'h_sum{outcome="ok"} 0.0',
        'h_bucket{outcome="bad",le="0.5"} 0.0',
        'h_bucket{outcome="bad",le="+Inf"} 1.0',
        'h_count{outcome="bad"} 1.0',
        'h_sum{outcome="bad"} NaN',
    ]
    samples = parsed(render([histogram]).decode())["h"].samples
    assert math.isnan(samples[-1].value)


def test_names_and_buckets_are_checked() -> None:
    for bad in (
        lambda: Counter("1bad", "x"),
        lambda: Counter("ok", "x", ("bad-label",)),
        lambda: Counter("ok", "x", ("__reserved",)),
        lambda: Counter("ok", "x", ("a", "a")),
        lambda: Histogram("h", "x", (1.0,), ("le",)),
        lambda: Histogram("h", "x", ()),
        lambda: Histogram("h", "x", (1.0, 1.0)),
        lambda: Histogram("h", "x", (math.nan,)),
    ):
        with pytest.raises(ValueError):
            bad()


def test_gauges_are_read_at_scrape_time() -> None:
    state = {"value": 1.0, "up": {"kubernetes": 1.0}}
    single = Gauge("g", "G", lambda: state["value"])  # type: ignore[arg-type,return-value]
    labelled = Gauge(
        "up",
        "Up",
        lambda: [((name,), v) for name, v in state["up"].items()],  # type: ignore[attr-defined]
        ("dependency",),
    )
    absent = Gauge("maybe", "Only when known", lambda: None)
    assert lines(single, labelled, absent) == [
        "# HELP g G",
        "# TYPE g gauge",
        "g 1.0",
        "# HELP up Up",
        "# TYPE up gauge",
        'up{dependency="kubernetes"} 1.0',
    ]
    state["value"] = math.inf
    state["up"] = {}
    assert lines(single, labelled) == [
        "# HELP g G",
        "# TYPE g gauge",
        "g +Inf",
        "# HELP up Up",
        "# TYPE up gauge",  # a labelled gauge with no series: the family, empty
    ]
    assert Gauge("n", "N", lambda: 3).values() == [((), 3.0)]


def test_a_registry_renders_in_registration_order_and_refuses_a_name_twice() -> None:
    registry = Registry()
    first = registry.register(Counter("b", "B", series=[()]))
    registry.register(Gauge("a", "A", lambda: 2.0))
    assert registry.families == [first, registry.families[1]]
    assert registry.render().decode().splitlines() == [
        "# HELP b_total B",
        "# TYPE b_total counter",
        "b_total 0.0",
        "# HELP a A",
        "# TYPE a gauge",
        "a 2.0",
    ]
    assert registry.render().endswith(b"a 2.0\n")
    with pytest.raises(ValueError, match="twice"):
        registry.register(Counter("b_total", "again"))
    assert Registry().render() == b""


label_values = st.text(max_size=20)
numbers = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=200, deadline=None)
@given(
    documentation=st.text(max_size=40).filter(lambda t: t == t.strip()),
    counts=st.lists(st.tuples(label_values, label_values), max_size=6),
    observations=st.lists(st.tuples(label_values, numbers.filter(lambda v: v >= 0)), max_size=6),
    gauge_values=st.lists(st.tuples(label_values, numbers), max_size=4, unique_by=lambda p: p[0]),
)
def test_the_exposition_parses_back_to_what_was_recorded(
    documentation: str,
    counts: list[tuple[str, str]],
    observations: list[tuple[str, float]],
    gauge_values: list[tuple[str, float]],
) -> None:
    counter = Counter("c", documentation, ("a", "b"))
    for a, b in counts:
        counter.inc(a, b)
    histogram = Histogram("h_seconds", documentation, (0.1, 1.0, 10.0), ("outcome",))
    for outcome, value in observations:
        histogram.observe(value, outcome)
    gauge = Gauge("g", documentation, lambda: [((k,), v) for k, v in gauge_values], ("k",))

    families = parsed(render([counter, histogram, gauge]).decode())

    assert families["c"].type == "counter" and families["c"].documentation == documentation
    got = {(s.labels["a"], s.labels["b"]): s.value for s in families["c"].samples}
    assert got == {(a, b): counter.value(a, b) for a, b in counts}

    hist = families["h_seconds"]
    assert hist.type == "histogram"
    for outcome in {o for o, _ in observations}:
        mine = [s for s in hist.samples if s.labels.get("outcome") == outcome]
        buckets = [s for s in mine if s.name.endswith("_bucket")]
        assert [s.labels["le"] for s in buckets] == ["0.1", "1.0", "10.0", "+Inf"]
        assert [s.value for s in buckets] == sorted(s.value for s in buckets)  # cumulative
        total = [s.value for s in mine if s.name.endswith("_count")]
        assert total == [buckets[-1].value] == [sum(1 for o, _ in observations if o == outcome)]

    read = {s.labels["k"]: s.value for s in families["g"].samples}
    assert read.keys() == {k for k, _ in gauge_values}
    for key, value in gauge_values:
        assert read[key] == value or (math.isnan(read[key]) and math.isnan(value))
