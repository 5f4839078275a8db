"""Hostile-load benchmark of the CP token service, run by hand; prints one table.

    .venv/bin/python bench/bench_hostile.py

Each row is a function (``ROWS``) that runs one hostile scenario against a real
``cp-token serve`` process and returns what it measured next to its goal:

- CP resident memory growth while one unknown, well-formed 16 KB JWT (real ``kid``, ``aud``
  ambient-cp, future ``exp``, a signature nobody made) is replayed 3,000 times; once with the
  issuer keys readable (the forged signature is refused before TokenReview) and once with
  them unreadable (TokenReview decides, then the negative cache answers). Goal <= 24 MiB.
- TokenReviews per 1,000 forged tokens (real ``kid``, forged signature). Goal 0.
- Legitimate pods served within 10 s while ``FLOOD`` forged tokens arrive on 200 connections
  and every TokenReview takes 500 ms. Goal: all 20.
- The sidecar after a 12 s CP outage longer than its 5 s tokens (``bench_recovery``): seconds
  from the CP healed to a token served to a consumer asking every 100 ms, and to the token
  file back for a consumer that only reads it (no request). Goal <= 2.5 s each.
- The sidecar holding a token while the CP answers malformed bytes (a raw TCP server,
  ``tests/fakes/hostile_upstream.py``: chunk size -1, superscript digits, 400-digit
  numbers, JSON 200,000 deep, bad token characters, 60 KB error text, ...), one sidecar
  process per answer: how many kept serving their token (goal: all; before the fix about
  twelve exited 1), and the largest resident memory among them (goal <= 30 MiB).
- Memory under one hostile connection and under stalled bodies, for the CP and the injector
  (raw sockets, ``tests/integration/hostile_rig.py``): peak RSS growth while one connection
  streams a chunked body's endless trailer for 10 s (before the edge bounded it: CP +414 MiB
  in 45 s, injector +284 MiB), and while bodies stall one byte short (CP 4,000 x 64 KB,
  injector 100 x 3.1 MB; before: 372 and 407 MiB resident). Goals <= 24 MiB and <= 96 MiB.
- Fairness: legitimate requests (from 127.0.0.1) served while one address (127.0.0.2) holds
  4,096 idle sockets (before: 11 of 64 to the CP, 15 of 51 to the injector). Goal: all.

The fake kube-apiserver runs in its own process (``bench_cp.FakeKube``), the load comes from
a third (``common.run_loadgen``: raw asyncio keep-alive HTTP/1.1), memory is read from /proc.
Every process is started here and stopped here by its pid.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trustme
from bench_cp import FakeKube, start_cp
from bench_recovery import measure_sidecar_recovery
from common import ROOT, Proc, rss_kib, run_loadgen

sys.path.insert(0, str(ROOT))
from tests.fakes.admission import admission_review, opted_in_pod
from tests.integration.hostile_rig import (
    chunked_head,
    idle_sockets,
    peak_growth_kib,
    stalled_bodies,
    stream_after,
)
from tests.integration.inject_rig import Injector, start_injector, tls_files

MiB = 1024 * 1024
TOKEN_SIZE = 16_000  # just under the 16 KiB bearer limit


@dataclass
class Row:
    """One line of the table."""

    metric: str
    measured: str
    goal: str
    ok: bool


@dataclass
class Bench:
    """What every row shares: a work directory and the fake kube-apiserver process."""

    workdir: Path
    kube: FakeKube
    started: int = 0

    def cp(self, name: str, extra: dict[str, str] | None = None) -> tuple[Proc, int]:
        """A fresh CP (tokenreview authn, jwt minter) against the fake."""
        self.started += 1
        return start_cp(
            self.workdir, f"{name}-{self.started}", self.kube, "tokenreview", "info", extra
        )

    def injector(self) -> Injector:
        """A fresh ``cp-token inject`` over HTTPS (trustme certificates); stop it with
        ``.proc.terminate()``."""
        self.started += 1
        directory = self.workdir / f"inject-{self.started}"
        directory.mkdir()
        ca = trustme.CA()
        cert, key = tls_files(directory, ca)
        return start_injector(
            cert, key, directory / "inject.log", ca, "cp-token:bench", "http://cp:8080/token"
        )

    def good_token(self) -> str:
        """One valid pod-bound token of the fake's session."""
        path = self.kube.tokens(self.workdir / f"good-{secrets.token_hex(4)}.txt", 1)
        return path.read_text().strip()

    def write(self, name: str, tokens: list[str]) -> Path:
        """A tokens file for the load generator."""
        path = self.workdir / name
        path.write_text("\n".join(tokens) + "\n")
        return path


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS."""
    head, payload, _ = token.split(".")
    return tuple(  # type: ignore[return-value]
        json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in (head, payload)
    )


def forged(good: str, n: int, size: int | None = None) -> list[str]:
    """``n`` distinct tokens with ``good``'s header and claims and a signature nobody made."""
    header, claims = parts(good)
    head = b64(json.dumps(header).encode())
    out = []
    for i in range(n):
        body = {**claims, "jti": f"forged-{i}-{secrets.token_hex(4)}"}
        if size is not None:
            body["pad"] = "x" * max(0, (size - 700) * 3 // 4 - len(json.dumps(body)))
        out.append(f"{head}.{b64(json.dumps(body).encode())}.{b64(secrets.token_bytes(256))}")
    return out


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    return rss_kib(pid) * 1024


def get(port: int, token: str) -> int:
    """One ``GET /token``; the status."""
    return httpx.get(
        f"http://127.0.0.1:{port}/token",
        headers={"Authorization": f"Bearer {token}"},
        trust_env=False,
        timeout=15,
    ).status_code


def expect(what: str, result: dict[str, Any], statuses: set[str], proc: Proc) -> None:
    """Every answer of a run must be one of ``statuses``, else the numbers mean nothing."""
    if not set(result["statuses"]) <= statuses or not result["requests"]:
        tail = "\n".join(proc.output().splitlines()[-10:])
        raise RuntimeError(f"{what}: answers {result['statuses']} (want {statuses}):\n{tail}")


# --- rows -----------------------------------------------------------------------------------


def replay_growth(bench: Bench, keys_readable: bool) -> Row:
    """RSS growth of the CP over 3,000 replays of one unknown 16 KB token."""
    good = bench.good_token()
    if not keys_readable:
        bench.kube.call("deny", ["get", "", "/openid/v1/jwks"])
    proc, port = bench.cp("cp-replay")
    try:
        warm = bench.write("replay-warm.txt", forged(good, 300, TOKEN_SIZE))
        expect("warm-up", run_loadgen(port, warm, conns=16, each=True), {"401"}, proc)
        bench.kube.call("reset")
        token = forged(good, 1, TOKEN_SIZE)[0]
        replay = bench.write("replay.txt", [token] * 3000)
        before = rss(proc.pid)
        result = run_loadgen(port, replay, conns=16, each=True)
        grown = rss(proc.pid) - before
        expect("replay", result, {"401"}, proc)
        reviews = bench.kube.call("calls")["tokenreviews"]
    finally:
        proc.stop()
        if not keys_readable:
            bench.kube.call("allow", ["get", "", "/openid/v1/jwks"])
    how = "keys readable" if keys_readable else f"keys unreadable, {reviews} TokenReviews"
    return Row(
        f"CP RSS growth, 3,000 replays of one unknown 16 KB token ({how})",
        f"{grown / MiB:+.1f} MiB",
        "<= 24 MiB",
        grown <= 24 * MiB,
    )


def replay_growth_keys_readable(bench: Bench) -> Row:
    """The replay with the issuer keys readable (the default deployment)."""
    return replay_growth(bench, keys_readable=True)


def replay_growth_keys_unreadable(bench: Bench) -> Row:
    """The replay with the keys unreadable: TokenReview decides, the negative cache answers."""
    return replay_growth(bench, keys_readable=False)


def forged_reviews(bench: Bench) -> Row:
    """TokenReviews caused by 1,000 forged tokens with a real kid."""
    good = bench.good_token()
    proc, port = bench.cp("cp-forged")
    try:
        if get(port, good) != 200:  # the keys are loaded by a real request
            raise RuntimeError("the good token was refused")
        tokens = bench.write("forged.txt", forged(good, 1000))
        bench.kube.call("reset")
        result = run_loadgen(port, tokens, conns=32, each=True)
        expect("forged", result, {"401"}, proc)
        reviews = bench.kube.call("calls")["tokenreviews"]
    finally:
        proc.stop()
    per_1000 = reviews * 1000 / result["requests"]
    return Row(
        f"TokenReviews per 1,000 forged tokens (real kid; {result['rps']:,.0f} req/s refused)",
        f"{per_1000:g}",
        "0",
        per_1000 == 0,
    )


FLOOD = 30_000  # forged tokens: refused at about 4,000 req/s, 3,000 were over before the pods


def flood_fairness(bench: Bench) -> Row:
    """20 new pods during a forged flood (``FLOOD`` tokens, enough to outlast the pods' run
    at the rate the CP refuses them) on 200 connections, TokenReview 500 ms."""
    good = bench.good_token()
    legit = bench.workdir / "legit.txt"
    bench.kube.call("sessions", [str(legit), 20, f"b{secrets.token_hex(2)}"])
    flood_file = bench.write("flood.txt", forged(good, FLOOD))
    proc, port = bench.cp("cp-flood")
    flood: dict[str, Any] = {}
    try:
        if get(port, good) != 200:
            raise RuntimeError("the good token was refused")
        bench.kube.call("reset")
        bench.kube.call("latency", [0.5, "tokenreviews"])

        def run_flood() -> None:
            flood.update(run_loadgen(port, flood_file, conns=200, each=True))

        thread = threading.Thread(target=run_flood)
        thread.start()
        time.sleep(0.5)  # the flood's connections are open and busy
        pods = run_loadgen(port, legit, conns=20, each=True)
        flood_running = thread.is_alive()
        thread.join()
        reviews = bench.kube.call("calls")["tokenreviews"]
    finally:
        bench.kube.call("latency", 0.0)
        proc.stop()
    expect("flood", flood, {"401", "503"}, proc)  # refused, or shed: never a 200 or a 500
    served = pods["statuses"].get("200", 0) if (pods["p99"] or 99) <= 10.0 else 0
    note = "" if flood_running else " (the flood ended first: rerun)"
    shed = flood["statuses"].get("503", 0)
    return Row(
        f"new pods served within 10 s during a forged flood, TokenReview 500 ms "
        f"(slowest {pods['p99']:.2f} s; {reviews} TokenReviews; {shed} forged shed 503){note}",
        f"{served}/20",
        "all",
        served == 20 and flood_running,
    )


def sidecar_recovery(bench: Bench) -> Row:
    """Time from a healed CP to the sidecar serving a token, after an outage (12 s) longer
    than the token's life (5 s); its own CP and sidecar (bench_recovery), not the shared kube."""
    seconds = measure_sidecar_recovery(ttl=5, outage=12.0)
    return Row(
        "sidecar: time to a token after a 12 s CP outage heals (tokens live 5 s)",
        f"{seconds:.2f} s",
        "<= 2.5 s",
        seconds <= 2.5,
    )


def sidecar_file_recovery(bench: Bench) -> Row:
    """The same outage with a consumer that only reads the token file: no request helps."""
    seconds = measure_sidecar_recovery(ttl=5, outage=12.0, file_only=True)
    return Row(
        "sidecar: time to the token file back after a 12 s CP outage heals (no requests)",
        f"{seconds:.2f} s",
        "<= 2.5 s",
        seconds <= 2.5,
    )


def sidecar_hostile_answers(bench: Bench) -> Row:
    """One sidecar per malformed CP answer: it holds a token, is made to fetch, gets the
    bad answer, and must keep serving its token (and not exit). (tests/ is on sys.path:
    bench_recovery put it there.)"""
    from tests.fakes.hostile_upstream import GOOD_TOKEN, HOSTILE_ANSWERS, RawUpstream
    from tests.integration.procs import sidecar_serve

    sa = bench.workdir / "sidecar-sa"
    sa.write_text("sa.jwt.token")
    kept, peak, failed = 0, 0, []
    headers = {"Ambient-Token-Request": "true"}
    with RawUpstream() as upstream:
        for case in sorted(HOSTILE_ANSWERS):
            proc, base = sidecar_serve(
                upstream.url(f"good-then/{case}"), sa, bench.workdir / f"sidecar-{case}.log"
            )
            try:
                proc.wait_http(f"{base}/readyz")
                with httpx.Client(base_url=base, trust_env=False, timeout=10) as http:
                    asked = http.get("/token", params={"min_ttl": 3600}, headers=headers)
                    time.sleep(0.2)
                    again = http.get("/token", headers=headers)
                alive = proc.popen.poll() is None
                if (
                    alive
                    and asked.status_code == again.status_code == 200
                    and (again.json()["token"] == GOOD_TOKEN)
                ):
                    kept += 1
                else:
                    failed.append(case)
                peak = max(peak, rss(proc.pid) if alive else 0)
            finally:
                proc.stop()
    total = len(HOSTILE_ANSWERS)
    if failed:
        print(f"  sidecar: did not keep serving after {', '.join(failed)}")
    return Row(
        f"sidecar: kept serving its token after a malformed CP answer ({total} kinds)",
        f"{kept}/{total}, {peak / MiB:.1f} MiB",
        "all, <= 30 MiB",
        kept == total and peak <= 30 * MiB,
    )


# --- memory and fairness at the edge (raw sockets) ---------------------------------------

TRAILER_SECONDS = 10.0


def _trailer_row(who: str, pid: int, port: int, path: bytes, tls: Any = None) -> Row:
    with peak_growth_kib(pid) as growth:
        attack = stream_after(
            port, chunked_head(path) + b"0\r\nX-Endless: ", seconds=TRAILER_SECONDS, tls=tls
        )
    cut = "never cut" if attack.closed_after is None else f"cut after {attack.sent >> 10} KiB"
    return Row(
        f"{who} peak RSS growth, one connection streaming an endless trailer 10 s ({cut})",
        f"{growth[0] / 1024:+.1f} MiB",
        "<= 24 MiB",
        growth[0] <= 24 * 1024 and attack.closed_after is not None,
    )


def cp_trailer_growth(bench: Bench) -> Row:
    """The CP under one endless trailer (before: 65 -> 414 MiB in 45 s, a core pinned)."""
    proc, port = bench.cp("cp-trailer")
    try:
        return _trailer_row("CP", proc.pid, port, b"/token")
    finally:
        proc.stop()


def inject_trailer_growth(bench: Bench) -> Row:
    """The injector under one endless trailer (before: to 284 MiB)."""
    running = bench.injector()
    try:
        port = int(running.url.rsplit(":", 1)[1])
        return _trailer_row("injector", running.proc.pid, port, b"/mutate", running.ca)
    finally:
        running.proc.terminate()


def cp_stalled_growth(bench: Bench) -> Row:
    """4,000 form bodies of 64 KB, each one byte short (before: the CP at 372 MiB). No
    per-client cap, so the bound on bytes held is what is measured."""
    proc, port = bench.cp("cp-stalled", {"CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT": "0"})
    form = b"application/x-www-form-urlencoded"
    try:
        with peak_growth_kib(proc.pid) as growth:
            socks = stalled_bodies(port, 4000, 64 * 1024, path=b"/oauth2/token", content_type=form)
            time.sleep(1.0)  # the CP reads what the kernel buffered
        for sock in socks:
            sock.close()
    finally:
        proc.stop()
    return Row(
        "CP peak RSS growth, 4,000 form bodies of 64 KB stalled one byte short",
        f"{growth[0] / 1024:+.1f} MiB",
        "<= 96 MiB",
        growth[0] <= 96 * 1024,
    )


def inject_stalled_growth(bench: Bench) -> Row:
    """100 reviews of 3.1 MB, each one byte short (before: the injector at 407 MiB, never
    given back)."""
    running = bench.injector()
    try:
        port = int(running.url.rsplit(":", 1)[1])
        with peak_growth_kib(running.proc.pid) as growth:
            socks = stalled_bodies(
                port,
                100,
                3_100_000,
                path=b"/mutate",
                content_type=b"application/json",
                tls=running.ca,
            )
            time.sleep(1.0)
            review = admission_review(opted_in_pod())
            answer: dict[str, Any] = {}
            with contextlib.suppress(httpx.HTTPError):  # a small review still fits
                answer = running.post(review).json().get("response", {})
        for sock in socks:
            sock.close()
    finally:
        running.proc.terminate()
    return Row(
        "injector peak RSS growth, 100 reviews of 3.1 MB stalled one byte short "
        f"(a small review meanwhile: {'answered' if answer.get('uid') else 'not answered'})",
        f"{growth[0] / 1024:+.1f} MiB",
        "<= 96 MiB",
        growth[0] <= 96 * 1024 and bool(answer.get("uid")),
    )


HOG = "127.0.0.2"


def succeeded(call: Callable[[], int], want: int = 200) -> bool:
    """Whether ``call`` returned ``want``; a refused or reset connection is a failure."""
    try:
        return call() == want
    except httpx.HTTPError:
        return False


def cp_fairness(bench: Bench) -> Row:
    """64 new pods' requests while one address holds 4,096 idle sockets (before: 53 of 64
    failed)."""
    good = bench.good_token()
    proc, port = bench.cp("cp-fairness")
    try:
        if get(port, good) != 200:
            raise RuntimeError("the good token was refused")
        hog = idle_sockets(port, 4096, HOG)
        served = sum(succeeded(lambda: get(port, good)) for _ in range(64))
        for sock in hog:
            sock.close()
    finally:
        proc.stop()
    return Row(
        f"CP: legitimate requests served while {HOG} holds {len(hog):,} idle sockets",
        f"{served}/64",
        "all",
        served == 64,
    )


def inject_fairness(bench: Bench) -> Row:
    """51 reviews while one address holds 4,096 idle sockets (before: 36 of 51 failed, and
    failurePolicy: Fail blocks pod creation)."""
    running = bench.injector()
    try:
        port = int(running.url.rsplit(":", 1)[1])
        hog = idle_sockets(port, 4096, HOG)
        review = admission_review(opted_in_pod())
        answered = sum(succeeded(lambda: running.post(review).status_code) for _ in range(51))
        for sock in hog:
            sock.close()
    finally:
        running.proc.terminate()
    return Row(
        f"injector: reviews answered while {HOG} holds {len(hog):,} idle sockets",
        f"{answered}/51",
        "all",
        answered == 51,
    )


# Rows run in order; each starts its own processes.
ROWS: list[Callable[[Bench], Row]] = [
    replay_growth_keys_readable,
    replay_growth_keys_unreadable,
    forged_reviews,
    flood_fairness,
    sidecar_recovery,
    sidecar_file_recovery,
    sidecar_hostile_answers,
    cp_trailer_growth,
    inject_trailer_growth,
    cp_stalled_growth,
    inject_stalled_growth,
    cp_fairness,
    inject_fairness,
]


def main(argv: list[str] | None = None) -> int:
    """Run every row and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only the rows whose function name "
        "contains this (repeatable), e.g. --only growth --only fairness",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"cp-token hostile-load benchmark: {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load average {load}"
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        kube = FakeKube(Path(tmp))
        try:
            bench = Bench(Path(tmp), kube)
            for row in ROWS:
                if args.only and not any(part in row.__name__ for part in args.only):
                    continue
                rows.append(row(bench))
                print(f"  done: {rows[-1].metric}", flush=True)
        finally:
            kube.stop()
    width = max(len(r.metric) for r in rows)
    print("\n" + "=" * (width + 34))
    print("SUMMARY (bench/bench_hostile.py)")
    print(f"{'metric':<{width}}  {'measured':>12}  {'goal':>10}")
    for r in rows:
        print(f"{r.metric:<{width}}  {r.measured:>12}  {r.goal:>10}  {'ok' if r.ok else 'MISSED'}")
    print(f"total bench time {time.perf_counter() - started:.0f} s")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
