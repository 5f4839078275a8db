"""The API server's ServiceAccount issuer keys, and verification against them.

One component, used twice: by the ``jwks`` authenticator (the keys are how it authenticates)
and by the signature pre-check in front of every TokenReview (so a forged token costs the API
server nothing). The keys are read from the API server's own ``/openid/v1/jwks`` through the
Kubernetes client only, never from a ``jwks_uri`` elsewhere, so cluster credentials go
nowhere else.

- One fetch at a time, shared by every caller (:class:`~cp_token.runtime.singleflight.SharedCall`).
- An unknown ``kid`` triggers a re-read at once (key rotation on the API server), at most one
  a second however many unknown kids arrive; the token waits for it instead of being
  refused, and only a kid still unknown after a read that started after the token arrived
  is refused (that refusal is not remembered: the next read may publish the key).
- The set is re-read every ``max_age`` seconds in the background even when every kid is
  known; a failed read backs off (1 s doubling to 10 s).
- Signatures are verified by ``joserfc`` with an explicit allowlist, :data:`ALGORITHMS`:
  what the API server signs ServiceAccount tokens with (k8s.io/kubernetes
  pkg/serviceaccount/jwt.go: RS256 for any RSA key, ES256/ES384/ES512 for P-256/P-384/P-521
  keys; the external signer of externaljwt/plugin accepts the same four). PS*, HS* and
  ``none`` are never accepted, and a key is used only with the algorithm of its type and curve.
- The key set is an answer from upstream, so untrusted: a key that does not load, or is far
  larger than any signing key (its verification would cost the event loop), is skipped; a
  document that is not a key set is a failed fetch, never an exception in a caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from cp_token.authn.precheck import UnverifiedJWT
from cp_token.errors import Unauthenticated
from cp_token.kube.client import KubeClient, KubeDown, KubeError, KubeUnavailable
from cp_token.runtime.backoff import Backoff, Pacer
from cp_token.runtime.clock import Clock
from cp_token.runtime.singleflight import SharedCall

__all__ = [
    "ALGORITHMS",
    "UNKNOWN_KEY",
    "IssuerKeys",
    "Key",
    "KeySet",
    "SignatureCheck",
    "parse_key_set",
    "unknown_key",
    "verifies",
]

log = logging.getLogger(__name__)
# What the API server's /openid/v1/jwks produces (it answers 406 to Accept: application/json).
JWKS_MEDIA_TYPE = "application/jwk-set+json"

# The key type (and curve) each accepted algorithm verifies with.
KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}
ALGORITHMS = frozenset(KEY_TYPES)
ALGORITHM_NAMES = ", ".join(sorted(ALGORITHMS))
MIN_READ_INTERVAL = 1.0  # SPEC: an unknown kid re-reads the keys at most once a second
KEYS_MAX_AGE = 300.0  # re-read the key set this often even when every kid is known
# after a failed read (the API server down, a malformed set): 1 s, doubling up to 10 s
READ_BACKOFF = Backoff(base=1.0, cap=10.0, floor=1.0)
MAX_RSA_BITS = 16384  # far past any signing key; bounds what one verification costs
MAX_RSA_EXPONENT = 2**32  # real keys use 65537; a huge exponent makes verification slow
MAX_KEYS = 64  # an API server publishes a handful (more during rotations)

# joserfc with exactly our algorithms; sizes as large as the tokens the precheck lets through
# (its defaults would refuse the signature of an RSA key over 6,144 bits)
_REGISTRY = jws.JWSRegistry(algorithms=sorted(ALGORITHMS))
_REGISTRY.max_header_length = 4096
_REGISTRY.max_payload_length = 16 * 1024
_REGISTRY.max_signature_length = 4 * MAX_RSA_BITS // 8 // 3 + 4


@dataclass(frozen=True)
class _Failure:
    """A failed read of the key set: its error's kind, reason and (for an API server taken
    for down) how long calls are held back."""

    kind: type[KubeError]
    reason: str
    retry_after: float | None = None

    @classmethod
    def of(cls, exc: KubeError) -> _Failure:
        retry = exc.retry_after if isinstance(exc, KubeDown) else None
        return cls(type(exc), exc.reason, retry)

    def error(self) -> KubeError:
        """A fresh error of the same kind (each kind's own constructor)."""
        if issubclass(self.kind, KubeDown):
            return KubeDown(self.reason, self.retry_after or 1.0)
        return self.kind(self.reason)


@dataclass(frozen=True, slots=True)
class Key:
    """One usable public key of the API server's set: its JWK ``kty``, its curve (EC), and
    the key (imported once, when the set is fetched)."""

    key_type: str  # "RSA" or "EC"
    curve: str | None  # "P-256", "P-384" or "P-521" for EC
    public: RSAKey | ECKey

    def fits(self, alg: str) -> bool:
        """Whether this key verifies signatures of ``alg``."""
        return KEY_TYPES.get(alg) == (self.key_type, self.curve)


@dataclass(frozen=True)
class KeySet:
    """One fetched key set: keys by kid, keys without a kid, and how many could not be used."""

    by_kid: dict[str, Key] = field(default_factory=dict)
    unnamed: tuple[Key, ...] = ()
    # Keys of another type or curve that this service cannot verify with.
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
        if alg not in ALGORITHMS:
            return []
        if kid is not None:
            key = self.by_kid.get(kid)
            return [key] if key is not None and key.fits(alg) else []
        return [k for k in [*self.by_kid.values(), *self.unnamed] if k.fits(alg)]


def parse_key_set(doc: dict[str, object]) -> KeySet:
    """The usable keys of a JWKS document (RSA, or EC on P-256, P-384, P-521); never raises."""
    by_kid: dict[str, Key] = {}
    unnamed: list[Key] = []
    unusable_kids: set[str] = set()
    unusable_unnamed = 0
    raw_keys = doc.get("keys")
    for raw in raw_keys[:MAX_KEYS] if isinstance(raw_keys, list) else []:
        if not isinstance(raw, dict):
            continue
        kid = raw.get("kid") if isinstance(raw.get("kid"), str) and raw.get("kid") else None
        key = _import(raw)
        if key is None:
            if kid is None:
                unusable_unnamed += 1
            else:
                unusable_kids.add(str(kid))
        elif kid is None:
            unnamed.append(key)
        else:
            by_kid[str(kid)] = key
    return KeySet(
        by_kid=by_kid,
        unnamed=tuple(unnamed),
        unusable_kids=frozenset(unusable_kids - set(by_kid)),
        unusable_unnamed=unusable_unnamed,
    )


def _import(raw: dict[str, object]) -> Key | None:
    """A public RSA or EC key through joserfc, or None for anything this service cannot or
    will not verify with: another type or curve, a key for encryption, a malformed or
    oversized one. Only the public members are handed over (never ``d`` or ``alg``)."""
    use = raw.get("use")
    if use is not None and use != "sig":
        return None
    try:
        kty = raw.get("kty")
        if kty == "RSA":
            rsa = RSAKey.import_key({"kty": "RSA", "n": _member(raw, "n"), "e": _member(raw, "e")})
            numbers = rsa.public_key.public_numbers()
            if numbers.n.bit_length() > MAX_RSA_BITS or numbers.e > MAX_RSA_EXPONENT:
                raise ValueError("an RSA key larger than any signing key")
            return Key("RSA", None, rsa)
        crv = raw.get("crv")
        if kty == "EC" and crv in ("P-256", "P-384", "P-521"):
            members: dict[str, str | list[str]] = {
                "kty": "EC",
                "crv": str(crv),
                "x": _member(raw, "x"),
                "y": _member(raw, "y"),
            }
            return Key("EC", str(crv), ECKey.import_key(members))
    except Exception:  # untrusted bytes in a library: any failure means "skip this key"
        log.warning("skipping a key of the API server's JWKS that does not load")
    return None


def _member(raw: dict[str, object], name: str) -> str:
    """A JWK's base64url member (RFC 7518 §6) as a string; ValueError when absent or not one."""
    value = raw.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_RSA_BITS // 4:
        raise ValueError(f"{name} is missing or too long")
    return value


UNKNOWN_KEY = "unknown_key"  # a refusal with this reason is never remembered


def unknown_key() -> Unauthenticated:
    """The refusal of a token whose ``kid`` is not in a key set read after it arrived."""
    return Unauthenticated(
        "token was signed by a key the cluster does not publish", reason=UNKNOWN_KEY
    )


def verifies(token: str, keys: list[Key], alg: str) -> bool:
    """True when one of ``keys`` verifies the compact JWS ``token`` under ``alg``, through
    joserfc with the :data:`ALGORITHMS` allowlist (a key of another type never checks)."""
    usable = [key for key in keys if key.fits(alg)]
    if not usable:
        return False
    try:
        obj = jws.extract_compact(token.encode("ascii"), registry=_REGISTRY)
        if obj.headers().get("alg") != alg:
            return False
    except (JoseError, ValueError, TypeError):  # UnicodeError is a ValueError
        return False
    for key in usable:
        try:
            if jws.validate_compact(obj, key.public, registry=_REGISTRY):
                return True
        except (JoseError, ValueError, TypeError):
            continue
    return False


class IssuerKeys:
    """The API server's issuer key set: fetched once, shared, refreshed, re-read on rotation.

    - A token whose ``kid`` is not in the set makes it re-read at once (the API server may
      have rotated its key): one read in flight, shared by every caller, at most one per
      ``min_interval``. The token waits for a read that started after it arrived; only a
      ``kid`` still unknown after such a fresh read is refused.
    - The set is re-read in the background every ``max_age`` seconds.
    - A failed read (the API server down, a malformed set) is a failure with backoff: while
      the backoff holds reads back, a caller that needs a read gets the failure at once
      (the known set still answers for known kids).
    """

    def __init__(
        self,
        kube: KubeClient,
        clock: Clock,
        *,
        min_interval: float = MIN_READ_INTERVAL,
        max_age: float = KEYS_MAX_AGE,
        backoff: Backoff = READ_BACKOFF,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._kube = kube
        self._clock = clock
        self._min_interval = min_interval
        self._max_age = max_age
        self._keys: KeySet | None = None
        self._loaded_at = float("-inf")  # monotonic time the current set's read started
        self._read_at = float("-inf")  # monotonic time the last read started
        self._reads = 0  # reads started: a read is fresh for a token if it started after it
        self._pacer = Pacer(backoff, clock, rand)
        # Why the last read failed, as (type, reason): a fresh exception is raised each time,
        # so no caller's frames pile up on one shared traceback.
        # the last failed read, to raise again (as a fresh error: no traceback is kept)
        self._failure: _Failure | None = None
        self._fetch: SharedCall[KeySet] = SharedCall()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def keys(self) -> KeySet | None:
        """The current key set (None while none was ever loaded)."""
        return self._keys

    @property
    def failure(self) -> str | None:
        """Why the last read failed (None after a success or before any attempt)."""
        return None if self._failure is None else self._failure.reason

    @property
    def fetching(self) -> bool:
        """True while a read is in flight."""
        return self._fetch.running

    @property
    def fetches(self) -> int:
        """Reads started so far (tests and benchmarks)."""
        return self._reads

    def _failed(self) -> KubeError:
        if self._failure is None:
            return KubeUnavailable("jwks: the key set is not loaded yet")
        return self._failure.error()

    async def _read_after(self, seen: int) -> KeySet:
        """The set from a read started after the ``seen``-th one: the one in flight when it
        did, else a new one as soon as ``min_interval`` allows. Raises :class:`KubeError`
        when that read fails, or at once while the failure backoff holds reads back."""
        while True:
            if self._reads > seen:
                if self.fetching:
                    return await self._fetch.do(self._load)
                if self._failure is None and self._keys is not None:
                    return self._keys  # read, and successfully, since the token came
                raise self._failed()
            if self.fetching:  # started before the token came: may predate the new key
                with contextlib.suppress(KubeError):
                    await self._fetch.do(self._load)
                continue
            if self._pacer.wait() > 0:
                raise self._failed()
            wait = self._read_at + self._min_interval - self._clock.monotonic()
            if wait > 0:
                await self._clock.sleep(wait)
                continue
            return await self._fetch.do(self._load)

    def _refresh_if_stale(self) -> None:
        """Re-read the set in the background when it is older than ``max_age``."""
        now = self._clock.monotonic()
        if now - self._loaded_at < self._max_age or self.fetching:
            return
        if self._pacer.wait() > 0 or now - self._read_at < self._min_interval:
            return  # a read was tried just now (or failed recently): no task per request

        async def run() -> None:
            try:
                await self._fetch.do(self._load)
            except KubeError as exc:
                log.warning("JWKS refresh failed, keeping known keys: %s", exc.reason)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _load(self) -> KeySet:
        self._reads += 1
        started = self._read_at = self._clock.monotonic()
        try:
            doc = await self._kube.get_json("jwks", "/openid/v1/jwks", accept=JWKS_MEDIA_TYPE)
            keys = parse_key_set(doc)
            if not keys.by_kid and not keys.unnamed:
                raise KubeUnavailable("jwks: the API server's key set holds no usable key")
        except KubeError as exc:
            self._failure = _Failure.of(exc)
            self._pacer.failed()
            raise
        except Exception as exc:  # an answer nothing above foresaw: a failed read, not a crash
            reason = f"jwks: the API server's key set could not be read ({type(exc).__name__})"
            self._failure = _Failure(KubeUnavailable, reason)
            self._pacer.failed()
            raise KubeUnavailable(reason) from None
        self._keys, self._loaded_at, self._failure = keys, started, None
        self._pacer.succeeded()
        return keys

    def known(self, kid: str | None, alg: str) -> list[Key] | None:
        """The answer of :meth:`lookup` when it needs no read, else None."""
        keys = self._keys
        if keys is None:
            return None
        self._refresh_if_stale()
        found = keys.candidates(kid, alg)
        if found or kid is None or kid in keys.by_kid or alg not in ALGORITHMS:
            return found
        return None

    async def lookup(self, kid: str | None, alg: str) -> list[Key]:
        """The keys that may have signed a token with this ``kid`` and ``alg``.

        An empty list means: certainly none (the kid is not in a set read after the token
        arrived, or the alg does not fit). Raises :class:`KubeError` when it cannot tell: the
        set could not be read (or the backoff after a failed read holds reads back).
        """
        found = self.known(kid, alg)
        if found is not None:
            return found
        return (await self._read_after(self._reads)).candidates(kid, alg)

    def unknown(self, kid: str | None) -> bool:
        """Whether ``kid`` names no key of the current set (so a refusal for it is not
        remembered: the next read may publish it)."""
        keys = self._keys
        return kid is not None and (keys is None or kid not in keys.by_kid)

    async def aclose(self) -> None:
        """Cancel the read in flight and background refreshes."""
        self._fetch.cancel()
        for task in list(self._background):
            task.cancel()


class SignatureCheck:
    """The pre-check in front of TokenReview: a token whose signature does not verify
    against the API server's issuer keys is refused at no cost to the API server.

    Whenever the keys cannot be read (403, 404, the API server down or slow) the check is
    skipped and TokenReview decides; that is logged once per outage, not per request.
    Waiting for the keys (a token of a key published a moment ago waits for the re-read) is
    bounded by the caller's deadline.
    """

    def __init__(self, keys: IssuerKeys) -> None:
        self._keys = keys
        self._skipping = False
        self.skipped = 0  # checks skipped because the keys could not be read (tests, metrics)

    async def check(self, token: str, jwt: UnverifiedJWT, deadline: float) -> None:
        """Raise Unauthenticated when the signature is certainly not the API server's.

        ``deadline`` is event-loop time: the keys are waited for until then at the latest.
        """
        alg, kid = jwt.alg, jwt.kid
        try:
            keys = self._keys.known(kid, alg)
            if keys is None:
                async with asyncio.timeout_at(deadline):
                    keys = await self._keys.lookup(kid, alg)
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
                f"token algorithm is not accepted ({ALGORITHM_NAMES} only)",
                reason="bad_algorithm",
            )
        if not keys and self._keys.unknown(kid):
            raise unknown_key()
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
