"""``process_*`` read from ``/proc`` at each scrape, with the names and types every
Prometheus client library exports; left out where ``/proc`` cannot be read."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest

from cp_token.runtime.metrics import render
from cp_token.runtime.process_metrics import ReadCounter, process_families, read_proc_stat


def fake_proc(tmp_path: Path, comm: str = "python") -> Path:
    """A /proc with one process: 3 s user + 1 s system CPU at 100 ticks/s, 2,000 pages
    resident, started 50 s after a boot at 1,700,000,000."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = ["S", "1", "1", "1", "0", "-1", "0"] + ["0"] * 4
    fields += [str(3 * ticks), str(1 * ticks)] + ["0"] * 6
    fields += [str(50 * ticks), "123456789", "2000"] + ["0"] * 20
    (tmp_path / "self" / "fd").mkdir(parents=True)
    for n in range(3):
        (tmp_path / "self" / "fd" / str(n)).touch()
    (tmp_path / "self" / "stat").write_text(f"42 ({comm}) " + " ".join(fields) + "\n")
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime 1700000000\nprocesses 9\n")
    return tmp_path


@pytest.mark.parametrize("comm", ["python", "a (b) c", ") )"])
def test_the_stat_fields_are_read_after_the_command_name(tmp_path: Path, comm: str) -> None:
    stat = read_proc_stat(fake_proc(tmp_path, comm))
    assert stat is not None
    assert stat.cpu_seconds == 4.0
    assert stat.virtual_bytes == 123456789
    assert stat.resident_bytes == 2000 * os.sysconf("SC_PAGE_SIZE")
    assert stat.start_time == 1_700_000_050.0


def test_the_exposition_names_and_types_match_the_client_libraries(tmp_path: Path) -> None:
    text = render(process_families(fake_proc(tmp_path))).decode()
    page = os.sysconf("SC_PAGE_SIZE")
    assert "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 4.0\n" in text
    assert f"process_resident_memory_bytes {float(2000 * page)}\n" in text
    assert "process_virtual_memory_bytes 123456789.0\n" in text
    assert "process_start_time_seconds 1700000050.0\n" in text
    assert "process_open_fds 3.0\n" in text
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        assert f"process_max_fds {float(soft)}\n" in text


def test_an_unreadable_proc_leaves_the_families_out(tmp_path: Path) -> None:
    assert read_proc_stat(tmp_path) is None
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "stat").write_text("garbage")
    assert read_proc_stat(tmp_path) is None
    text = render(process_families(tmp_path)).decode()
    assert "process_cpu_seconds" not in text
    assert "process_resident_memory_bytes" not in text
    assert "process_open_fds" not in text


def test_this_process_reads_true() -> None:
    """The product runs on Linux (its image, CI)."""
    stat = read_proc_stat()
    assert stat is not None
    assert stat.resident_bytes > 1 << 20
    assert stat.cpu_seconds > 0
    assert time.time() - 86400 * 7 < stat.start_time <= time.time() + 1


def test_a_read_counter_is_exposed_as_a_total() -> None:
    text = render([ReadCounter("x_seconds", "help", lambda: 2.5)]).decode()
    assert text == (
        "# HELP x_seconds_total help\n# TYPE x_seconds_total counter\nx_seconds_total 2.5\n"
    )
