"""Namespaces, ServiceAccounts and Pods read through the Kubernetes API, cached briefly.

One cache serves the policy's label checks and the ``jwks`` authenticator's liveness checks,
so a cold request reads each object once. Reads are coalesced; a missing object is
remembered as None for the same time as a found one.

- Only what decisions need is kept (uid, labels, and when the object's deletion began), and
  the cache is bounded in entries and bytes, so a large Pod spec never sits in memory.
- An entry expires ``ttl`` seconds after its read *started* (the state it reflects may be
  that old), and callers that cache decisions built on it learn that moment
  (:attr:`Cached.valid_until`), so caches never stack.
- Stale-if-error: an expired entry is kept until ``stale_ttl`` seconds after its read
  (``CP_TOKEN_REVIEW_CACHE_TTL``) and answers in place of a read only while the API server
  is down (unreachable, refused, timed out, 5xx, 429, or calls held back by the backoff that
  follows), or when the request's budget runs out waiting for the read. While the API
  server is taken for down, such an entry answers at once and the read goes on without the
  request (as the backoff's probe). A 404 or any real answer always wins.
- Label reads (outside a review) have their own bound, ``max_reads``, so they never wait
  behind token reviews, and reviews never wait behind them; the Kubernetes worker pool is
  sized for both (see :mod:`cp_token.wiring`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cp_token.errors import Unavailable
from cp_token.kube.client import (
    KubeClient,
    KubeDown,
    KubeForbidden,
    KubeUnavailable,
    labels_of,
    uid_of,
)
from cp_token.metrics import NO_METRICS, CacheMetrics
from cp_token.runtime.bounded import BoundedCache, bounded_tlru, text_bytes
from cp_token.runtime.clock import Clock, parse_rfc3339
from cp_token.runtime.singleflight import Singleflight

__all__ = ["MAX_OBJECT_READS", "Cached", "ObjectCache"]

log = logging.getLogger(__name__)

Obj = dict[str, Any] | None
Key = tuple[str, str, str]

MAX_OBJECT_READS = 16  # label reads in flight at once, outside review slots
READ_WAIT = 2.0  # a label read waits at most this long for its turn, then 503
MAX_ENTRIES = 50_000
MAX_BYTES = 16 * 1024 * 1024  # about 28,000 objects


@dataclass(frozen=True, slots=True)
class Cached:
    """One cached read, trimmed to what decisions use: whether the object exists, its uid
    and labels, when its deletion began; and its age."""

    exists: bool
    uid: str | None
    labels: Mapping[str, str]
    fetched_at: float  # monotonic time the read started
    valid_until: float  # monotonic time the entry expires (fetched_at + ttl)
    size: int  # estimated bytes, for the cache's byte bound
    # wall-clock time of metadata.deletionTimestamp: the object is being deleted and a
    # finalizer holds it (None: not being deleted)
    deleted_at: float | None = None


# What one entry costs besides its own strings (the entry, its key tuple, the cache's
# bookkeeping), and a label mapping of its own; measured with tracemalloc
# (bench/profile_memory.py); and a deletion time's float, when there is one.
ENTRY_OVERHEAD = 468
LABELS_OVERHEAD = 250
FLOAT_BYTES = 24
MAX_SHARED_LABEL_SETS = 1024
_NO_LABELS: Mapping[str, str] = {}
_label_sets: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}


def _shared_labels(labels: dict[str, str]) -> tuple[Mapping[str, str], bool]:
    """One mapping per distinct label set (every managed ServiceAccount carries the same
    labels) instead of one per cached object; and whether it is a shared one."""
    if not labels:
        return _NO_LABELS, True
    key = tuple(sorted(labels.items()))
    shared = _label_sets.get(key)
    if shared is not None:
        return shared, True
    if len(_label_sets) < MAX_SHARED_LABEL_SETS:
        _label_sets[key] = labels
        return labels, True
    return labels, False


def deleted_at_of(obj: Obj, read_at: float) -> float | None:
    """``metadata.deletionTimestamp`` of an API object as wall-clock seconds; None when it
    has none. One that is no RFC 3339 time (the API server writes none such) counts as a
    deletion begun at ``read_at`` (the wall-clock time of the read): the object is going."""
    if not obj:
        return None
    stamp = (obj.get("metadata") or {}).get("deletionTimestamp")
    if stamp is None:
        return None
    parsed = parse_rfc3339(stamp)
    return read_at if parsed is None else parsed


def _entry(key: Key, obj: Obj, fetched_at: float, ttl: float, read_at: float) -> Cached:
    """Keep what decisions use (uid, labels, deletion); drop spec, status, managed fields."""
    uid = uid_of(obj)
    labels, shared = _shared_labels(labels_of(obj))
    deleted_at = deleted_at_of(obj, read_at)
    size = ENTRY_OVERHEAD + text_bytes(key[2], uid)  # kind and namespace are shared
    if not shared:
        size += LABELS_OVERHEAD + sum(text_bytes(k, v) for k, v in labels.items())
    if deleted_at is not None:
        size += FLOAT_BYTES
    return Cached(obj is not None, uid, labels, fetched_at, fetched_at + ttl, size, deleted_at)


@functools.lru_cache(maxsize=8)  # kinds are this module's own words, never input
def _forbidden_message(kind: str) -> str:
    """The log template for a refused read of ``kind``: one template per kind, because the
    repeat filter (:class:`cp_token.runtime.logs.RepeatFilter`) keys on the template and a kind's
    refusal is logged only once, so two kinds refused within a second must not share one."""
    return f"reading {kind} refused: %s (the CP needs 'get {kind}')"


class ObjectCache:
    """Cached, coalesced GETs of the objects the CP's decisions depend on."""

    def __init__(
        self,
        kube: KubeClient,
        clock: Clock,
        *,
        ttl: float = 10.0,
        stale_ttl: float | None = None,
        max_reads: int = MAX_OBJECT_READS,
        read_wait: float = READ_WAIT,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        metrics: CacheMetrics = NO_METRICS,
    ) -> None:
        self._kube = kube
        self._clock = clock
        self.ttl = ttl
        self.stale_ttl = max(ttl, ttl if stale_ttl is None else stale_ttl)
        # entries are kept until they may no longer answer even in an outage
        self._cache: BoundedCache[Key, Cached] = bounded_tlru(
            max_entries=max_entries,
            max_bytes=max_bytes,
            ttu=lambda _k, v, _now: v.fetched_at + self.stale_ttl,
            timer=clock.monotonic,
            estimate=lambda v: v.size,
        )
        self._inflight: Singleflight[Key, Cached] = Singleflight()
        self._background: set[asyncio.Future[Cached]] = set()
        self._reads = asyncio.Semaphore(max_reads)
        self._read_wait = read_wait
        self._metrics = metrics
        self._forbidden_logged: set[str] = set()

    # --- label reads (the policy, outside any review slot) -----------------------------------

    async def namespace_labels(
        self, name: str, deadline: float | None = None
    ) -> Mapping[str, str] | None:
        """The Namespace's labels (None if it does not exist).

        ``deadline`` (event-loop time): a read not answered by then is a 503 (the request's
        budget for the Kubernetes API); the read itself goes on for whoever shares it.
        """
        key = ("namespaces", "", name)
        entry = self._hit(key) or await self._get(
            key, lambda: self._kube.get_namespace(name), bounded=True, deadline=deadline
        )
        return entry.labels if entry.exists else None

    async def service_account_labels(
        self, namespace: str, name: str, deadline: float | None = None
    ) -> Mapping[str, str] | None:
        """The ServiceAccount's labels (None if it does not exist); ``deadline`` as for
        :meth:`namespace_labels`."""
        entry = self._hit(("serviceaccounts", namespace, name)) or await self._service_account(
            namespace, name, bounded=True, deadline=deadline
        )
        return entry.labels if entry.exists else None

    # --- liveness reads (the jwks authenticator, inside a review slot) -----------------------

    async def service_account_entry(self, namespace: str, name: str) -> Cached:
        """The ServiceAccount read with its age; for callers already holding a review slot."""
        return await self._service_account(namespace, name, bounded=False)

    async def pod_entry(self, namespace: str, name: str) -> Cached:
        """The Pod read with its age; for callers already holding a review slot."""
        return await self._pod(namespace, name, bounded=False)

    def cached_entry(self, kind: str, namespace: str, name: str) -> Cached | None:
        """The cached read of a ``pods`` or ``serviceaccounts`` object while fresh, else None
        (nothing is fetched: the caller then takes the path that awaits a read)."""
        return self._hit((kind, namespace, name))

    # -----------------------------------------------------------------------------------------

    def _service_account(
        self, namespace: str, name: str, *, bounded: bool, deadline: float | None = None
    ) -> Awaitable[Cached]:
        return self._get(
            ("serviceaccounts", namespace, name),
            lambda: self._kube.get_service_account(namespace, name),
            bounded=bounded,
            deadline=deadline,
        )

    def _pod(self, namespace: str, name: str, *, bounded: bool) -> Awaitable[Cached]:
        return self._get(
            ("pods", namespace, name), lambda: self._kube.get_pod(namespace, name), bounded=bounded
        )

    def _fresh(self, key: Key) -> Cached | None:
        """The cached entry while it is within ``ttl`` of its read, else None."""
        entry = self._cache.get(key)
        if entry is not None and entry.valid_until > self._clock.monotonic():
            return entry
        return None

    def _hit(self, key: Key) -> Cached | None:
        """The fresh entry, counted as a hit; None (nothing counted) when there is none."""
        entry = self._fresh(key)
        if entry is not None:
            self._metrics.cache(key[0], True)
        return entry

    def _stale(self, key: Key) -> Cached | None:
        """The entry within ``stale_ttl`` of its read, for when the API server is down."""
        entry = self._cache.get(key)
        if entry is not None:
            self._metrics.cache(f"{key[0]}_stale", True)
        return entry

    async def _get(
        self,
        key: Key,
        fetch: Callable[[], Awaitable[Obj]],
        *,
        bounded: bool,
        deadline: float | None = None,
    ) -> Cached:
        entry = self._fresh(key)
        self._metrics.cache(key[0], entry is not None)
        if entry is not None:
            return entry
        if self._kube.down:
            # The API server is taken for down: what was read within stale_ttl answers at
            # once; the read goes on without this request, as the backoff's probe when one
            # may go now (a real answer then replaces the entry for the next requests).
            stale = self._stale(key)
            if stale is not None:
                if self._kube.may_call and not self._inflight.running(key):
                    self._in_background(key, fetch, bounded)
                return stale
        read = self._inflight.do(key, lambda: self._fetch(key, fetch, bounded))
        if deadline is None:
            return await read
        try:
            async with asyncio.timeout_at(deadline):
                return await read
        except TimeoutError:
            stale = self._stale(key)  # the read goes on for whoever shares it
            if stale is not None:
                return stale
            raise Unavailable(
                "the Kubernetes API did not answer in time", reason="kube_timeout"
            ) from None

    def _in_background(self, key: Key, fetch: Callable[[], Awaitable[Obj]], bounded: bool) -> None:
        """Start the shared read of ``key`` without waiting for it."""
        task = asyncio.ensure_future(
            self._inflight.do(key, lambda: self._fetch(key, fetch, bounded))
        )
        self._background.add(task)
        task.add_done_callback(self._read_done)

    def _read_done(self, task: asyncio.Future[Cached]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: whoever needs the answer asks again

    async def _fetch(self, key: Key, fetch: Callable[[], Awaitable[Obj]], bounded: bool) -> Cached:
        if not bounded:
            return await self._read(key, fetch)
        try:
            await asyncio.wait_for(self._reads.acquire(), timeout=self._read_wait)
        except TimeoutError:
            raise Unavailable(
                "too many Kubernetes reads in flight; retry shortly",
                reason="reads_saturated",
                retry_after=1,
            ) from None
        try:
            return await self._read(key, fetch)
        finally:
            self._reads.release()

    async def _read(self, key: Key, fetch: Callable[[], Awaitable[Obj]]) -> Cached:
        kind = key[0]
        started, read_at = self._clock.monotonic(), self._clock.time()
        try:
            obj = await fetch()
        except KubeForbidden as exc:
            if kind not in self._forbidden_logged:
                log.error(_forbidden_message(kind), exc.reason)
                self._forbidden_logged.add(kind)
            raise Unavailable(
                f"the token service cannot read {kind} (missing permission)",
                reason="kube_forbidden",
                retry_after=30,
            ) from None
        except KubeDown as exc:
            stale = self._stale(key)
            if stale is not None:
                log.warning("reading %s failed, answering from the last read: %s", kind, exc.reason)
                return stale
            log.warning("reading %s failed: %s", kind, exc.reason)
            raise Unavailable(
                "the Kubernetes API is unavailable",
                reason="kube_unavailable",
                retry_after=exc.retry_after,
            ) from None
        except KubeUnavailable as exc:
            log.warning("reading %s failed: %s", kind, exc.reason)
            raise Unavailable(
                "the Kubernetes API is unavailable", reason="kube_unavailable"
            ) from None
        entry = _entry(key, obj, started, self.ttl, read_at)
        if entry.valid_until > self._clock.monotonic():
            self._cache[key] = entry
        return entry
