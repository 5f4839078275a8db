"""Flow 6: the API server restarted mid-run, and frozen for 20 s, under CPs in both modes.

The CP's connections break for real: a restart (SIGTERM, then a new kube-apiserver on the
same port and etcd) closes them; a freeze (SIGSTOP) leaves them open and silent, then SIGCONT.
Throughout: no 500 and no hang (every answer within 12 s: a 503 with ``Retry-After`` for a
caller the CP knows nothing of, a 200 from what it decided recently for one it knows), and
within a few seconds of the server's return a new caller is served again.

A CP of its own per mode (the session CPs stay intact); the tokens are requested before the
fault (TokenRequest needs the API server).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from .cluster import Cluster
from .conftest import AUTHN_MODES, start_extra_cp
from .session import CpServer, Injector, make_session, pod_token

# SPEC: while the API server hangs, /token answers 503 within 12 s; a little for the request's
# own way through TLS on a busy machine.
ANSWER_WITHIN = 12.0 + 1.0
# "recovers within a few seconds of the server's return"
RECOVERS_WITHIN = 5.0
FREEZE = 20.0
# The CPs' own reads expire quickly, so a recent caller asked during the outage needs what
# the CP read before it past that TTL (SPEC, "Riding out faults": used until the API server
# answers again, for up to CP_TOKEN_REVIEW_CACHE_TTL).
LIVENESS_TTL = 4.0


@dataclass
class Answer:
    status: int
    seconds: float
    retry_after: str | None
    body: str


def ask(cp: CpServer, token: str) -> Answer:
    start = time.monotonic()
    try:
        resp = cp.get_token(token)
    except httpx.TimeoutException:
        return Answer(0, time.monotonic() - start, None, "no answer in 20 s")
    return Answer(
        resp.status_code, time.monotonic() - start, resp.headers.get("retry-after"), resp.text
    )


@pytest.fixture(scope="module")
def cps(
    cluster: Cluster,
    injector: Injector,
    pki: trustme.CA,
    signing_key: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, CpServer]]:
    """One CP per authn mode, short-lived reads (``LIVENESS_TTL``), the default review
    cache (30 s)."""
    started: dict[str, CpServer] = {}
    try:
        for mode in AUTHN_MODES:
            work = tmp_path_factory.mktemp(f"cp-faults-{mode}")
            started[mode] = start_extra_cp(
                cluster,
                pki,
                signing_key,
                work,
                mode,
                {"CP_TOKEN_LIVENESS_CACHE_TTL": str(LIVENESS_TTL)},
            )
        yield started
    finally:
        for cp in started.values():
            cp.stop()


@dataclass
class Callers:
    """Per mode: a caller decided a moment ago, callers the CP has never seen."""

    recent: str
    during: list[str]
    after: str


def callers(cluster: Cluster, cps: dict[str, CpServer], tag: str) -> dict[str, Callers]:
    out = {}
    for mode, cp in cps.items():
        tokens = [
            pod_token(cluster, make_session(cluster, f"{tag}{mode[:4]}{i}")) for i in range(4)
        ]
        first = cp.get_token(tokens[0])
        assert first.status_code == 200, first.text
        out[mode] = Callers(recent=tokens[0], during=tokens[1:3], after=tokens[3])
    return out


def assert_no_500(cps: dict[str, CpServer]) -> None:
    for mode, cp in cps.items():
        text = cp.metrics_text()
        assert 'outcome="internal"' not in text, f"{mode}: an internal error was answered"
        assert cp.proc.popen.poll() is None, f"the {mode} CP died"


def asked_during_outage(
    cps: dict[str, CpServer], who: dict[str, Callers], since: float
) -> tuple[dict[str, list[Answer]], dict[str, list[Answer]]]:
    """At once: every CP's unknown callers and its recent caller; then, once the CP's own
    reads have expired (``LIVENESS_TTL`` after ``since``), the recent caller again. The
    answers (unknown, recent) per mode."""
    jobs = [(0.0, mode, token, "unknown") for mode in cps for token in who[mode].during]
    jobs += [(0.0, mode, who[mode].recent, "recent") for mode in cps]
    jobs += [(LIVENESS_TTL + 1, mode, who[mode].recent, "recent") for mode in cps]

    def run(job: tuple[float, str, str, str]) -> Answer:
        time.sleep(max(0.0, since + job[0] - time.monotonic()))
        return ask(cps[job[1]], job[2])

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))
    unknown: dict[str, list[Answer]] = {mode: [] for mode in cps}
    recent: dict[str, list[Answer]] = {mode: [] for mode in cps}
    for (_, mode, _, kind), answer in zip(jobs, answers, strict=True):
        (unknown if kind == "unknown" else recent)[mode].append(answer)
    return unknown, recent


def assert_unknown_callers_get_503(answers: dict[str, list[Answer]]) -> None:
    for mode, got in answers.items():
        for a in got:
            assert a.status == 503, f"{mode}: {a}"
            assert a.seconds <= ANSWER_WITHIN, f"{mode}: answered after {a.seconds:.1f} s"
            assert a.retry_after is not None and a.retry_after.isdigit(), f"{mode}: {a}"


def assert_recent_callers_served(answers: dict[str, list[Answer]]) -> None:
    for mode, got in answers.items():
        for a in got:
            assert a.status == 200, f"{mode}: a caller decided a moment ago: {a}"
            assert a.seconds <= ANSWER_WITHIN, f"{mode}: answered after {a.seconds:.1f} s"


def recovered_within(cps: dict[str, CpServer], who: dict[str, Callers], back: float) -> None:
    """Every CP serves a caller it has never seen within RECOVERS_WITHIN of ``back`` (the
    moment the API server answered again); until then only 503s."""
    for mode, cp in cps.items():
        while True:
            a = ask(cp, who[mode].after)
            if a.status == 200:
                break
            assert a.status == 503, f"{mode}: {a}"
            waited = time.monotonic() - back
            assert waited <= RECOVERS_WITHIN, f"{mode}: not recovered {waited:.1f} s after"
            time.sleep(0.2)
        waited = time.monotonic() - back
        assert waited <= RECOVERS_WITHIN, f"{mode}: recovered only {waited:.1f} s after"


def kube_errors(cp: CpServer) -> float:
    """Kubernetes calls that got no HTTP answer at all (refused, reset, timed out)."""
    return sum(n for (_, result), n in cp.kube_calls().items() if not result.isdigit())


def test_the_api_server_restarted_mid_run(cluster: Cluster, cps: dict[str, CpServer]) -> None:
    who = callers(cluster, cps, "rst")
    errors_before = {mode: kube_errors(cp) for mode, cp in cps.items()}
    stopped_at = time.monotonic()
    cluster.stop_apiserver()
    try:
        unknown, recent = asked_during_outage(cps, who, stopped_at)
    finally:
        cluster.start_apiserver()
    back = time.monotonic()
    assert_unknown_callers_get_503(unknown)
    for mode, cp in cps.items():
        assert kube_errors(cp) > errors_before[mode], f"{mode}: its calls did not break"
    recovered_within(cps, who, back)
    assert_no_500(cps)
    # last, so that the checks above speak first (SPEC "Riding out faults", issue 18)
    assert_recent_callers_served(recent)


def test_the_api_server_frozen_for_20_s(cluster: Cluster, cps: dict[str, CpServer]) -> None:
    who = callers(cluster, cps, "frz")
    frozen_at = time.monotonic()
    cluster.freeze_apiserver()
    try:
        unknown, recent = asked_during_outage(cps, who, frozen_at)
        assert time.monotonic() - frozen_at < FREEZE, "the checks outlasted the freeze"
        time.sleep(max(0.0, frozen_at + FREEZE - time.monotonic()))
    finally:
        cluster.thaw_apiserver()
    back = time.monotonic()
    assert_unknown_callers_get_503(unknown)
    recovered_within(cps, who, back)
    assert_no_500(cps)
    assert_recent_callers_served(recent)
