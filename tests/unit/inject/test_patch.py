"""The injector's decision and JSON Patch (``cp_token.inject.patch``), as plain data.

Every mutation is applied with the ``jsonpatch`` library to the pod as sent and the result
is validated against the Kubernetes schemas (1.29 and the newest release), so "applies
cleanly" and "is a valid pod" are checked, not assumed. A property test then generates pods
and checks that the patch changes nothing outside what SPEC lists.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cp_token.inject.app import review_response
from cp_token.inject.patch import (
    CA_FILE,
    CONTAINERS_ANNOTATION,
    MODE_ANNOTATION,
    SIDECAR_NAME,
    VOLUME_NAMES,
    Decision,
    decide,
    patch_for,
    pointer,
)
from cp_token.settings.inject import InjectSettings
from cp_token.settings.sidecar import load_sidecar_settings
from tests.fakes.admission import admission_review, apply_review_patch, opted_in_pod

SETTINGS = InjectSettings(
    image="registry.example.com/cp-token:1.2",
    cp_url="http://cp-token.ambient-code.svc:8080/token",
    audience="ambient-cp",
    token_expiration=3600,
)
VERSIONS = ("1.29", kubernetes_validate.latest_version())
APP_ENV = {
    "AMBIENT_TOKEN_SIDECAR_URL": "http://127.0.0.1:8099/token",
    "AMBIENT_TOKEN_FILE": "/var/run/ambient/token",
}
APP_MOUNT = {"name": "cp-token-file", "mountPath": "/var/run/ambient", "readOnly": True}

Obj = dict[str, Any]


def run(pod: Obj | None, **kw: Any) -> tuple[Decision, Obj]:
    """Decide on a review of ``pod``; returns the decision and the answer's patched pod."""
    review = admission_review(pod, **kw)
    decision = decide(review["request"], SETTINGS)
    answer = review_response(review["request"]["uid"], decision)
    assert answer["response"]["uid"] == review["request"]["uid"]
    return decision, apply_review_patch(pod or {}, answer)


def mutate(pod: Obj) -> Obj:
    """The mutated pod, validated against the Kubernetes schemas."""
    decision, out = run(pod)
    assert decision.action == "mutated", decision
    for version in VERSIONS:
        kubernetes_validate.validate(out, version, strict=True)
    return out


def containers(pod: Obj, key: str = "containers") -> dict[str, Obj]:
    return {c["name"]: c for c in pod["spec"].get(key, [])}


def env(c: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def sidecar(pod: Obj) -> Obj:
    first: Obj = pod["spec"]["initContainers"][0]
    assert first["name"] == SIDECAR_NAME
    return first


# --------------------------------------------------------------------------- what is added


def test_minimal_pod_gets_everything_and_arrays_are_created() -> None:
    pod = opted_in_pod()
    out = mutate(pod)
    assert [c["name"] for c in out["spec"]["initContainers"]] == [SIDECAR_NAME]
    assert [v["name"] for v in out["spec"]["volumes"]] == list(VOLUME_NAMES)
    runner = containers(out)["runner"]
    assert env(runner) == APP_ENV
    assert runner["volumeMounts"] == [APP_MOUNT]
    # nothing else: the pod minus what was added is the pod as sent
    rest = copy.deepcopy(out)
    del rest["spec"]["initContainers"], rest["spec"]["volumes"]
    del rest["spec"]["containers"][0]["env"], rest["spec"]["containers"][0]["volumeMounts"]
    assert rest == pod


def test_the_native_sidecar() -> None:
    c = sidecar(mutate(opted_in_pod()))
    assert c["image"] == SETTINGS.image
    assert c["restartPolicy"] == "Always"
    assert c["command"] == ["cp-token-sidecar"]
    assert [(e["name"], e["value"]) for e in c["env"]] == [
        ("AMBIENT_CP_TOKEN_URL", SETTINGS.cp_url),
        ("SIDECAR_LISTEN_ADDR", "127.0.0.1:8099"),
        ("AMBIENT_SA_TOKEN_FILE", "/var/run/secrets/tokens/ambient-cp"),
        ("SIDECAR_TOKEN_FILE", "/var/run/ambient/token"),
        ("SIDECAR_METRICS_ADDR", "0.0.0.0:9099"),
    ]
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 9099}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9099}
    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) == {"cpu", "memory"}
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert c["volumeMounts"] == [
        {"name": "cp-token-sa", "mountPath": "/var/run/secrets/tokens", "readOnly": True},
        {"name": "cp-token-file", "mountPath": "/var/run/ambient"},
        {"name": "cp-token-tmp", "mountPath": "/tmp"},
    ]


def test_the_three_volumes() -> None:
    custom = InjectSettings(
        image="i", cp_url="https://cp/token", audience="aud-x", token_expiration=900
    )
    review = admission_review(opted_in_pod())
    out = apply_review_patch(
        opted_in_pod(), review_response("u", decide(review["request"], custom))
    )
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["cp-token-sa"]["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "aud-x",
                "expirationSeconds": 900,
                "path": "ambient-cp",
            }
        }
    ]
    assert volumes["cp-token-file"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes["cp-token-tmp"]
    assert env(sidecar(out))["AMBIENT_CP_TOKEN_URL"] == "https://cp/token"


# --------------------------------------------------------------------------- ordering, keeping


def test_sidecar_goes_first_before_existing_init_containers() -> None:
    inits = [
        {"name": "istio-init", "image": "proxy:1"},
        {"name": "setup", "image": "setup:1", "env": [{"name": "X", "value": "1"}]},
    ]
    pod = opted_in_pod(
        initContainers=copy.deepcopy(inits), volumes=[{"name": "data", "emptyDir": {}}]
    )
    out = mutate(pod)
    assert [c["name"] for c in out["spec"]["initContainers"]] == [
        SIDECAR_NAME,
        "istio-init",
        "setup",
    ]
    assert out["spec"]["initContainers"][1:] == inits  # not selected: untouched
    assert [v["name"] for v in out["spec"]["volumes"]] == ["data", *VOLUME_NAMES]


def test_existing_env_and_mounts_are_kept() -> None:
    runner = {
        "name": "runner",
        "image": "runner:1",
        "env": [
            {"name": "A", "value": "1"},
            {"name": "AMBIENT_TOKEN_FILE", "value": "/custom/token"},
            {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    pod = opted_in_pod(containers=[runner], volumes=[{"name": "data", "emptyDir": {}}])
    out = containers(mutate(pod))["runner"]
    assert out["env"] == [
        *runner["env"],
        {"name": "AMBIENT_TOKEN_SIDECAR_URL", "value": APP_ENV["AMBIENT_TOKEN_SIDECAR_URL"]},
    ]
    assert out["volumeMounts"] == [*runner["volumeMounts"], APP_MOUNT]


@pytest.mark.parametrize("path", ["/var/run/ambient", "/var/run/ambient/", "/var/run//ambient"])
def test_a_container_mounting_the_token_dir_keeps_its_mount(path: str) -> None:
    mine = {"name": "mine", "mountPath": path, "readOnly": True}
    runner = {"name": "runner", "image": "r", "volumeMounts": [mine]}
    pod = opted_in_pod(containers=[runner], volumes=[{"name": "mine", "emptyDir": {}}])
    out = containers(mutate(pod))["runner"]
    assert out["volumeMounts"] == [mine]
    assert env(out) == APP_ENV


def test_a_container_setting_both_variables_gets_only_the_mount() -> None:
    preset = [{"name": k, "value": "mine"} for k in APP_ENV]
    pod = opted_in_pod(containers=[{"name": "runner", "image": "r", "env": preset}])
    out = containers(mutate(pod))["runner"]
    assert out["env"] == preset
    assert out["volumeMounts"] == [APP_MOUNT]


def test_every_app_container_by_default_and_no_init_container() -> None:
    pod = opted_in_pod(
        containers=[{"name": "runner", "image": "r"}, {"name": "mcp", "image": "m"}],
        initContainers=[{"name": "setup", "image": "s"}],
    )
    out = mutate(pod)
    assert all(env(c) == APP_ENV for c in containers(out).values())
    assert "env" not in containers(out, "initContainers")["setup"]


# --------------------------------------------------------------------------- the annotation


def annotated(value: str) -> Obj:
    pod = opted_in_pod(
        containers=[
            {"name": "runner", "image": "r"},
            {"name": "mcp", "image": "m"},
            {"name": "log", "image": "l"},
        ],
        initContainers=[{"name": "setup", "image": "s"}, {"name": "other", "image": "o"}],
    )
    pod["metadata"]["annotations"] = {CONTAINERS_ANNOTATION: value, "a/b~c": "kept"}
    return pod


def test_annotation_selects_containers_and_init_containers_by_name() -> None:
    pod = annotated("runner, setup")
    out = mutate(pod)
    got = {**containers(out), **containers(out, "initContainers")}
    touched = {name for name, c in got.items() if "env" in c and name != SIDECAR_NAME}
    assert touched == {"runner", "setup"}
    assert got["setup"]["volumeMounts"] == [APP_MOUNT]
    assert got["mcp"] == {"name": "mcp", "image": "m"}
    assert got["other"] == {"name": "other", "image": "o"}
    assert out["metadata"] == pod["metadata"]
    # the init container it selected now sits behind the sidecar
    assert [c["name"] for c in out["spec"]["initContainers"]] == [SIDECAR_NAME, "setup", "other"]


@pytest.mark.parametrize("value", ["", "  ", " , ,"])
def test_an_empty_annotation_counts_as_absent(value: str) -> None:
    out = mutate(annotated(value))
    assert {n for n, c in containers(out).items() if env(c) == APP_ENV} == {"runner", "mcp", "log"}
    assert "env" not in containers(out, "initContainers")["setup"]


def test_an_annotation_naming_no_container_warns() -> None:
    decision, out = run(annotated("runner,ghost"))
    assert decision.action == "mutated"
    assert decision.warnings and "ghost" in decision.warnings[0]
    assert env(containers(out)["runner"]) == APP_ENV


# --------------------------------------------------------------------------- skip and refuse


def test_reinvocation_is_a_no_op() -> None:
    out = mutate(annotated("runner,setup"))
    decision, again = run(out)
    assert decision == Decision("skipped", message=f"already has a {SIDECAR_NAME} container")
    assert again == out


@pytest.mark.parametrize("key", ["containers", "initContainers"])
def test_a_hand_written_sidecar_is_left_alone(key: str) -> None:
    pod = opted_in_pod()
    pod["spec"].setdefault(key, []).append({"name": SIDECAR_NAME, "image": "mine"})
    decision, out = run(pod)
    assert decision.action == "skipped" and not decision.patch
    assert out == pod


@pytest.mark.parametrize("volume", VOLUME_NAMES)
def test_a_volume_name_collision_is_refused(volume: str) -> None:
    pod = opted_in_pod(volumes=[{"name": "data", "emptyDir": {}}, {"name": volume, "emptyDir": {}}])
    review = admission_review(pod)
    decision = decide(review["request"], SETTINGS)
    assert decision.action == "refused" and not decision.patch
    assert volume in decision.message
    answer = review_response(review["request"]["uid"], decision)["response"]
    assert answer["allowed"] is False and "patch" not in answer
    assert volume in answer["status"]["message"]


@pytest.mark.parametrize(
    "labels",
    [
        None,
        {},
        {"app": "x"},
        {"ambient-code.io/token-sidecar": "false"},
        {"ambient-code.io/token-sidecar": "True"},
    ],
)
def test_pods_without_the_label_are_skipped(labels: Obj | None) -> None:
    pod = opted_in_pod()
    if labels is None:
        del pod["metadata"]["labels"]
    else:
        pod["metadata"]["labels"] = labels
    decision, out = run(pod)
    assert decision.action == "skipped" and out == pod


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE", "CONNECT"])
def test_only_create_is_mutated(operation: str) -> None:
    pod = opted_in_pod()
    decision, _ = run(pod, operation=operation, old=pod)
    assert decision.action == "skipped" and not decision.patch


@pytest.mark.parametrize(
    ("kind", "resource", "sub"),
    [
        (
            {"group": "apps", "version": "v1", "kind": "Deployment"},
            {"group": "apps", "version": "v1", "resource": "deployments"},
            None,
        ),
        (
            {"group": "", "version": "v1", "kind": "ConfigMap"},
            {"group": "", "version": "v1", "resource": "configmaps"},
            None,
        ),
        # the kind alone, or the resource alone, is not enough
        (
            {"group": "", "version": "v1", "kind": "Pod"},
            {"group": "", "version": "v1", "resource": "podtemplates"},
            None,
        ),
        (
            {"group": "", "version": "v1", "kind": "Binding"},
            {"group": "", "version": "v1", "resource": "pods"},
            "binding",
        ),
        (
            {"group": "example.com", "version": "v1", "kind": "Pod"},
            {"group": "example.com", "version": "v1", "resource": "pods"},
            None,
        ),
        (
            {"group": "", "version": "v1", "kind": "Pod"},
            {"group": "", "version": "v1", "resource": "pods"},
            "ephemeralcontainers",
        ),
    ],
)
def test_non_pods_are_skipped(kind: Obj, resource: Obj, sub: str | None) -> None:
    decision, _ = run(opted_in_pod(), kind=kind, resource=resource, sub_resource=sub)
    assert decision.action == "skipped" and not decision.patch


@pytest.mark.parametrize(
    "spec",
    [
        "nope",
        {"containers": "nope"},
        {"containers": [{"name": "runner", "image": "r", "env": {"A": "1"}}]},
        {"containers": [{"name": "runner", "image": "r", "volumeMounts": [1]}]},
        {"containers": [1]},
        {"containers": [{"name": "r", "image": "r"}], "volumes": {"a": 1}},
        {"containers": [{"name": "r", "image": "r"}], "initContainers": 5},
    ],
)
def test_a_malformed_opted_in_pod_is_refused_not_crashed(spec: Any) -> None:
    pod = opted_in_pod()
    pod["spec"] = spec
    decision, _ = run(pod)
    assert decision.action == "refused" and "malformed" in decision.message


def test_a_create_without_a_pod_object_is_allowed_unchanged() -> None:
    """It carries no opt-in label: "anything else is allowed unchanged" (SPEC)."""
    for obj in (None, [], "pod"):
        review = admission_review(None)
        review["request"]["object"] = obj
        decision = decide(review["request"], SETTINGS)
        answer = review_response(review["request"]["uid"], decision)
        assert decision.action == "skipped"
        assert answer["response"]["allowed"] is True and "patch" not in answer["response"]


def test_patch_for_raises_refused_for_collisions() -> None:
    from cp_token.inject.patch import Refused

    with pytest.raises(Refused, match="cp-token-tmp"):
        patch_for(opted_in_pod(volumes=[{"name": "cp-token-tmp", "emptyDir": {}}]), SETTINGS)


def test_pointer_escapes_per_rfc6901() -> None:
    assert pointer("metadata", "annotations", "ambient-code.io/x~y") == (
        "/metadata/annotations/ambient-code.io~1x~0y"
    )
    assert pointer("spec", "containers", 0, "env", "-") == "/spec/containers/0/env/-"


# --------------------------------------------------------------------------- property


NAMES = st.sampled_from(["runner", "mcp", "setup", "proxy", "log", "init-db", "a", "b"])
ENV_NAMES = st.sampled_from(["A", "B", "PATH", *APP_ENV])
MOUNT_PATHS = st.sampled_from(["/data", "/tmp", "/var/run/ambient", "/var/run", "/cache"])


@st.composite
def container_st(draw: st.DrawFn, name: str) -> Obj:
    c: Obj = {"name": name, "image": draw(st.sampled_from(["r:1", "m:2"]))}
    if draw(st.booleans()):
        names = draw(st.lists(ENV_NAMES, unique=True, max_size=4))
        c["env"] = [{"name": n, "value": draw(st.text(max_size=5))} for n in names]
    if draw(st.booleans()):
        paths = draw(st.lists(MOUNT_PATHS, unique=True, max_size=3))
        c["volumeMounts"] = [{"name": "data", "mountPath": p} for p in paths]
    if draw(st.booleans()):
        c["args"] = draw(st.lists(st.text(max_size=5), max_size=2))
    return c


@st.composite
def pod_st(draw: st.DrawFn) -> Obj:
    names = draw(st.lists(NAMES, unique=True, min_size=1, max_size=6))
    split = draw(st.integers(min_value=1, max_value=len(names)))
    spec: Obj = {"containers": [draw(container_st(n)) for n in names[:split]]}
    if draw(st.booleans()) or split < len(names):
        spec["initContainers"] = [draw(container_st(n)) for n in names[split:]]
    if draw(st.booleans()):
        spec["volumes"] = [{"name": "data", "emptyDir": {}}]
        if draw(st.booleans()):
            spec["volumes"].append({"name": "config", "configMap": {"name": "cfg"}})
    elif any("volumeMounts" in c for c in [*spec["containers"], *spec.get("initContainers", [])]):
        spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    if draw(st.booleans()):
        spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": 1000}
    pod = opted_in_pod(**spec)
    if draw(st.booleans()):
        chosen = draw(st.lists(NAMES, max_size=3))
        pod["metadata"]["annotations"] = {CONTAINERS_ANNOTATION: " , ".join(chosen), "x/y": "z"}
    return pod


def selected_names(pod: Obj) -> set[str] | None:
    raw = pod["metadata"].get("annotations", {}).get(CONTAINERS_ANNOTATION, "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    return names or None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod_st())
def test_property_the_patch_changes_nothing_outside_what_spec_lists(pod: Obj) -> None:
    sent = copy.deepcopy(pod)
    decision, out = run(pod)
    assert pod == sent, "decide must not modify its input"
    assert decision.action == "mutated"
    # only spec.initContainers, spec.volumes and spec.containers may differ
    assert {k: v for k, v in out.items() if k != "spec"} == {
        k: v for k, v in pod.items() if k != "spec"
    }
    changed = {
        k
        for k in out["spec"].keys() | pod["spec"].keys()
        if out["spec"].get(k) != pod["spec"].get(k)
    }
    assert changed <= {"initContainers", "volumes", "containers"}
    assert out["spec"]["volumes"] == [*pod["spec"].get("volumes", []), *out["spec"]["volumes"][-3:]]
    assert [v["name"] for v in out["spec"]["volumes"][-3:]] == list(VOLUME_NAMES)
    inits = out["spec"]["initContainers"]
    assert inits[0]["name"] == SIDECAR_NAME
    chosen = selected_names(pod)
    for key, now in (("containers", out["spec"]["containers"]), ("initContainers", inits[1:])):
        before = pod["spec"].get(key, [])
        assert [c["name"] for c in now] == [c["name"] for c in before]
        for old, new in zip(before, now, strict=True):
            is_target = old["name"] in chosen if chosen is not None else key == "containers"
            if not is_target:
                assert new == old
                continue
            # everything but env and volumeMounts is as sent
            assert {k: v for k, v in new.items() if k not in ("env", "volumeMounts")} == {
                k: v for k, v in old.items() if k not in ("env", "volumeMounts")
            }
            old_env = old.get("env", [])
            assert new["env"][: len(old_env)] == old_env  # kept, in order
            added = new["env"][len(old_env) :]
            assert {e["name"] for e in added} == set(APP_ENV) - {e["name"] for e in old_env}
            assert all(e["value"] == APP_ENV[e["name"]] for e in added)
            old_mounts = old.get("volumeMounts", [])
            if any(m["mountPath"] == "/var/run/ambient" for m in old_mounts):
                assert new.get("volumeMounts", []) == old_mounts
            else:
                assert new["volumeMounts"] == [*old_mounts, APP_MOUNT]
    # and a second pass is a no-op
    again, same = run(out)
    assert again.action == "skipped" and same == out


@settings(max_examples=25, deadline=None)
@given(pod_st())
def test_property_mutated_pods_validate(pod: Obj) -> None:
    mutate(pod)


# --------------------------------------------------------------------------- sealed pods

SEALED_SETTINGS = InjectSettings(
    image="registry.example.com/cp-token:1.2",
    cp_url="https://cp-token.ambient-code.svc:8080/token",
    upstreams=(("api", "https://api.example.com/v1"), ("files", "https://files.example.com")),
    grpc_upstream="grpc.example.com:443",
)
SEALED_APP_ENV = {
    "AMBIENT_API_URL": "http://127.0.0.1:8099/upstream/api",
    "AMBIENT_GRPC_ADDR": "127.0.0.1:8098",
}


def sealed(pod: Obj) -> Obj:
    pod["metadata"].setdefault("annotations", {})[MODE_ANNOTATION] = "sealed"
    return pod


def run_with(pod: Obj, settings_: InjectSettings) -> tuple[Decision, Obj]:
    review = admission_review(pod)
    decision = decide(review["request"], settings_)
    return decision, apply_review_patch(pod, review_response("u", decision))


def mutate_sealed(pod: Obj, settings_: InjectSettings = SEALED_SETTINGS) -> Obj:
    decision, out = run_with(pod, settings_)
    assert decision.action == "mutated", decision
    for version in VERSIONS:
        kubernetes_validate.validate(out, version, strict=True)
    return out


def test_a_sealed_pod_gets_the_sealed_sidecar_and_no_token_anywhere() -> None:
    out = mutate_sealed(sealed(opted_in_pod()))
    side = sidecar(out)
    assert [(e["name"], e["value"]) for e in side["env"]] == [
        ("AMBIENT_CP_TOKEN_URL", SEALED_SETTINGS.cp_url),
        ("SIDECAR_LISTEN_ADDR", "127.0.0.1:8099"),
        ("AMBIENT_SA_TOKEN_FILE", "/var/run/secrets/tokens/ambient-cp"),
        ("SIDECAR_METRICS_ADDR", "0.0.0.0:9099"),
        ("SIDECAR_SEALED", "true"),
        ("SIDECAR_UPSTREAMS", "api=https://api.example.com/v1,files=https://files.example.com"),
        ("SIDECAR_GRPC_UPSTREAM", "grpc.example.com:443"),
        ("SIDECAR_GRPC_LISTEN_ADDR", "127.0.0.1:8098"),
    ]
    assert side["volumeMounts"] == [
        {"name": "cp-token-sa", "mountPath": "/var/run/secrets/tokens", "readOnly": True},
        {"name": "cp-token-tmp", "mountPath": "/tmp"},
    ]
    assert [v["name"] for v in out["spec"]["volumes"]] == ["cp-token-sa", "cp-token-tmp"]
    runner = containers(out)["runner"]
    assert env(runner) == SEALED_APP_ENV
    assert "volumeMounts" not in runner
    # the probes, resources and security context are the plain sidecar's
    plain = sidecar(mutate(opted_in_pod()))
    for key in ("startupProbe", "livenessProbe", "resources", "securityContext", "command"):
        assert side[key] == plain[key]


def test_only_the_sidecar_mounts_the_service_account_token() -> None:
    pod = sealed(
        opted_in_pod(
            containers=[{"name": "runner", "image": "r"}, {"name": "mcp", "image": "m"}],
            initContainers=[{"name": "setup", "image": "s"}],
        )
    )
    out = mutate_sealed(pod)
    for c in [*out["spec"]["containers"], *out["spec"]["initContainers"][1:]]:
        assert not c.get("volumeMounts")
        assert not {"AMBIENT_TOKEN_FILE", "AMBIENT_TOKEN_SIDECAR_URL"} & set(env(c))


@pytest.mark.parametrize(
    ("upstreams", "grpc_upstream", "app_env", "sidecar_names"),
    [
        (
            (("api", "https://api.example.com"),),
            "",
            {"AMBIENT_API_URL": "http://127.0.0.1:8099/upstream/api"},
            {"SIDECAR_SEALED", "SIDECAR_UPSTREAMS"},
        ),
        (
            (),
            "grpc.example.com:443",
            {"AMBIENT_GRPC_ADDR": "127.0.0.1:8098"},
            {"SIDECAR_SEALED", "SIDECAR_GRPC_UPSTREAM", "SIDECAR_GRPC_LISTEN_ADDR"},
        ),
    ],
)
def test_http_only_and_grpc_only_sealed_pods(
    upstreams: tuple[tuple[str, str], ...],
    grpc_upstream: str,
    app_env: dict[str, str],
    sidecar_names: set[str],
) -> None:
    only = InjectSettings(
        image="i", cp_url="https://cp/token", upstreams=upstreams, grpc_upstream=grpc_upstream
    )
    out = mutate_sealed(sealed(opted_in_pod()), only)
    assert env(containers(out)["runner"]) == app_env
    names = set(env(sidecar(out)))
    assert {
        n
        for n in names
        if n.startswith("SIDECAR_") and n not in ("SIDECAR_LISTEN_ADDR", "SIDECAR_METRICS_ADDR")
    } == sidecar_names


def test_a_sealed_pod_without_upstreams_configured_is_refused() -> None:
    decision, _ = run_with(sealed(opted_in_pod()), SETTINGS)
    assert decision.action == "refused" and not decision.patch
    assert "CP_TOKEN_INJECT_UPSTREAMS" in decision.message
    answer = review_response("u", decision)["response"]
    assert answer["allowed"] is False and "sealed" in answer["status"]["message"]


@pytest.mark.parametrize("mode", ["Sealed", "seal", "plain", "true"])
def test_an_unknown_mode_is_refused_rather_than_left_unsealed(mode: str) -> None:
    pod = opted_in_pod()
    pod["metadata"]["annotations"] = {MODE_ANNOTATION: mode}
    decision, _ = run_with(pod, SEALED_SETTINGS)
    assert decision.action == "refused" and MODE_ANNOTATION in decision.message


@pytest.mark.parametrize("mode", ["", "  "])
def test_an_empty_mode_is_the_default(mode: str) -> None:
    pod = opted_in_pod()
    pod["metadata"]["annotations"] = {MODE_ANNOTATION: mode}
    out = mutate_sealed(pod)
    assert env(containers(out)["runner"]) == APP_ENV
    assert "SIDECAR_SEALED" not in env(sidecar(out))


def test_a_sealed_pod_keeps_its_own_variables_and_may_use_the_token_file_volume_name() -> None:
    runner = {
        "name": "runner",
        "image": "r",
        "env": [{"name": "AMBIENT_API_URL", "value": "http://127.0.0.1:8099/upstream/files"}],
    }
    pod = sealed(
        opted_in_pod(containers=[runner], volumes=[{"name": "cp-token-file", "emptyDir": {}}])
    )
    out = mutate_sealed(pod)
    assert env(containers(out)["runner"]) == {
        "AMBIENT_API_URL": "http://127.0.0.1:8099/upstream/files",
        "AMBIENT_GRPC_ADDR": "127.0.0.1:8098",
    }
    collision = sealed(opted_in_pod(volumes=[{"name": "cp-token-sa", "emptyDir": {}}]))
    assert run_with(collision, SEALED_SETTINGS)[0].action == "refused"


def test_a_plaintext_upstream_carries_its_permission_to_the_sidecar() -> None:
    mesh = InjectSettings(
        image="i", cp_url="https://cp/token", upstreams=(("api", "http://api.mesh.svc:8080"),)
    )
    assert (
        env(sidecar(mutate_sealed(sealed(opted_in_pod()), mesh)))["AMBIENT_CP_ALLOW_PLAINTEXT"]
        == "true"
    )
    local = InjectSettings(
        image="i", cp_url="https://cp/token", upstreams=(("api", "http://127.0.0.1:9000"),)
    )
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" not in env(
        sidecar(mutate_sealed(sealed(opted_in_pod()), local))
    )
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" not in env(sidecar(mutate_sealed(sealed(opted_in_pod()))))


def test_the_sealed_sidecar_settings_load() -> None:
    """What the injector writes is what the sidecar accepts (same parser, same rules)."""
    side = sidecar(mutate_sealed(sealed(opted_in_pod())))
    loaded = load_sidecar_settings(env(side))
    assert loaded.sealed and loaded.token_file is None
    assert loaded.upstreams == SEALED_SETTINGS.upstreams
    assert loaded.grpc_upstream == SEALED_SETTINGS.grpc_upstream


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod_st())
def test_property_a_sealed_pod_holds_no_token_outside_the_sidecar(pod: Obj) -> None:
    pod = sealed(pod)
    sent = copy.deepcopy(pod)
    decision, out = run_with(pod, SEALED_SETTINGS)
    assert pod == sent
    assert decision.action == "mutated"
    assert {k: v for k, v in out.items() if k != "spec"} == {
        k: v for k, v in pod.items() if k != "spec"
    }
    added = [v["name"] for v in out["spec"]["volumes"][len(pod["spec"].get("volumes", [])) :]]
    assert added == ["cp-token-sa", "cp-token-tmp"]
    inits = out["spec"]["initContainers"]
    assert inits[0]["name"] == SIDECAR_NAME and "SIDECAR_TOKEN_FILE" not in env(inits[0])
    chosen = selected_names(pod)
    for key, now in (("containers", out["spec"]["containers"]), ("initContainers", inits[1:])):
        before = pod["spec"].get(key, [])
        for old, new in zip(before, now, strict=True):
            # nothing of ours is mounted in an app container, ever
            assert new.get("volumeMounts") == old.get("volumeMounts")
            is_target = old["name"] in chosen if chosen is not None else key == "containers"
            if not is_target:
                assert new == old
                continue
            old_env = old.get("env", [])
            assert new["env"][: len(old_env)] == old_env
            added_env = {e["name"]: e["value"] for e in new["env"][len(old_env) :]}
            assert set(added_env) == set(SEALED_APP_ENV) - {e["name"] for e in old_env}
            assert all(SEALED_APP_ENV[k] == v for k, v in added_env.items())
    for version in VERSIONS[-1:]:
        kubernetes_validate.validate(out, version, strict=True)
    again, same = run_with(out, SEALED_SETTINGS)
    assert again.action == "skipped" and same == out


PLAIN = "http://cp-token.ambient-code.svc:8080/token"
STRICT = InjectSettings(image="cp-token:1", cp_url="https://cp-token.ambient-code.svc:8080/token")


def sidecar_of(pod: dict[str, Any], settings: InjectSettings) -> tuple[dict[str, Any], list[Any]]:
    """The injected sidecar container and the pod's volumes after the patch."""
    import jsonpatch

    patched = jsonpatch.apply_patch(pod, patch_for(pod, settings), in_place=False)
    return patched["spec"]["initContainers"][0], patched["spec"]["volumes"]


POD: dict[str, Any] = {
    "metadata": {"name": "runner", "labels": {"ambient-code.io/token-sidecar": "true"}},
    "spec": {"containers": [{"name": "runner", "image": "runner:1"}]},
}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_plaintext_permission_is_passed_on_to_sidecars() -> None:
    allowed = dataclasses.replace(STRICT, cp_url=PLAIN, allow_plaintext=True)
    env = env_of(sidecar_of(POD, allowed)[0])
    assert env["AMBIENT_CP_TOKEN_URL"] == PLAIN
    assert env["AMBIENT_CP_ALLOW_PLAINTEXT"] == "true"
    # ... and the sidecar it configures accepts exactly that environment
    url_env = {k: v for k, v in env.items() if k.startswith("AMBIENT_CP_")}
    assert load_sidecar_settings(url_env).cp_token_url == PLAIN
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" not in env_of(sidecar_of(POD, STRICT)[0])


def test_the_ca_configmap_is_mounted_in_the_sidecar_only() -> None:
    settings = dataclasses.replace(STRICT, ca_configmap="cp-token-ca")
    sidecar, volumes = sidecar_of(POD, settings)
    assert env_of(sidecar)["AMBIENT_CP_CA_FILE"] == CA_FILE == "/var/run/ambient-ca/ca.crt"
    (volume,) = [v for v in volumes if v["name"] == "cp-token-ca"]
    assert volume["configMap"]["name"] == "cp-token-ca"
    assert {"key": "ca.crt", "path": "ca.crt"} in volume["configMap"]["items"]
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == "cp-token-ca"]
    assert mount == {"name": "cp-token-ca", "mountPath": "/var/run/ambient-ca", "readOnly": True}
    # without the variable: no CA volume, no variable (the system's trust store)
    plain_sidecar, plain_volumes = sidecar_of(POD, STRICT)
    assert "AMBIENT_CP_CA_FILE" not in env_of(plain_sidecar)
    assert all(v["name"] != "cp-token-ca" for v in plain_volumes)


def test_a_pod_with_a_volume_named_like_the_ca_is_refused() -> None:
    from cp_token.inject.patch import Refused

    pod = {**POD, "spec": {**POD["spec"], "volumes": [{"name": "cp-token-ca", "emptyDir": {}}]}}
    with_ca = dataclasses.replace(STRICT, ca_configmap="cp-token-ca")
    with pytest.raises(Refused, match="cp-token-ca"):
        patch_for(pod, with_ca)
    assert patch_for(pod, STRICT)  # the name is free without it
