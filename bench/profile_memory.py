"""What one entry of each CP cache really costs (tracemalloc), against the estimate its byte
bound counts, and the memory of every cache full at its default bounds.

    .venv/bin/python bench/profile_memory.py [--entries 20000]

Entries are built the way the service builds them: identities from TokenReview answers
(``identity_from_user`` over parsed JSON), object entries from parsed API objects, refusals
from the reviewers' errors, rate buckets through ``RateLimiter.check``. The estimates are
what ``cp_token.runtime.bounded`` counts against ``max_bytes``; an estimate below the real cost
would let a cache hold more memory than its bound says.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cp_token.authn import cache as review_cache
from cp_token.authn.tokenreview import identity_from_user
from cp_token.errors import Unauthenticated
from cp_token.kube.objects import MAX_BYTES as OBJECT_BYTES
from cp_token.kube.objects import MAX_ENTRIES as OBJECT_ENTRIES
from cp_token.kube.objects import _entry
from cp_token.ratelimit import MAX_BUCKETS, RateLimiter
from cp_token.runtime.bounded import BoundedCache
from cp_token.runtime.clock import FakeClock

EXTRA = "authentication.kubernetes.io/"


def user(i: int) -> dict[str, Any]:
    """A TokenReview ``status.user`` of a pod-bound session runner, as the API server sends."""
    uid = f"{i:012d}"
    doc = {
        "username": f"system:serviceaccount:session-ns:session-b{i}-sa",
        "uid": f"5f0e8b9a-1c2d-4e5f-8a9b-{uid}",
        "groups": [
            "system:serviceaccounts",
            "system:serviceaccounts:session-ns",
            "system:authenticated",
        ],
        "extra": {
            f"{EXTRA}credential-id": [f"JTI=7b1c2d3e-4f5a-6b7c-8d9e-{uid}"],
            f"{EXTRA}node-name": [f"node-{i % 50}"],
            f"{EXTRA}node-uid": [f"0a1b2c3d-4e5f-6a7b-8c9d-{i % 50:012d}"],
            f"{EXTRA}pod-name": [f"runner-b{i}"],
            f"{EXTRA}pod-uid": [f"9a8b7c6d-5e4f-3a2b-1c0d-{uid}"],
        },
    }
    parsed: dict[str, Any] = json.loads(json.dumps(doc))  # fresh strings, as from the wire
    return parsed


def service_account(i: int) -> dict[str, Any]:
    """A ServiceAccount as read from the API (before trimming)."""
    doc = {
        "metadata": {
            "name": f"session-b{i}-sa",
            "namespace": "session-ns",
            "uid": f"5f0e8b9a-1c2d-4e5f-8a9b-{i:012d}",
            "labels": {"ambient-code.io/managed-by": "ambient-control-plane"},
        }
    }
    parsed: dict[str, Any] = json.loads(json.dumps(doc))
    return parsed


def measure(fill: Callable[[int], float], n: int) -> tuple[float, float]:
    """(real bytes, estimated bytes) per entry of ``n`` entries stored by ``fill(i)``, which
    returns the estimate it counted."""
    gc.collect()
    tracemalloc.start()
    estimated = 0.0
    for i in range(n):
        estimated += fill(i)
    gc.collect()
    real, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return real / n, estimated / n


def unbounded(estimate: Callable[[Any], int], clock: FakeClock) -> BoundedCache[Any, Any]:
    """A cache with the service's estimate and no bound in reach (everything stays)."""
    return BoundedCache(
        max_entries=10**9,
        max_bytes=10**12,
        expires=lambda _k, _v, now: now + 3600,
        timer=clock.monotonic,
        estimate=estimate,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=20_000)
    n = parser.parse_args().entries
    clock = FakeClock()
    reviews = unbounded(review_cache._identity_size, clock)
    objects = unbounded(lambda entry: entry.size, clock)
    refusals = unbounded(review_cache._refusal_size, clock)
    limiter = RateLimiter(5, 20, clock, maxsize=10**9)
    expiry = time.time() + 3600

    def review(i: int) -> float:
        # parsed here: counted; bounded by the reads it rests on, as tokenreview's now are
        identity = identity_from_user(user(i), expiry)
        identity = dataclasses.replace(identity, cache_until=i + 0.5, stale_until=i + 0.25)
        value = (identity, i + 0.5, i + 0.25)
        reviews[hashlib.sha256(b"%d" % i).hexdigest()] = value
        return review_cache._identity_size(value)

    def obj(i: int) -> float:
        key = ("serviceaccounts", "session-ns", f"session-b{i}-sa")
        entry = _entry(key, service_account(i), clock.monotonic(), 3600.0, clock.time())
        objects[key] = entry
        return entry.size

    def refusal(i: int) -> float:
        value = review_cache.Refusal.of(
            Unauthenticated("token is not authenticated (expired, revoked, or unknown)")
        )
        refusals[hashlib.sha256(b"%d" % i).hexdigest()] = value
        return review_cache._refusal_size(value)

    def bucket(i: int) -> float:
        limiter.check(f"system:serviceaccount:session-ns:session-b{i}-sa")
        return 0.0

    rows = {
        "review (tokenreview identity)": (review, review_cache.MAX_BYTES, review_cache.MAX_ENTRIES),
        "object (ServiceAccount)": (obj, OBJECT_BYTES, OBJECT_ENTRIES),
        "refusal": (refusal, review_cache.MAX_NEGATIVE_BYTES, review_cache.MAX_NEGATIVE_ENTRIES),
    }
    total = 0.0
    print(f"per entry, {n:,} entries each (tracemalloc):")
    for name, (fill, max_bytes, max_entries) in rows.items():
        real, estimated = measure(fill, n)
        full = min(max_entries, max_bytes / estimated) * real
        total += full
        print(
            f"  {name:<30} {real:6.0f} B real, {estimated:6.0f} B estimated; full at its "
            f"defaults ({max_bytes >> 20} MiB, {max_entries:,} entries): {full / 2**20:5.1f} MiB"
        )
    real, _ = measure(bucket, n)
    full = MAX_BUCKETS * real
    total += full
    print(
        f"  {'rate bucket':<30} {real:6.0f} B real; {MAX_BUCKETS:,} buckets: {full / 2**20:.1f} MiB"
    )
    print(f"every cache full at its defaults: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
