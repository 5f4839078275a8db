"""TokenFileSink: exact mode, bare content, atomic replace in the same directory, removal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sidecar.sink import TokenFileSink


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mode", "mask"), [(0o600, 0o000), (0o640, 0o077), (0o644, 0o027)])
def test_the_mode_is_exact_whatever_the_umask(tmp_path: Path, mode: int, mask: int) -> None:
    old = os.umask(mask)
    try:
        TokenFileSink(str(tmp_path / "token"), mode).write("abc")
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "token") == mode


def test_writes_the_bare_token(tmp_path: Path) -> None:
    TokenFileSink(str(tmp_path / "token")).write("eyJ.header.sig")
    assert (tmp_path / "token").read_bytes() == b"eyJ.header.sig"


def test_replaces_atomically_through_a_temp_file_in_the_same_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "token"
    sink = TokenFileSink(str(target))
    sink.write("old")
    old_inode = target.stat().st_ino
    seen: list[tuple[str, str, bytes, bytes]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        # At the moment of the swap: the new content is complete in the temp file and the
        # reader still sees the old token.
        seen.append((src, dst, Path(src).read_bytes(), Path(dst).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    sink.write("new")
    [(src, dst, src_content, dst_content)] = seen
    assert os.path.dirname(src) == str(tmp_path)
    assert os.path.basename(src).startswith(".token.")
    assert dst == str(target)
    assert (src_content, dst_content) == (b"new", b"old")
    assert target.read_text() == "new"
    assert target.stat().st_ino != old_inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_a_failed_write_leaves_the_old_token_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "token"
    sink = TokenFileSink(str(target))
    sink.write("old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        sink.write("new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_remove_deletes_and_tolerates_absence(tmp_path: Path) -> None:
    sink = TokenFileSink(str(tmp_path / "token"))
    sink.write("abc")
    sink.remove()
    assert not (tmp_path / "token").exists()
    sink.remove()  # already gone: fine
