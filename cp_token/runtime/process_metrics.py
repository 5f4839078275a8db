"""The standard ``process_*`` metrics for a process that does not load ``prometheus_client``
(the sidecar): the names, types and units the Prometheus client libraries export, read from
``/proc`` at each scrape, so the dashboards and alerts written for any exporter work on it.

- ``process_cpu_seconds_total`` (counter): user and system CPU time;
- ``process_resident_memory_bytes``, ``process_virtual_memory_bytes``;
- ``process_start_time_seconds``: since the Unix epoch;
- ``process_open_fds``, ``process_max_fds`` (the soft limit).

Where ``/proc`` is not there (not Linux) the families are left out, as ``prometheus_client``
leaves them out. Stdlib only.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

from cp_token.runtime.metrics import Family, Gauge, GaugeReading, Kind, Sample

__all__ = ["ProcStat", "ReadCounter", "boot_time", "process_families", "read_proc_stat"]

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class ReadCounter(Gauge):
    """A counter read when scraped (a total the kernel keeps, not one this process counts):
    exposed as ``<name>_total``."""

    kind: Kind = "counter"

    def samples(self) -> list[Sample] | None:
        """One ``_total`` sample per value read."""
        samples = super().samples()
        return None if samples is None else [s._replace(suffix="_total") for s in samples]


class ProcStat:
    """What ``/proc/<pid>/stat`` says of a process: CPU seconds, memory, start time."""

    def __init__(self, cpu_seconds: float, virtual: int, resident: int, start: float) -> None:
        self.cpu_seconds = cpu_seconds
        self.virtual_bytes = virtual
        self.resident_bytes = resident
        self.start_time = start


def boot_time(proc: Path = PROC) -> float | None:
    """The kernel's boot time (``btime`` in ``/proc/stat``, Unix seconds); None when
    unreadable. It never changes while the machine runs: read it once."""
    try:
        for line in (proc / "stat").read_bytes().splitlines():
            if line.startswith(b"btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_proc_stat(
    proc: Path = PROC, pid: str = "self", boot: float | None = None
) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed (fields after the command name, which may hold spaces and
    parentheses); ``boot`` is :func:`boot_time` (read here when not given). None when
    unreadable."""
    if boot is None:
        boot = boot_time(proc)
        if boot is None:
            return None
    try:
        raw = (proc / pid / "stat").read_bytes()
        fields = raw[raw.rindex(b")") + 2 :].split()
        # stat(5): utime 14, stime 15, starttime 22, vsize 23, rss 24 (1-based, from pid)
        utime, stime = float(fields[11]), float(fields[12])
        return ProcStat(
            cpu_seconds=(utime + stime) / _TICKS,
            virtual=int(fields[20]),
            resident=int(fields[21]) * _PAGE,
            start=boot + float(fields[19]) / _TICKS,
        )
    except (OSError, ValueError, IndexError):
        return None


def _open_fds(proc: Path) -> GaugeReading:
    try:
        return float(len(os.listdir(proc / "self" / "fd")))
    except OSError:
        return None


def _max_fds() -> GaugeReading:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else float(soft)


def process_families(proc: Path = PROC) -> list[Family]:
    """The ``process_*`` families, each read from ``proc`` when scraped (the boot time once,
    on the first scrape that finds it)."""
    boot: list[float] = []

    def stat(part: Callable[[ProcStat], float]) -> Callable[[], GaugeReading]:
        def read() -> GaugeReading:
            if not boot:
                found_boot = boot_time(proc)
                if found_boot is None:
                    return None
                boot.append(found_boot)
            found = read_proc_stat(proc, boot=boot[0])
            return None if found is None else float(part(found))

        return read

    return [
        ReadCounter(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            stat(lambda s: s.cpu_seconds),
        ),
        Gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stat(lambda s: s.virtual_bytes),
        ),
        Gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stat(lambda s: s.resident_bytes),
        ),
        Gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            stat(lambda s: s.start_time),
        ),
        Gauge("process_open_fds", "Number of open file descriptors.", lambda: _open_fds(proc)),
        Gauge("process_max_fds", "Maximum number of open file descriptors.", _max_fds),
    ]
