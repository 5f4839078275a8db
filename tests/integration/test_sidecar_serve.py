"""`sidecar.cli.serve` in this process on real loopback sockets: a dying refresh loop stops
the servers with a non-zero exit code; a busy port is one clear line and exit 1."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cp_token.client import FetchedToken, TokenRejected, TokenSource
from cp_token.settings.sidecar import SidecarSettings
from sidecar.cli import serve
from tests.integration.procs import free_port


class BrokenSource(TokenSource):
    """The CP refuses the pod, and checking the SA token file then hits a bug: the refresh
    loop itself dies (an answer never kills it: any answer is a failed fetch)."""

    async def afetch_once(
        self, min_ttl: float | None = None, *, force: bool = False
    ) -> FetchedToken:
        raise TokenRejected(403, "not a session pod", self.url)

    def sa_token_changed(self) -> bool:
        raise RuntimeError("a bug in the refresh loop")


def broken_source(tmp_path: Path) -> TokenSource:
    sa = tmp_path / "sa"
    sa.write_text("sa-token")
    return BrokenSource(cp_url="http://127.0.0.1:9/token", sa_token_file=str(sa))


async def test_a_dying_refresh_loop_exits_non_zero(tmp_path: Path) -> None:
    settings = SidecarSettings(cp_token_url="http://127.0.0.1:9/token", listen_port=free_port())
    assert await serve(settings, broken_source(tmp_path)) == 1


async def test_a_busy_port_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = SidecarSettings(cp_token_url="http://127.0.0.1:9/token", listen_port=port)
        assert await serve(settings, broken_source(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"127.0.0.1:{port}" in err
