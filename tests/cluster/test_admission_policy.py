"""Flow 4: the ValidatingAdmissionPolicy from k8s/base, enforced by the real API server.

An identity that is not the control plane, with the ``edit`` ClusterRole in a session
namespace (so RBAC lets it create and change ServiceAccounts there), cannot add, change or
remove the managed label: the API server answers 403 Forbidden with the policy's message. A
cluster administrator cannot either: the policy names one identity. The control plane's
ServiceAccount can. What does not touch the label stays allowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .cluster import Cluster
from .session import CONTROL_PLANE, MANAGED_NS

POLICY = "ambient-code-managed-serviceaccount-label"
LABEL = "ambient-code.io/managed-by"
VALUE = "ambient-control-plane"
EDITOR = "alice@example.com"
NS = "vap-session"
POLICY_MESSAGE = f"only {CONTROL_PLANE} may set or change the label {LABEL} on ServiceAccounts"


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, applied: dict[str, str]) -> Iterator[str]:
    """A managed session namespace where ``EDITOR`` holds what the ``edit`` ClusterRole
    grants. (Without a controller manager the aggregated ``edit`` role stays empty, so its
    parts, ``system:aggregate-to-edit`` and ``-view``, are copied into a Role.)"""
    rules: list[Any] = []
    for part in ("system:aggregate-to-edit", "system:aggregate-to-view"):
        rules += cluster.get(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{part}")["rules"]
    assert any("serviceaccounts" in r.get("resources", []) and "patch" in r["verbs"] for r in rules)
    cluster.apply_objects(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": MANAGED_NS}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "edit", "namespace": NS},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "alice-edit", "namespace": NS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": EDITOR}],
        },
    )
    # The API server loads a new policy through an informer: wait until it is in force
    # (a dry run of what it forbids), as an operator would before relying on it.
    cluster.wait_for(
        "the admission policy in force",
        lambda: (
            cluster.request(
                "POST",
                sa_path() + "?dryRun=All",
                as_user=EDITOR,
                body=service_account("session-probe-sa", {LABEL: VALUE}),
            ).status_code
            == 403
        ),
    )
    yield NS


def sa_path(name: str = "") -> str:
    return f"/api/v1/namespaces/{NS}/serviceaccounts" + (f"/{name}" if name else "")


def service_account(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def relabel(
    cluster: Cluster, name: str, labels: dict[str, str | None], as_user: str | None
) -> httpx.Response:
    return cluster.request(
        "PATCH",
        sa_path(name),
        as_user=as_user,
        body={"metadata": {"labels": labels}},
        patch="merge",
    )


def assert_denied_by_policy(resp: httpx.Response) -> None:
    """403 Forbidden, a Status naming the policy, its binding and its message."""
    assert resp.status_code == 403, resp.text
    status = resp.json()
    assert status["kind"] == "Status" and status["reason"] == "Forbidden"
    assert status["code"] == 403
    assert POLICY in status["message"]
    assert POLICY_MESSAGE in status["message"]


def labels_of(cluster: Cluster, name: str) -> dict[str, str]:
    labels: dict[str, str] = cluster.get(sa_path(name))["metadata"].get("labels", {})
    return labels


def test_an_editor_cannot_create_a_labelled_serviceaccount(
    cluster: Cluster, namespace: str
) -> None:
    for value in (VALUE, "", "someone-else"):  # an empty value counts as set
        resp = cluster.request(
            "POST", sa_path(), as_user=EDITOR, body=service_account("session-x-sa", {LABEL: value})
        )
        assert_denied_by_policy(resp)
    assert cluster.request("GET", sa_path("session-x-sa")).status_code == 404


def test_an_editor_cannot_add_change_or_remove_the_label(cluster: Cluster, namespace: str) -> None:
    # RBAC lets the editor create an unlabelled ServiceAccount
    created = cluster.request(
        "POST", sa_path(), as_user=EDITOR, body=service_account("session-y-sa", {"team": "a"})
    )
    assert created.status_code == 201, created.text
    # add
    assert_denied_by_policy(relabel(cluster, "session-y-sa", {LABEL: VALUE}, EDITOR))
    assert LABEL not in labels_of(cluster, "session-y-sa")
    # the control plane adds it
    assert relabel(cluster, "session-y-sa", {LABEL: VALUE}, CONTROL_PLANE).status_code == 200
    assert labels_of(cluster, "session-y-sa")[LABEL] == VALUE
    # change, remove (merge patch, and a whole-object PUT without labels)
    assert_denied_by_policy(relabel(cluster, "session-y-sa", {LABEL: "other"}, EDITOR))
    assert_denied_by_policy(relabel(cluster, "session-y-sa", {LABEL: None}, EDITOR))
    current = cluster.get(sa_path("session-y-sa"))
    current["metadata"].pop("labels")
    assert_denied_by_policy(
        cluster.request("PUT", sa_path("session-y-sa"), as_user=EDITOR, body=current)
    )
    assert labels_of(cluster, "session-y-sa")[LABEL] == VALUE
    # what does not touch the label stays the editor's to change
    other = relabel(cluster, "session-y-sa", {"team": "b"}, EDITOR)
    assert other.status_code == 200, other.text
    assert labels_of(cluster, "session-y-sa") == {LABEL: VALUE, "team": "b"}
    # the control plane changes and removes it
    assert relabel(cluster, "session-y-sa", {LABEL: "x"}, CONTROL_PLANE).status_code == 200
    assert relabel(cluster, "session-y-sa", {LABEL: None}, CONTROL_PLANE).status_code == 200
    assert LABEL not in labels_of(cluster, "session-y-sa")


def test_kubectl_label_as_an_editor_shows_the_policys_message(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply_objects(service_account("session-z-sa"), as_user=EDITOR)
    done = cluster.kubectl(
        "label", "serviceaccount", "session-z-sa", "-n", NS, f"{LABEL}={VALUE}",
        as_user=EDITOR, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert POLICY_MESSAGE in done.stderr, done.stderr


def test_not_even_a_cluster_administrator_may_set_the_label(
    cluster: Cluster, namespace: str
) -> None:
    """The policy names one identity: the admin (system:masters) passes RBAC, not it."""
    resp = cluster.request("POST", sa_path(), body=service_account("session-a-sa", {LABEL: VALUE}))
    assert_denied_by_policy(resp)


def test_the_control_plane_creates_labelled_serviceaccounts(
    cluster: Cluster, namespace: str
) -> None:
    resp = cluster.request(
        "POST",
        sa_path(),
        as_user=CONTROL_PLANE,
        body=service_account("session-cp-sa", {LABEL: VALUE}),
    )
    assert resp.status_code == 201, resp.text
    assert labels_of(cluster, "session-cp-sa") == {LABEL: VALUE}


def test_an_editor_cannot_label_the_namespace(cluster: Cluster, namespace: str) -> None:
    """The namespace label is the other half: RBAC keeps it to cluster administrators and the
    control plane (``edit`` grants nothing on namespaces)."""
    resp = cluster.request(
        "PATCH",
        f"/api/v1/namespaces/{NS}",
        as_user=EDITOR,
        body={"metadata": {"labels": {"ambient-code.io/managed": "true", "x": "y"}}},
        patch="merge",
    )
    assert resp.status_code == 403, resp.text
    assert resp.json()["reason"] == "Forbidden"
    fresh = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "vap-mine"}}
    created = cluster.request(
        "POST", "/api/v1/namespaces", as_user=EDITOR, body={**fresh, "metadata": {
            "name": "vap-mine", "labels": {"ambient-code.io/managed": "true"}}},
    )  # fmt: skip
    assert created.status_code == 403, created.text
