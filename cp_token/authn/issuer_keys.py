"""The API server's ServiceAccount issuer keys, and verification against them.

One component, used twice: by the ``jwks`` authenticator (the keys are how it authenticates)
and by the signature pre-check in front of every TokenReview (so a forged token costs the API
server nothing). The keys are read from the API server's own ``/openid/v1/jwks`` through the
Kubernetes client only, never from a ``jwks_uri`` elsewhere, so cluster credentials go
nowhere else.

- One fetch at a time, shared by every caller (:class:`~cp_token.runtime.singleflight.SharedCall`).
- An unknown ``kid`` triggers a re-fetch (key rotation on the API server), at most one per
  ``refetch_interval`` however many unknown kids arrive.
- The set is re-read every ``max_age`` seconds in the background even when every kid is known.
- Only RS256 and ES256 are accepted: what API servers sign ServiceAccount tokens with.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cp_token.authn.precheck import UnverifiedJWT, b64url_bytes
from cp_token.errors import Unauthenticated
from cp_token.kube.client import KubeClient, KubeError, KubeUnavailable
from cp_token.runtime.clock import Clock
from cp_token.runtime.singleflight import SharedCall

__all__ = [
    "ALGORITHMS",
    "IssuerKeys",
    "Key",
    "KeySet",
    "SignatureCheck",
    "parse_key_set",
    "verifies",
]

log = logging.getLogger(__name__)

# What the API server's /openid/v1/jwks produces (it answers 406 to Accept: application/json).
JWKS_MEDIA_TYPE = "application/jwk-set+json"
ALGORITHMS = frozenset({"RS256", "ES256"})
KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
REFETCH_INTERVAL = 10.0  # at most one fetch per window for unknown kids
KEYS_MAX_AGE = 300.0  # re-read the key set this often even when every kid is known
RETRY_INTERVAL = 1.0  # while no key set was ever loaded, retry a failed fetch this often
KEY_WAIT = 1.0  # the pre-check waits at most this long for the keys, then TokenReview decides

ES256_SIGNATURE_BYTES = 64  # r || s, 32 bytes each (RFC 7518 §3.4)
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
_ECDSA = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True, slots=True)
class Key:
    """One usable public key of the API server's set: its JWK ``kty`` and the key object
    (imported once, when the set is fetched)."""

    key_type: str  # "RSA" or "EC" (P-256)
    public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class KeySet:
    """One fetched key set: keys by kid, keys without a kid, and how many could not be used."""

    by_kid: dict[str, Key] = field(default_factory=dict)
    unnamed: tuple[Key, ...] = ()
    # Keys of another type or curve (e.g. P-384) that this service cannot verify with.
    unusable_kids: frozenset[str] = frozenset()
    unusable_unnamed: int = 0

    def can_judge(self, kid: str | None, alg: str) -> bool:
        """False when the token may be signed by a key this set holds but cannot use."""
        if alg not in ALGORITHMS:
            return not self.unusable_kids and not self.unusable_unnamed
        if kid is None:
            return not self.unusable_kids and not self.unusable_unnamed
        return kid not in self.unusable_kids

    def candidates(self, kid: str | None, alg: str) -> list[Key]:
        """The keys that could have signed a token with this ``kid`` and ``alg``."""
        kty = KEY_TYPES.get(alg)
        if kty is None:
            return []
        if kid is not None:
            key = self.by_kid.get(kid)
            return [key] if key is not None and key.key_type == kty else []
        return [k for k in [*self.by_kid.values(), *self.unnamed] if k.key_type == kty]


def parse_key_set(doc: dict[str, object]) -> KeySet:
    """The usable RS256/ES256 keys of a JWKS document (RSA, or EC on P-256)."""
    by_kid: dict[str, Key] = {}
    unnamed: list[Key] = []
    unusable_kids: set[str] = set()
    unusable_unnamed = 0
    raw_keys = doc.get("keys")
    for raw in raw_keys if isinstance(raw_keys, list) else []:
        if not isinstance(raw, dict):
            continue
        kid = raw.get("kid") if isinstance(raw.get("kid"), str) and raw.get("kid") else None
        key = _import(raw)
        if key is None:
            if kid is None:
                unusable_unnamed += 1
            else:
                unusable_kids.add(kid)
        elif kid is None:
            unnamed.append(key)
        else:
            by_kid[kid] = key
    return KeySet(
        by_kid=by_kid,
        unnamed=tuple(unnamed),
        unusable_kids=frozenset(unusable_kids - set(by_kid)),
        unusable_unnamed=unusable_unnamed,
    )


def _import(raw: dict[str, object]) -> Key | None:
    """An RSA or P-256 EC public key, or None for anything this service cannot verify with."""
    try:
        if raw.get("kty") == "RSA":
            n, e = _jwk_int(raw, "n"), _jwk_int(raw, "e")
            return Key("RSA", rsa.RSAPublicNumbers(e, n).public_key())
        if raw.get("kty") == "EC" and raw.get("crv") == "P-256":
            x, y = _jwk_int(raw, "x"), _jwk_int(raw, "y")
            return Key("EC", ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key())
    except (ValueError, TypeError):  # a malformed key in the API server's set: skip it
        log.warning("skipping a key of the API server's JWKS that does not load")
    return None


def _jwk_int(raw: dict[str, object], name: str) -> int:
    """A JWK's base64url-encoded unsigned integer member (RFC 7518 §6); ValueError if not."""
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is missing")
    return int.from_bytes(b64url_bytes(value), "big")


def verifies(token: str, keys: list[Key], alg: str) -> bool:
    """True when one of ``keys`` verifies the compact JWS ``token`` under ``alg``
    (``cryptography`` directly, with key objects imported once per key set)."""
    signing_input, _, encoded = token.rpartition(".")
    try:
        signature = b64url_bytes(encoded)
    except ValueError:
        return False
    data = signing_input.encode("ascii", "replace")
    if alg == "ES256":
        if len(signature) != ES256_SIGNATURE_BYTES:
            return False
        half = ES256_SIGNATURE_BYTES // 2
        signature = encode_dss_signature(
            int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
        )
    return any(_verifies_with(key, signature, data, alg) for key in keys)


def _verifies_with(key: Key, signature: bytes, data: bytes, alg: str) -> bool:
    public = key.public
    try:
        if alg == "RS256" and isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, _PKCS1, _SHA256)
        elif alg == "ES256" and isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, _ECDSA)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


class IssuerKeys:
    """The API server's issuer key set: fetched once, shared, refreshed, re-read on rotation."""

    def __init__(
        self,
        kube: KubeClient,
        clock: Clock,
        *,
        refetch_interval: float = REFETCH_INTERVAL,
        max_age: float = KEYS_MAX_AGE,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        self._kube = kube
        self._clock = clock
        self._refetch_interval = refetch_interval
        self._max_age = max_age
        self._retry_interval = retry_interval
        self._keys: KeySet | None = None
        self._loaded_at = float("-inf")  # monotonic time the current set's fetch started
        self._attempt_at = float("-inf")  # monotonic time of the last fetch attempt
        # Why the last fetch failed, as (type, reason): a fresh exception is raised each time,
        # so no caller's frames pile up on one shared traceback.
        self._failure: tuple[type[KubeError], str] | None = None
        self._fetch: SharedCall[KeySet] = SharedCall()
        self._background: set[asyncio.Task[None]] = set()
        self.fetches = 0  # for tests and benchmarks

    @property
    def keys(self) -> KeySet | None:
        """The current key set (None while none was ever loaded)."""
        return self._keys

    @property
    def failure(self) -> str | None:
        """Why the last fetch failed (None after a success or before any attempt)."""
        return None if self._failure is None else self._failure[1]

    @property
    def fetching(self) -> bool:
        """True while a fetch is in flight."""
        return self._fetch.running

    def _failed(self) -> KubeError:
        kind, reason = self._failure or (KubeUnavailable, "jwks: the key set is not loaded yet")
        return kind(reason)

    async def _refresh(self) -> KeySet | None:
        """Start or join a fetch when one is allowed now; None when it is too soon.

        Raises :class:`KubeError` when the fetch fails. A new fetch is allowed every
        ``refetch_interval`` once a set is loaded, every ``retry_interval`` before that; one
        already in flight is always joined.
        """
        if not self.fetching:
            interval = self._refetch_interval if self._keys is not None else self._retry_interval
            now = self._clock.monotonic()
            if now - self._attempt_at < interval:
                return None
            self._attempt_at = now
        return await self._fetch.do(self._load)

    def _refresh_if_stale(self) -> None:
        """Re-read the set in the background when it is older than ``max_age``."""
        now = self._clock.monotonic()
        if now - self._loaded_at < self._max_age or self.fetching:
            return
        if now - self._attempt_at < self._refetch_interval:
            return  # a refresh was tried (and failed) just now: no task per request

        async def run() -> None:
            try:
                await self._refresh()
            except KubeError as exc:
                log.warning("JWKS refresh failed, keeping known keys: %s", exc.reason)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _load(self) -> KeySet:
        self.fetches += 1
        started = self._clock.monotonic()
        try:
            doc = await self._kube.get_json("jwks", "/openid/v1/jwks", accept=JWKS_MEDIA_TYPE)
            keys = parse_key_set(doc)
            if not keys.by_kid and not keys.unnamed:
                raise KubeUnavailable("jwks: the API server's key set holds no RS256/ES256 key")
        except KubeError as exc:
            self._failure = (type(exc), exc.reason)
            raise
        self._keys, self._loaded_at, self._failure = keys, started, None
        return keys

    def known(self, kid: str | None, alg: str) -> list[Key] | None:
        """The answer of :meth:`lookup` when it needs no fetch, else None."""
        keys = self._keys
        if keys is None:
            return None
        self._refresh_if_stale()
        found = keys.candidates(kid, alg)
        if found or kid is None or kid in keys.by_kid:
            return found
        return None

    async def lookup(self, kid: str | None, alg: str) -> list[Key]:
        """The keys that may have signed a token with this ``kid`` and ``alg``.

        An empty list means: certainly none (the kid is not in a set fetched successfully
        within ``refetch_interval``, or the alg does not fit). Raises :class:`KubeError` when
        it cannot tell: no set could be loaded, or the kid is unknown and the re-fetch failed.
        """
        found = self.known(kid, alg)
        if found is not None:
            return found
        if self._keys is None:
            keys = await self._refresh()
            if keys is None:
                raise self._failed()
            found = self.known(kid, alg)
            if found is not None:
                return found
        fresh = await self._refresh()  # an unseen kid: the API server may have rotated keys
        if fresh is None:  # fetched (or tried) within the window: the last answer stands
            if self._failure is not None:
                raise self._failed()
            return []
        return fresh.candidates(kid, alg)

    async def aclose(self) -> None:
        """Cancel the fetch in flight and background refreshes."""
        self._fetch.cancel()
        for task in list(self._background):
            task.cancel()


class SignatureCheck:
    """The pre-check in front of TokenReview: a token whose signature does not verify
    against the API server's issuer keys is refused at no cost to the API server.

    Whenever the keys cannot be read (403, 404, the API server down or slow) the check is
    skipped and TokenReview decides; that is logged once per outage, not per request.
    Waiting for the keys is bounded by the caller's deadline and by ``max_wait``.
    """

    def __init__(self, keys: IssuerKeys, *, max_wait: float = KEY_WAIT) -> None:
        self._keys = keys
        self._max_wait = max_wait
        self._skipping = False
        self.skipped = 0  # checks skipped because the keys could not be read (tests, metrics)

    async def check(self, token: str, jwt: UnverifiedJWT, deadline: float) -> None:
        """Raise Unauthenticated when the signature is certainly not the API server's.

        ``deadline`` is event-loop time: the keys are waited for until then at the latest.
        """
        alg, kid = jwt.alg, jwt.kid
        wait = max(0.0, min(deadline - asyncio.get_running_loop().time(), self._max_wait))
        try:
            keys = self._keys.known(kid, alg)
            if keys is None:
                keys = await asyncio.wait_for(self._keys.lookup(kid, alg), timeout=wait)
        except TimeoutError:
            self._skip("the API server did not answer in time")
            return
        except KubeError as exc:
            self._skip(exc.reason)
            return
        key_set = self._keys.keys
        if key_set is None or not key_set.can_judge(kid, alg):
            return
        self._recovered()
        if alg not in ALGORITHMS:
            raise Unauthenticated(
                "token algorithm is not accepted (RS256 or ES256 only)", reason="bad_algorithm"
            )
        if not verifies(token, keys, alg):
            raise Unauthenticated(
                "token signature does not verify against the cluster's issuer keys",
                reason="bad_signature",
            )

    async def aclose(self) -> None:
        """Stop background key refreshes."""
        await self._keys.aclose()

    def _skip(self, why: str) -> None:
        self.skipped += 1
        if not self._skipping:
            self._skipping = True
            log.warning(
                "the API server's issuer keys (/openid/v1/jwks) cannot be read (%s): token "
                "signatures are not pre-checked, TokenReview decides until they can",
                why,
            )

    def _recovered(self) -> None:
        if self._skipping:
            self._skipping = False
            log.info("the API server's issuer keys are readable again: signatures are pre-checked")
