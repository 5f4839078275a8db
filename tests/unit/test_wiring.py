"""Service wiring: a dead background task stops the process; readiness comes from the minter;
the metrics are wired to readiness, the minimum lifetime and the oidc minter's upstream token."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from cp_token.identity import Identity
from cp_token.kube.client import KubeConnection
from cp_token.minters import IssuedToken
from cp_token.settings.cp import load_settings
from cp_token.wiring import Service, build_service
from tests.fakes.idp import FakeIdP
from tests.fakes.loop import run_until, spin


class DyingMinter:
    problem = None

    async def mint(self, identity: Identity) -> IssuedToken:
        return IssuedToken("x", None)

    async def run(self) -> None:
        await asyncio.sleep(0)  # dies once running, not at its start
        raise RuntimeError("refresher crashed")

    async def aclose(self) -> None:
        pass


def static_service(tmp_path: Path, on_fatal: Callable[[str], None] | None = None) -> Service:
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
    return build_service(settings, on_fatal=on_fatal)


async def test_dead_background_task_is_fatal(tmp_path: Path) -> None:
    base = static_service(tmp_path)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    reasons: list[str] = []
    service = Service(**{**fields, "minter": DyingMinter(), "on_fatal": reasons.append})
    async with service.lifespan(service.app):
        await run_until(lambda: reasons, "the minter's death reported")
    assert reasons == ["background task minter died"]


async def test_minter_without_background_work_is_not_fatal(tmp_path: Path) -> None:
    reasons: list[str] = []
    service = static_service(tmp_path, on_fatal=reasons.append)
    async with service.lifespan(service.app):
        await spin(200)  # the static minter's run has returned by now: allowed
    assert reasons == []
    assert service.readiness() is None


ROOT = Path(__file__).resolve().parents[2]


DEV_IDENTITIES = str(ROOT / "examples" / "config" / "dev-identities.json")


def test_the_service_wires_readiness_and_min_ttl() -> None:
    settings = load_settings(
        {
            "CP_TOKEN_AUTHN": "static",
            "CP_TOKEN_STATIC_IDENTITIES_FILE": DEV_IDENTITIES,
            "CP_TOKEN_MINTER": "static",
            "CP_TOKEN_STATIC_TOKEN": "t",
            "CP_TOKEN_MIN_TTL": "120",
        }
    )
    text = build_service(settings).metrics.render().decode()
    assert "cp_token_ready 1.0" in text
    assert "cp_token_min_ttl_seconds 120.0" in text


async def test_the_oidc_minters_upstream_token_expiry_is_a_metric(idp: FakeIdP) -> None:
    from cp_token.identity import Identity

    settings = load_settings(
        {
            "CP_TOKEN_AUTHN": "static",
            "CP_TOKEN_STATIC_IDENTITIES_FILE": DEV_IDENTITIES,
            "CP_TOKEN_MINTER": "oidc",
            "OIDC_TOKEN_URL": idp.token_url,
            "OIDC_CLIENT_ID": idp.client_id,
            "OIDC_CLIENT_SECRET": idp.client_secret,
        }
    )
    service = build_service(settings)
    try:
        before = service.metrics.render().decode()
        assert "cp_token_idp_token_expiry_timestamp_seconds " not in before  # none held yet
        start = time.time()
        await service.minter.mint(Identity("system:serviceaccount:s:session-1-sa"))
        text = service.metrics.render().decode()
        m = re.search(r"^cp_token_idp_token_expiry_timestamp_seconds (\S+)$", text, re.M)
        assert m, text
        # the fake IdP's tokens live 3600 s
        assert start + 3590 <= float(m.group(1)) <= time.time() + 3600
    finally:
        await service.minter.aclose()


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
