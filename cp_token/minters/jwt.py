"""The ``jwt`` minter: per-session JWTs signed by the CP, verifiable through its JWKS.

The key file holds one or more PEM private keys (EC P-256 -> ES256, RSA -> RS256); the first
signs, all are published, so a rotation is: add the new key second, wait out the JWKS
``max-age``, then move it first. ``kid`` is the RFC 7638 thumbprint, so replicas sharing a
key agree on it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

from cp_token.errors import Unavailable
from cp_token.identity import Identity, session_id_of
from cp_token.minters import DEFAULT_OPTIONS, IssuedToken, MintOptions
from cp_token.minters.signer import JwsSigner
from cp_token.runtime.clock import Clock

__all__ = ["JwtMinter", "KeyRing", "load_keyring", "session_id_of"]

log = logging.getLogger(__name__)

# A caller asking again this soon after its last token gets that token again (at most
# REUSE_FRACTION of the lifetime: it still has nearly all of it); callers remembered at most.
# Below the sidecar's 5 s between two forced fetches (POST /token, an upstream's 401 in sealed
# mode), so a forced fetch always gets a new token, never the one just rejected.
REUSE_WINDOW = 4.0
REUSE_FRACTION = 0.01
MAX_REUSABLE = 1024

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class SigningKey:
    """A private key with its algorithm and RFC 7638 ``kid``; ``jws`` signs with it."""

    key: ECKey | RSAKey
    alg: str
    kid: str
    jws: JwsSigner

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK with kid, alg and use."""
        jwk = dict(self.key.as_dict(private=False))
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


@dataclass(frozen=True)
class KeyRing:
    """Keys in file order: the first signs, every one is published."""

    keys: tuple[SigningKey, ...]

    @property
    def signer(self) -> SigningKey:
        """The signing key."""
        return self.keys[0]


def _signing_key(pem: bytes) -> SigningKey:
    private = serialization.load_pem_private_key(pem, password=None)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        if not isinstance(private.curve, ec.SECP256R1):
            raise ValueError(f"EC keys must be P-256 (got {private.curve.name})")
        key: ECKey | RSAKey = ECKey.import_key(pem)
        alg = "ES256"
    elif isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 2048:
            raise ValueError(f"RSA keys must have at least 2048 bits (got {private.key_size})")
        key = RSAKey.import_key(pem)
        alg = "RS256"
    else:
        raise ValueError("only EC P-256 (ES256) and RSA (RS256) keys are supported")
    kid = key.thumbprint()
    return SigningKey(key=key, alg=alg, kid=kid, jws=JwsSigner(private, alg, kid))


def load_keyring(raw: bytes) -> KeyRing:
    """Parse every PEM private key in ``raw``; raises ValueError naming what is wrong."""
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(raw)]
    if not blocks:
        raise ValueError("no PEM private key found")
    keys = []
    for i, block in enumerate(blocks):
        try:
            keys.append(_signing_key(block))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"key #{i + 1} does not load ({exc})") from None
    return KeyRing(keys=tuple(keys))


def ephemeral_keyring() -> KeyRing:
    """A fresh P-256 key that lives as long as the process (dev only)."""
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return KeyRing(keys=(_signing_key(pem),))


def _aud_claim(audiences: tuple[str, ...] | None) -> str | list[str] | None:
    """``aud`` as RFC 7519 writes it: one value as a string, several as a list."""
    if not audiences:
        return None
    return audiences[0] if len(audiences) == 1 else list(audiences)


class JwtMinter:
    """Signs a JWT per caller with the claims docs/reference.md lists."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        ttl: float,
        clock: Clock,
        key_pem: bytes | None = None,
        key_variable: str = "CP_TOKEN_SIGNING_KEY_FILE",
        jwks_max_age: int = 300,
        reuse: bool = True,
    ) -> None:
        self.issuer = issuer  # exactly as configured: verifiers compare issuers as strings
        self._audience = audience
        self._ttl = int(ttl)
        self._clock = clock
        self._variable = key_variable
        self.jwks_max_age = jwks_max_age
        self._problem: str | None = None
        self._ring: KeyRing | None = None
        self._jwks_body = b'{"keys":[]}'
        self.reuse_window = min(REUSE_WINDOW, ttl * REUSE_FRACTION) if reuse else 0.0
        # (username, pod) -> the last token minted with the default options, and when
        self._recent: OrderedDict[tuple[str, str | None], tuple[IssuedToken, float]] = OrderedDict()
        if key_pem is None:
            log.warning(
                "CP_TOKEN_SIGNING_KEY_FILE is unset: signing with an ephemeral key; tokens "
                "become unverifiable when this process restarts and differ between replicas"
            )
            self._install(ephemeral_keyring())
        else:
            self.reload(key_pem)

    def reload(self, key_pem: bytes) -> None:
        """Load keys from PEM bytes (a rotated Secret); a bad file keeps the last good keys."""
        try:
            ring = load_keyring(key_pem)
        except ValueError as exc:
            if self._ring is None:
                self._problem = "signing_key"  # a reason class: the probe port says no more
                log.error("%s: %s", self._variable, exc)
            else:
                log.warning("%s: new content ignored: %s", self._variable, exc)
            return
        self._install(ring)
        log.info(
            "signing keys loaded",
            extra={"fields": {"kids": [k.kid for k in ring.keys], "signing_kid": ring.signer.kid}},
        )

    def _install(self, ring: KeyRing) -> None:
        self._ring = ring
        self._problem = None
        self._recent.clear()  # from now on, tokens carry the new signing key's kid
        body = {"keys": [k.public_jwk() for k in ring.keys]}
        self._jwks_body = json.dumps(body, separators=(",", ":")).encode()

    @property
    def problem(self) -> str | None:
        """Why no key is loaded, if none is."""
        return self._problem

    async def run(self) -> None:
        """No background work (the file watcher calls :meth:`reload`)."""

    async def aclose(self) -> None:
        """Nothing to close."""

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWK Set."""
        data: dict[str, Any] = json.loads(self._jwks_body)
        return data

    @property
    def jwks_body(self) -> bytes:
        """The JWK Set, pre-rendered."""
        return self._jwks_body

    @property
    def jwks_uri(self) -> str:
        """Where the JWK Set is served (the issuer keeps its own trailing slash, if any)."""
        return f"{self.issuer.rstrip('/')}/.well-known/jwks.json"

    def openid_configuration(self) -> dict[str, Any]:
        """OIDC discovery for an API server that verifies minted tokens."""
        algs = sorted({k.alg for k in self._ring.keys}) if self._ring else []
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
        }

    @property
    def audience(self) -> str:
        """The configured ``aud`` (``CP_TOKEN_TOKEN_AUDIENCE``), used when none is asked for."""
        return self._audience

    async def mint(self, identity: Identity, options: MintOptions = DEFAULT_OPTIONS) -> IssuedToken:
        """A JWT for this caller, valid for ``CP_TOKEN_TTL`` seconds.

        ``options.audiences`` replaces ``aud`` (a string for one value, a list for several,
        RFC 7519 §4.1.3); ``options.scopes`` become a ``scope`` claim, one space-separated
        string (RFC 8693 §4.2).

        With the default options, a caller asking again within :attr:`reuse_window` seconds
        of its last token (same username and pod: the same claims) gets that token again,
        with nearly its whole lifetime left; a token exchange that narrows ``aud`` or
        ``scope`` always gets a new one.
        """
        ring = self._ring
        if ring is None:
            raise Unavailable("no signing key is loaded", reason="no_signing_key", retry_after=30)
        clock_now = self._clock.time()
        now = int(clock_now)
        if options is not DEFAULT_OPTIONS:
            return self._narrowed(ring, identity, options, now)
        key = (identity.username, identity.pod_name if identity.pod_bound else None)
        recent = self._recent.get(key)
        if recent is not None and 0 <= clock_now - recent[1] <= self.reuse_window:
            return recent[0]
        jti = new_jti()
        exp = now + self._ttl
        fixed = _fixed_claims(self.issuer, self._audience, *key)
        times = f'"iat":{now},"nbf":{now},"exp":{exp},"jti":"{jti}"'
        token = ring.signer.jws.sign_payload(f"{{{fixed},{times}}}".encode())
        issued = IssuedToken(token=token, expires_at=float(exp), jti=jti)
        if self.reuse_window > 0:
            self._remember(key, issued, clock_now)
        return issued

    def _remember(self, key: tuple[str, str | None], issued: IssuedToken, at: float) -> None:
        recent = self._recent
        recent[key] = (issued, at)
        recent.move_to_end(key)
        if len(recent) > MAX_REUSABLE:
            recent.popitem(last=False)

    def _narrowed(
        self, ring: KeyRing, identity: Identity, options: MintOptions, now: int
    ) -> IssuedToken:
        """A new token with the asked ``aud`` and ``scope`` (never reused)."""
        jti = new_jti()
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": identity.username,
            "aud": _aud_claim(options.audiences) or self._audience,
            "iat": now,
            "nbf": now,
            "exp": now + self._ttl,
            "jti": jti,
            "namespace": identity.namespace,
            "service_account": identity.service_account,
            "session_id": session_id_of(identity.service_account),
        }
        if identity.pod_bound:
            claims["pod"] = identity.pod_name
        if options.scopes:
            claims["scope"] = " ".join(options.scopes)
        token = ring.signer.jws.sign(claims)
        return IssuedToken(token=token, expires_at=float(now + self._ttl), jti=jti)


def new_jti() -> str:
    """A random (version 4) UUID as text: what ``str(uuid.uuid4())`` gives, from the same
    source (``os.urandom``), in half the time."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@functools.lru_cache(maxsize=1024)
def _fixed_claims(issuer: str, audience: str, username: str, pod: str | None) -> str:
    """The claims that do not change between two tokens of one caller, as a JSON object's
    members (no braces): ``iss``, ``sub``, ``aud``, ``namespace``, ``service_account``,
    ``session_id`` and (pod-bound callers) ``pod``. Kept for the most recent callers."""
    caller = Identity(username)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": username,
        "aud": audience,
        "namespace": caller.namespace,
        "service_account": caller.service_account,
        "session_id": session_id_of(caller.service_account),
    }
    if pod is not None:
        claims["pod"] = pod
    return json.dumps(claims, separators=(",", ":"))[1:-1]
