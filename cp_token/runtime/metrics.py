"""Metric primitives every process shares, and the Prometheus text exposition (0.0.4).

A counter, a histogram with fixed buckets, and a gauge read from a callback at scrape time,
each a *family*: a name, its help text, its label names and one series per set of label
values. The series are plain numbers changed on the event loop (every process records and
serves ``/metrics`` there): no lock per increment, no metrics library loaded. The sidecar
renders them itself with :class:`Registry` (``prometheus_client`` costs each sidecar pod about
1 MiB); the CP and the injector hand them to their ``prometheus_client`` registry through an
adapter (``cp_token.metrics.SharedFamilies``), beside its process collector.

Rules the exposition follows: a counter named ``x`` is exposed as ``x_total`` (a trailing
``_total`` in the given name is dropped, as ``prometheus_client`` does); a histogram's
buckets are cumulative, with ``le`` last among the labels and a ``+Inf`` bucket that counts
every observation; values are spelled as Prometheus (and Go) spell them (``+Inf``, ``-Inf``,
``NaN``); label values escape backslash, double quote and line feed, help texts backslash
and line feed. Series given in ``series`` exist from the start at zero; any other appears at
its first record. Label values should be fixed words (outcomes, reasons, routes), never
input: beyond :data:`MAX_SERIES` label sets per family, new ones are counted but not kept.

Stdlib only, and nothing of ours: every process (the client's sidecar included) imports it.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal, NamedTuple, Protocol, TypeAlias, TypeVar

__all__ = [
    "CONTENT_TYPE",
    "MAX_SERIES",
    "Counter",
    "CounterSeries",
    "Family",
    "Gauge",
    "GaugeReading",
    "Histogram",
    "HistogramSeries",
    "Registry",
    "Sample",
    "escape_help",
    "escape_label_value",
    "format_value",
    "render",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_SERIES = 4096

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[str, ...]
# what a gauge's callback returns: one value (None: no sample now), or (label values, value)
# pairs for a labelled gauge
GaugeReading: TypeAlias = float | Iterable[tuple[Labels, float]] | None

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def format_value(value: float) -> str:
    """A sample value or ``le`` bound as Prometheus (and Go) spell it."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    """A label value for the text format: backslash, double quote and line feed escaped."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escape_help(text: str) -> str:
    """A help text for the text format: backslash and line feed escaped."""
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _check_names(name: str, labels: Sequence[str], reserved: tuple[str, ...] = ()) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")
    for label in labels:
        if not _LABEL.fullmatch(label) or label.startswith("__") or label in reserved:
            raise ValueError(f"invalid label name {label!r} for {name}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"repeated label name for {name}")


class Sample(NamedTuple):
    """One line of the exposition: the family's name plus ``suffix``, labels, value."""

    suffix: str
    labels: tuple[tuple[str, str], ...]
    value: float


class Family(Protocol):
    """What :func:`render` (and the CP's adapter) reads of a primitive."""

    @property
    def name(self) -> str:
        """The family's name (a counter's without ``_total``)."""

    @property
    def documentation(self) -> str:
        """Its help text."""

    @property
    def kind(self) -> Kind:
        """``counter``, ``gauge`` or ``histogram``."""

    @property
    def labelnames(self) -> Labels:
        """Its label names, in exposition order."""

    def samples(self) -> list[Sample] | None:
        """Its samples now; None when the family is not exposed at all (a gauge without a
        value)."""


class CounterSeries:
    """One series of a counter: its value and when it was created (Unix time)."""

    __slots__ = ("created", "value")

    def __init__(self, created: float) -> None:
        self.value = 0.0
        self.created = created

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative)."""
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class Counter:
    """A counter family: a count per set of label values, only ever going up."""

    kind: Kind = "counter"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        series: Iterable[Labels] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name.removesuffix("_total")
        _check_names(self.name, labelnames)
        self.documentation = documentation
        self.labelnames: Labels = tuple(labelnames)
        self._clock = clock
        self._series: dict[Labels, CounterSeries] = {}
        for values in series:
            self.labels(*values)

    def labels(self, *values: str) -> CounterSeries:
        """The series of these label values (made at its first use)."""
        found = self._series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes {len(self.labelnames)} label values")
            found = CounterSeries(self._clock())
            if len(self._series) < MAX_SERIES:
                self._series[values] = found
        return found

    def __getitem__(self, key: str | Labels) -> CounterSeries:
        """``counter["ok"]`` or ``counter["GET", "ok"]``: :meth:`labels`."""
        return self.labels(key) if isinstance(key, str) else self.labels(*key)

    def inc(self, *values: str) -> None:
        """Add one to the series of these label values (the hot path: one lookup)."""
        found = self._series.get(values)
        if found is None:
            found = self.labels(*values)
        found.value += 1

    def value(self, *values: str) -> float:
        """The series' count so far (0 before its first increment)."""
        found = self._series.get(values)
        return 0.0 if found is None else found.value

    def series(self) -> list[tuple[Labels, CounterSeries]]:
        """Every series kept, in the order they were made."""
        return list(self._series.items())

    def samples(self) -> list[Sample]:
        """One ``_total`` sample per series."""
        names = self.labelnames
        return [
            Sample("_total", tuple(zip(names, values, strict=True)), s.value)
            for values, s in self._series.items()
        ]


class HistogramSeries:
    """One series of a histogram: a count per bucket (not cumulative), the sum of the
    observations, and when it was created."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...], created: float) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = created

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is at least it (NaN: ``+Inf``)."""
        index = bisect.bisect_left(self._bounds, value) if value == value else -1
        self.counts[index] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, count of observations <= le)`` per bucket, ``+Inf`` last."""
        total, out = 0, []
        for bound, count in zip(self._bounds, self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)


class Histogram:
    """A histogram family: observations counted into fixed ``le`` buckets, per set of label
    values."""

    kind: Kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
        *,
        series: Iterable[Labels] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_names(name, labelnames, reserved=("le",))
        bounds = sorted(float(b) for b in buckets if b != math.inf)
        if not bounds or any(math.isnan(b) for b in bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct numbers")
        self.name = name
        self.documentation = documentation
        self.labelnames: Labels = tuple(labelnames)
        self.bounds: tuple[float, ...] = (*bounds, math.inf)
        self._clock = clock
        self._series: dict[Labels, HistogramSeries] = {}
        for values in series:
            self.labels(*values)

    def labels(self, *values: str) -> HistogramSeries:
        """The series of these label values (made at its first use)."""
        found = self._series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes {len(self.labelnames)} label values")
            found = HistogramSeries(self.bounds, self._clock())
            if len(self._series) < MAX_SERIES:
                self._series[values] = found
        return found

    def observe(self, value: float, *values: str) -> None:
        """Count ``value`` in the series of these label values (the hot path: one lookup,
        :meth:`HistogramSeries.observe` inlined)."""
        found = self._series.get(values)
        if found is None:
            found = self.labels(*values)
        found.counts[bisect.bisect_left(self.bounds, value) if value == value else -1] += 1
        found.sum += value

    def series(self) -> list[tuple[Labels, HistogramSeries]]:
        """Every series kept, in the order they were made."""
        return list(self._series.items())

    def samples(self) -> list[Sample]:
        """Per series: cumulative ``_bucket`` samples (``le`` last), ``_count``, ``_sum``."""
        out: list[Sample] = []
        for values, s in self._series.items():
            pairs = tuple(zip(self.labelnames, values, strict=True))
            cumulative = s.cumulative()
            for bound, count in cumulative:
                out.append(Sample("_bucket", (*pairs, ("le", format_value(bound))), count))
            out.append(Sample("_count", pairs, cumulative[-1][1]))
            out.append(Sample("_sum", pairs, s.sum))
        return out


class Gauge:
    """A gauge family read when scraped: ``read`` returns the value (None: no sample, and
    the family is left out), or for a labelled gauge ``(label values, value)`` pairs."""

    kind: Kind = "gauge"

    def __init__(
        self,
        name: str,
        documentation: str,
        read: Callable[[], GaugeReading],
        labelnames: Sequence[str] = (),
    ) -> None:
        _check_names(name, labelnames)
        self.name = name
        self.documentation = documentation
        self.labelnames: Labels = tuple(labelnames)
        self._read = read

    def values(self) -> list[tuple[Labels, float]] | None:
        """What ``read`` says now, as ``(label values, value)`` pairs (None: left out)."""
        reading = self._read()
        if reading is None:
            return None
        if isinstance(reading, int | float):
            return [((), float(reading))]
        return [(tuple(values), float(value)) for values, value in reading]

    def samples(self) -> list[Sample] | None:
        """One sample per value read."""
        read = self.values()
        if read is None:
            return None
        names = self.labelnames
        return [Sample("", tuple(zip(names, v, strict=True)), value) for v, value in read]


def _lines(family: Family) -> Iterator[str]:
    samples = family.samples()
    if samples is None:
        return
    name = family.name
    exposed = f"{name}_total" if family.kind == "counter" else name
    yield f"# HELP {exposed} {escape_help(family.documentation)}"
    yield f"# TYPE {exposed} {family.kind}"
    for suffix, labels, value in samples:
        if labels:
            pairs = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
            yield f"{name}{suffix}{{{pairs}}} {format_value(value)}"
        else:
            yield f"{name}{suffix} {format_value(value)}"


def render(families: Iterable[Family]) -> bytes:
    """The families in the text exposition format 0.0.4 (:data:`CONTENT_TYPE`)."""
    lines = [line for family in families for line in _lines(family)]
    return ("\n".join(lines) + "\n").encode() if lines else b""


F = TypeVar("F", bound=Family)


class Registry:
    """The families a process exposes, in the order they were registered."""

    def __init__(self) -> None:
        self._families: list[Family] = []
        self._names: set[str] = set()

    def register(self, family: F) -> F:
        """Add ``family`` (a name taken twice is a ValueError); returns it."""
        if family.name in self._names:
            raise ValueError(f"metric {family.name} is registered twice")
        self._names.add(family.name)
        self._families.append(family)
        return family

    @property
    def families(self) -> list[Family]:
        """Every family, in registration order."""
        return list(self._families)

    def render(self) -> bytes:
        """Every family in the text exposition format 0.0.4."""
        return render(self._families)
