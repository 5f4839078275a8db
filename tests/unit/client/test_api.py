"""``api_client``, ``api_async_client`` and ``grpc_channel``: one call site for both modes.

A pod is sealed for the client when ``AMBIENT_API_URL`` or ``AMBIENT_GRPC_ADDR`` is set; then
no token is read anywhere, and ``TokenSource.from_env()`` says which helpers to use instead.
"""

from __future__ import annotations

import grpc
import httpx
import pytest

import cp_token.client
from cp_token.client import (
    TokenError,
    TokenSource,
    api_async_client,
    api_client,
    grpc_channel,
)

SEALED = {"AMBIENT_API_URL": "http://127.0.0.1:8099/upstream/api"}
GRPC_SEALED = {"AMBIENT_GRPC_ADDR": "127.0.0.1:8098"}


class Recorder:
    """A mock transport recording each request; answers 200, or a redirect for /moved."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/moved"):
            return httpx.Response(302, headers={"Location": "https://elsewhere.example/"})
        return httpx.Response(200, json={"ok": True})


def test_the_helpers_are_exported() -> None:
    for name in ("api_client", "api_async_client", "grpc_channel"):
        assert name in cp_token.client.__all__
        assert callable(getattr(cp_token.client, name))


def test_sealed_client_goes_to_the_sidecar_with_the_guard_header_and_no_token() -> None:
    seen = Recorder()
    env = {**SEALED, "BOT_TOKEN": "never-used"}
    with api_client(
        "https://ignored.example", env=env, transport=httpx.MockTransport(seen)
    ) as client:
        assert client.get("/v1/sessions", params={"a": "1"}).status_code == 200
        moved = client.get("/moved")
    request = seen.requests[0]
    assert str(request.url) == "http://127.0.0.1:8099/upstream/api/v1/sessions?a=1"
    assert request.headers["Ambient-Token-Request"] == "true"
    assert "authorization" not in request.headers
    assert moved.status_code == 302 and len(seen.requests) == 2  # not followed


def test_sealed_client_keeps_the_callers_headers() -> None:
    seen = Recorder()
    with api_client(
        env=SEALED, headers={"X-Trace": "1"}, transport=httpx.MockTransport(seen)
    ) as client:
        client.get("/x")
    assert seen.requests[0].headers["X-Trace"] == "1"
    assert seen.requests[0].headers["Ambient-Token-Request"] == "true"


async def test_sealed_async_client() -> None:
    seen = Recorder()
    async with api_async_client(env=SEALED, transport=httpx.MockTransport(seen)) as client:
        assert (await client.post("/v1/x", json={"a": 1})).status_code == 200
    request = seen.requests[0]
    assert str(request.url) == "http://127.0.0.1:8099/upstream/api/v1/x"
    assert request.headers["Ambient-Token-Request"] == "true"
    assert "authorization" not in request.headers


def test_unsealed_client_adds_the_bearer_to_base_url() -> None:
    seen = Recorder()
    env = {"BOT_TOKEN": "bot-1"}
    with api_client("https://api.example/v1/", env=env, transport=httpx.MockTransport(seen)) as c:
        c.get("sessions")
    request = seen.requests[0]
    assert str(request.url) == "https://api.example/v1/sessions"
    assert request.headers["Authorization"] == "Bearer bot-1"
    assert "ambient-token-request" not in request.headers


async def test_unsealed_async_client_uses_the_given_source() -> None:
    seen = Recorder()
    source = TokenSource(static_token="s-1")
    async with api_async_client(
        "https://api.example", source=source, env={}, transport=httpx.MockTransport(seen)
    ) as client:
        await client.get("/x")
    assert seen.requests[0].headers["Authorization"] == "Bearer s-1"


@pytest.mark.parametrize("helper", [api_client, api_async_client])
def test_unsealed_clients_need_a_base_url(helper: object) -> None:
    with pytest.raises(TokenError, match="base_url"):
        helper(env={"BOT_TOKEN": "b"})  # type: ignore[operator]
    with pytest.raises(TokenError, match="user-info"):
        helper("https://u:p@api.example", env={"BOT_TOKEN": "b"})  # type: ignore[operator]


def test_a_grpc_only_sealed_pod_has_no_http_client() -> None:
    with pytest.raises(TokenError, match="grpc_channel"):
        api_client(env=GRPC_SEALED)


def test_a_malformed_sealed_url_is_a_token_error() -> None:
    with pytest.raises(TokenError, match="AMBIENT_API_URL"):
        api_client(env={"AMBIENT_API_URL": "ftp://127.0.0.1/x"})
    with pytest.raises(TokenError, match="AMBIENT_GRPC_ADDR"):
        grpc_channel(env={"AMBIENT_GRPC_ADDR": "nope"})


@pytest.mark.parametrize("env", [SEALED, GRPC_SEALED, {**SEALED, **GRPC_SEALED}])
def test_from_env_in_a_sealed_pod_names_the_helpers(env: dict[str, str]) -> None:
    full = {**env, "AMBIENT_TOKEN_SIDECAR_URL": "http://127.0.0.1:8099/token", "BOT_TOKEN": "b"}
    with pytest.raises(TokenError) as info:
        TokenSource.from_env(full)
    message = str(info.value)
    for helper in ("api_client()", "api_async_client()", "grpc_channel()"):
        assert helper in message


def test_sealed_grpc_channel_is_plaintext_to_the_sidecar() -> None:
    channel = grpc_channel("ignored.example:443", env=GRPC_SEALED)
    try:
        assert isinstance(channel, grpc.Channel)
    finally:
        channel.close()
    with pytest.raises(TokenError, match="api_client"):
        grpc_channel(env=SEALED)


def test_unsealed_grpc_channel_needs_a_target() -> None:
    with pytest.raises(TokenError, match="target"):
        grpc_channel(env={"BOT_TOKEN": "b"})
    channel = grpc_channel("api.example:443", env={"BOT_TOKEN": "b"})
    try:
        assert isinstance(channel, grpc.Channel)
    finally:
        channel.close()
