"""The API server's liveness rule (claims.go), as both Kubernetes authenticators apply it:
gone, another UID, or deleted more than 60 s ago refuses; an answer resting on reads lives
no longer than they do, nor past the moment a deleted object stops vouching."""

from __future__ import annotations

import pytest

from cp_token.authn.liveness import DELETION_LEEWAY, check_live, object_names, proof_bounds
from cp_token.errors import Unauthenticated
from cp_token.kube.objects import Cached
from cp_token.runtime.clock import FakeClock

NOW = 1_800_000_000.0


def read(
    *,
    exists: bool = True,
    uid: str | None = "u-1",
    fetched_at: float = 1000.0,
    ttl: float = 10.0,
    deleted_at: float | None = None,
) -> Cached:
    return Cached(exists, uid, {}, fetched_at, fetched_at + ttl, 100, deleted_at)


def test_a_live_object_with_the_claimed_uid_vouches() -> None:
    check_live(read(), "u-1", NOW, "pod_gone", "gone")
    check_live(read(), None, NOW, "pod_gone", "gone")  # no uid claimed: existence is enough


@pytest.mark.parametrize(
    "entry, uid",
    [
        (read(exists=False, uid=None), "u-1"),  # deleted
        (read(uid="u-2"), "u-1"),  # deleted and made again under the same name
        (read(deleted_at=NOW - DELETION_LEEWAY - 0.001), "u-1"),  # a finalizer holds it, too long
    ],
)
def test_a_gone_replaced_or_long_deleted_object_refuses(entry: Cached, uid: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        check_live(entry, uid, NOW, "pod_gone", "the pod is gone")
    assert info.value.reason == "pod_gone"


def test_a_deletion_vouches_for_exactly_the_leeway() -> None:
    """Go's Time.Before: still valid at exactly now - 60 s, refused just past it."""
    check_live(read(deleted_at=NOW - DELETION_LEEWAY), "u-1", NOW, "sa_gone", "x")
    with pytest.raises(Unauthenticated):
        check_live(read(deleted_at=NOW - DELETION_LEEWAY), "u-1", NOW + 0.5, "sa_gone", "x")


def test_proof_bounds_take_the_earliest_read() -> None:
    clock = FakeClock(NOW)
    a = read(fetched_at=995.0, ttl=10.0)  # fresh until 1005
    b = read(fetched_at=999.0, ttl=3.0)  # fresh until 1002
    fresh, stale = proof_bounds([a, b], clock, stale_ttl=30.0)
    assert fresh == 1002.0
    assert stale == 995.0 + 30.0  # the oldest read bounds the stale answer
    assert proof_bounds([], clock, 30.0) == (float("inf"), float("inf"))


def test_proof_bounds_end_where_a_deleted_object_stops_vouching() -> None:
    clock = FakeClock(NOW)  # monotonic 1000.0
    deleting = read(fetched_at=999.0, ttl=30.0, deleted_at=NOW - 50.0)  # void in 10 s
    fresh, stale = proof_bounds([deleting], clock, stale_ttl=60.0)
    assert fresh == pytest.approx(1010.0)
    assert stale == pytest.approx(1010.0)


def test_object_names_read_the_kubernetes_claims_leniently() -> None:
    sa = {"namespace": "s", "serviceaccount": {"name": "sa", "uid": "x"}}
    assert object_names({"kubernetes.io": sa}) == ("s", "sa", None)
    bound = {**sa, "pod": {"name": "runner", "uid": "p"}}
    assert object_names({"kubernetes.io": bound}) == ("s", "sa", "runner")
    assert object_names({}) is None
    assert object_names({"kubernetes.io": "x"}) is None
    assert object_names({"kubernetes.io": {**sa, "pod": {"name": 3}}}) is None
    assert object_names({"kubernetes.io": {"namespace": "s", "serviceaccount": "sa"}}) is None
