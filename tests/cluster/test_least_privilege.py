"""Flow 5: least privilege, against the real RBAC authorizer.

- Over a whole run the API server never answers the CP 403: the session CPs' metrics and logs
  are checked when they stop, and the API server's audit log of the CP's ServiceAccount when
  the cluster stops (conftest); here, per CP, as it goes.
- What each mode uses is exactly what k8s/base grants, plus what every authenticated
  ServiceAccount already has (``system:basic-user``: SelfSubjectAccessReview;
  ``system:service-account-issuer-discovery``: the issuer discovery document and
  ``/openid/v1/jwks``), and the ClusterRole grants nothing that neither mode uses. Read from
  the API server's audit log, per CP (its kubeconfig token's credential id).
- One permission removed from the ClusterRole (a copy of k8s/base's, bound to a ServiceAccount
  of its own): the documented 503 with ``Retry-After``, and a log line naming the verb and the
  resource; restored, the CP serves again.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .cluster import ROOT, Cluster
from .conftest import CP_USERNAME, StartCp, audited_403s, refused_by_the_api_server
from .session import CP_NAMESPACE, CpServer, Injector, make_session, pod_token

RBAC = ROOT / "k8s" / "base" / "rbac.yaml"
REDUCED_SA = "cp-token-reduced"
REDUCED_USER = f"system:serviceaccount:{CP_NAMESPACE}:{REDUCED_SA}"
# What every authenticated ServiceAccount may do by default (bootstrap RBAC)
DEFAULT_GRANTS = {
    ("create", "authorization.k8s.io", "selfsubjectaccessreviews"),
    ("get", "", "/.well-known/openid-configuration"),
    ("get", "", "/openid/v1/jwks"),
}
# What each authn mode needs from the ClusterRole (SPEC: "create tokenreviews; get
# serviceaccounts, namespaces; and for jwks authn get pods"; tokenreview reads pods too:
# the API server caches a review for 10 s, so the CP checks the bound pod itself)
NEEDS = {
    "tokenreview": {
        ("create", "authentication.k8s.io", "tokenreviews"),
        ("get", "", "pods"),
        ("get", "", "serviceaccounts"),
        ("get", "", "namespaces"),
    },
    "jwks": {
        ("get", "", "pods"),
        ("get", "", "serviceaccounts"),
        ("get", "", "namespaces"),
    },
}


def cluster_role() -> dict[str, Any]:
    """The cp-token ClusterRole as k8s/base ships it."""
    for doc in yaml.safe_load_all(RBAC.read_text()):
        if doc and doc["kind"] == "ClusterRole" and doc["metadata"]["name"] == "cp-token":
            role: dict[str, Any] = doc
            return role
    raise AssertionError(f"no ClusterRole cp-token in {RBAC}")


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(verb, group, resource) for every combination the rules name."""
    out = set()
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule["verbs"]:
                    out.add((verb, group, resource))
        for url in rule.get("nonResourceURLs", []):
            for verb in rule["verbs"]:
                out.add((verb, "", url))
    return out


def credential_id(cp: CpServer) -> str:
    """The credential id the API server records for the CP's kubeconfig token (its jti)."""
    token = json.loads(Path(cp.work / "kubeconfig").read_text())["users"][0]["user"]["token"]
    seg = token.split(".")[1]
    return f"JTI={json.loads(base64.urlsafe_b64decode(seg + '=' * (-len(seg) % 4)))['jti']}"


def used_by(cluster: Cluster, cp: CpServer) -> list[tuple[tuple[str, str, str], int]]:
    """What this CP asked of the API server, and the status it got (audit log)."""
    jti = credential_id(cp)
    out = []
    for event in cluster.audit_events(CP_USERNAME):
        extra = event["user"].get("extra", {})
        if jti not in extra.get("authentication.kubernetes.io/credential-id", []):
            continue
        ref = event.get("objectRef")
        if ref:
            what = (event["verb"], ref.get("apiGroup", ""), ref["resource"])
        else:
            what = (event["verb"], "", event["requestURI"].split("?")[0])
        out.append((what, event["responseStatus"]["code"]))
    return out


def test_the_cluster_role_grants_exactly_what_the_two_modes_need() -> None:
    assert grants(cluster_role()["rules"]) == NEEDS["tokenreview"] | NEEDS["jwks"]


def test_the_default_discovery_binding_is_all_jwks_needs_beyond_the_role(
    cluster: Cluster,
) -> None:
    binding = cluster.get(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/system:service-account-issuer-discovery"
    )
    assert {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io",
            "name": "system:serviceaccounts"} in binding["subjects"]  # fmt: skip
    role = cluster.get(
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:service-account-issuer-discovery"
    )
    assert grants(role["rules"]) == {
        ("get", "", "/.well-known/openid-configuration"),
        ("get", "", "/.well-known/openid-configuration/"),
        ("get", "", "/openid/v1/jwks"),
        ("get", "", "/openid/v1/jwks/"),
    }


def test_each_mode_uses_what_it_is_granted_and_is_never_refused(
    cluster: Cluster, cp: CpServer
) -> None:
    session = make_session(cluster, f"lp{cp.mode[:4]}")
    resp = cp.get_token(pod_token(cluster, session))
    assert resp.status_code == 200, resp.text
    used = used_by(cluster, cp)
    assert used, "the audit log holds this CP's requests"
    asked = {what for what, _ in used}
    allowed = NEEDS[cp.mode] | DEFAULT_GRANTS
    assert asked <= allowed, f"{cp.mode} asked for more than it needs: {asked - allowed}"
    # everything the mode needs from the ClusterRole is what it used
    assert NEEDS[cp.mode] <= asked, NEEDS[cp.mode] - asked
    if cp.mode == "jwks":
        # jwks authn reads the issuer's keys and discovery through the default binding
        assert ("get", "", "/openid/v1/jwks") in asked
        assert ("get", "", "/.well-known/openid-configuration") in asked
    assert all(code != 403 for _, code in used), used
    assert not refused_by_the_api_server(cp)
    assert not audited_403s(cluster)


# -- one permission removed ---------------------------------------------------------------


def apply_reduced_role(cluster: Cluster, without: tuple[str, str, str] | None) -> None:
    """The cp-token ClusterRole's rules, minus ``without``, as the ClusterRole of
    ``REDUCED_SA``; returns once the authorizer agrees."""
    rules = []
    for rule in cluster_role()["rules"]:
        resources = [
            r
            for r in rule["resources"]
            if without is None or not (r == without[2] and without[1] in rule["apiGroups"])
        ]
        if resources:
            rules.append({**rule, "resources": resources})
    cluster.apply_objects(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": REDUCED_SA},
            "rules": rules,
        }
    )
    for verb, group, resource in NEEDS["tokenreview"] | NEEDS["jwks"]:
        expected = (verb, group, resource) != without
        cluster.wait_for(
            f"{REDUCED_USER} {'may' if expected else 'may not'} {verb} {resource}",
            lambda v=verb, g=group, r=resource, e=expected: can_i(cluster, v, g, r) == e,
        )


def can_i(cluster: Cluster, verb: str, group: str, resource: str) -> bool:
    """A SubjectAccessReview for ``REDUCED_USER`` (in a session namespace)."""
    resp = cluster.request(
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        body={
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": REDUCED_USER,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{CP_NAMESPACE}"],
                "resourceAttributes": {
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "namespace": "some-session",
                },
            },
        },
    )
    assert resp.status_code == 201, resp.text
    return bool(resp.json()["status"].get("allowed"))


@pytest.fixture(scope="module")
def reduced_token(cluster: Cluster, applied: dict[str, str]) -> Iterator[str]:
    """A ServiceAccount of its own bound to a ClusterRole that starts as k8s/base's copy."""
    cluster.apply_objects(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": REDUCED_SA, "namespace": CP_NAMESPACE},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": REDUCED_SA},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": REDUCED_SA,
            },
            "subjects": [{"kind": "ServiceAccount", "name": REDUCED_SA, "namespace": CP_NAMESPACE}],
        },
    )
    apply_reduced_role(cluster, None)
    yield cluster.create_token(CP_NAMESPACE, REDUCED_SA, seconds=86400)
    apply_reduced_role(cluster, None)


def assert_unavailable(resp: httpx.Response) -> None:
    """The documented 503: temporarily_unavailable, Retry-After in whole seconds."""
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "temporarily_unavailable"
    assert resp.headers["retry-after"].isdigit()


def names_the_permission(cp: CpServer, verb: str, resource: str) -> list[str]:
    """Error log lines that name both the verb and the resource."""
    word = re.compile(rf"\b{verb}\b")
    return [
        str(line["msg"])
        for line in cp.log_lines()
        if line.get("level") == "error"
        and resource in str(line.get("msg", ""))
        and word.search(str(line.get("msg", "")))
    ]


def wait_for_log(cp: CpServer, verb: str, resource: str) -> list[str]:
    """:func:`names_the_permission`, given a few seconds (a log line may trail the answer)."""
    deadline = time.monotonic() + 5
    while not (lines := names_the_permission(cp, verb, resource)):
        assert time.monotonic() < deadline, f"no log names {verb} {resource}: " + "\n".join(
            json.dumps(line)[:400] for line in cp.log_lines()[-12:]
        )
        time.sleep(0.1)
    return lines


@pytest.mark.parametrize("mode", ["tokenreview", "jwks"])
def test_one_permission_removed_is_a_503_and_a_log_naming_it(
    cluster: Cluster, injector: Injector, start_cp: StartCp, reduced_token: str, mode: str
) -> None:
    cp = start_cp(mode, token=reduced_token)
    warm = make_session(cluster, f"lpwarm{mode[:4]}")
    assert cp.get_token(pod_token(cluster, warm)).status_code == 200
    for i, missing in enumerate(sorted(NEEDS[mode])):
        verb, _, resource = missing
        apply_reduced_role(cluster, missing)
        try:
            # a new session: nothing of it is cached
            session = make_session(cluster, f"lp{mode[:4]}{i}")
            token = pod_token(cluster, session)
            started = time.monotonic()
            assert_unavailable(cp.get_token(token))
            assert time.monotonic() - started < 12
            wait_for_log(cp, verb, resource)
            assert any(
                e["responseStatus"]["code"] == 403
                and (e.get("objectRef") or {}).get("resource") == resource
                for e in cluster.audit_events(REDUCED_USER)
            )
        finally:
            apply_reduced_role(cluster, None)
        # restored: the same pod gets its token (its refusal was not remembered as a denial)
        deadline = time.monotonic() + 10
        while (resp := cp.get_token(token)).status_code != 200:
            assert resp.status_code == 503, resp.text
            assert time.monotonic() < deadline, "not served again after the role was restored"
            time.sleep(0.5)


def test_a_cp_started_without_tokenreviews_says_so_and_names_jwks(
    cluster: Cluster, injector: Injector, start_cp: StartCp, reduced_token: str
) -> None:
    apply_reduced_role(cluster, ("create", "authentication.k8s.io", "tokenreviews"))
    try:
        cp = start_cp("tokenreview", token=reduced_token)
        lines = wait_for_log(cp, "create", "tokenreviews")
        assert any("CP_TOKEN_AUTHN=jwks" in line for line in lines), lines
        # readiness stays on: the permission can be granted without a restart
        assert httpx.get(f"{cp.metrics}/readyz", timeout=5).status_code == 200
        session = make_session(cluster, "lpstart")
        assert_unavailable(cp.get_token(pod_token(cluster, session)))
    finally:
        apply_reduced_role(cluster, None)
