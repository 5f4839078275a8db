"""Proxy variables never route the token request (loopback servers, no fakes)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cp_token.client import TokenSource


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = json.dumps(
            {"token": "direct", "token_type": "Bearer", "expires_at": None, "expires_in": None}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[tuple[str, list[str], str, list[str]]]:
    """(cp_url, cp_hits, proxy_url, proxy_hits)"""
    started = []
    hits: list[list[str]] = [[], []]
    for recorded in hits:
        handler = type("Handler", (_Recorder,), {"hits": recorded})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        started.append(server)
    cp, proxy = (f"http://127.0.0.1:{s.server_address[1]}" for s in started)
    yield f"{cp}/token", hits[0], proxy, hits[1]
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy"])
async def test_proxy_variables_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
    servers: tuple[str, list[str], str, list[str]],
    variable: str,
) -> None:
    cp_url, cp_hits, proxy_url, proxy_hits = servers
    monkeypatch.setenv(variable, proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    source = TokenSource(sidecar_url=cp_url, deadline=2.0)
    assert source.token() == "direct"
    source.invalidate()
    assert await source.atoken() == "direct"
    await source.aclose()
    assert proxy_hits == []
    assert len(cp_hits) == 2
