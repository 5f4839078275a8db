"""Static checks of the deployment artifacts: k8s/, Dockerfile and docker-compose.yml.

Every Kubernetes object is validated against the schemas of Kubernetes 1.29 (the oldest
release the manifests support) and of the newest release kubernetes-validate ships, both as
committed and as kustomize renders it; cert-manager's objects, which those schemas do not
cover, get hand-written structural checks. Then the properties SPEC asks for are asserted
one by one, so a well-meant edit that drops one of them fails here, not in a cluster. The
example session pod opts in to the sidecar injector, so its checks run on the pod as the
injector mutates it (``cp_token.inject.patch``, configured from the injector's Deployment).
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import trustme
import yaml

from cp_token.inject.patch import patch_for
from cp_token.settings.inject import load_inject_settings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "k8s"
BASE = K8S / "base"
EXAMPLE = K8S / "example-session"
INJECTOR = K8S / "injector"
TRUST = K8S / "trust"
OBSERVABILITY = K8S / "observability"
DIRECTORIES = [TRUST, BASE, EXAMPLE, INJECTOR, OBSERVABILITY]
DIRECTORY_IDS = ["trust", "base", "example-session", "injector", "observability"]

CP_NAMESPACE = "ambient-code"
# cert-manager's cluster resource namespace and trust-manager's trust namespace (defaults)
TRUST_NAMESPACE = "cert-manager"
SESSION_NAMESPACE = "session-demo"
MANAGED_LABEL = "ambient-code.io/managed-by"
CONTROL_PLANE_USERNAME = "system:serviceaccount:ambient-code:ambient-control-plane"

OLDEST_VERSION = "1.29"
NEWEST_VERSION = kubernetes_validate.latest_version()
VERSIONS = (OLDEST_VERSION, NEWEST_VERSION)

# (apiVersion, kind) -> the first release that serves it. ValidatingAdmissionPolicy is GA
# (admissionregistration.k8s.io/v1) from 1.30; 1.29 has only v1beta1, off by default. These
# objects are validated against that release instead of an older one (see docs/operating.md,
# "What the manifests cannot express").
FIRST_RELEASE = {
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"): "1.30",
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"): "1.30",
}

Obj = dict[str, Any]


# --------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    """Every YAML file under k8s/ that holds Kubernetes objects (not kustomization.yaml)."""
    files = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")])
    not_objects = ("kustomization.yaml", "kustomization.yml", "kustomizeconfig.yaml")
    return [f for f in files if f.name not in not_objects]


def load_docs(path: Path) -> list[Obj]:
    """The non-empty documents of a multi-document YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def committed_objects() -> tuple[tuple[Path, Obj], ...]:
    """Every object of every manifest file, with the file it came from."""
    return tuple((path, doc) for path in manifest_files() for doc in load_docs(path))


def kustomization(directory: Path) -> Obj:
    """A directory's kustomization.yaml."""
    loaded: Obj = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return loaded


CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "MutatingWebhookConfiguration",
    "ClusterIssuer",
    "Bundle",
}


@functools.cache
def render(directory: Path) -> tuple[Obj, ...]:
    """What ``kubectl kustomize`` makes of ``directory``.

    Without kubectl the same files are assembled the way kustomize would for these simple
    kustomizations (resources, ``namespace:``, ServiceAccount subjects), so the checks
    still run.
    """
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return tuple(doc for doc in yaml.safe_load_all(out) if doc)
    spec = kustomization(directory)
    docs: list[Obj] = []
    for resource in spec.get("resources", []):
        for doc in load_docs(directory / resource):
            if "namespace" in spec and doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
            for subject in doc.get("subjects", []):
                if subject["kind"] == "ServiceAccount" and "namespace" in spec:
                    subject.setdefault("namespace", spec["namespace"])
            docs.append(doc)
    return tuple(docs)


def find(kind: str, name: str | None = None, directory: Path = K8S) -> list[Obj]:
    """Committed objects of ``kind`` (and ``name``) in files under ``directory``."""
    return [
        obj
        for path, obj in committed_objects()
        if path.is_relative_to(directory)
        and obj.get("kind") == kind
        and (name is None or obj["metadata"]["name"] == name)
    ]


def one(kind: str, name: str | None = None, directory: Path = K8S) -> Obj:
    """The single committed object of ``kind`` (and ``name``) under ``directory``."""
    found = find(kind, name, directory)
    assert len(found) == 1, f"expected one {kind} {name or ''} under {directory}, got {len(found)}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    """The pod spec of a Pod or a workload's template."""
    spec: Obj = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return spec


def all_containers(spec: Obj) -> Iterator[Obj]:
    """Init containers (native sidecars included) and containers."""
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def container(spec: Obj, name: str) -> Obj:
    """A container (or init container) of ``spec`` by name."""
    matches = [c for c in all_containers(spec) if c["name"] == name]
    assert len(matches) == 1, f"no single container {name!r}"
    return matches[0]


def env_of(c: Obj) -> dict[str, str]:
    """A container's literal env values (valueFrom entries map to '')."""
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def port_number(c: Obj, port: int | str) -> int:
    """Resolve a named container port to its number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {c['name']} has no port named {port!r}"
    return int(numbers[0])


def workload_id(obj: Obj) -> str:
    """``Kind/name``, marked when the injector made it."""
    names = [c["name"] for c in all_containers(pod_spec(obj))]
    mark = " (injected)" if "cp-token-sidecar" in names else ""
    return f"{obj['kind']}/{obj['metadata']['name']}{mark}"


@functools.cache
def injector_settings_env() -> tuple[tuple[str, str], ...]:
    """The injector container's environment as the pod sees it (``$(VAR)`` expanded)."""
    deploy = next(o for o in render(INJECTOR) if o["kind"] == "Deployment")
    env: dict[str, str] = {}
    for e in container(pod_spec(deploy), "cp-token-inject")["env"]:
        if "valueFrom" in e:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            env[e["name"]] = deploy["metadata"]["namespace"]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    return tuple(env.items())


def injected(pod: Obj) -> Obj:
    """``pod`` as the injector (configured like k8s/injector) mutates it on CREATE."""
    import jsonpatch

    ca = trustme.CA().issue_cert("cp-token-inject.ambient-code.svc")
    with ca.cert_chain_pems[0].tempfile() as cert, ca.private_key_pem.tempfile() as key:
        env = dict(injector_settings_env())
        env.update(CP_TOKEN_INJECT_TLS_CERT_FILE=cert, CP_TOKEN_INJECT_TLS_KEY_FILE=key)
        settings = load_inject_settings(env)
    patched: Obj = jsonpatch.apply_patch(pod, patch_for(pod, settings), in_place=False)
    return patched


@functools.cache
def _runner_pod() -> Obj:
    return injected(one("Pod", "runner-demo", EXAMPLE))


def runner_pod() -> Obj:
    """The example session's runner pod, as the injector makes it (a fresh copy)."""
    return copy.deepcopy(_runner_pod())


def workload_objects() -> list[Obj]:
    """Every committed object that runs pods, and the example pod as the injector makes it."""
    kinds = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
    committed = [obj for _, obj in committed_objects() if obj["kind"] in kinds]
    return [*committed, runner_pod()]


# --------------------------------------------------------------------------- schemas


def validate(obj: Obj, version: str) -> None:
    """Validate ``obj`` strictly for ``version`` (or the first release that serves it).

    cert-manager's and trust-manager's kinds are CRDs, absent from the Kubernetes schemas:
    checked by hand (the cluster tier applies them against the real CRDs).
    """
    if obj["apiVersion"].startswith("cert-manager.io/"):
        check_cert_manager_object(obj)
        return
    if obj["apiVersion"].startswith("trust.cert-manager.io/"):
        check_bundle(obj)
        return
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        check_monitoring_object(obj)
        return
    first = FIRST_RELEASE.get((obj["apiVersion"], obj["kind"]))
    if first and tuple(map(int, version.split(".")[:2])) < tuple(map(int, first.split("."))):
        version = first
    kubernetes_validate.validate(obj, version, strict=True)


# cert-manager.io/v1 (https://cert-manager.io/docs/reference/api-docs/): the fields these
# manifests may use, their types and enums. Unknown fields fail, as strict validation does.
_CERTIFICATE_FIELDS = {
    "subject": dict,
    "literalSubject": str,
    "commonName": str,
    "duration": str,
    "renewBefore": str,
    "renewBeforePercentage": int,
    "dnsNames": list,
    "ipAddresses": list,
    "uris": list,
    "emailAddresses": list,
    "secretName": str,
    "secretTemplate": dict,
    "keystores": dict,
    "issuerRef": dict,
    "isCA": bool,
    "usages": list,
    "privateKey": dict,
    "encodeUsagesInRequest": bool,
    "revisionHistoryLimit": int,
    "additionalOutputFormats": list,
    "nameConstraints": dict,
    "signatureAlgorithm": str,
}
_KEY_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
}  # fmt: skip
_ISSUER_TYPES = {"acme", "ca", "vault", "selfSigned", "venafi"}
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def go_duration(value: str) -> float:
    """Seconds of a Go duration string (``2160h``, ``1h30m``), as cert-manager parses it."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a Go duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def check_cert_manager_object(obj: Obj) -> None:
    """A structural check of a cert-manager.io/v1 Issuer, ClusterIssuer or Certificate."""
    assert obj["apiVersion"] == "cert-manager.io/v1", obj["apiVersion"]
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
    name = obj["metadata"]["name"]
    assert _DNS_SUBDOMAIN.fullmatch(name) and len(name) <= 253, name
    spec = obj["spec"]
    if obj["kind"] == "ClusterIssuer":
        assert "namespace" not in obj["metadata"], f"ClusterIssuer {name} is cluster-scoped"
    if obj["kind"] in ("Issuer", "ClusterIssuer"):
        kinds = set(spec) & _ISSUER_TYPES
        assert len(kinds) == 1 and set(spec) == kinds, f"Issuer {name}: one issuer type"
        if "ca" in spec:
            assert isinstance(spec["ca"]["secretName"], str)
            assert set(spec["ca"]) <= {
                "secretName", "crlDistributionPoints", "ocspServers", "issuingCertificateURLs",
            }  # fmt: skip
        if "selfSigned" in spec:
            assert set(spec["selfSigned"]) <= {"crlDistributionPoints"}
        return
    assert obj["kind"] == "Certificate", obj["kind"]
    for key, value in spec.items():
        assert key in _CERTIFICATE_FIELDS, f"Certificate {name}: unknown field {key}"
        assert isinstance(value, _CERTIFICATE_FIELDS[key]), f"Certificate {name}: {key} type"
    assert spec["secretName"] and spec["issuerRef"]["name"]
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"}
    assert spec["issuerRef"].get("kind", "Issuer") in ("Issuer", "ClusterIssuer")
    assert spec["issuerRef"].get("group", "cert-manager.io") == "cert-manager.io"
    assert set(spec.get("usages", [])) <= _KEY_USAGES
    key = spec.get("privateKey", {})
    assert set(key) <= {"rotationPolicy", "encoding", "algorithm", "size"}
    assert key.get("rotationPolicy", "Always") in ("Never", "Always")
    assert key.get("algorithm", "RSA") in ("RSA", "ECDSA", "Ed25519")
    if key.get("algorithm") == "ECDSA":
        assert key.get("size", 256) in (256, 384, 521)
    duration = go_duration(spec.get("duration", "2160h"))
    assert duration >= 3600, "cert-manager's minimum duration is 1h"
    if "renewBefore" in spec:
        assert 300 <= go_duration(spec["renewBefore"]) < duration
    for dns in spec.get("dnsNames", []):
        assert _DNS_SUBDOMAIN.fullmatch(dns), dns


def check_bundle(obj: Obj) -> None:
    """A structural check of a trust.cert-manager.io/v1alpha1 Bundle (cluster-scoped)."""
    assert (obj["apiVersion"], obj["kind"]) == ("trust.cert-manager.io/v1alpha1", "Bundle")
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
    assert "namespace" not in obj["metadata"], "a Bundle is cluster-scoped"
    spec = obj["spec"]
    assert set(spec) == {"sources", "target"}
    for source in spec["sources"]:
        (kind,) = source
        assert kind in {"configMap", "secret", "inLine", "useDefaultCAs"}
        if kind in ("configMap", "secret"):
            assert set(source[kind]) == {"name", "key"}
    assert set(spec["target"]) <= {"configMap", "secret", "additionalFormats", "namespaceSelector"}
    assert set(spec["target"]["configMap"]) == {"key"}
    assert set(spec["target"].get("namespaceSelector", {})) <= {"matchLabels"}


# monitoring.coreos.com/v1 (Prometheus Operator API reference): the fields these manifests
# may use. Unknown fields fail, as `kubectl apply --server-side` (strict) does.
_ENDPOINT_FIELDS = {
    "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
    "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings", "tlsConfig",
    "followRedirects", "enableHttp2", "filterRunning", "proxyUrl",
}  # fmt: skip
_RELABEL_FIELDS = {
    "sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action",
}  # fmt: skip
_RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def check_monitoring_object(obj: Obj) -> None:
    """A structural check of a ServiceMonitor, PodMonitor or PrometheusRule."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["apiVersion"]
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
    spec, kind = obj["spec"], obj["kind"]
    if kind == "PrometheusRule":
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert set(group) <= {"name", "interval", "rules", "limit"} and group["name"]
            for rule in group["rules"]:
                assert set(rule) <= _RULE_FIELDS, rule
                assert ("alert" in rule) != ("record" in rule) and isinstance(rule["expr"], str)
                for key in ("labels", "annotations"):
                    assert all(isinstance(v, str) for v in rule.get(key, {}).values())
                if "for" in rule:
                    go_duration(rule["for"])
        return
    endpoints_key = {"ServiceMonitor": "endpoints", "PodMonitor": "podMetricsEndpoints"}[kind]
    assert set(spec) <= {endpoints_key, "selector", "namespaceSelector", "jobLabel"}
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"}
    assert set(spec.get("namespaceSelector", {})) <= {"any", "matchNames"}
    for endpoint in spec[endpoints_key]:
        assert set(endpoint) <= _ENDPOINT_FIELDS, endpoint
        assert isinstance(endpoint["port"], str)
        for relabel in endpoint.get("relabelings", []):
            assert set(relabel) <= _RELABEL_FIELDS, relabel
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                go_duration(endpoint[key])


def test_there_are_manifests() -> None:
    """The directory walk finds both kustomizations' files."""
    kinds = {obj["kind"] for _, obj in committed_objects()}
    assert {"Deployment", "Service", "Pod", "Namespace", "ValidatingAdmissionPolicy"} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
def test_committed_manifests_validate(version: str) -> None:
    """Every object in every file validates against the Kubernetes schemas."""
    for path, obj in committed_objects():
        try:
            validate(obj, version)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            where = f"{path.relative_to(ROOT)} {obj.get('kind')}/{obj['metadata'].get('name')}"
            pytest.fail(f"{where} (Kubernetes {version}): {getattr(e, 'message', e)}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("directory", DIRECTORIES, ids=DIRECTORY_IDS)
def test_rendered_kustomization_validates(directory: Path, version: str) -> None:
    """``kubectl kustomize`` output validates too, and lands in the intended namespace."""
    rendered = render(directory)
    assert rendered
    # k8s/trust sets no namespace: its one namespaced object names cert-manager's own
    expected_ns = kustomization(directory).get("namespace", TRUST_NAMESPACE)
    for obj in rendered:
        validate(obj, version)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == expected_ns, obj["metadata"]["name"]


@pytest.mark.parametrize("directory", DIRECTORIES, ids=DIRECTORY_IDS)
def test_kustomization_lists_every_file(directory: Path) -> None:
    """No manifest is left out of its kustomization, and no listed file is missing."""
    listed = set(kustomization(directory).get("resources", []))
    present = {p.name for p in manifest_files() if p.parent == directory}
    assert listed == present


def test_no_private_key_is_committed() -> None:
    """The signing key comes from the operator, never from the repository."""
    for path in K8S.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY" not in path.read_text(errors="replace"), path
    assert not find("Secret"), "Secrets are created by the operator (docs/operating.md)"


# --------------------------------------------------------------------------- CP Deployment


def cp_deployment() -> Obj:
    """The CP token service Deployment."""
    return one("Deployment", "cp-token", BASE)


def cp_container() -> Obj:
    """The CP token service container."""
    return container(pod_spec(cp_deployment()), "cp-token")


def test_cp_deployment_shape() -> None:
    """Two replicas spread over nodes, running ``cp-token serve`` with its own API access."""
    deploy = cp_deployment()
    spec = pod_spec(deploy)
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = spec["topologySpreadConstraints"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" for t in spread)
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert spec["serviceAccountName"] == "cp-token"
    assert spec["automountServiceAccountToken"] is True
    assert spec["enableServiceLinks"] is False  # else CP_TOKEN_PORT & co. appear in env
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    c = cp_container()
    assert c["image"].split(":")[0] == "cp-token"
    assert c["command"] == ["cp-token", "serve"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"https": 8080, "metrics": 9090}


def test_cp_env() -> None:
    """CP_RUNTIME_NAMESPACE (downward API) precedes the CP_TOKEN_URL built from it."""
    env = cp_container()["env"]
    names = [e["name"] for e in env]
    ns_index, url_index = names.index("CP_RUNTIME_NAMESPACE"), names.index("CP_TOKEN_URL")
    assert ns_index < url_index
    assert env[ns_index]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    url = env[url_index]["value"]
    assert "$(CP_RUNTIME_NAMESPACE)" in url
    assert url == "https://cp-token.$(CP_RUNTIME_NAMESPACE).svc:8080/token"
    values = env_of(cp_container())
    assert values["CP_TOKEN_MINTER"] == "jwt"
    assert values["CP_TOKEN_AUDIENCES"] == "ambient-cp"
    assert values["CP_TOKEN_LOG_FORMAT"] == "json"
    assert len(names) == len(set(names)), "duplicate env entries"


def test_cp_signing_key_from_shared_secret() -> None:
    """Every replica reads the same key, from the Secret, as a directory mount."""
    spec = pod_spec(cp_deployment())
    key_file = env_of(cp_container())["CP_TOKEN_SIGNING_KEY_FILE"]
    assert key_file == "/etc/cp-token/signing/key.pem"
    mounts = {m["mountPath"]: m for m in cp_container()["volumeMounts"]}
    mount = mounts[str(Path(key_file).parent)]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees Secret updates (rotation)"
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "cp-token-signing-key"
    items = volume["secret"].get("items")
    assert items is None or {"key": "key.pem", "path": "key.pem"} in items


def test_cp_probes_on_metrics_port() -> None:
    """Liveness on /healthz and readiness on /readyz, both on 9090."""
    c = cp_container()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert port_number(c, get["port"]) == 9090


def test_cp_drains_before_sigterm() -> None:
    """A preStop pause, and a grace period longer than it."""
    command = cp_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    assert pause > 0
    assert pod_spec(cp_deployment())["terminationGracePeriodSeconds"] > pause


def test_cp_writable_tmp() -> None:
    """The root filesystem is read-only, so /tmp is an emptyDir."""
    spec = pod_spec(cp_deployment())
    mounts = {m["mountPath"]: m["name"] for m in cp_container()["volumeMounts"]}
    volume = next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"])
    assert "emptyDir" in volume


def test_cp_service() -> None:
    """ClusterIP on 8080 (https) and 9090 (metrics), selecting the CP pods."""
    svc = one("Service", "cp-token", BASE)
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"https": 8080, "metrics": 9090}
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert (ports["https"]["appProtocol"], ports["metrics"]["appProtocol"]) == ("https", "http")
    labels = cp_deployment()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_pod_disruption_budget() -> None:
    """One pod at a time, and unhealthy pods never block a drain."""
    pdb = one("PodDisruptionBudget", directory=BASE)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    labels = cp_deployment()["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_cp_autoscaler() -> None:
    """autoscaling/v2 on CPU, from the Deployment's 2 replicas up; the container requests CPU
    (a Utilization target is a share of the request)."""
    hpa = one("HorizontalPodAutoscaler", "cp-token", BASE)
    assert hpa["apiVersion"] == "autoscaling/v2"
    deploy = cp_deployment()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deploy["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] == deploy["spec"]["replicas"] == 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert "cpu" in cp_container()["resources"]["requests"]
    # the PodDisruptionBudget still lets a drain take one pod at a time at any size
    assert one("PodDisruptionBudget", directory=BASE)["spec"]["maxUnavailable"] == 1


# --------------------------------------------------------------------------- RBAC


def test_rbac_is_exactly_what_the_cp_needs() -> None:
    """create tokenreviews; get serviceaccounts, namespaces, pods; nothing else."""
    roles = find("ClusterRole", directory=BASE) + find("Role", directory=BASE)
    assert [r["metadata"]["name"] for r in roles] == ["cp-token"]
    granted = {
        (group, resource, verb)
        for rule in roles[0]["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }
    assert all("nonResourceURLs" not in rule for rule in roles[0]["rules"])
    assert all("resourceNames" not in rule for rule in roles[0]["rules"])
    assert granted == {
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "serviceaccounts", "get"),
        ("", "namespaces", "get"),
        ("", "pods", "get"),
    }
    binding = one("ClusterRoleBinding", "cp-token", BASE)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "cp-token",
    }
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", "cp-token")]
    one("ServiceAccount", "cp-token", BASE)
    rendered = next(o for o in render(BASE) if o["kind"] == "ClusterRoleBinding")
    assert rendered["subjects"][0]["namespace"] == CP_NAMESPACE


# --------------------------------------------------------------------------- admission


def test_admission_policy_guards_the_managed_label() -> None:
    """Only the control plane may set or change the managed label on ServiceAccounts."""
    policy = one("ValidatingAdmissionPolicy", directory=BASE)
    assert policy["apiVersion"] == "admissionregistration.k8s.io/v1"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == [""]
    assert rule["resources"] == ["serviceaccounts"]
    assert set(rule["operations"]) == {"CREATE", "UPDATE"}
    assert policy["spec"].get("failurePolicy", "Fail") == "Fail"
    text = json.dumps(policy["spec"])
    assert MANAGED_LABEL in text
    assert CONTROL_PLANE_USERNAME in text
    assert "request.userInfo.username" in text
    assert "oldObject != null" in text or "oldObject == null" in text  # CREATE has none
    assert "has(object.metadata.labels)" in text
    bindings = find("ValidatingAdmissionPolicyBinding", directory=BASE)
    assert [b["spec"]["policyName"] for b in bindings] == [policy["metadata"]["name"]]
    assert bindings[0]["spec"]["validationActions"] == ["Deny"]


# --------------------------------------------------------------------------- NetworkPolicy


def ingress_by_port(policy: Obj) -> dict[int, list[Obj]]:
    """Map each admitted port to its peers."""
    rules: dict[int, list[Obj]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert isinstance(port["port"], int), "use port numbers, not names"
            rules.setdefault(port["port"], []).extend(rule["from"])
    return rules


def test_cp_network_policy() -> None:
    """8080 from session namespaces and the CP's own; 9090 from monitoring only."""
    policy = one("NetworkPolicy", directory=BASE)
    labels = cp_deployment()["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    by_port = ingress_by_port(policy)
    assert set(by_port) == {8080, 9090}
    assert by_port[8080] == [
        {"namespaceSelector": {"matchLabels": {"ambient-code.io/managed": "true"}}},
        {"podSelector": {}},  # the policy's own namespace
    ]
    assert by_port[9090] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_session_network_policy() -> None:
    """The runner's 8001 is reachable from the CP's namespace."""
    policy = one("NetworkPolicy", directory=EXAMPLE)
    pod = one("Pod", "runner-demo", EXAMPLE)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    by_port = ingress_by_port(policy)
    assert by_port[8001] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": CP_NAMESPACE}}}
    ]


# --------------------------------------------------------------------------- every pod


@pytest.mark.parametrize("workload", workload_objects(), ids=workload_id)
def test_restricted_pod_security(workload: Obj) -> None:
    """Every container, init containers included, meets the restricted profile."""
    spec = pod_spec(workload)
    pod_sc = spec.get("securityContext", {})
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in v for v in spec.get("volumes", []))
    for c in all_containers(spec):
        sc = {**pod_sc, **c.get("securityContext", {})}
        name = c["name"]
        assert sc.get("runAsNonRoot") is True, name
        assert sc.get("runAsUser", 1) != 0, name
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        assert not sc.get("capabilities", {}).get("add"), name
        assert not sc.get("privileged"), name


@pytest.mark.parametrize("workload", workload_objects(), ids=workload_id)
def test_requests_and_limits(workload: Obj) -> None:
    """Every container states CPU and memory requests and limits."""
    for c in all_containers(pod_spec(workload)):
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), (c["name"], kind)


# --------------------------------------------------------------------------- example session


@pytest.mark.parametrize("version", VERSIONS)
def test_injected_runner_pod_validates(version: str) -> None:
    """The opted-in example pod, once mutated, is a valid pod for both releases."""
    validate(runner_pod(), version)


def test_example_pod_opts_in_instead_of_writing_the_sidecar() -> None:
    """The committed pod carries the label and none of what the injector adds."""
    pod = one("Pod", "runner-demo", EXAMPLE)
    assert pod["metadata"]["labels"]["ambient-code.io/token-sidecar"] == "true"
    spec = pod_spec(pod)
    assert "initContainers" not in spec
    assert not {v["name"] for v in spec["volumes"]} & {
        "cp-token-sa",
        "cp-token-file",
        "cp-token-tmp",
    }
    assert all("AMBIENT_TOKEN_SIDECAR_URL" not in env_of(c) for c in all_containers(spec))
    # and the namespace it lives in is one the webhook's namespaceSelector admits
    webhook = one("MutatingWebhookConfiguration", directory=INJECTOR)["webhooks"][0]
    ns = one("Namespace", SESSION_NAMESPACE, EXAMPLE)
    assert webhook["namespaceSelector"]["matchLabels"].items() <= ns["metadata"]["labels"].items()
    assert webhook["objectSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def sidecar_container() -> Obj:
    """The token sidecar of the runner pod."""
    spec = pod_spec(runner_pod())
    sidecars: list[Obj] = [
        c for c in spec["initContainers"] if c["command"] == ["cp-token-sidecar"]
    ]
    assert len(sidecars) == 1
    return sidecars[0]


def test_session_namespace_and_service_account() -> None:
    """The namespace and ServiceAccount carry the labels the CP checks."""
    ns = one("Namespace", SESSION_NAMESPACE, EXAMPLE)
    assert ns["metadata"]["labels"]["ambient-code.io/managed"] == "true"
    sa = one("ServiceAccount", "session-demo-sa", EXAMPLE)
    assert sa["metadata"]["labels"][MANAGED_LABEL] == "ambient-control-plane"
    assert re.fullmatch(r"session-.+-sa", sa["metadata"]["name"])
    spec = pod_spec(runner_pod())
    assert spec["serviceAccountName"] == "session-demo-sa"
    assert spec["automountServiceAccountToken"] is False


def test_native_sidecar() -> None:
    """The sidecar is an always-restarting init container gated by a /readyz startupProbe."""
    sidecar = sidecar_container()
    assert sidecar["restartPolicy"] == "Always"
    env = env_of(sidecar)
    assert env["AMBIENT_CP_TOKEN_URL"] == "https://cp-token.ambient-code.svc:8080/token"
    assert env["AMBIENT_CP_CA_FILE"] == "/var/run/ambient-ca/ca.crt"
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" not in env
    assert env["SIDECAR_LISTEN_ADDR"] == "127.0.0.1:8099"
    assert env["SIDECAR_METRICS_ADDR"] == "0.0.0.0:9099"
    assert env["SIDECAR_TOKEN_FILE"] == "/var/run/ambient/token"
    probe = sidecar["startupProbe"]["httpGet"]
    assert probe["path"] == "/readyz"
    # The kubelet probes from outside the pod's loopback: the metrics address, not 8099.
    assert port_number(sidecar, probe["port"]) == 9099


def test_token_file_on_shared_empty_dir() -> None:
    """SIDECAR_TOKEN_FILE lives on an emptyDir (not a subPath) the runner mounts too."""
    spec = pod_spec(runner_pod())
    token_dir = str(Path(env_of(sidecar_container())["SIDECAR_TOKEN_FILE"]).parent)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in all_containers(spec):
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == token_dir)
        assert "subPath" not in mount
        assert "emptyDir" in volumes[mount["name"]]


def test_projected_service_account_token() -> None:
    """A projected token for the CP audience at /var/run/secrets/tokens/ambient-cp."""
    spec = pod_spec(runner_pod())
    sidecar = sidecar_container()
    sources = [
        (volume["name"], source["serviceAccountToken"])
        for volume in spec["volumes"]
        for source in volume.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in source
    ]
    assert len(sources) == 1
    volume_name, token = sources[0]
    assert token["audience"] == "ambient-cp"
    assert token["expirationSeconds"] >= 600
    assert token["path"] == "ambient-cp"
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == volume_name]
    assert mount["mountPath"] == "/var/run/secrets/tokens"
    token_file = f"{mount['mountPath']}/{token['path']}"
    assert env_of(sidecar).get("AMBIENT_SA_TOKEN_FILE", token_file) == token_file


def test_runner_uses_the_sidecar() -> None:
    """The runner's client library is pointed at the sidecar's loopback address."""
    runner = container(pod_spec(runner_pod()), "runner")
    url = env_of(runner)["AMBIENT_TOKEN_SIDECAR_URL"]
    assert url == "http://127.0.0.1:8099/token"
    assert url.split("/")[2] == env_of(sidecar_container())["SIDECAR_LISTEN_ADDR"]
    assert ipaddress.ip_address(url.split("/")[2].split(":")[0]).is_loopback


# --------------------------------------------------------------------------- injector


def injector_deployment() -> Obj:
    """The sidecar injector's Deployment."""
    return one("Deployment", "cp-token-inject", INJECTOR)


def injector_container() -> Obj:
    """The injector's container."""
    return container(pod_spec(injector_deployment()), "cp-token-inject")


def test_injector_deployment_shape() -> None:
    """Two replicas over nodes, ``cp-token inject``, no API credentials, probes on metrics."""
    deploy = injector_deployment()
    spec = pod_spec(deploy)
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname" for t in spec["topologySpreadConstraints"]
    )
    assert spec["serviceAccountName"] == "cp-token-inject"
    one("ServiceAccount", "cp-token-inject", INJECTOR)
    assert spec["automountServiceAccountToken"] is False  # it calls no API
    assert spec["enableServiceLinks"] is False
    assert not find("ClusterRole", directory=INJECTOR) and not find("Role", directory=INJECTOR)
    c = injector_container()
    assert c["command"] == ["cp-token", "inject"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"https": 8443, "metrics": 9090}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"]["path"] == path
        assert port_number(c, c[probe]["httpGet"]["port"]) == 9090
    pause = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pause > 0


def test_injector_configuration_loads() -> None:
    """The Deployment's environment is a valid configuration, listening where the ports say,
    pointing injected sidecars at the CP Service of the base, in the same image."""
    c = injector_container()
    env = dict(injector_settings_env())
    assert env["CP_TOKEN_INJECT_LISTEN_ADDR"] == ":8443"
    assert env["CP_TOKEN_METRICS_ADDR"] == ":9090"
    cp_svc = one("Service", "cp-token", BASE)
    https = next(p["port"] for p in cp_svc["spec"]["ports"] if p["name"] == "https")
    assert env["CP_TOKEN_INJECT_CP_URL"] == f"https://cp-token.{CP_NAMESPACE}.svc:{https}/token"
    assert env["CP_TOKEN_INJECT_CA_CONFIGMAP"] == one("Bundle", directory=TRUST)["metadata"]["name"]
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" not in env
    assert env["CP_TOKEN_INJECT_IMAGE"] == c["image"]
    assert env["CP_TOKEN_INJECT_AUDIENCE"] in env_of(cp_container())["CP_TOKEN_AUDIENCES"].split(
        ","
    )
    assert int(env["CP_TOKEN_INJECT_TOKEN_EXPIRATION"]) >= 600
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names))


def test_injector_tls_from_the_certificate_secret() -> None:
    """cert and key come from the Certificate's Secret, mounted as a directory (renewals)."""
    spec = pod_spec(injector_deployment())
    env = env_of(injector_container())
    cert_dir = str(Path(env["CP_TOKEN_INJECT_TLS_CERT_FILE"]).parent)
    assert Path(env["CP_TOKEN_INJECT_TLS_CERT_FILE"]).name == "tls.crt"
    assert env["CP_TOKEN_INJECT_TLS_KEY_FILE"] == f"{cert_dir}/tls.key"
    mount = next(m for m in injector_container()["volumeMounts"] if m["mountPath"] == cert_dir)
    assert mount.get("readOnly") is True and "subPath" not in mount
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    serving = one("Certificate", "cp-token-inject", INJECTOR)
    assert volume["secret"]["secretName"] == serving["spec"]["secretName"]


def test_injector_service_and_pdb() -> None:
    """Service 443 -> 8443 selecting the injector pods; one replica down at a time."""
    svc = one("Service", "cp-token-inject", INJECTOR)
    labels = injector_deployment()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    https = next(p for p in svc["spec"]["ports"] if p["port"] == 443)
    assert port_number(injector_container(), https["targetPort"]) == 8443
    pdb = one("PodDisruptionBudget", "cp-token-inject", INJECTOR)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_mutating_webhook_configuration() -> None:
    """Exactly SPEC's webhook: v1 reviews, no side effects, Fail, IfNeeded, <= 10 s, the
    managed namespaces, the opt-in label, CREATE of pods, to the injector's Service."""
    config = one("MutatingWebhookConfiguration", directory=INJECTOR)
    (hook,) = config["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Fail"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert 1 <= hook["timeoutSeconds"] <= 10
    assert hook["namespaceSelector"] == {"matchLabels": {"ambient-code.io/managed": "true"}}
    assert hook["objectSelector"] == {"matchLabels": {"ambient-code.io/token-sidecar": "true"}}
    (rule,) = hook["rules"]
    assert (rule["operations"], rule["apiGroups"], rule["resources"]) == (
        ["CREATE"],
        [""],
        ["pods"],
    )
    assert rule["apiVersions"] == ["v1"]
    service = hook["clientConfig"]["service"]
    assert "url" not in hook["clientConfig"] and "caBundle" not in hook["clientConfig"]
    assert service["name"] == one("Service", "cp-token-inject", INJECTOR)["metadata"]["name"]
    assert (service["path"], service["port"]) == ("/mutate", 443)
    # rendered: the Service reference and the CA injection name the injector's namespace
    rendered = next(o for o in render(INJECTOR) if o["kind"] == "MutatingWebhookConfiguration")
    ns = kustomization(INJECTOR)["namespace"]
    assert rendered["webhooks"][0]["clientConfig"]["service"]["namespace"] == ns
    ca_from = rendered["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert ca_from == f"{ns}/cp-token-inject"


def test_cert_manager_chain() -> None:
    """One private CA (k8s/trust) signs both serving certificates: a self-signed
    ClusterIssuer -> the CA Certificate in cert-manager's namespace -> a CA ClusterIssuer ->
    the CP's and the injector's Certificates for their Services' in-cluster names. The
    webhook trusts the CA, so a renewal keeps the caBundle."""
    issuers = {o["metadata"]["name"]: o["spec"] for o in find("ClusterIssuer", directory=TRUST)}
    (ca_obj,) = find("Certificate", directory=TRUST)
    ca = ca_obj["spec"]
    assert ca_obj["metadata"]["namespace"] == TRUST_NAMESPACE
    assert "selfSigned" in issuers[ca["issuerRef"]["name"]]
    assert ca["issuerRef"]["kind"] == "ClusterIssuer"
    assert ca["isCA"] is True
    # renewing the CA keeps its key, so every pod's trusted ca.crt still verifies
    assert ca["privateKey"]["rotationPolicy"] == "Never"
    signer = next(name for name, spec in issuers.items() if "ca" in spec)
    assert issuers[signer] == {"ca": {"secretName": ca["secretName"]}}
    assert not find("Issuer"), "one CA for everything: ClusterIssuers only"
    for directory, service in ((BASE, "cp-token"), (INJECTOR, "cp-token-inject")):
        serving = one("Certificate", directory=directory)["spec"]
        assert serving["issuerRef"] == {
            "group": "cert-manager.io",
            "kind": "ClusterIssuer",
            "name": signer,
        }
        assert not serving.get("isCA")
        svc = f"{service}.{kustomization(directory)['namespace']}.svc"
        assert svc in serving["dnsNames"]
        assert "server auth" in serving["usages"]
        assert serving["privateKey"]["rotationPolicy"] == "Always"
        assert go_duration(serving["duration"]) < go_duration(ca["duration"])


def test_the_bundle_distributes_the_ca_to_session_namespaces() -> None:
    """trust-manager copies the CA's ca.crt (never its key) into a ConfigMap, key ca.crt, in
    every namespace the CP serves; the injector mounts that ConfigMap."""
    bundle = one("Bundle", directory=TRUST)
    (ca_obj,) = find("Certificate", directory=TRUST)
    assert bundle["spec"]["sources"] == [
        {"secret": {"name": ca_obj["spec"]["secretName"], "key": "ca.crt"}}
    ]
    assert bundle["spec"]["target"]["configMap"] == {"key": "ca.crt"}
    selector = bundle["spec"]["target"]["namespaceSelector"]["matchLabels"]
    assert selector == {"ambient-code.io/managed": "true"}
    ns = one("Namespace", SESSION_NAMESPACE, EXAMPLE)
    assert selector.items() <= ns["metadata"]["labels"].items()
    webhook = one("MutatingWebhookConfiguration", directory=INJECTOR)["webhooks"][0]
    assert webhook["namespaceSelector"]["matchLabels"] == selector  # same namespaces
    # the injected sidecar reads the ConfigMap trust-manager writes
    spec = pod_spec(runner_pod())
    (volume,) = [v for v in spec["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == bundle["metadata"]["name"]
    assert volume["configMap"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    sidecar = sidecar_container()
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True and "subPath" not in mount
    assert env_of(sidecar)["AMBIENT_CP_CA_FILE"] == f"{mount['mountPath']}/ca.crt"
    runner = container(spec, "runner")
    assert all(m["name"] != volume["name"] for m in runner.get("volumeMounts", []))


def test_cp_serves_https_with_the_certificate_secret() -> None:
    """The API port's certificate comes from the Certificate's Secret, mounted as a
    directory (renewals); the probes stay on the plain-HTTP metrics port."""
    spec = pod_spec(cp_deployment())
    env = env_of(cp_container())
    cert_dir = str(Path(env["CP_TOKEN_TLS_CERT_FILE"]).parent)
    assert Path(env["CP_TOKEN_TLS_CERT_FILE"]).name == "tls.crt"
    assert env["CP_TOKEN_TLS_KEY_FILE"] == f"{cert_dir}/tls.key"
    mount = next(m for m in cp_container()["volumeMounts"] if m["mountPath"] == cert_dir)
    assert mount.get("readOnly") is True and "subPath" not in mount
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert (
        volume["secret"]["secretName"] == one("Certificate", "cp-token", BASE)["spec"]["secretName"]
    )
    assert env["CP_TOKEN_URL"].startswith("https://")
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" not in env
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = cp_container()[probe]["httpGet"]
        assert get.get("scheme", "HTTP") == "HTTP"
        assert port_number(cp_container(), get["port"]) == 9090


def test_an_overlay_image_moves_the_injected_sidecar_too(tmp_path: Path) -> None:
    """One ``images:`` entry in an overlay sets the injector's image and the sidecar's."""
    config = yaml.safe_load((INJECTOR / "kustomizeconfig.yaml").read_text())
    assert {"kind": "Deployment", "path": "spec/template/spec/containers/env/value"} in config[
        "images"
    ]
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # the configuration is checked above; rendering needs kubectl
    (tmp_path / "base").symlink_to(INJECTOR)
    overlay = {
        "resources": ["base"],
        "namespace": "elsewhere",
        "images": [{"name": "cp-token", "newName": "registry.example.com/cp-token", "newTag": "9"}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    out = subprocess.run(
        [kubectl, "kustomize", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    c = container(pod_spec(deploy), "cp-token-inject")
    assert c["image"] == "registry.example.com/cp-token:9"
    assert env_of(c)["CP_TOKEN_INJECT_IMAGE"] == "registry.example.com/cp-token:9"
    hook = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")
    assert hook["webhooks"][0]["clientConfig"]["service"]["namespace"] == "elsewhere"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    pairs = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        pairs.append((instruction.upper(), args.strip()))
    return pairs


def test_dockerfile() -> None:
    """Multi-stage, slim final stage, numeric non-root USER, no HEALTHCHECK."""
    instructions = dockerfile_instructions()
    args = {
        a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instructions if i == "ARG" and "=" in a
    }
    froms = [a for i, a in instructions if i == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    final_image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), froms[-1])
    assert re.match(r"python:3\.11-slim\b", final_image), final_image
    assert not any(i == "HEALTHCHECK" for i, _ in instructions)
    last_from = max(n for n, (i, _) in enumerate(instructions) if i == "FROM")
    final_stage = instructions[last_from + 1 :]
    users = [a for i, a in final_stage if i == "USER"]
    assert users, "the final stage sets USER"
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"USER must be numeric: {users[-1]}"
    assert any(i == "COPY" and a.startswith("--from=") for i, a in final_stage)
    assert ("CMD", '["cp-token", "serve"]') in final_stage
    # what the sealed sidecar's gRPC listener needs is in the image (SPEC "Sealed mode"):
    # the grpc extra installed, or grpcio pinned in the lock the image installs from
    installs = " ".join(a for i, a in instructions if i == "RUN")
    lock = ROOT / "requirements.lock"
    assert re.search(r"\[[a-z,]*\bgrpc\b[a-z,]*\]", installs) or (
        "requirements.lock" in installs and re.search(r"(?m)^grpcio==", lock.read_text())
    ), "the image installs grpcio"


def test_dockerignore() -> None:
    """The build context leaves out the venv, git and caches."""
    patterns = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".pytest_cache", ".mypy_cache"} <= set(patterns)


# --------------------------------------------------------------------------- compose


def test_docker_compose() -> None:
    """The dev stack parses, and its services are explicit enough to run as processes."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"cp", "sidecar", "runner", "demo-api"} <= set(services)
    for name, service in services.items():
        assert isinstance(service["command"], list), name
        assert isinstance(service["environment"], dict), name
        for value in service["environment"].values():
            assert isinstance(value, str), (name, value)
    cp = services["cp"]["environment"]
    assert cp["CP_TOKEN_AUTHN"] == "static"
    assert cp["CP_TOKEN_MINTER"] == "jwt"
    assert (ROOT / cp["CP_TOKEN_STATIC_IDENTITIES_FILE"]).is_file()
    sidecar = services["sidecar"]["environment"]
    assert sidecar["SIDECAR_LISTEN_ADDR"].startswith("127.0.0.1:")
    # plain HTTP to the CP on compose's network: opted in explicitly (SPEC)
    assert sidecar["AMBIENT_CP_TOKEN_URL"].startswith("http://cp:")
    assert sidecar["AMBIENT_CP_ALLOW_PLAINTEXT"] == "true"
    sa_token = (ROOT / sidecar["AMBIENT_SA_TOKEN_FILE"]).read_text().strip()
    identities = json.loads((ROOT / cp["CP_TOKEN_STATIC_IDENTITIES_FILE"]).read_text())
    assert sa_token in {i["token"] for i in identities["identities"]}
    runner = services["runner"]
    assert runner["network_mode"] == "service:sidecar"
    assert runner["environment"]["AMBIENT_TOKEN_SIDECAR_URL"] == (
        f"http://{sidecar['SIDECAR_LISTEN_ADDR']}/token"
    )
    for script in ("examples/demo_runner.py", "examples/demo_api.py"):
        assert (ROOT / script).is_file()
