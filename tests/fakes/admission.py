"""AdmissionReview requests as the kube-apiserver sends them to a mutating webhook.

The shape follows ``admission.k8s.io/v1`` (``AdmissionReview`` with ``request``: uid, kind,
resource, requestKind/requestResource, name, namespace, operation, userInfo, object,
oldObject, dryRun, options), so the injector is tested against what a cluster sends, and
:func:`apply_review_patch` applies the answer's JSON Patch the way the API server does.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from typing import Any

import jsonpatch

__all__ = [
    "POD_GVK",
    "POD_GVR",
    "admission_review",
    "apply_review_patch",
    "opted_in_pod",
    "patch_of",
]

POD_GVK = {"group": "", "version": "v1", "kind": "Pod"}
POD_GVR = {"group": "", "version": "v1", "resource": "pods"}

_OPTIONS = {
    "CREATE": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
    "UPDATE": {"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1"},
    "DELETE": {"kind": "DeleteOptions", "apiVersion": "meta.k8s.io/v1"},
}


def opted_in_pod(name: str = "runner-abc", **spec: Any) -> dict[str, Any]:
    """A minimal session pod carrying the opt-in label; ``spec`` entries are merged in."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "session-ns",
            "labels": {"ambient-code.io/token-sidecar": "true", "app": "runner"},
        },
        "spec": {
            "serviceAccountName": "session-abc-sa",
            "containers": [{"name": "runner", "image": "runner:1"}],
            **spec,
        },
    }
    return pod


def admission_review(
    obj: dict[str, Any] | None,
    *,
    operation: str = "CREATE",
    kind: dict[str, str] | None = None,
    resource: dict[str, str] | None = None,
    sub_resource: str | None = None,
    old: dict[str, Any] | None = None,
    uid: str | None = None,
) -> dict[str, Any]:
    """An ``admission.k8s.io/v1`` AdmissionReview for ``obj`` (a Pod unless told otherwise)."""
    kind = kind or POD_GVK
    resource = resource or POD_GVR
    meta = (obj or old or {}).get("metadata", {})
    request: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": kind,
        "resource": resource,
        "requestKind": kind,
        "requestResource": resource,
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", "session-ns"),
        "operation": operation,
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": "0b8f7b5e-2a64-4a0e-9a8a-0f3d1c0e2f11",
            "groups": ["system:serviceaccounts", "system:authenticated"],
        },
        "object": copy.deepcopy(obj),
        "oldObject": copy.deepcopy(old),
        "dryRun": False,
        "options": _OPTIONS.get(operation),
    }
    if sub_resource:
        request["subResource"] = sub_resource
        request["requestSubResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def patch_of(answer: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The decoded JSON Patch of an AdmissionReview answer, or None when it has none."""
    response = answer["response"]
    if "patch" not in response:
        assert "patchType" not in response
        return None
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"], validate=True))
    return ops


def apply_review_patch(obj: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the answer's patch applied by a JSON Patch library (unchanged if none)."""
    ops = patch_of(answer)
    if ops is None:
        return copy.deepcopy(obj)
    patched: dict[str, Any] = jsonpatch.apply_patch(obj, ops, in_place=False)
    return patched
