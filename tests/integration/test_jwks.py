"""``CP_TOKEN_AUTHN=jwks``: forgeries, issuer rules, key rotation and the unknown-kid flood."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fixtures import SESSION_NS, SESSION_POD
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.cp_rig import JwksCP, b64, claims_of, good


@pytest.fixture
async def cp(kubeconfig: Path) -> AsyncIterator[JwksCP]:
    c = JwksCP(kubeconfig)
    yield c
    await c.aclose()


async def test_alg_none_and_hmac_with_the_public_key_are_refused(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP
) -> None:
    claims = claims_of(good(kube_apiserver))
    payload = b64(json.dumps(claims).encode())
    none_token = f"{b64(json.dumps({'alg': 'none'}).encode())}.{payload}.c2ln"
    assert (await cp.get(none_token)).status_code == 401
    # HS256 "signed" with the RSA public key (the classic algorithm-confusion forgery)
    jwk = kube_apiserver.jwks()["keys"][0]
    head = b64(json.dumps({"alg": "HS256", "kid": jwk["kid"]}).encode())
    secret = json.dumps(jwk).encode()
    sig = b64(hmac.new(secret, f"{head}.{payload}".encode(), hashlib.sha256).digest())
    resp = await cp.get(f"{head}.{payload}.{sig}")
    assert resp.status_code == 401
    assert "algorithm" in resp.json()["error_description"]


@pytest.mark.parametrize(
    ("change", "reason_word"),
    [
        ({"iss": "https://evil.example"}, "issuer"),
        ({"nbf": time.time() + 3600, "iat": time.time() + 3600}, "not valid yet"),
    ],
)
async def test_claim_checks(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP, change: dict[str, Any], reason_word: str
) -> None:
    claims = {**claims_of(good(kube_apiserver)), **change}
    resp = await cp.get(kube_apiserver.sign_claims(claims))
    assert resp.status_code == 401
    assert reason_word in resp.json()["error_description"]


async def test_forged_signature_from_another_key(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP
) -> None:
    token = good(kube_apiserver)
    other = FakeKubeAPIServer()  # never started: only its key is used
    forged = other.sign_claims(claims_of(token), header={"kid": kube_apiserver.signing_kid})
    assert (await cp.get(forged)).status_code == 401


async def test_key_rotation_on_the_api_server(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP
) -> None:
    assert (await cp.get(good(kube_apiserver))).status_code == 200
    kube_apiserver.rotate_signing_key("ES256")
    cp.clock.advance(11)  # past the refetch window
    resp = await cp.get(good(kube_apiserver))  # new kid: one coalesced re-fetch
    assert resp.status_code == 200, resp.text


async def test_unknown_kid_flood_costs_at_most_one_fetch_a_second(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP
) -> None:
    """Every unknown kid waits for a key read that started after it came (a rotation must
    not be refused), but reads stay at most one per second of the CP's clock, however many
    kids arrive (before: one per 10 s window, and a new key was refused meanwhile)."""
    assert (await cp.get(good(kube_apiserver))).status_code == 200
    kube_apiserver.reset_counts()
    cp.clock.advance(11)
    claims = claims_of(good(kube_apiserver))
    forged = [
        kube_apiserver.sign_claims({**claims, "jti": str(i)}, header={"kid": f"forged-{i}"})
        for i in range(200)
    ]
    start = cp.clock.monotonic()
    results = await asyncio.gather(*(cp.get(t) for t in forged))
    assert {r.status_code for r in results} == {401}
    assert {r.json()["error_description"] for r in results} == {
        "token was signed by a key the cluster does not publish"
    }
    elapsed = cp.clock.monotonic() - start  # the fake clock: every wait moved it
    assert 1 <= kube_apiserver.calls("jwks") <= 1 + elapsed
    assert kube_apiserver.calls("tokenreviews") == 0


async def test_issuer_rotation_list(kube_apiserver: FakeKubeAPIServer, kubeconfig: Path) -> None:
    old = good(kube_apiserver)
    kube_apiserver.set_issuer("https://new-issuer.example", also_accept=[kube_apiserver.issuer])
    new = good(kube_apiserver)
    c = JwksCP(
        kubeconfig,
        CP_TOKEN_SA_ISSUER="https://kubernetes.default.svc.cluster.local,https://new-issuer.example",
    )
    try:
        assert (await c.get(old)).status_code == 200
        assert (await c.get(new)).status_code == 200
        assert kube_apiserver.calls("openid-configuration") == 0  # explicit list: no discovery
    finally:
        await c.aclose()


async def test_deleted_pod_stops_working_within_liveness_ttl(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP
) -> None:
    token = good(kube_apiserver)
    assert (await cp.get(token)).status_code == 200
    kube_apiserver.delete_pod(SESSION_NS, SESSION_POD)
    cp.clock.advance(10.5)  # CP_TOKEN_LIVENESS_CACHE_TTL defaults to 10
    assert (await cp.get(token)).status_code == 401


async def test_no_cluster_scoped_permission_needed(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP
) -> None:
    for verb, group, resource in [("create", "authentication.k8s.io", "tokenreviews")]:
        kube_apiserver.deny(verb, group, resource)
    assert (await cp.get(good(kube_apiserver))).status_code == 200
    assert kube_apiserver.calls("tokenreviews") == 0
