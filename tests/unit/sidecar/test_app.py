"""The sidecar's HTTP contract over ASGI, with a scripted CP and a fake clock: the request
guard (the headers as sent, duplicates kept, proxies, absolute-form targets; a property test
under arbitrary header lists), the routes, the probes, and recovery (with nothing held a request
fetches at once, at most once a second; ``?min_ttl`` within 5 s of a fetch; a rotated SA token
file seen by the next request)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_token.client import TokenRejected, TokenSource, TokenUnavailable
from cp_token.client._http import (
    MAX_DESCRIPTION,
)
from sidecar.app import PROXY_HEADERS, create_metrics_app, refusal
from tests.fakes.client import Script, ok, refused, unavailable
from tests.fakes.clock import SteppedClock
from tests.fakes.sidecar_rig import HEADER, ManualClock, Rig

# --- the request guard ------------------------------------------------------------------------


async def test_the_header_is_required(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    for headers in ({}, {"Ambient-Token-Request": "false"}, {"Ambient-Token-Request": ""}):
        response = await rig.client.get("/token", headers=headers)
        assert response.status_code == 403
        assert response.json()["error"] == "access_denied"
        assert "Ambient-Token-Request" in response.json()["error_description"]
    assert rig.cp.count == 0  # refused before any fetch


@pytest.mark.parametrize(
    ("header", "value", "fragment"),
    [
        ("Origin", "http://evil.example", "Origin"),
        ("Origin", "null", "Origin"),
        ("X-Forwarded-For", "10.0.0.1", "X-Forwarded-For"),
        ("Host", "evil.example", "loopback"),
        ("Host", "127.0.0.1.nip.io:8099", "loopback"),
        ("Host", "10.1.2.3:8099", "loopback"),
    ],
)
async def test_browser_proxy_and_rebinding_requests_are_refused(
    tmp_path: Path, header: str, value: str, fragment: str
) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    for method in (rig.get, rig.post):
        response = await method(headers={header: value})
        assert response.status_code == 403
        assert fragment in response.json()["error_description"]
    assert rig.cp.count == 0


@pytest.mark.parametrize("host", ["localhost", "localhost:8099", "127.0.0.5:1", "[::1]:8099"])
async def test_loopback_hosts_are_accepted(tmp_path: Path, host: str) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    response = await rig.get(headers={"Host": host})
    assert response.status_code == 200


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
async def test_other_methods_get_405(tmp_path: Path, method: str) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    response = await rig.client.request(method, "/token", headers=HEADER)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, POST"
    assert rig.cp.count == 0


async def test_probes_need_no_header(tmp_path: Path) -> None:
    rig = Rig(Script(ok("tok-secret-xyz")), tmp_path)
    assert (await rig.client.get("/healthz")).text == "ok"
    not_ready = await rig.client.get("/readyz")
    assert not_ready.status_code == 503
    await rig.get()
    assert (await rig.client.get("/readyz")).status_code == 200
    metrics = await rig.client.get("/metrics")
    assert metrics.status_code == 200
    assert "\ncp_token_sidecar_ready 1.0" in metrics.text
    assert "tok-secret-xyz" not in metrics.text


# --- GET ------------------------------------------------------------------------------------


async def test_get_serves_the_cp_json_with_an_honest_expires_in(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1", 900)), tmp_path)
    first = await rig.get()
    assert first.status_code == 200
    assert first.headers["Cache-Control"] == "no-store"
    assert first.headers["Content-Type"] == "application/json"
    assert first.json() == {
        "token": "t1",
        "token_type": "Bearer",
        "expires_at": "2027-01-15T08:15:00Z",
        "expires_in": 900,
    }
    rig.clock.advance(100.6)
    assert (await rig.get()).json()["expires_in"] == 799  # floored: never overstated
    assert rig.cp.count == 1
    assert rig.cp.requests[0].headers["Authorization"] == "Bearer sa-token"


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "1e9", ""])
async def test_bad_min_ttl_is_a_400_with_the_reason(tmp_path: Path, value: str) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    response = await rig.get(params={"min_ttl": value})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "min_ttl" in response.json()["error_description"]


async def test_min_ttl_is_percent_decoded_and_given_once(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1", 900), ok("t2", 900)), tmp_path)
    await rig.get()
    rig.clock.advance(400)  # 500 s left
    encoded = await rig.get(path="/token?min%5Fttl=%36%30%30")  # min_ttl=600
    assert encoded.status_code == 200 and encoded.json()["token"] == "t2"
    twice = await rig.get(path="/token?min_ttl=99999&min_ttl=1")
    assert twice.status_code == 400
    assert "more than once" in twice.json()["error_description"]
    assert rig.cp.count == 2


async def test_min_ttl_fetches_first_when_needed(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1", 900), ok("t2", 900)), tmp_path)
    await rig.get()
    rig.clock.advance(400)  # 500 s left
    assert (await rig.get(params={"min_ttl": "100"})).json()["token"] == "t1"
    assert rig.cp.count == 1
    fresh = await rig.get(params={"min_ttl": "600"})
    assert fresh.json()["token"] == "t2"
    assert fresh.json()["expires_in"] == 900
    assert rig.cp.count == 2


async def test_default_min_ttl_is_sidecar_min_ttl(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1", 900), ok("t2", 900)), tmp_path)
    await rig.get()
    rig.clock.advance(839)  # 61 s left
    assert (await rig.get()).json()["token"] == "t1"
    rig.clock.advance(2)  # 59 s left: below SIDECAR_MIN_TTL (60)
    assert (await rig.get()).json()["token"] == "t2"


async def test_if_the_min_ttl_fetch_fails_the_held_token_is_served(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1", 900), unavailable()), tmp_path)
    await rig.get()
    rig.clock.advance(880)
    response = await rig.get(params={"min_ttl": "300"})
    assert response.status_code == 200
    assert response.json()["token"] == "t1"
    assert response.json()["expires_in"] == 20
    assert rig.cp.count == 2


async def test_concurrent_cold_start_gets_share_one_fetch(tmp_path: Path) -> None:
    cp = Script(ok("t1"))
    cp.gate = asyncio.Event()
    rig = Rig(cp, tmp_path)
    requests = [asyncio.create_task(rig.get()) for _ in range(25)]
    for _ in range(20):
        await asyncio.sleep(0)
    cp.gate.set()
    responses = await asyncio.gather(*requests)
    assert {r.json()["token"] for r in responses} == {"t1"}
    assert cp.count == 1


# --- POST -----------------------------------------------------------------------------------


async def test_post_forces_a_fresh_token_but_not_within_5_seconds(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1"), ok("t2"), ok("t3")), tmp_path)
    await rig.get()
    rig.clock.advance(4)
    assert (await rig.post()).json()["token"] == "t1"  # fetched 4 s ago: held token
    assert rig.cp.count == 1
    rig.clock.advance(1)
    assert (await rig.post()).json()["token"] == "t2"
    assert rig.cp.count == 2


async def test_concurrent_posts_share_one_fetch(tmp_path: Path) -> None:
    cp = Script(ok("t1"), ok("t2"))
    rig = Rig(cp, tmp_path)
    await rig.get()
    rig.clock.advance(10)
    cp.gate = asyncio.Event()
    posts = [asyncio.create_task(rig.post()) for _ in range(10)]
    gets = [asyncio.create_task(rig.get(params={"min_ttl": "895"})) for _ in range(10)]
    for _ in range(20):
        await asyncio.sleep(0)
    cp.gate.set()
    responses = await asyncio.gather(*posts, *gets)
    assert {r.json()["token"] for r in responses} == {"t2"}
    assert cp.count == 2


async def test_a_refusal_while_holding_a_token_keeps_serving_it(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1"), refused(403, "no longer a runner")), tmp_path)
    await rig.get()
    rig.clock.advance(6)
    response = await rig.post()
    assert response.status_code == 200
    assert response.json()["token"] == "t1"


# --- nothing held ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "challenge"),
    [(401, "invalid_token", 'Bearer error="invalid_token"'), (403, "access_denied", None)],
)
async def test_cp_refusals_are_relayed_while_nothing_is_held(
    tmp_path: Path, status: int, error: str, challenge: str | None
) -> None:
    """With the CP's status and description; a 401 with its Bearer challenge (RFC 6750)."""
    rig = Rig(Script(refused(status, "serviceaccount default is not a session runner")), tmp_path)
    response = await rig.get()
    assert response.status_code == status
    assert response.headers.get("www-authenticate") == challenge
    assert response.json() == {
        "error": error,
        "error_description": "serviceaccount default is not a session runner",
    }
    assert (await rig.get()).status_code == status  # still relayed, without a new fetch
    assert rig.cp.count == 1


async def test_a_client_through_the_sidecar_raises_token_rejected(tmp_path: Path) -> None:
    rig = Rig(Script(refused(403, "namespace is not managed")), tmp_path)
    client = TokenSource(
        sidecar_url="http://127.0.0.1:8099/token",
        clock=rig.clock,
        async_transport=httpx.ASGITransport(app=rig.app),
    )
    with pytest.raises(TokenRejected) as err:
        await client.atoken()
    assert err.value.status == 403
    assert err.value.description == "namespace is not managed"


async def test_503_with_retry_after_when_nothing_is_held_and_the_cp_is_down(
    tmp_path: Path,
) -> None:
    rig = Rig(Script(unavailable(503, retry_after="4")), tmp_path)
    response = await rig.get()
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert "no unexpired token" in response.json()["error_description"]
    assert int(response.headers["Retry-After"]) >= 4
    again = await rig.get()  # backing off: no new fetch, same answer
    assert again.status_code == 503
    assert rig.cp.count == 1


async def test_an_absurd_retry_after_does_not_leave_the_pod_dark(tmp_path: Path) -> None:
    rig = Rig(Script(unavailable(503, retry_after="100000"), ok("t1")), tmp_path)
    response = await rig.get()
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) <= 10  # not 100000 (5 s, jittered to 2N)
    rig.clock.advance(5)
    recovered = await rig.get()  # the CP is back: the next request gets a token
    assert recovered.status_code == 200 and recovered.json()["token"] == "t1"


async def test_an_expired_token_is_never_served(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1", 100), httpx.ConnectError("refused")), tmp_path)
    await rig.get()
    rig.clock.advance(100)
    response = await rig.get()
    assert response.status_code == 503
    assert (await rig.client.get("/readyz")).status_code == 503


async def test_a_client_through_the_sidecar_gives_up_after_its_deadline(tmp_path: Path) -> None:
    rig = Rig(Script(httpx.ConnectError("refused")), tmp_path)
    client = TokenSource(
        sidecar_url="http://127.0.0.1:8099/token",
        clock=rig.clock,
        deadline=60,
        async_transport=httpx.ASGITransport(app=rig.app),
    )
    with pytest.raises(TokenUnavailable):
        await client.atoken()


# --- metrics address --------------------------------------------------------------------------


async def test_the_metrics_app_never_serves_tokens(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    await rig.get()
    app = create_metrics_app(rig.holder, rig.metrics)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9099"
    ) as metrics:
        assert (await metrics.get("/token", headers=HEADER)).status_code == 404
        assert (await metrics.post("/token", headers=HEADER)).status_code == 404
        assert (await metrics.get("/readyz")).status_code == 200
        text = (await metrics.get("/metrics")).text
        assert 'cp_token_sidecar_token_requests_total{method="GET",outcome="ok"} 1.0' in text
        assert 'cp_token_sidecar_upstream_fetches_total{outcome="ok"} 1.0' in text


# --- what the probe port says -----------------------------------------------------------------

POLICY_WORDS = (
    "system:serviceaccount:team-a:default is not an allowed session runner "
    "(CP_TOKEN_ALLOWED_SA system:serviceaccount:*:session-*-sa)"
)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (refused(403, POLICY_WORDS), "refused"),
        (refused(401, POLICY_WORDS), "refused"),
        (unavailable(503), "cp_unavailable"),
        (httpx.ConnectError("refused by cp.example.svc:8080"), "cp_unavailable"),
        (httpx.Response(404, json={"error_description": POLICY_WORDS}), "cp_error"),
    ],
)
async def test_readyz_names_a_reason_class_only(
    tmp_path: Path, answer: httpx.Response | Exception, reason: str
) -> None:
    """SIDECAR_METRICS_ADDR is reachable from the network (before: /readyz showed the
    pod's ServiceAccount username and the CP's policy glob after a refusal)."""
    rig = Rig(Script(answer), tmp_path)
    app = create_metrics_app(rig.holder, rig.metrics)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://10.0.0.7:9099"
    ) as probes:
        assert (await probes.get("/readyz")).text == "not ready: starting"
        await rig.get()  # the sidecar asks the CP
        for client in (probes, rig.client):
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.text == f"not ready: {reason}"
            metrics = (await client.get("/metrics")).text
            for words in ("serviceaccount", "session-*", "team-a", "cp.example", "8080"):
                assert words not in ready.text and words not in metrics


async def test_readyz_says_ready_and_then_expired(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1", 100)), tmp_path, clock=ManualClock())
    await rig.get()
    assert (await rig.client.get("/readyz")).text == "ready"
    rig.clock.advance(100)  # no refresh was tried (its loop is not running here)
    assert (await rig.client.get("/readyz")).text == "not ready: expired"


async def test_the_503s_retry_after_is_spread_over_n_to_2n(tmp_path: Path) -> None:
    """Consumers told to come back do not all come back in the same second (before: every
    503 said exactly the CP's 5)."""
    rig = Rig(Script(unavailable(503, retry_after="5")), tmp_path)
    values = set()
    for _ in range(60):
        response = await rig.get()
        assert response.status_code == 503
        values.add(int(response.headers["Retry-After"]))
    assert rig.cp.count == 1  # the requests wait the CP's 5 s out
    assert values <= set(range(5, 11)) and len(values) >= 4


async def test_after_a_refusal_a_request_5_s_later_asks_the_cp_again(tmp_path: Path) -> None:
    rig = Rig(Script(refused(403, "not managed"), ok("t1")), tmp_path)
    assert (await rig.get()).status_code == 403
    rig.clock.advance(4.9)
    assert (await rig.get()).status_code == 403
    assert rig.cp.count == 1  # at most one ask per 5 s
    rig.clock.advance(0.1)
    labelled = await rig.get()  # the ServiceAccount was labelled meanwhile
    assert labelled.status_code == 200 and labelled.json()["token"] == "t1"
    assert rig.cp.count == 2


# --- the request guard, as the headers were sent (refusal) ---------------------------------

HOST = (b"host", b"127.0.0.1:8099")


OPT_IN = (b"ambient-token-request", b"true")


LOOPBACK_HINTS = (b"127.", b"localhost", b"::1")


def test_a_plain_loopback_request_passes() -> None:
    assert refusal([HOST, OPT_IN]) is None
    assert refusal({b"host": b"localhost", b"ambient-token-request": b"TRUE"}) is None


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        # the last of two used to win: `false` then `true` passed
        ([HOST, (b"ambient-token-request", b"false"), OPT_IN], "exactly once"),
        ([HOST, OPT_IN, OPT_IN], "exactly once"),
        ([HOST], "Ambient-Token-Request"),
        # `Host: evil` then `Host: 127.0.0.1` passed
        ([(b"host", b"evil.example"), HOST, OPT_IN], "more than one Host"),
        ([HOST, HOST, OPT_IN], "more than one Host"),
        ([OPT_IN], "loopback"),
        ([HOST, OPT_IN, (b"origin", b"null")], "Origin"),
    ],
)
def test_duplicates_and_missing_headers_are_refused(
    headers: list[tuple[bytes, bytes]], fragment: str
) -> None:
    reason = refusal(headers)
    assert reason is not None and fragment in reason


@pytest.mark.parametrize("name", sorted(PROXY_HEADERS))
def test_every_proxy_header_is_refused(name: bytes) -> None:
    reason = refusal([HOST, OPT_IN, (name, b"10.0.0.1")])
    assert reason is not None and PROXY_HEADERS[name] in reason


def test_an_absolute_form_target_is_refused() -> None:
    reason = refusal([HOST, OPT_IN], absolute_target=True)
    assert reason is not None and "absolute-form" in reason


HEADER_NAMES = st.sampled_from(
    [b"host", b"ambient-token-request", b"origin", *PROXY_HEADERS, b"accept", b"user-agent"]
)


HEADER_VALUES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"true", b"TRUE", b"false", b"localhost:8099", b"[::1]:1", b"127.0.0.1"]),
)


@settings(max_examples=500, deadline=None)
@given(headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8))
def test_guard_never_raises_and_only_opens_for_one_loopback_host_and_one_opt_in(
    headers: list[tuple[bytes, bytes]],
) -> None:
    reason = refusal(headers)
    assert reason is None or isinstance(reason, str)
    if reason is None:
        names = [name for name, _ in headers]
        assert b"origin" not in names and not set(names) & set(PROXY_HEADERS)
        hosts = [value for name, value in headers if name == b"host"]
        opt_ins = [value for name, value in headers if name == b"ambient-token-request"]
        assert len(hosts) == 1 and any(h in hosts[0].lower() for h in LOOPBACK_HINTS)
        assert len(opt_ins) == 1 and opt_ins[0].lower() == b"true"


async def test_a_false_then_true_opt_in_is_refused(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    headers = [("Ambient-Token-Request", "false"), ("Ambient-Token-Request", "true")]
    response = await rig.client.get("/token", headers=headers)
    assert response.status_code == 403
    assert "exactly once" in response.json()["error_description"]
    assert rig.cp.count == 0


@pytest.mark.parametrize(
    "header",
    ["Forwarded", "X-Real-IP", "Via", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"],
)
async def test_proxy_headers_are_refused_over_asgi(tmp_path: Path, header: str) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    for method in (rig.get, rig.post):
        response = await method(headers={header: "1.0 proxy"})
        assert response.status_code == 403
        named = header if not header.startswith("X-Forwarded-") else "X-Forwarded-"
        assert named in response.json()["error_description"]
    assert rig.cp.count == 0


# --- recovery -------------------------------------------------------------------------------


async def test_with_nothing_held_a_request_fetches_at_once_after_a_long_outage(
    tmp_path: Path,
) -> None:
    down = httpx.ConnectError("connection refused")
    cp = Script(ok("t1", 10), *[down] * 12, ok("t2", 10))
    rig = Rig(cp, tmp_path)
    assert (await rig.get()).json()["token"] == "t1"
    # the CP goes away for longer than the token's life; the holder backs off (to 2 s at
    # most, now that nothing is held)
    start = rig.clock.monotonic()
    while True:
        due = rig.holder.next_fetch_at()
        assert due is not None
        assert due - rig.clock.monotonic() <= 2 or rig.holder.ready
        if rig.clock.monotonic() - start > 10 and due - rig.clock.monotonic() > 1.2:
            break
        rig.clock.advance(max(0.0, due - rig.clock.monotonic()))
        await rig.refresher.fetch()
    assert not rig.holder.ready
    fetched = cp.count
    rig.clock.advance(1)
    response = await rig.get()  # a request, whatever the backoff: one fetch (still down)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"  # ask again in a second
    assert cp.count == fetched + 1
    assert (await rig.get()).status_code == 503
    assert cp.count == fetched + 1  # at most one fetch a second
    while cp.count < 13:  # the outage lasts: one fetch per second of requests
        rig.clock.advance(1)
        assert (await rig.get()).status_code == 503
    rig.clock.advance(1)  # the CP is back: the next request gets a token at once
    response = await rig.get()
    assert response.status_code == 200 and response.json()["token"] == "t2"


async def test_min_ttl_within_5_s_of_a_fetch_fetches_unless_the_token_was_shorter(
    tmp_path: Path,
) -> None:
    rig = Rig(Script(ok("t1", 100), ok("t2", 100), ok("t3", 100)), tmp_path)
    assert (await rig.get(params={"min_ttl": "5"})).json()["token"] == "t1"
    rig.clock.advance(2)  # 98 s left
    fresh = await rig.get(params={"min_ttl": "99"})  # the CP gives 100 s: worth a fetch
    assert fresh.json()["token"] == "t2" and fresh.json()["expires_in"] == 100
    rig.clock.advance(2)
    held = await rig.get(params={"min_ttl": "150"})  # it gave 100 s moments ago: no fetch
    assert held.json()["token"] == "t2" and held.json()["expires_in"] == 98
    assert rig.cp.count == 2


async def test_a_request_right_after_the_sa_token_rotates_gets_a_token(tmp_path: Path) -> None:
    """No wait for the loop's poll: the request itself sees the new file (SPEC: "as soon as
    the SA token file has changed")."""

    def cp_answer(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer rotated-sa-token":
            return ok("t1")
        return refused(403, "not a session runner")

    cp = Script(cp_answer)
    rig = Rig(cp, tmp_path, clock=SteppedClock())
    assert (await rig.get()).status_code == 403  # relayed
    assert (await rig.get()).status_code == 403  # the file is unchanged: no new fetch
    assert cp.count == 1
    (tmp_path / "sa-token.new").write_text("rotated-sa-token")
    os.replace(tmp_path / "sa-token.new", tmp_path / "sa-token")
    answer = await rig.get()  # no time has passed
    assert answer.status_code == 200 and answer.json()["token"] == "t1"
    assert cp.count == 2


async def test_the_sidecar_relays_at_most_300_characters_of_upstream_text(tmp_path: Path) -> None:
    """Before: a refusal's non-JSON text (here the 60 KB reason phrase) was relayed whole."""
    long = b"y" * 60_000
    refusal = httpx.Response(403, content=long, extensions={"reason_phrase": long})
    rig = Rig(Script(refusal), tmp_path)
    refused = await rig.get()
    assert refused.status_code == 403
    assert refused.json()["error_description"] == "y" * MAX_DESCRIPTION

    outage = httpx.Response(503, content=long, extensions={"reason_phrase": long})
    rig = Rig(Script(outage), tmp_path)
    busy = await rig.get()
    assert busy.status_code == 503
    assert len(busy.json()["error_description"]) < MAX_DESCRIPTION + 150
