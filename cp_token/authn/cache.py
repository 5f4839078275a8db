"""The review cache in front of every authenticator.

- A bearer token over 16 KiB is refused unparsed; then (outside ``static`` authn) the
  unverified precheck refuses what cannot be a ServiceAccount token, and the signature
  pre-check refuses what the API server's issuer keys did not sign: neither costs the API
  server anything.
- Successful reviews are reused for ``ttl`` seconds from the review's start, never past the
  token's own ``exp`` nor past the reads the review rests on (``Identity.cache_until``).
- Stale-if-error: a review is kept for ``stale_ttl`` seconds (``CP_TOKEN_REVIEW_CACHE_TTL``)
  from its start, never past the token's ``exp`` nor past ``Identity.stale_until``, and past
  its own reuse it stands in only while the API server is down: at once while the Kubernetes
  client takes it for down (the review then goes on without the request, as the backoff's
  probe, when a call may go), or when a new review fails for want of it (unreachable, 5xx,
  429, the request's budget gone). Any real answer wins.
- Failed reviews are remembered for a few seconds as a :class:`Refusal` (plain values: no
  exception, traceback, request or token), and each replay raises a fresh exception; a
  token refused only because its key is not (yet) published is not remembered.
- Concurrent requests with the same token share one review (singleflight).
- Reviews in flight are capped (``max_in_flight``), and no single caller (source address, or
  unverified ``sub``) holds more than a small share of the slots; a request waits at most
  ``queue_wait`` for the keys and a slot, and is answered within ``queue_wait + call_timeout``
  whatever the API server does.
- Both caches are bounded in entries and bytes.

Keys are SHA-256 hashes of the token, never the token.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from dataclasses import dataclass
from typing import Protocol

from cp_token.authn import DecodedReviewer, ReadyReviewer, Reviewer
from cp_token.authn.fairness import FairSlots
from cp_token.authn.issuer_keys import UNKNOWN_KEY, SignatureCheck
from cp_token.authn.precheck import MAX_TOKEN_BYTES, UnverifiedJWT, precheck
from cp_token.errors import InternalError, Unauthenticated, Unavailable
from cp_token.identity import SHARED_EXTRA, Identity, token_hash
from cp_token.metrics import NO_METRICS, ReviewMetrics
from cp_token.runtime.bounded import BoundedCache, bounded_tlru, bounded_ttl, text_bytes
from cp_token.runtime.clock import Clock
from cp_token.runtime.singleflight import Singleflight

__all__ = ["ANSWER_WITHIN", "CachedAuthenticator", "Refusal", "identity_size"]

log = logging.getLogger(__name__)

NEGATIVE_TTL = 5.0
QUEUE_WAIT = 2.0  # SPEC: beyond CP_TOKEN_MAX_REVIEWS a request waits at most 2 s, then 503
CALL_TIMEOUT = 10.0  # SPEC: every Kubernetes API call gives up after 10 s
ANSWER_MARGIN = 0.5  # answer up to this much before queue_wait + call_timeout: the 503 is in time
# SPEC: while the API server hangs, /token answers 503 within 12 s; this is every request's
# budget for the Kubernetes API (its review and then its label reads), from its start.
ANSWER_WITHIN = QUEUE_WAIT + CALL_TIMEOUT - ANSWER_MARGIN
CALLER_SHARE = 8  # one caller holds at most 1/8 of the review slots
MAX_ENTRIES = 50_000
MAX_BYTES = 24 * 1024 * 1024  # about 15,000 identities
MAX_NEGATIVE_ENTRIES = 20_000
MAX_NEGATIVE_BYTES = 8 * 1024 * 1024


class Upstream(Protocol):
    """What the review cache needs to know of the API server (the Kubernetes client)."""

    @property
    def down(self) -> bool:
        """Whether the API server is taken for down (a call failed, none answered since)."""

    @property
    def may_call(self) -> bool:
        """Whether a call made now would go to the API server (not held back)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A failed review as plain values; :meth:`error` makes a fresh exception each time."""

    unavailable: bool
    description: str
    reason: str
    retry_after: float = 5.0

    @classmethod
    def of(cls, exc: Unauthenticated | Unavailable) -> Refusal:
        """The values of a refusal, without the exception (and its traceback)."""
        if isinstance(exc, Unavailable):
            return cls(True, exc.description, exc.reason, exc.retry_after)
        return cls(False, exc.description, exc.reason)

    def error(self) -> Unauthenticated | Unavailable:
        """A new exception for this refusal."""
        if self.reason == INTERNAL.reason:
            return InternalError(self.description)
        if self.unavailable:
            return Unavailable(self.description, reason=self.reason, retry_after=self.retry_after)
        return Unauthenticated(self.description, reason=self.reason)


INTERNAL = Refusal.of(InternalError("the token service failed to review the token"))


# What a review entry costs besides its own strings: the key (a SHA-256 in hex), the
# Identity, the cache's bookkeeping; per ``extra`` item and per group. Measured with
# tracemalloc (bench/profile_memory.py); group names, ``extra`` keys and node values are
# interned by the reviewers, so one copy serves every entry.
ENTRY_OVERHEAD = 500
EXTRA_ITEM_OVERHEAD = 130
GROUP_OVERHEAD = 8
REFUSAL_OVERHEAD = 400

# (identity, reused until, kept for stale-if-error until): monotonic times
Entry = tuple[Identity, float, float]


def _identity_size(entry: Entry) -> int:
    return identity_size(entry[0])


def identity_size(identity: Identity) -> int:
    """The estimated bytes a cached identity holds (its entry's overhead included)."""
    size = ENTRY_OVERHEAD + EXTRA_ITEM_OVERHEAD * len(identity.extra)
    size += GROUP_OVERHEAD * len(identity.groups)
    size += text_bytes(identity.username, identity.uid, identity.service_account)
    for key, values in identity.extra.items():
        if key not in SHARED_EXTRA:
            size += text_bytes(*values)
    return size


def _refusal_size(refusal: Refusal) -> int:
    return REFUSAL_OVERHEAD + text_bytes(refusal.description)


class CachedAuthenticator:
    """Precheck, cache, coalesce and fairly cap calls to a :class:`Reviewer`."""

    def __init__(
        self,
        reviewer: Reviewer,
        *,
        clock: Clock,
        audiences: tuple[str, ...],
        ttl: float,
        stale_ttl: float | None = None,
        upstream: Upstream | None = None,
        max_in_flight: int,
        jwt_precheck: bool = True,
        signature_check: SignatureCheck | None = None,
        queue_wait: float = QUEUE_WAIT,
        call_timeout: float = CALL_TIMEOUT,
        caller_share: int | None = None,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        metrics: ReviewMetrics = NO_METRICS,
    ) -> None:
        self._reviewer = reviewer
        self._review_decoded = (
            reviewer.review_decoded if isinstance(reviewer, DecodedReviewer) else None
        )
        self._review_ready = reviewer.review_ready if isinstance(reviewer, ReadyReviewer) else None
        self._clock = clock
        self._audiences = audiences
        self._ttl = ttl
        # without an upstream to be down there is no stale-if-error
        self._stale_ttl = ttl if upstream is None or stale_ttl is None else max(ttl, stale_ttl)
        self._upstream = upstream
        self._background: set[asyncio.Task[Identity | Refusal]] = set()
        self._jwt_precheck = jwt_precheck
        self._signature = signature_check
        self._queue_wait = queue_wait
        self.answer_within = queue_wait + call_timeout - min(ANSWER_MARGIN, call_timeout / 10)
        """Seconds from a request's start within which it is answered, whatever the API
        server does."""
        self._metrics = metrics
        # see _remember for what bounds an entry's times
        self._ok: BoundedCache[str, Entry] = bounded_tlru(
            max_entries=max_entries,
            max_bytes=max_bytes,
            ttu=lambda _k, v, _now: v[2],
            timer=clock.monotonic,
            estimate=_identity_size,
        )
        self._bad: BoundedCache[str, Refusal] = bounded_ttl(
            max_entries=min(max_entries, MAX_NEGATIVE_ENTRIES),
            max_bytes=min(max_bytes, MAX_NEGATIVE_BYTES),
            ttl=NEGATIVE_TTL,
            timer=clock.monotonic,
            estimate=_refusal_size,
        )
        self._inflight: Singleflight[str, Identity | Refusal] = Singleflight()
        share = caller_share or max(1, max_in_flight // CALLER_SHARE)
        self.slots = FairSlots(max_in_flight, share)
        self.reviews = 0  # upstream reviews started, for tests and metrics

    async def aclose(self) -> None:
        """Close the reviewer's connections and stop background key refreshes and reviews."""
        for task in list(self._background):
            task.cancel()
        close = getattr(self._reviewer, "aclose", None)
        if close is not None:
            await close()
        if self._signature is not None:
            await self._signature.aclose()

    async def authenticate(self, token: str, *, peer: str | None = None) -> Identity:
        """The caller's identity, or raise Unauthenticated / Unavailable.

        ``peer`` is the caller's source address, if known: with the token's unverified
        ``sub`` it names the caller whose share of the review slots this request takes.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("malformed token: too long", reason="malformed")
        key = token_hash(token)
        cached = self._ok.get(key)
        if cached is not None:
            if cached[1] > self._clock.monotonic():
                self._metrics.cache("review", True)
                return cached[0]
            return await self._authenticate_stale(key, token, peer, cached[0])
        return await self._authenticate_cold(key, token, peer)

    async def _authenticate_stale(
        self, key: str, token: str, peer: str | None, identity: Identity
    ) -> Identity:
        """A review past its reuse, kept for stale-if-error: it answers only while the API
        server is down; otherwise a new review decides."""
        upstream = self._upstream
        assert upstream is not None  # without one, entries are never kept past their reuse
        if upstream.down:
            if upstream.may_call and not self._inflight.running(key):
                self._review_in_background(key, token)
            self._metrics.cache("review_stale", True)
            # one turn of the event loop: the probe (this review's, or a read's) is sent, and
            # its answer heard, while callers are answered from what was read before
            await asyncio.sleep(0)
            return identity
        try:
            return await self._authenticate_cold(key, token, peer)
        except Unavailable as exc:
            if not (upstream.down or exc.reason == "kube_timeout"):
                raise
        self._metrics.cache("review_stale", True)
        return identity

    def _review_in_background(self, key: str, token: str) -> None:
        """Start the shared review of ``token`` without waiting for it (the backoff's probe);
        what it decides is remembered for the next requests."""
        jwt = None
        if self._jwt_precheck:
            try:
                jwt = precheck(token, self._audiences, self._clock.time())
            except Unauthenticated:
                return  # expired since: the next request is refused by the precheck itself
        start_by = asyncio.get_running_loop().time() + self._queue_wait
        task = asyncio.ensure_future(
            self._inflight.do(key, lambda: self._review(key, token, jwt, [], start_by))
        )
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Identity | Refusal]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: _review never raises, but a cancellation may

    async def _authenticate_cold(self, key: str, token: str, peer: str | None) -> Identity:
        """A token not in the review cache: a remembered refusal, or a (shared) review."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        bad = self._bad.get(key)
        if bad is not None:
            self._metrics.cache("review_negative", True)
            raise bad.error()
        self._metrics.cache("review", False)
        jwt: UnverifiedJWT | None = None
        if self._jwt_precheck:
            jwt = precheck(token, self._audiences, self._clock.time())
        if jwt is not None and self._review_ready is not None:
            identity = self._ready(key, token, jwt)
            if identity is not None:
                return identity
        callers = _caller_keys(peer, jwt)
        start_by = start + self._queue_wait
        try:
            async with asyncio.timeout_at(start + self.answer_within):
                result = await self._inflight.do(
                    key, lambda: self._review(key, token, jwt, callers, start_by)
                )
        except TimeoutError:
            raise Unavailable(
                "the Kubernetes API did not answer in time", reason="kube_timeout"
            ) from None
        if isinstance(result, Refusal):
            raise result.error()
        return result

    async def _review(
        self,
        key: str,
        token: str,
        jwt: UnverifiedJWT | None,
        callers: list[str],
        start_by: float,
    ) -> Identity | Refusal:
        """One shared review; never raises, so no exception is shared between waiters."""
        started = self._clock.monotonic()
        try:
            if self._signature is not None and jwt is not None:
                await self._signature.check(token, jwt, start_by)
            async with self.slots.hold(callers, start_by):
                identity = await self._reviewed(token, jwt)
        except Unauthenticated as exc:
            refusal = Refusal.of(exc)
            self._ok.discard(key)  # a real answer: what was decided before stands in no more
            if exc.reason != UNKNOWN_KEY:  # the next key read may publish it: not remembered
                self._bad[key] = refusal
            return refusal
        except Unavailable as exc:
            return Refusal.of(exc)
        except Exception as exc:  # a bug: answer 503, never share a live traceback
            frame = exc.__traceback__
            while frame is not None and frame.tb_next is not None:
                frame = frame.tb_next
            where = f"{frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}" if frame else "?"
            log.error("token review failed unexpectedly: %s at %s", type(exc).__name__, where)
            return INTERNAL
        self._remember(key, identity, started)
        return identity

    def _ready(self, key: str, token: str, jwt: UnverifiedJWT) -> Identity | None:
        """A review answered at once from what the reviewer holds (no slot, no task, nothing
        awaited), remembered as the full review's would be; None when it needs the API."""
        assert self._review_ready is not None
        started = self._clock.monotonic()
        try:
            identity = self._review_ready(token, jwt)
        except Unauthenticated as exc:
            self.reviews += 1
            self._ok.discard(key)
            self._bad[key] = Refusal.of(exc)
            raise
        if identity is not None:
            self.reviews += 1
            self._remember(key, identity, started)
        return identity

    async def _reviewed(self, token: str, jwt: UnverifiedJWT | None) -> Identity:
        self.reviews += 1
        self._metrics.review_started()
        try:
            if jwt is not None and self._review_decoded is not None:
                return await self._review_decoded(token, jwt)  # no second decoding
            return await self._reviewer.review(token)
        finally:
            self._metrics.review_finished()

    def _remember(self, key: str, identity: Identity, started: float) -> None:
        now = self._clock.monotonic()
        fresh, stale = started + self._ttl, started + self._stale_ttl
        if identity.expires_at is not None:
            expiry = now + identity.expires_at - self._clock.time()
            fresh, stale = min(fresh, expiry), min(stale, expiry)
        if identity.cache_until is not None:
            fresh = min(fresh, identity.cache_until)
        if identity.stale_until is not None:
            stale = min(stale, identity.stale_until)
        stale = fresh if self._upstream is None else max(fresh, stale)
        if stale > now:
            self._ok[key] = (identity, fresh, stale)


def _caller_keys(peer: str | None, jwt: UnverifiedJWT | None) -> list[str]:
    """The names of the caller whose share a review takes: source address, unverified sub.

    A loopback (or non-IP) peer names no caller: it is a local proxy in front of the CP (a
    mesh sidecar, a port-forward) through which every caller arrives, not one caller.
    """
    keys = []
    if peer and _remote(peer):
        keys.append(f"peer:{peer}")
    subject = jwt.subject if jwt is not None else None
    if subject:
        keys.append(f"sub:{token_hash(subject)[:32]}")
    return keys


@functools.lru_cache(maxsize=1024)  # callers come back from the same few addresses
def _remote(peer: str) -> bool:
    try:
        return not ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False
