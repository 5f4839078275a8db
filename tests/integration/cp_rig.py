"""The CP in-process against the fake kube-apiserver (reached through a kubeconfig), for the
integration tests: :class:`CP` for either authenticator, :class:`JwksCP` for ``jwks`` with a
cluster-style environment, and small JWT helpers. The ``authn`` and ``make_cp`` fixtures are in
tests/integration/conftest.py."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx

from cp_token.runtime.clock import FakeClock
from cp_token.settings.cp import load_settings
from cp_token.wiring import Service, build_service
from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA
from tests.fakes.kube_apiserver import FakeKubeAPIServer

__all__ = ["CP", "RUNNER", "JwksCP", "b64", "claims_of", "good", "settings_env"]

RUNNER = f"system:serviceaccount:{SESSION_NS}:{SESSION_SA}"


def settings_env(kubeconfig: Path, authn: str, **extra: str) -> dict[str, str]:
    """The CP's environment: this kubeconfig, this authenticator, the ``jwt`` minter."""
    return {
        "KUBECONFIG": str(kubeconfig),
        "CP_TOKEN_AUTHN": authn,
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_URL": "https://cp.test/token",
        **extra,
    }


class CP:
    """An in-process CP with an httpx client on its ASGI app, on a clock tests can move."""

    def __init__(self, service: Service, clock: FakeClock) -> None:
        self.service = service
        self.clock = clock
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=service.app), base_url="http://cp"
        )

    async def get(self, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return await self.client.get("/token", headers=headers)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.service.authenticator.aclose()
        if self.service.kube is not None:
            await self.service.kube.aclose()


def b64(data: bytes) -> str:
    """Unpadded base64url, as in a JWT."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    """A JWT's claims, unverified."""
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # type: ignore[no-any-return]


class JwksCP:
    """An in-process CP with ``CP_TOKEN_AUTHN=jwks`` and a generous rate limit."""

    def __init__(self, kubeconfig: Path, **extra: str) -> None:
        self.clock = FakeClock(start=time.time())
        env = {
            "KUBECONFIG": str(kubeconfig),
            "CP_TOKEN_AUTHN": "jwks",
            "CP_TOKEN_MINTER": "jwt",
            "CP_TOKEN_URL": "https://cp.test/token",
            "CP_TOKEN_RATE_LIMIT": "1000/s,1000",
            **extra,
        }
        self.service = build_service(load_settings(env), self.clock)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.service.app), base_url="http://cp"
        )

    async def get(self, token: str) -> httpx.Response:
        return await self.client.get("/token", headers={"Authorization": f"Bearer {token}"})

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.service.authenticator.aclose()
        assert self.service.kube is not None
        await self.service.kube.aclose()


def good(k: FakeKubeAPIServer) -> str:
    """A valid pod-bound token of the session's ServiceAccount."""
    return k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
