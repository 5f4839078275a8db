"""Service wiring: a dead background task stops the process; readiness comes from the minter."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from cp_token.identity import Identity
from cp_token.kube.client import KubeConnection
from cp_token.minters import IssuedToken
from cp_token.settings.cp import load_settings
from cp_token.wiring import Service, build_service


class DyingMinter:
    problem = None

    async def mint(self, identity: Identity) -> IssuedToken:
        return IssuedToken("x", None)

    async def run(self) -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("refresher crashed")

    async def aclose(self) -> None:
        pass


def static_service(tmp_path: Path) -> Service:
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"identities": []}))
    settings = load_settings(
        {
            "CP_TOKEN_AUTHN": "static",
            "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
            "CP_TOKEN_MINTER": "static",
            "CP_TOKEN_STATIC_TOKEN": "t",
        }
    )
    return build_service(settings)


async def test_dead_background_task_is_fatal(tmp_path: Path) -> None:
    base = static_service(tmp_path)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    service = Service(**{**fields, "minter": DyingMinter()})
    reasons: list[str] = []
    service.on_fatal = reasons.append
    async with service.lifespan(service.app):
        for _ in range(100):
            if reasons:
                break
            await asyncio.sleep(0.01)
    assert reasons == ["background task minter died"]


async def test_minter_without_background_work_is_not_fatal(tmp_path: Path) -> None:
    service = static_service(tmp_path)
    reasons: list[str] = []
    service.on_fatal = reasons.append
    async with service.lifespan(service.app):
        await asyncio.sleep(0.05)
    assert reasons == []
    assert service.readiness() is None


def kube_service(authn: str, **env: str) -> Service:
    settings = load_settings(
        {
            "CP_TOKEN_AUTHN": authn,
            "CP_TOKEN_MINTER": "static",
            "CP_TOKEN_STATIC_TOKEN": "t",
            **env,
        }
    )
    unreachable = KubeConnection("https://127.0.0.1:9", False, lambda: None)
    return build_service(settings, kube_connection=unreachable)


def test_with_tokenreview_a_deleted_pod_is_bounded_by_the_review_ttl() -> None:
    """SPEC: with tokenreview a deleted pod's token is refused within
    CP_TOKEN_REVIEW_CACHE_TTL; the review rests on the pod read, so the reads answer for the
    shorter of the two TTLs (with jwks, CP_TOKEN_LIVENESS_CACHE_TTL bounds it)."""
    env = {"CP_TOKEN_REVIEW_CACHE_TTL": "3", "CP_TOKEN_LIVENESS_CACHE_TTL": "10"}
    review = kube_service("tokenreview", **env)
    jwks = kube_service("jwks", **env)
    assert review.objects is not None and jwks.objects is not None
    assert (review.objects.ttl, review.objects.stale_ttl) == (3.0, 3.0)
    assert (jwks.objects.ttl, jwks.objects.stale_ttl) == (10.0, 10.0)
    default = kube_service("tokenreview")
    assert default.objects is not None and default.objects.ttl == 10.0


def test_both_kubernetes_modes_say_they_read_pods() -> None:
    for authn in ("tokenreview", "jwks"):
        needed = {(verb, res) for verb, _, res, _ in kube_service(authn).needed_permissions()}
        assert {("get", "pods"), ("get", "serviceaccounts"), ("get", "namespaces")} <= needed
