"""Sealed mode with real processes: the sidecar between a fake CP, a recording HTTPS API and a
TLS gRPC API, called the way an app container of a sealed pod calls it (the environment the
injector writes, the client library's ``api_client()`` and ``grpc_channel()``).

What an app container can see (every answer, header, trailer, file and environment variable)
is kept and scanned for every token the CP issued: nothing. Time is real: every wait polls a
process with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from cp_token.client import TokenError, TokenSource, api_async_client, api_client, grpc_channel
from cp_token.inject.app import review_response
from cp_token.inject.patch import MODE_ANNOTATION, decide
from cp_token.settings.inject import InjectSettings
from tests.fakes.admission import admission_review, apply_review_patch, opted_in_pod
from tests.integration.fake_cp import FakeCP
from tests.integration.procs import Proc, free_port, run_cmd
from tests.integration.sealed_rig import (
    GRPC_SERVICE,
    HEADER,
    GrpcUpstream,
    RecordingUpstream,
    sealed_sidecar,
    write_ca_bundle,
)

MiB = 1024 * 1024
SIDECAR = [sys.executable, "-m", "sidecar"]


def poll(predicate: Callable[[], bool], deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {deadline}s: {what}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Pod:
    """A sealed pod: the sidecar process, and what its app containers see of it."""

    def __init__(
        self,
        proc: Proc,
        base: str,
        grpc_port: int,
        cp: FakeCP,
        api: RecordingUpstream,
        upstream_grpc: GrpcUpstream,
        tmp: Path,
    ) -> None:
        self.proc, self.base, self.cp = proc, base, cp
        self.api, self.upstream_grpc, self.tmp = api, upstream_grpc, tmp
        self.grpc_addr = f"127.0.0.1:{grpc_port}"
        self.env = app_container_env(base, self.grpc_addr, api.url)
        self.visible: list[str] = [json.dumps(self.env)]  # everything an app container saw
        self.http = api_client(env=self.env, timeout=10)
        self.channel = grpc_channel(env=self.env)

    def keep(self, response: httpx.Response) -> httpx.Response:
        self.visible.append(f"{response.status_code} {response.headers.multi_items()!r}")
        self.visible.append(response.text)
        return response

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.keep(self.http.request(method, path, **kw))

    def raw(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """A request to the sidecar itself (not under AMBIENT_API_URL)."""
        with httpx.Client(base_url=self.base, trust_env=False, timeout=10) as client:
            return self.keep(client.request(method, path, **kw))

    def rpc(self, name: str, kind: str = "unary") -> Any:
        make = {
            "unary": self.channel.unary_unary,
            "stream": self.channel.unary_stream,
            "bidi": self.channel.stream_stream,
        }[kind]
        return make(f"/{GRPC_SERVICE}/{name}")

    def keep_call(self, call: Any) -> None:
        self.visible.append(repr(call.initial_metadata()))
        self.visible.append(repr(call.trailing_metadata()))
        self.visible.append(f"{call.code()} {call.details()}")

    def close(self) -> None:
        self.http.close()
        self.channel.close()


def app_container_env(base: str, grpc_addr: str, api_url: str) -> dict[str, str]:
    """The variables the injector gives a sealed pod's app container, pointed at this test's
    ports (the injector writes 8099 and 8098)."""
    settings = InjectSettings(
        image="cp-token:test",
        cp_url="https://cp.example/token",
        upstreams=(("api", f"{api_url}/v1"),),
        grpc_upstream="api.example:443",
    )
    pod = opted_in_pod()
    pod["metadata"]["annotations"] = {MODE_ANNOTATION: "sealed"}
    review = admission_review(pod)
    decision = decide(review["request"], settings)
    assert decision.action == "mutated", decision
    patched = apply_review_patch(pod, review_response("u", decision))
    runner = patched["spec"]["containers"][0]
    assert not runner.get("volumeMounts"), "a sealed app container mounts nothing of ours"
    env = {e["name"]: e["value"] for e in runner["env"]}
    assert set(env) == {"AMBIENT_API_URL", "AMBIENT_GRPC_ADDR"}
    env["AMBIENT_API_URL"] = env["AMBIENT_API_URL"].replace("http://127.0.0.1:8099", base)
    env["AMBIENT_GRPC_ADDR"] = grpc_addr
    return env


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[RecordingUpstream, GrpcUpstream]]:
    with RecordingUpstream() as api, GrpcUpstream() as upstream_grpc:
        yield api, upstream_grpc


def start_pod(
    tmp: Path,
    cp: FakeCP,
    upstreams: tuple[RecordingUpstream, GrpcUpstream],
    **env: str,
) -> Pod:
    api, upstream_grpc = upstreams
    sa = tmp / "sa-token"
    sa.write_text("sa-token")
    ca = write_ca_bundle(tmp / "upstream-ca.pem", api.server.ca_pem, upstream_grpc.ca_pem)
    (tmp / "sidecar-tmp").mkdir(exist_ok=True)
    proc, base, gport = sealed_sidecar(
        cp.url,
        sa,
        tmp / "sidecar.log",
        SIDECAR_UPSTREAMS=f"api={api.url}/v1",
        SIDECAR_GRPC_UPSTREAM=upstream_grpc.target,
        SIDECAR_UPSTREAM_CA_FILE=str(ca),
        TMPDIR=str(tmp / "sidecar-tmp"),
        **env,
    )
    try:
        proc.wait_http(f"{base}/readyz")
    except Exception:
        proc.kill()
        raise
    return Pod(proc, base, gport, cp, api, upstream_grpc, tmp)


@pytest.fixture(scope="module")
def pod(
    tmp_path_factory: pytest.TempPathFactory,
    upstreams: tuple[RecordingUpstream, GrpcUpstream],
) -> Iterator[Pod]:
    tmp = tmp_path_factory.mktemp("sealed")
    with FakeCP(ttl=900) as cp:
        started = start_pod(tmp, cp, upstreams)
        yield started
        started.close()
        assert started.proc.stop() == 0
        log = started.proc.output()
        assert "Traceback" not in log, log[-3000:]
        print(
            "\nsealed sidecar log, error lines:",
            [line for line in log.splitlines() if '"level": "error"' in line or "ERROR" in line],
        )


def issued_secrets(cp: FakeCP) -> list[str]:
    """Each token the CP issued, and its distinctive part (a partial leak counts too)."""
    out: list[str] = []
    for token in list(cp.issued):
        out.append(token)
        out.extend(part for part in token.split("-") if len(part) >= 6)
    return out


# --- what an app container sees --------------------------------------------------------------


def test_a_sealed_pod_has_no_token_to_read(pod: Pod) -> None:
    with pytest.raises(TokenError, match="api_client"):
        TokenSource.from_env(pod.env)
    for method in ("GET", "POST"):
        for headers in (HEADER, {}):
            response = pod.raw(method, "/token", headers=headers)
            assert response.status_code == 403 and response.json()["error"] == "sealed"
    assert pod.cp.calls >= 1  # the sidecar holds one all the same


def test_no_answer_header_file_or_variable_holds_the_token(pod: Pod) -> None:
    """Every route, both protocols, the probes and metrics; then the scan."""
    pod.call("GET", "/sessions", headers={"Authorization": "Bearer mine"})
    pod.call("POST", "/sessions", json={"a": 1})
    pod.call("GET", "/moved")
    pod.call("GET", "/sse")
    pod.call("PUT", "/upload", content=b"x" * 1000)
    pod.call("GET", "/../escape")
    for path in ("/healthz", "/readyz", "/metrics", "/token", "/upstream/nope/x"):
        pod.raw("GET", path, headers=HEADER)
    unary = pod.rpc("Unary").with_call(b"hi", timeout=10)[1]
    pod.keep_call(unary)
    pod.visible.extend(m.decode() for m in pod.rpc("Stream", "stream")(b"2", timeout=10))
    with pytest.raises(grpc.RpcError) as failed:
        pod.rpc("Fail")(b"", timeout=10)
    pod.keep_call(failed.value)
    files = [p for p in pod.tmp.rglob("*") if p.is_file() and p.name != "sidecar.log"]
    pod.visible.extend(p.read_bytes().decode("latin-1") for p in files)
    pod.visible.extend(f"{k}={v}" for k, v in pod.env.items())
    seen = "\n".join(pod.visible)
    secrets = issued_secrets(pod.cp)
    assert secrets, "the CP issued tokens"
    assert not [s for s in secrets if s in seen]
    # and the sidecar's own log carries none either
    assert not [s for s in issued_secrets(pod.cp) if s in pod.proc.output()]


def test_the_upstream_sees_exactly_one_authorization_the_current_token(pod: Pod) -> None:
    before = len(pod.api.seen)
    response = pod.call(
        "GET",
        "/who?x=1",
        headers={
            "Authorization": "Bearer the-callers-own",
            "Cookie": "session=abc",
            "Proxy-Authorization": "Basic eA==",
            "X-Request-Id": "r-1",
        },
    )
    assert response.status_code == 200
    seen = pod.api.seen[before]
    (bearer,) = seen.all("authorization")
    token = bearer.removeprefix("Bearer ")
    assert token in pod.cp.issued and pod.cp.issued[token] > time.time()
    assert token == max(pod.cp.issued, key=pod.cp.issued.__getitem__)  # the current one
    assert seen.all("cookie") == [] and seen.all("proxy-authorization") == []
    assert seen.all("ambient-token-request") == []
    assert seen.all("x-request-id") == ["r-1"]
    assert (seen.path, seen.query) == ("/v1/who", "x=1")
    assert seen.all("host") == [pod.api.url.removeprefix("https://")]


def test_a_redirect_is_handed_back_not_followed(pod: Pod) -> None:
    before = len(pod.api.seen)
    response = pod.call("GET", "/moved")
    assert response.status_code == 302
    assert response.headers["location"] == "https://login.example/next"
    assert "authorization" not in {k.lower() for k in response.headers}
    assert len(pod.api.seen) == before + 1  # the upstream was asked once, nothing followed


def test_errors_are_json_reasons(pod: Pod) -> None:
    unknown = pod.raw("GET", "/upstream/nope/x", headers=HEADER)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_upstream"
    guard = pod.raw("GET", "/upstream/api/x")
    assert guard.status_code == 403 and "Ambient-Token-Request" in guard.text
    origin = pod.raw("GET", "/upstream/api/x", headers={**HEADER, "Origin": "https://e.x"})
    assert origin.status_code == 403
    assert pod.raw("GET", "/upstream/api/a/%2e%2e/x", headers=HEADER).status_code == 400


def test_server_sent_events_arrive_as_they_are_sent(pod: Pod) -> None:
    pod.api.sse_events, pod.api.sse_interval = 5, 0.2

    def first_and_all(client: httpx.Client, url: str) -> tuple[float, list[float]]:
        arrived: list[float] = []
        started = time.monotonic()
        with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data:"):
                    arrived.append(time.monotonic())
        return arrived[0] - started, arrived

    first, arrived = first_and_all(pod.http, "/sse")
    sent = pod.api.sse_sent
    assert len(arrived) == len(sent) == 5
    lags = [a - s for a, s in zip(arrived, sent, strict=True)]
    # each event as it is sent (buffered to the end, the first would lag 0.8 s); the bound
    # leaves room for a loaded machine
    assert max(lags) < 0.4, lags
    assert arrived[-1] - arrived[0] > 0.6, "the events arrived spread out, as sent"
    ca = ssl.create_default_context(cafile=str(pod.tmp / "upstream-ca.pem"))
    with httpx.Client(verify=ca, trust_env=False) as direct:
        direct.headers["Authorization"] = f"Bearer {next(iter(pod.cp.issued))}"
        direct_first, _ = first_and_all(direct, f"{pod.api.url}/v1/sse")
    extra_ms = (first - direct_first) * 1000
    print(f"\nfirst SSE event: proxied {first * 1000:.1f} ms, direct {direct_first * 1000:.1f} ms")
    assert extra_ms < 100  # bench/bench_sealed.py measures it properly (goal: 10 ms)


def test_a_10_mib_upload_streams_with_bounded_memory(pod: Pod) -> None:
    pod.call("PUT", "/upload", content=b"warm" * 1000)  # the pool and code paths are warm
    chunk = os.urandom(64 * 1024)
    digest = hashlib.sha256()
    sizes: list[float] = []
    pid = pod.proc.pid

    def body() -> Iterator[bytes]:
        for i in range(160):  # 10 MiB
            digest.update(chunk)
            if i % 16 == 0:
                sizes.append(rss_mib(pid))
            yield chunk

    before = rss_mib(pid)
    response = pod.call("PUT", "/upload", content=body())
    after = rss_mib(pid)
    assert response.status_code == 200
    assert response.json() == {"size": 10 * MiB, "sha256": digest.hexdigest()}
    growth = max([*sizes, after]) - before
    print(f"\n10 MiB upload: sidecar RSS {before:.1f} -> peak {before + growth:.1f} MiB")
    assert growth < 5, f"the sidecar grew {growth:.1f} MiB for a 10 MiB upload"


def test_metrics_count_proxied_calls_by_upstream_and_class(pod: Pod) -> None:
    page = pod.raw("GET", "/metrics").text
    name = "cp_token_sidecar_proxied_requests_total"
    ok = re.search(rf'{name}{{protocol="http",upstream="api",class="2xx"}} (\S+)', page)
    assert ok and float(ok.group(1)) >= 1
    assert f'{name}{{protocol="http",upstream="api",class="3xx"}}' in page
    assert f'protocol="grpc",upstream="{pod.upstream_grpc.target}",class="2xx"' in page
    assert "/v1/" not in page and "sessions" not in page


# --- gRPC ------------------------------------------------------------------------------------


def test_grpc_unary_with_headers_and_trailers(pod: Pod) -> None:
    before = len(pod.upstream_grpc.bearers)
    answer, call = pod.rpc("Unary").with_call(
        b"hello",
        timeout=10,
        metadata=(("authorization", "Bearer the-callers-own"), ("x-caller", "runner")),
    )
    pod.keep_call(call)
    body = json.loads(answer)
    assert body["echo"] == "hello"
    assert "x-caller" in body["keys"]
    assert dict(call.initial_metadata())["x-initial"] == "hello"
    trailers = dict(call.trailing_metadata())
    assert trailers["x-trailer"] == "bye" and trailers["x-bin-bin"] == b"\x00\x01"
    (bearer,) = pod.upstream_grpc.bearers[before]
    assert bearer.removeprefix("Bearer ") in pod.cp.issued  # the held token, not the caller's


def test_grpc_server_streaming(pod: Pod) -> None:
    messages = list(pod.rpc("Stream", "stream")(b"4", timeout=10))
    assert messages == [f"message {i}".encode() for i in range(4)]


def test_grpc_bidirectional_streaming_interleaves(pod: Pod) -> None:
    """Each answer comes back before the next request is sent: nothing is held back."""
    outbox: list[bytes] = []
    ready = threading.Event()

    def requests() -> Iterator[bytes]:
        for i in range(3):
            outbox.append(f"q{i}".encode())
            ready.clear()
            yield outbox[-1]
            assert ready.wait(10), "the answer to the last request did not arrive first"

    answers = []
    for answer in pod.rpc("Bidi", "bidi")(requests(), timeout=20):
        answers.append(answer)
        ready.set()
    assert answers == [b"re: q0", b"re: q1", b"re: q2"]


def test_grpc_deadline_expires_upstream(pod: Pod) -> None:
    pod.upstream_grpc.cancelled.clear()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        pod.rpc("Slow")(b"", timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    # the upstream call carried the caller's deadline: it ended there too
    poll(pod.upstream_grpc.cancelled.is_set, 5, "the upstream call ended at the deadline")


def test_grpc_cancellation_reaches_the_upstream(pod: Pod) -> None:
    pod.upstream_grpc.cancelled.clear()
    stream = pod.rpc("Stream", "stream")(b"200", timeout=30)
    assert next(stream) == b"message 0"
    stream.cancel()
    poll(pod.upstream_grpc.cancelled.is_set, 5, "the upstream call cancelled")


def test_grpc_status_details_and_trailers_pass_through(pod: Pod) -> None:
    with pytest.raises(grpc.RpcError) as info:
        pod.rpc("Fail")(b"", timeout=10)
    error = info.value
    pod.keep_call(error)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "the session is archived"
    trailers = dict(error.trailing_metadata())
    assert trailers["grpc-status-details-bin"] == b"\x08\x09rich"
    assert trailers["x-reason"] == "archived"


async def test_the_async_client_works_in_a_sealed_pod(pod: Pod) -> None:
    async with api_async_client(env=pod.env, timeout=10) as client:
        answers = await asyncio.gather(*(client.get(f"/a/{i}") for i in range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    assert {a.json()["path"] for a in answers} == {f"/v1/a/{i}" for i in range(5)}


# --- tokens change under the caller ----------------------------------------------------------


def test_a_401_leads_to_one_shared_refresh_and_one_repeat(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, GrpcUpstream]
) -> None:
    api, _ = upstreams
    with FakeCP(ttl=900) as cp:
        pod = start_pod(tmp_path, cp, upstreams)
        try:
            assert pod.call("GET", "/warm").status_code == 200
            first = next(iter(cp.issued))
            fetched_at = time.monotonic()
            api.revoked.add(first)
            # within 5 s of the last fetch a 401 is passed back, no fetch (SPEC)
            assert pod.call("GET", "/early").status_code == 401
            assert len(cp.issued) == 1
            # the 5 s window is the sidecar's real clock: wait it out once
            time.sleep(max(0.0, fetched_at + 5.3 - time.monotonic()))
            before, calls = len(api.seen), cp.calls
            api.hold_revoked_answers(6)  # the six 401s are answered together
            results: list[int] = []

            def one(i: int) -> None:
                results.append(pod.call("POST", f"/s/{i}", json={"i": i}).status_code)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert results == [200] * 6
            assert cp.calls == calls + 1  # one shared refresh for six 401s
            second = [t for t in cp.issued if t != first]
            assert len(second) == 1
            bearers = [s.all("authorization") for s in api.seen[before:]]
            assert sorted(b[0] for b in bearers) == sorted(
                [f"Bearer {first}"] * 6 + [f"Bearer {second[0]}"] * 6
            ), "each call once with the revoked token, repeated once with the fresh one"
        finally:
            api.revoked.clear()
            api.hold_revoked_answers(0)
            pod.close()
            pod.proc.stop()


def test_refreshes_change_the_bearer_without_the_caller_noticing(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, GrpcUpstream]
) -> None:
    api, upstream_grpc = upstreams
    with FakeCP(ttl=4) as cp:  # refreshed at half-life: about every 2 s
        pod = start_pod(tmp_path, cp, upstreams)
        try:
            before, grpc_before = len(api.seen), len(upstream_grpc.bearers)
            end = time.monotonic() + 6
            while time.monotonic() < end:
                assert pod.call("GET", "/tick").status_code == 200
                assert json.loads(pod.rpc("Unary")(b"t", timeout=10))["echo"] == "t"
                time.sleep(0.1)
            http_tokens = [s.all("authorization")[0] for s in api.seen[before:]]
            grpc_tokens = [b[0] for b in upstream_grpc.bearers[grpc_before:]]
            assert len(set(http_tokens)) >= 2 and len(set(grpc_tokens)) >= 2
            for bearer in {*http_tokens, *grpc_tokens}:
                assert bearer.removeprefix("Bearer ") in cp.issued
        finally:
            pod.close()
            pod.proc.stop()


# --- failures --------------------------------------------------------------------------------


def test_unreachable_timeout_and_no_token(
    tmp_path: Path, upstreams: tuple[RecordingUpstream, GrpcUpstream]
) -> None:
    api, _ = upstreams
    closed = free_port()
    with FakeCP(ttl=900) as cp:
        pod = start_pod(
            tmp_path,
            cp,
            upstreams,
            SIDECAR_UPSTREAM_TIMEOUT_SECS="1",
        )
        try:
            started = time.monotonic()
            hung = pod.call("GET", "/hang")
            assert hung.status_code == 504 and hung.json()["error"] == "upstream_timeout"
            assert 0.9 < time.monotonic() - started < 5
            # the CP goes away and the token expires: no token, 503 + Retry-After
        finally:
            pod.close()
            pod.proc.stop()
    with FakeCP(ttl=900) as cp:
        cp.mode = "unavailable"
        sa = tmp_path / "sa-token"
        proc, base, _ = sealed_sidecar(
            cp.url,
            sa,
            tmp_path / "dark.log",
            SIDECAR_UPSTREAMS=f"api={api.url}/v1,down=https://127.0.0.1:{closed}",
            SIDECAR_UPSTREAM_CA_FILE=str(tmp_path / "upstream-ca.pem"),
        )
        try:
            proc.wait_http(f"{base}/healthz")
            with httpx.Client(base_url=base, headers=HEADER, trust_env=False) as client:
                dark = client.get("/upstream/api/x")
                assert dark.status_code == 503 and int(dark.headers["retry-after"]) >= 1
                assert dark.json()["error"] == "temporarily_unavailable"
                cp.mode = "ok"
                poll(lambda: client.get("/readyz").status_code == 200, 10, "a token held")
                down = client.get("/upstream/down/x")
                assert down.status_code == 502 and down.json()["error"] == "upstream_unreachable"
        finally:
            proc.stop()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SIDECAR_UPSTREAMS": "api=https://a.example"}, "SIDECAR_TOKEN_FILE"),
        ({}, "SIDECAR_UPSTREAMS"),
        ({"SIDECAR_UPSTREAMS": "API=https://a.example"}, "SIDECAR_UPSTREAMS"),
        ({"SIDECAR_UPSTREAMS": "api=http://a.example"}, "SIDECAR_UPSTREAMS"),
        (
            {"SIDECAR_GRPC_UPSTREAM": "g:443", "SIDECAR_GRPC_LISTEN_ADDR": "0.0.0.0:8098"},
            "SIDECAR_GRPC_LISTEN_ADDR",
        ),
    ],
)
def test_bad_sealed_configuration_exits_2_naming_the_variable(
    tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    full = {
        "AMBIENT_CP_TOKEN_URL": "http://127.0.0.1:9/token",
        "SIDECAR_SEALED": "true",
        **env,
    }
    if variable == "SIDECAR_TOKEN_FILE":
        full["SIDECAR_TOKEN_FILE"] = str(tmp_path / "token")
    done = run_cmd([*SIDECAR], full)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and variable in done.stderr
    assert "Traceback" not in done.stderr


def test_once_is_refused_in_a_sealed_sidecar() -> None:
    full = {
        "AMBIENT_CP_TOKEN_URL": "http://127.0.0.1:9/token",
        "SIDECAR_SEALED": "true",
        "SIDECAR_UPSTREAMS": "api=https://a.example",
    }
    done = run_cmd([*SIDECAR, "--once"], full)
    assert done.returncode == 2 and "SIDECAR_SEALED" in done.stderr
