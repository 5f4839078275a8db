"""The client library and `cp-token get` against real servers on loopback: the sidecar as a
process, the fake CP over plain HTTP and over TLS."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cp_token.client import TokenAuth, TokenError, TokenRejected, TokenSource
from tests.integration.fake_cp import FakeCP
from tests.integration.procs import run_cmd, sidecar_serve

GET = [sys.executable, "-m", "cp_token", "get"]


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa-token"
    path.write_text("sa-token")
    return path


@pytest.fixture
def cp_mode() -> str:
    return "ok"


@pytest.fixture
def cp(cp_mode: str) -> Iterator[FakeCP]:
    with FakeCP(sa_token="sa-token") as server:
        server.mode = cp_mode  # before any sidecar starts
        yield server


@pytest.fixture
def sidecar_url(cp: FakeCP, sa_file: Path, tmp_path: Path) -> Iterator[str]:
    proc, base = sidecar_serve(cp.url, sa_file, tmp_path / "sidecar.log")
    try:
        proc.wait_http(f"{base}/healthz")
        yield f"{base}/token"
    finally:
        proc.kill()


def test_get_through_the_sidecar(cp: FakeCP, sidecar_url: str) -> None:
    result = run_cmd(GET, {"AMBIENT_TOKEN_SIDECAR_URL": sidecar_url, "BOT_TOKEN": "nope"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in cp.issued


def test_get_directly_from_the_cp(cp: FakeCP, sa_file: Path) -> None:
    env = {"AMBIENT_CP_TOKEN_URL": cp.url, "AMBIENT_SA_TOKEN_FILE": str(sa_file)}
    result = run_cmd(GET, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in cp.issued


@pytest.mark.parametrize("cp_mode", ["forbidden"])
def test_get_reports_a_refusal_relayed_by_the_sidecar(cp: FakeCP, sidecar_url: str) -> None:
    started = time.monotonic()
    result = run_cmd(GET, {"AMBIENT_TOKEN_SIDECAR_URL": sidecar_url})
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert cp.description in result.stderr
    assert time.monotonic() - started < 10  # refused at once, not retried


async def test_library_through_the_sidecar_sync_and_async(cp: FakeCP, sidecar_url: str) -> None:
    source = TokenSource.from_env({"AMBIENT_TOKEN_SIDECAR_URL": sidecar_url})
    token = source.token()
    assert token in cp.issued
    assert await source.atoken() == token  # cached
    source.invalidate(token)
    assert await source.atoken() in cp.issued
    await source.aclose()


def test_token_auth_against_a_protected_api(cp: FakeCP, sa_file: Path) -> None:
    source = TokenSource(cp_url=cp.url, sa_token_file=str(sa_file))
    revoked: set[str] = set()

    def api(request: httpx.Request) -> httpx.Response:
        bearer = request.headers["Authorization"].removeprefix("Bearer ")
        ok = bearer in cp.issued and bearer not in revoked
        return httpx.Response(200 if ok else 401)

    with httpx.Client(auth=TokenAuth(source), transport=httpx.MockTransport(api)) as client:
        assert client.get("https://api.example/").status_code == 200
        revoked.add(source.token())
        assert client.get("https://api.example/").status_code == 200  # fresh token, retried
    assert len(cp.issued) == 2
    source.close()


def test_tls_with_the_configured_ca(tmp_path: Path, sa_file: Path) -> None:
    with FakeCP(sa_token="sa-token", tls=True) as cp:
        ca = tmp_path / "ca.pem"
        ca.write_bytes(cp.server.ca_pem)
        trusted = TokenSource.from_env(
            {
                "AMBIENT_CP_TOKEN_URL": cp.url,
                "AMBIENT_SA_TOKEN_FILE": str(sa_file),
                "AMBIENT_CP_CA_FILE": str(ca),
            }
        )
        assert trusted.token() in cp.issued
        untrusted = TokenSource(cp_url=cp.url, sa_token_file=str(sa_file))
        started = time.monotonic()
        with pytest.raises(TokenError, match="AMBIENT_CP_CA_FILE") as err:
            untrusted.token()
        assert not isinstance(err.value, TokenRejected)
        assert time.monotonic() - started < 5  # a trust problem is not retried
        trusted.close()
        untrusted.close()
