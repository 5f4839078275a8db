"""``cp-token inject`` as a real process: real AdmissionReview JSON over HTTPS (trustme
certificates), the returned JSON Patch applied with a JSON Patch library to the pod as
sent, the result validated against the Kubernetes schemas; certificate reload through a
Secret-style ``..data`` symlink swap; probes, metrics, signals and configuration errors."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import trustme
from cryptography import x509

from tests.fakes.admission import admission_review, opted_in_pod, patch_of
from tests.integration.hostile_rig import (
    chunked_head,
    idle_sockets,
    peak_growth_kib,
    stalled_bodies,
    stream_after,
)
from tests.integration.inject_rig import Injector, start_injector, tls_files
from tests.integration.procs import run_cmd

VERSIONS = ("1.29", kubernetes_validate.latest_version())
IMAGE = "registry.example.com/ambient/cp-token:1.0"
CP_URL = "https://cp-token.ambient-code.svc:8080/token"
SIDECAR = "cp-token-sidecar"
APP_ENV = {
    "AMBIENT_TOKEN_SIDECAR_URL": "http://127.0.0.1:8099/token",
    "AMBIENT_TOKEN_FILE": "/var/run/ambient/token",
}


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Injector]:
    tmp = tmp_path_factory.mktemp("inject")
    ca = trustme.CA()
    cert, key = tls_files(tmp, ca)
    running = start_injector(cert, key, tmp / "inject.log", ca, IMAGE, CP_URL)
    try:
        yield running
    finally:
        assert running.proc.terminate() == 0, running.proc.output()[-2000:]


def validate(pod: dict[str, Any]) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def by_name(pod: dict[str, Any], key: str = "containers") -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"].get(key, [])}


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


# --------------------------------------------------------------------------- mutations


def test_an_opted_in_pod_is_mutated_into_a_valid_pod(injector: Injector) -> None:
    pod = opted_in_pod()
    answer, out = injector.review(pod)
    assert answer["allowed"] is True and answer["patchType"] == "JSONPatch"
    validate(out)
    sidecar = out["spec"]["initContainers"][0]
    assert sidecar["name"] == SIDECAR and sidecar["image"] == IMAGE
    assert sidecar["restartPolicy"] == "Always"
    assert env_of(sidecar)["AMBIENT_CP_TOKEN_URL"] == CP_URL
    assert env_of(by_name(out)["runner"]) == APP_ENV
    assert [v["name"] for v in out["spec"]["volumes"]] == [
        "cp-token-sa",
        "cp-token-file",
        "cp-token-tmp",
    ]


def test_ordering_with_existing_init_containers(injector: Injector) -> None:
    inits = [{"name": "vault-agent-init", "image": "v"}, {"name": "migrate", "image": "m"}]
    pod = opted_in_pod(initContainers=copy.deepcopy(inits))
    _, out = injector.review(pod)
    validate(out)
    assert [c["name"] for c in out["spec"]["initContainers"]] == [
        SIDECAR,
        "vault-agent-init",
        "migrate",
    ]
    assert out["spec"]["initContainers"][1:] == inits


def test_existing_env_and_mounts_are_kept(injector: Injector) -> None:
    runner = {
        "name": "runner",
        "image": "r",
        "env": [{"name": "AMBIENT_TOKEN_SIDECAR_URL", "value": "http://127.0.0.1:9999/token"}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    mcp = {
        "name": "mcp",
        "image": "m",
        "volumeMounts": [{"name": "mine", "mountPath": "/var/run/ambient"}],
    }
    volumes = [{"name": "data", "emptyDir": {}}, {"name": "mine", "emptyDir": {}}]
    pod = opted_in_pod(containers=[runner, mcp], volumes=volumes)
    _, out = injector.review(pod)
    validate(out)
    got = by_name(out)
    assert got["runner"]["env"][0] == runner["env"][0]
    assert env_of(got["runner"]) == {
        **APP_ENV,
        "AMBIENT_TOKEN_SIDECAR_URL": "http://127.0.0.1:9999/token",
    }
    assert got["runner"]["volumeMounts"][0] == runner["volumeMounts"][0]
    assert got["mcp"]["volumeMounts"] == mcp["volumeMounts"]  # its own mount stays
    assert env_of(got["mcp"]) == APP_ENV
    assert out["spec"]["volumes"][:2] == volumes


def test_the_container_selection_annotation(injector: Injector) -> None:
    pod = opted_in_pod(
        containers=[{"name": "runner", "image": "r"}, {"name": "db", "image": "d"}],
        initContainers=[{"name": "fetch", "image": "f"}],
    )
    pod["metadata"]["annotations"] = {"ambient-code.io/token-sidecar-containers": "runner,fetch"}
    answer, out = injector.review(pod)
    validate(out)
    assert env_of(by_name(out)["runner"]) == APP_ENV
    assert by_name(out)["db"] == {"name": "db", "image": "d"}
    assert env_of(by_name(out, "initContainers")["fetch"]) == APP_ENV
    assert "warnings" not in answer


def test_reinvocation_gets_no_patch(injector: Injector) -> None:
    _, out = injector.review(opted_in_pod(initContainers=[{"name": "x", "image": "x"}]))
    answer, again = injector.review(out)
    assert answer == {"uid": answer["uid"], "allowed": True}
    assert again == out


def test_a_volume_name_collision_is_refused(injector: Injector) -> None:
    pod = opted_in_pod(volumes=[{"name": "cp-token-file", "emptyDir": {}}])
    answer, _ = injector.review(pod)
    assert answer["allowed"] is False and patch_of({"response": answer}) is None
    assert "cp-token-file" in answer["status"]["message"]


def test_non_pods_and_updates_are_allowed_unchanged(injector: Injector) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "labels": {"ambient-code.io/token-sidecar": "true"}},
        "spec": {},
    }
    cases = [
        (
            deployment,
            {
                "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            },
        ),
        (opted_in_pod(), {"operation": "UPDATE", "old": opted_in_pod()}),
        (None, {"operation": "DELETE", "old": opted_in_pod()}),
        ({**opted_in_pod(), "metadata": {"name": "p"}}, {}),  # no label
    ]
    for obj, kw in cases:
        answer, out = injector.review(obj, **kw)
        assert answer == {"uid": answer["uid"], "allowed": True}, (obj, kw)
        assert out == obj


ENVELOPE = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"", 400),
        (b"not json", 400),
        (json.dumps({**ENVELOPE, "apiVersion": "admission.k8s.io/v1beta1", "request": {}}), 400),
        (json.dumps({**ENVELOPE, "request": {"uid": 1}}), 400),
        (json.dumps(ENVELOPE), 400),
        (b"[" * 50_000, 400),
        (b"{" + b" " * (4 * 1024 * 1024) + b"}", 413),
    ],
)
def test_malformed_bodies(injector: Injector, body: bytes | str, status: int) -> None:
    resp = injector.post(body.encode() if isinstance(body, str) else body)
    assert resp.status_code == status
    assert resp.json()["error_description"]


def test_deep_or_huge_reviews_are_answered_with_json_and_logged_in_bounded_lines(
    injector: Injector,
) -> None:
    """An ``operation`` nested 962-966 deep was a 500 (text/plain); a 3 MiB ``operation``
    was logged whole, in one 3 MiB line."""
    review = json.dumps(injector_review())
    for depth in range(900, 1000, 2):
        deep = "[" * depth + "]" * depth
        resp = injector.post(
            review.replace('"operation": "CREATE"', f'"operation": {deep}').encode()
        )
        assert resp.status_code == 400, (depth, resp.status_code, resp.text[:200])
        assert "nested" in resp.json()["error_description"]
    huge = '"operation": "' + "C" * (3 * 1024 * 1024 - 10_000) + '"'
    resp = injector.post(review.replace('"operation": "CREATE"', huge).encode())
    assert resp.status_code == 200 and resp.json()["response"]["uid"] == "huge-1"
    longest = max(len(line) for line in injector.proc.output().splitlines())
    assert longest < 4096, longest


def injector_review() -> dict[str, Any]:
    return admission_review(opted_in_pod(), uid="huge-1")


def test_method_probes_and_metrics(injector: Injector) -> None:
    with httpx.Client(verify=injector.ca, trust_env=False) as client:
        resp = client.get(f"{injector.url}/mutate")
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert httpx.get(f"{injector.metrics}/healthz", trust_env=False).status_code == 200
    before = {r: injector.count(r) for r in ("mutated", "skipped", "refused", "error")}
    injector.review(opted_in_pod())
    injector.review(opted_in_pod(), operation="UPDATE", old=opted_in_pod())
    injector.review(opted_in_pod(volumes=[{"name": "cp-token-sa", "emptyDir": {}}]))
    injector.post(b"nope")
    after = {r: injector.count(r) for r in before}
    assert {r: after[r] - before[r] for r in before} == {
        "mutated": 1,
        "skipped": 1,
        "refused": 1,
        "error": 1,
    }


def test_log_lines_are_json_and_carry_no_pod_spec(injector: Injector) -> None:
    pod = opted_in_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "PASSWORD", "value": "hunter2-do-not-log"}]
    injector.review(pod)
    out = injector.proc.output()
    assert "hunter2-do-not-log" not in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(
        line.get("result") == "mutated" and line.get("name") == "runner-abc" for line in lines
    )


# --------------------------------------------------------------------------- certificates


def serial(port: int, ca_file: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der or b"").serial_number


def test_certificate_reload_through_a_secret_data_swap(tmp_path: Path) -> None:
    """A Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>; renewal swaps
    ..data atomically. New connections get the new certificate; no restart."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    secret = tmp_path / "secret"
    secret.mkdir()
    first = secret / "..2026_01_01"
    first.mkdir()
    tls_files(first, ca)
    (secret / "..data").symlink_to(first.name)
    for name in ("tls.crt", "tls.key"):
        (secret / name).symlink_to(f"..data/{name}")
    injector = start_injector(
        secret / "tls.crt", secret / "tls.key", tmp_path / "inject.log", ca, IMAGE, CP_URL
    )
    try:
        port = int(injector.url.rsplit(":", 1)[1])
        before = serial(port, ca_file)
        second = secret / "..2026_02_01"
        second.mkdir()
        tls_files(second, ca)
        (secret / "..data_tmp").symlink_to(second.name)
        (secret / "..data_tmp").rename(secret / "..data")
        shutil.rmtree(first)
        deadline = time.monotonic() + 15
        while serial(port, ca_file) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert serial(port, ca_file) != before
        answer, _ = injector.review(opted_in_pod())  # still serving reviews
        assert answer["allowed"] is True
        assert "TLS certificate reloaded" in injector.proc.output()
    finally:
        assert injector.proc.terminate() == 0


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("drop", "override", "variable"),
    [
        ("CP_TOKEN_INJECT_TLS_CERT_FILE", {}, "CP_TOKEN_INJECT_TLS_CERT_FILE"),
        ("CP_TOKEN_INJECT_IMAGE", {}, "CP_TOKEN_INJECT_IMAGE"),
        ("CP_TOKEN_INJECT_CP_URL", {}, "CP_TOKEN_INJECT_CP_URL"),
        (None, {"CP_TOKEN_INJECT_CP_URL": "not a url"}, "CP_TOKEN_INJECT_CP_URL"),
        (None, {"CP_TOKEN_INJECT_TOKEN_EXPIRATION": "60"}, "CP_TOKEN_INJECT_TOKEN_EXPIRATION"),
        (None, {"CP_TOKEN_INJECT_TLS_KEY_FILE": "/nonexistent"}, "CP_TOKEN_INJECT_TLS_KEY_FILE"),
        (None, {"CP_TOKEN_INJECT_TLS_CERT_FILE": "KEY"}, "CP_TOKEN_INJECT_TLS_CERT_FILE"),
    ],
)
def test_config_errors_exit_2_with_one_line(
    tmp_path: Path, drop: str | None, override: dict[str, str], variable: str
) -> None:
    cert, key = tls_files(tmp_path, trustme.CA())
    env = {
        "CP_TOKEN_INJECT_LISTEN_ADDR": "127.0.0.1:0",
        "CP_TOKEN_METRICS_ADDR": "127.0.0.1:0",
        "CP_TOKEN_INJECT_TLS_CERT_FILE": str(cert),
        "CP_TOKEN_INJECT_TLS_KEY_FILE": str(key),
        "CP_TOKEN_INJECT_IMAGE": IMAGE,
        "CP_TOKEN_INJECT_CP_URL": CP_URL,
        **override,
    }
    if env.get("CP_TOKEN_INJECT_TLS_CERT_FILE") == "KEY":  # readable, but not a certificate
        env["CP_TOKEN_INJECT_TLS_CERT_FILE"] = str(key)
    if drop:
        env.pop(drop)
    result = run_cmd([sys.executable, "-m", "cp_token", "inject"], env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- hostile peers


def test_hostile_connections_cannot_grow_it_or_shut_out_the_api_server(tmp_path: Path) -> None:
    """What took the injector to 284 MiB (an endless trailer) and 407 MiB (100 bodies of
    3.1 MB stalled one byte short), and 4,096 idle sockets from one address that failed 36 of
    51 reviews: bounded, and reviews from another address are answered throughout."""
    ca = trustme.CA()
    cert, key = tls_files(tmp_path, ca)
    running = start_injector(cert, key, tmp_path / "inject.log", ca, IMAGE, CP_URL)
    port = int(running.url.rsplit(":", 1)[1])
    pid = running.proc.pid
    try:
        running.review(opted_in_pod())  # warm
        with peak_growth_kib(pid) as growth:
            trailer = stream_after(
                port, chunked_head(b"/mutate") + b"0\r\nX-Endless: ", seconds=10, tls=running.ca
            )
            extension = stream_after(
                port, chunked_head(b"/mutate") + b"1;", seconds=10, tls=running.ca
            )
        print(
            f"trailer cut after {trailer.sent >> 10} KiB, "
            f"extension after {extension.sent >> 10} KiB"
        )
        assert trailer.closed_after is not None and trailer.sent < 16 << 20
        assert extension.closed_after is not None and extension.sent < 16 << 20
        assert growth[0] < 24 * 1024
        with peak_growth_kib(pid) as growth:
            stalled = stalled_bodies(
                port,
                100,
                3_100_000,
                path=b"/mutate",
                content_type=b"application/json",
                tls=running.ca,
            )
            answer, _ = running.review(opted_in_pod())  # a review of a few KB still fits
            assert answer["allowed"] is True
        for sock in stalled:
            sock.close()
        print(f"100 x 3.1 MB stalled bodies: peak RSS growth {growth[0] >> 10} MiB")
        assert growth[0] < 96 * 1024  # 276 MiB before the bound
        hog = idle_sockets(port, 4096, "127.0.0.2")
        answered = sum(
            running.post(admission_review(opted_in_pod())).status_code == 200 for _ in range(51)
        )
        for sock in hog:
            sock.close()
        print(f"{len(hog)} idle sockets from 127.0.0.2: {answered}/51 reviews answered")
        assert answered == 51
    finally:
        assert running.proc.terminate() == 0, running.proc.output()[-2000:]
