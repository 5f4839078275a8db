"""``*_FILE`` values: read at start (a mistake names the variable), re-read on a change of
content (a Secret volume's ``..data`` symlink swap included), the last good value kept."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from cp_token.runtime.errors import ConfigError
from cp_token.runtime.filewatch import FileWatcher, WatchedFile


def parse_int(raw: bytes) -> int:
    return int(raw.decode().strip())


def secret_volume(root: Path, content: str, generation: int) -> Path:
    """Lay out a Secret volume as the kubelet does: key -> ..data/key, ..data -> a dated
    directory; a new generation swaps the ..data symlink atomically."""
    dated = root / f"..2026_12_07_{generation}"
    dated.mkdir()
    (dated / "value").write_text(content)
    tmp = root / "..data_tmp"
    tmp.symlink_to(dated.name)
    os.replace(tmp, root / "..data")
    key = root / "value"
    if not key.is_symlink():
        key.symlink_to("..data/value")
    return key


def test_a_file_is_read_at_start(tmp_path: Path) -> None:
    path = tmp_path / "n"
    path.write_text("7\n")
    watched = WatchedFile("X_FILE", str(path), parse_int)
    assert watched.value == 7 and watched.get() == 7


@pytest.mark.parametrize("content", [None, "not a number"])
def test_a_bad_file_at_start_names_its_variable(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "n"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        WatchedFile("X_FILE", str(path), parse_int)
    assert err.value.variable == "X_FILE"
    assert "\n" not in str(err.value)


def test_a_symlink_swap_is_seen_and_subscribers_told(tmp_path: Path) -> None:
    key = secret_volume(tmp_path, "1", 1)
    seen: list[int] = []
    watched = WatchedFile("X_FILE", str(key), parse_int)
    watched.subscribe(seen.append)
    assert watched.check() is False  # nothing changed
    secret_volume(tmp_path, "2", 2)
    assert watched.check() is True
    assert watched.value == 2 and seen == [2]


def test_an_invalid_or_vanished_file_keeps_the_last_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "n"
    path.write_text("1")
    watched = WatchedFile("X_FILE", str(path), parse_int)
    path.write_text("garbage")
    with caplog.at_level(logging.WARNING):
        assert watched.check() is False
    assert watched.value == 1 and "invalid" in caplog.text
    assert watched.check() is False  # the same bad bytes are not reported twice
    path.unlink()
    assert watched.check() is False and watched.value == 1
    path.write_text("3")
    assert watched.check() is True and watched.value == 3


def test_the_watcher_checks_every_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("1")
    b.write_text("1")
    watcher = FileWatcher(interval=60)
    wa = watcher.add(WatchedFile("A_FILE", str(a), parse_int))
    watcher.add(WatchedFile("B_FILE", str(b), parse_int))
    assert len(watcher) == 2
    a.write_text("5")
    assert watcher.check_all() == 1
    assert wa.value == 5


def test_a_watched_file_tells_a_subscriber_built_later(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_text("one")
    watched = WatchedFile("VALUE_FILE", str(path), bytes.decode)
    heard: list[str] = []
    watched.subscribe(heard.append)
    assert watched.get() == "one"
    path.write_text("two")
    assert watched.check() is True
    assert heard == ["two"] and watched.get() == "two"
