"""The webhook's HTTP door in-process: AdmissionReview in, AdmissionReview out, with the
request's uid; anything else a 4xx with a reason (fuzzed), never a 500; metrics by result;
no pod spec in the logs."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cp_token.inject import app as inject_app
from cp_token.inject.app import MAX_DEPTH, MAX_REVIEW_BYTES, create_app, create_metrics_app
from cp_token.inject.metrics import InjectMetrics
from cp_token.inject.patch import CONTAINERS_ANNOTATION
from cp_token.settings.inject import InjectSettings
from tests.fakes.admission import admission_review, apply_review_patch, opted_in_pod, patch_of

SETTINGS = InjectSettings(image="cp-token:1", cp_url="http://cp.example:8080/token")


def client(metrics: InjectMetrics | None = None) -> httpx.AsyncClient:
    app = create_app(SETTINGS, metrics or InjectMetrics())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://webhook")


def count(metrics: InjectMetrics, result: str) -> float:
    value = metrics.registry.get_sample_value("cp_token_inject_requests_total", {"result": result})
    return value or 0.0


async def post(body: Any, metrics: InjectMetrics | None = None, **kw: Any) -> httpx.Response:
    async with client(metrics) as c:
        if isinstance(body, bytes | str):
            return await c.post("/mutate", content=body, **kw)
        return await c.post("/mutate", json=body, **kw)


async def test_mutation_answer_carries_the_uid_and_a_json_patch() -> None:
    metrics = InjectMetrics()
    review = admission_review(opted_in_pod(), uid="7b1e3c55-0e1f-4a9e-8c3d-5f1e2d3c4b5a")
    resp = await post(review, metrics)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    answer = resp.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "7b1e3c55-0e1f-4a9e-8c3d-5f1e2d3c4b5a"
    assert answer["response"]["allowed"] is True
    assert answer["response"]["patchType"] == "JSONPatch"
    out = apply_review_patch(review["request"]["object"], answer)
    assert out["spec"]["initContainers"][0]["name"] == "cp-token-sidecar"
    assert count(metrics, "mutated") == 1


async def test_skip_and_refuse_answers() -> None:
    metrics = InjectMetrics()
    update = admission_review(opted_in_pod(), operation="UPDATE", old=opted_in_pod())
    answer = (await post(update, metrics)).json()["response"]
    assert answer == {"uid": update["request"]["uid"], "allowed": True}
    clash = admission_review(opted_in_pod(volumes=[{"name": "cp-token-sa", "emptyDir": {}}]))
    answer = (await post(clash, metrics)).json()["response"]
    assert answer["uid"] == clash["request"]["uid"]
    assert answer["allowed"] is False and patch_of({"response": answer}) is None
    assert "cp-token-sa" in answer["status"]["message"]
    assert answer["status"]["code"] == 409
    assert (count(metrics, "skipped"), count(metrics, "refused")) == (1, 1)


def good_review() -> dict[str, Any]:
    return admission_review(opted_in_pod(), uid="u-1")


def nested(depth: int, leaf: Any = None) -> Any:
    """A value nested ``depth`` arrays deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def broken(mutate: Any) -> dict[str, Any]:
    review = good_review()
    mutate(review)
    return review


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty body"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),  # deeper than the parser recurses
        (broken(lambda r: r["request"].update(operation=nested(101))), "nested"),
        (broken(lambda r: r["request"]["object"].update(x=nested(200, {}))), "nested"),
        (broken(lambda r: r.update(apiVersion="admission.k8s.io/v1beta1")), "apiVersion"),
        (broken(lambda r: r.update(kind="Pod")), "kind"),
        (broken(lambda r: r.pop("request")), "no request"),
        (broken(lambda r: r.update(request=[])), "no request"),
        (broken(lambda r: r["request"].pop("uid")), "uid"),
        (broken(lambda r: r["request"].update(uid="")), "uid"),
        (broken(lambda r: r["request"].update(uid=5)), "uid"),
        (broken(lambda r: r["request"].update(uid="a\nb")), "uid"),
    ],
)
async def test_a_body_that_is_not_an_admission_review_is_400_with_a_reason(
    body: Any, reason: str
) -> None:
    metrics = InjectMetrics()
    resp = await post(body, metrics)
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_review"
    assert reason in resp.json()["error_description"]
    assert count(metrics, "error") == 1


async def test_a_body_over_the_limit_is_413() -> None:
    metrics = InjectMetrics()
    big = b" " * (MAX_REVIEW_BYTES + 1)
    resp = await post(big, metrics)
    assert resp.status_code == 413 and resp.json()["error"] == "invalid_request"

    async def chunks() -> Any:  # no Content-Length: the limit holds while streaming
        for _ in range(MAX_REVIEW_BYTES // 65536 + 2):
            yield b" " * 65536

    async with client(metrics) as c:
        resp = await c.post("/mutate", content=chunks())
    assert resp.status_code == 413
    assert count(metrics, "error") == 2


async def test_a_review_just_under_the_limit_is_answered() -> None:
    review = good_review()
    review["request"]["object"]["metadata"]["annotations"] = {"big": ""}
    size = len(json.dumps(review))
    review["request"]["object"]["metadata"]["annotations"]["big"] = "x" * (
        MAX_REVIEW_BYTES - size - 100
    )
    resp = await post(review)
    assert resp.status_code == 200 and resp.json()["response"]["allowed"] is True


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.update(kind="Pod"),
        lambda r: r.pop("resource"),
        lambda r: r.pop("kind"),
        lambda r: r.update(operation=None),
        lambda r: r.update(kind={"group": "", "version": "v1", "kind": "Pod"}, resource=[]),
    ],
)
async def test_a_review_with_a_uid_is_answered_even_if_incomplete(change: Any) -> None:
    """Not a recognisable pod CREATE: allowed unchanged, answered with the uid."""
    review = good_review()
    change(review["request"])
    resp = await post(review)
    assert resp.status_code == 200
    assert resp.json()["response"] == {"uid": "u-1", "allowed": True}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD", "PATCH"])
async def test_only_post(method: str) -> None:
    async with client() as c:
        resp = await c.request(method, "/mutate")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "POST"


async def test_a_bug_still_answers_the_review_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: Any) -> Any:
        raise KeyError("bug")

    monkeypatch.setattr(inject_app, "decide", explode)
    metrics = InjectMetrics()
    resp = await post(good_review(), metrics)
    assert resp.status_code == 200
    answer = resp.json()["response"]
    assert answer["uid"] == "u-1" and answer["allowed"] is False
    assert answer["status"]["code"] == 500
    assert count(metrics, "error") == 1


async def test_the_log_line_names_the_pod_never_its_spec(caplog: pytest.LogCaptureFixture) -> None:
    pod = opted_in_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "API_KEY", "value": "s3cr3t-value"}]
    with caplog.at_level(logging.INFO, logger="cp_token.inject"):
        await post(admission_review(pod, uid="u-9"))
    lines = [r for r in caplog.records if r.name == "cp_token.inject"]
    assert len(lines) == 1
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert fields["uid"] == "u-9" and fields["name"] == "runner-abc"
    assert fields["namespace"] == "session-ns" and fields["result"] == "mutated"
    assert "s3cr3t-value" not in caplog.text and "API_KEY" not in caplog.text


async def test_log_fields_from_the_request_cannot_forge_a_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pod = opted_in_pod(name='evil\n{"level":"error"}')
    review = admission_review(pod, uid="u-2")
    review["request"]["namespace"] = "ns\r\nforged"
    with caplog.at_level(logging.INFO, logger="cp_token.inject"):
        await post(review)
    fields = next(r for r in caplog.records if r.name == "cp_token.inject").fields  # type: ignore[attr-defined]
    assert "\n" not in fields["name"] and "\n" not in fields["namespace"]
    assert "\r" not in fields["namespace"]


async def test_a_review_as_deep_as_a_real_pod_is_answered() -> None:
    review = good_review()
    review["request"]["object"]["metadata"]["annotations"] = {"deep": "x"}
    review["request"]["object"]["spec"]["x-deep"] = nested(MAX_DEPTH - 10)
    resp = await post(review)
    assert resp.status_code == 200 and resp.json()["response"]["uid"] == "u-1"


async def test_a_huge_operation_is_answered_and_logged_in_a_bounded_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 3 MiB ``operation`` was logged whole (one 3 MiB line)."""
    review = good_review()
    review["request"]["operation"] = "CREATE" + "E" * (3 * 1024 * 1024 - 100_000)
    review["request"]["object"]["metadata"]["name"] = "n" * 100_000
    with caplog.at_level(logging.INFO, logger="cp_token.inject"):
        resp = await post(review)
    assert resp.status_code == 200 and resp.json()["response"] == {"uid": "u-1", "allowed": True}
    record = next(r for r in caplog.records if r.name == "cp_token.inject")
    fields = record.fields  # type: ignore[attr-defined]
    assert all(len(str(v)) < 300 for v in fields.values()), {
        k: len(str(v)) for k, v in fields.items()
    }


async def test_metrics_app_probes_and_series() -> None:
    metrics = InjectMetrics()
    ready: list[str | None] = ["starting"]
    app = create_metrics_app(metrics, lambda: ready[0])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://m") as c:
        assert (await c.get("/healthz")).status_code == 200
        starting = await c.get("/readyz")
        assert (starting.status_code, starting.text) == (503, "not ready: starting")
        # anything but a reason class (an upstream's words, configuration) is not shown
        ready[0] = "invalid_client: OIDC_CLIENT_ID=cp " + "the IdP says " * 1000
        long = await c.get("/readyz")
        assert (long.status_code, long.text) == (503, "not ready")
        ready[0] = None
        assert (await c.get("/readyz")).status_code == 200
        text = (await c.get("/metrics")).text
    for result in ("mutated", "skipped", "refused", "error"):
        assert f'cp_token_inject_requests_total{{result="{result}"}} 0.0' in text
    assert "cp_token_inject_build_info" in text


# --------------------------------------------------------------------------- fuzz

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def perturbed_reviews() -> st.SearchStrategy[Any]:
    """Valid reviews with one part replaced by arbitrary JSON: the interesting near misses."""
    paths = [
        ("request",),
        ("request", "object"),
        ("request", "object", "metadata"),
        ("request", "object", "metadata", "labels"),
        ("request", "object", "metadata", "annotations"),
        ("request", "object", "spec"),
        ("request", "object", "spec", "containers"),
        ("request", "object", "spec", "initContainers"),
        ("request", "object", "spec", "volumes"),
        ("request", "object", "spec", "volumes", 0),
        ("request", "object", "spec", "volumes", 0, "name"),
        ("request", "object", "spec", "containers", 0),
        ("request", "object", "spec", "containers", 0, "name"),
        ("request", "object", "spec", "containers", 0, "env"),
        ("request", "object", "spec", "containers", 0, "env", 0),
        ("request", "object", "spec", "containers", 0, "env", 0, "name"),
        ("request", "object", "spec", "containers", 0, "volumeMounts"),
        ("request", "object", "spec", "containers", 0, "volumeMounts", 0),
        ("request", "object", "spec", "containers", 0, "volumeMounts", 0, "mountPath"),
        ("request", "object", "spec", "initContainers", 0, "name"),
        ("request", "object", "metadata", "annotations", CONTAINERS_ANNOTATION),
        ("request", "object", "metadata", "labels", "ambient-code.io/token-sidecar"),
        ("request", "kind"),
        ("request", "resource"),
        ("request", "operation"),
        ("request", "uid"),
    ]
    paths_t: list[tuple[str | int, ...]] = list(paths)

    def build(path: tuple[str | int, ...], value: Any) -> Any:
        review = good_review()
        pod = review["request"]["object"]
        # something at every path the perturbation may replace
        pod["metadata"]["annotations"] = {CONTAINERS_ANNOTATION: "runner,setup"}
        pod["spec"]["initContainers"] = [{"name": "setup", "image": "s"}]
        pod["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
        pod["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}]
        pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/d"}]
        target = review
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return review

    return st.builds(build, st.sampled_from(paths_t), JSON)


def check_answer(resp: httpx.Response, sent: Any) -> None:
    assert resp.status_code in (200, 400), resp.text
    body = resp.json()
    if resp.status_code == 400:
        assert body["error"] == "invalid_review" and body["error_description"]
        return
    answer = body["response"]
    assert answer["uid"] == sent["request"]["uid"]
    assert isinstance(answer["allowed"], bool)
    assert answer.get("status", {}).get("code") != 500, "decide() raised"
    if "patch" in answer:
        json.loads(base64.b64decode(answer["patch"]))
        apply_review_patch(sent["request"]["object"], body)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(perturbed_reviews())
async def test_fuzz_near_miss_reviews_never_500(review: Any) -> None:
    check_answer(await post(review), review)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))
async def test_fuzz_arbitrary_bodies_are_400(body: bytes) -> None:
    resp = await post(body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error_description"]
