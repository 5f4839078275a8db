"""The hand-rolled JWS signer: what it signs verifies with joserfc, through the JWKS the CP
publishes, for EC (ES256) and RSA (RS256) keys; the header names the RFC 7638 kid."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws, jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import ECKey, KeySet, RSAKey

from cp_token.identity import Identity
from cp_token.minters.jwt import JwtMinter, load_keyring
from cp_token.minters.signer import JwsSigner, b64url
from cp_token.runtime.clock import FakeClock

WHO = Identity(
    "system:serviceaccount:ns-1:session-42-sa",
    extra={
        "authentication.kubernetes.io/pod-name": ("runner-42",),
        "authentication.kubernetes.io/pod-uid": ("uid-42",),
    },
)


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


KEYS = {
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def _segments(token: str) -> list[bytes]:
    return [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in token.split(".")]


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_signed_tokens_verify_with_joserfc(alg: str) -> None:
    private = KEYS[alg]
    public = (ECKey if alg == "ES256" else RSAKey).import_key(_pem(private))
    signer = JwsSigner(private, alg, public.thumbprint())
    claims = {"sub": "system:serviceaccount:ns:session-ü-sa", "exp": 2_000_000_000, "n": None}
    token = signer.sign(claims)
    decoded = jwt.decode(token, public, algorithms=[alg])
    assert decoded.claims == claims
    assert decoded.header == {"alg": alg, "kid": public.thumbprint(), "typ": "JWT"}
    signature = _segments(token)[2]
    assert len(signature) == (64 if alg == "ES256" else 256)  # raw r||s, not DER


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
async def test_minted_tokens_verify_against_the_published_jwks(alg: str) -> None:
    clock = FakeClock()
    minter = JwtMinter(
        issuer="https://cp.example",
        audience="ambient-api-server",
        ttl=600,
        clock=clock,
        key_pem=_pem(KEYS[alg]),
    )
    issued = await minter.mint(WHO)
    keys = KeySet.import_key_set(json.loads(minter.jwks_body))
    decoded = jwt.decode(issued.token, keys, algorithms=[alg])
    ring = load_keyring(_pem(KEYS[alg]))
    assert decoded.header["kid"] == ring.signer.kid
    assert decoded.claims["sub"] == WHO.username
    assert decoded.claims["pod"] == "runner-42"
    assert decoded.claims["exp"] - decoded.claims["iat"] == 600
    assert decoded.claims["jti"] == issued.jti


async def test_the_ephemeral_key_signs_verifiable_es256() -> None:
    minter = JwtMinter(
        issuer="https://cp.example", audience="api", ttl=600, clock=FakeClock(), key_pem=None
    )
    issued = await minter.mint(WHO)
    keys = KeySet.import_key_set(minter.jwks())
    assert jwt.decode(issued.token, keys, algorithms=["ES256"]).claims["aud"] == "api"


def test_a_tampered_token_does_not_verify() -> None:
    private = KEYS["ES256"]
    public = ECKey.import_key(_pem(private))
    token = JwsSigner(private, "ES256", "k").sign({"sub": "a"})
    header, _, signature = token.split(".")
    forged = f"{header}.{b64url(json.dumps({'sub': 'b'}).encode()).decode()}.{signature}"
    with pytest.raises(BadSignatureError):
        jws.deserialize_compact(forged, public, algorithms=["ES256"])


def test_mismatched_algorithms_and_curves_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot sign"):
        JwsSigner(KEYS["RS256"], "ES256", "k")
    with pytest.raises(ValueError, match="cannot sign"):
        JwsSigner(KEYS["ES256"], "RS256", "k")
    with pytest.raises(ValueError, match="P-256"):
        JwsSigner(ec.generate_private_key(ec.SECP384R1()), "ES256", "k")
