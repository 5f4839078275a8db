"""JWS compact serialization signed with ``cryptography`` directly (RFC 7515, RFC 7518).

The ``jwt`` minter signs one token per request: going through a JOSE library costs about
as much again as the signature itself (key wrappers, header validation, registry lookups).
Here the protected header is fixed per key, so its base64url segment is computed once, and
a token is ``header.payload`` plus one OpenSSL call. ES256 signatures are converted from the
DER that OpenSSL returns to the raw 64-byte ``r || s`` that JWS requires (RFC 7518 §3.4).
Verification stays with the JOSE library (and with the consumers of the JWKS).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = ["JwsSigner", "b64url"]

_ES256_PART = 32  # P-256: r and s are 32 bytes each


def b64url(data: bytes) -> bytes:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _es256(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    algorithm = ec.ECDSA(hashes.SHA256())

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, algorithm))
        return r.to_bytes(_ES256_PART, "big") + s.to_bytes(_ES256_PART, "big")

    return sign


def _rs256(key: rsa.RSAPrivateKey) -> Callable[[bytes], bytes]:
    pad, digest = padding.PKCS1v15(), hashes.SHA256()

    def sign(data: bytes) -> bytes:
        return key.sign(data, pad, digest)

    return sign


class JwsSigner:
    """Signs JWT claims with one private key: ES256 (P-256) or RS256 (RSA)."""

    def __init__(
        self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, alg: str, kid: str
    ) -> None:
        if alg == "ES256" and isinstance(key, ec.EllipticCurvePrivateKey):
            if not isinstance(key.curve, ec.SECP256R1):
                raise ValueError(f"ES256 needs a P-256 key (got {key.curve.name})")
            self._sign = _es256(key)
        elif alg == "RS256" and isinstance(key, rsa.RSAPrivateKey):
            self._sign = _rs256(key)
        else:
            raise ValueError(f"cannot sign {alg} with a {type(key).__name__}")
        self.alg = alg
        self.kid = kid
        header = {"alg": alg, "kid": kid, "typ": "JWT"}
        self._header_segment = b64url(json.dumps(header, separators=(",", ":")).encode()) + b"."

    def sign(self, claims: Mapping[str, Any]) -> str:
        """The compact JWS ``header.payload.signature`` of ``claims`` (a JSON object)."""
        return self.sign_payload(json.dumps(claims, separators=(",", ":")).encode())

    def sign_payload(self, payload: bytes) -> str:
        """The compact JWS of ``payload``, the claims already serialized as a JSON object."""
        signing_input = self._header_segment + b64url(payload)
        return (signing_input + b"." + b64url(self._sign(signing_input))).decode("ascii")
