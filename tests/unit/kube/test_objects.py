"""The object cache: what it keeps of a read (uid, labels, the deletion time), and a refused
read naming its permission in the log, whichever kind and however soon after another kind's
refusal (found by the cluster tier: the repeat filter dropped the second kind's line, and the
once-per-kind rule then never logged it)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from cp_token.errors import Unavailable
from cp_token.kube.client import KubeForbidden
from cp_token.kube.objects import FLOAT_BYTES, ObjectCache
from cp_token.runtime.clock import FakeClock
from cp_token.runtime.logs import RepeatFilter
from tests.fakes.kube_memory import MemoryKube


class RefusingKube:
    """Every read is refused by RBAC, as the API server's 403 makes it (an answer: the API
    server is up, and calls may go)."""

    down = False
    may_call = True

    async def get_namespace(self, name: str) -> Any:
        raise KubeForbidden(f'namespace: namespaces "{name}" is forbidden')

    async def get_service_account(self, namespace: str, name: str) -> Any:
        raise KubeForbidden(f'serviceaccount: serviceaccounts "{name}" is forbidden')

    async def get_pod(self, namespace: str, name: str) -> Any:
        raise KubeForbidden(f'pod: pods "{name}" is forbidden')


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RepeatFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_each_refused_kind_is_logged_even_within_the_repeat_interval() -> None:
    handler = Lines()
    logger = logging.getLogger("cp_token.kube.objects")
    logger.addHandler(handler)
    try:
        objects = ObjectCache(RefusingKube(), FakeClock())  # type: ignore[arg-type]
        with pytest.raises(Unavailable):
            await objects.namespace_labels("ns")
        with pytest.raises(Unavailable):
            await objects.service_account_labels("ns", "session-a-sa")
        with pytest.raises(Unavailable):
            await objects.pod_entry("ns", "runner-a")
        # once per kind: a second refusal of a kind adds nothing
        with pytest.raises(Unavailable):
            await objects.namespace_labels("other")
    finally:
        logger.removeHandler(handler)
    needs = [line.split("(the CP needs ")[1] for line in handler.lines if "refused" in line]
    assert needs == ["'get namespaces')", "'get serviceaccounts')", "'get pods')"]


# --- a deletion a finalizer holds: its time is kept --------------------------------------


async def test_the_deletion_timestamp_is_kept_and_counted() -> None:
    """kube-apiserver stops accepting a token 60 s after its pod's or ServiceAccount's
    deletionTimestamp, while the object still exists (a finalizer holds it): the cache keeps
    that time (before: dropped with everything but the uid and labels)."""
    kube, clock = MemoryKube(), FakeClock()
    objects = ObjectCache(kube, clock)  # type: ignore[arg-type]
    kube.put("pods", "ns", "held", uid="u1", deletion="2027-01-15T08:15:00Z")
    kube.put("pods", "ns", "live", uid="u2")
    kube.put("serviceaccounts", "ns", "held", uid="u3", deletion="2027-01-15T08:15:00.5+01:00")
    held, live = await objects.pod_entry("ns", "held"), await objects.pod_entry("ns", "live")
    assert held.deleted_at == 1800000900.0 and held.exists and held.uid == "u1"
    assert live.deleted_at is None
    assert held.size == live.size + FLOAT_BYTES
    sa = await objects.service_account_entry("ns", "held")
    assert sa.deleted_at == 1800000900.5 - 3600
    assert objects.cached_entry("pods", "ns", "held") is held


async def test_a_deletion_timestamp_that_is_no_time_counts_as_a_deletion_now() -> None:
    kube, clock = MemoryKube(), FakeClock()
    objects = ObjectCache(kube, clock)  # type: ignore[arg-type]
    kube.put("pods", "ns", "odd", deletion="yesterday")
    assert (await objects.pod_entry("ns", "odd")).deleted_at == clock.time()
