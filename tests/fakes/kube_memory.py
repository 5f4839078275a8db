"""An in-memory stand-in for :class:`cp_token.kube.client.KubeClient` for unit tests of the
authenticators and the object cache: the calls they make, answered from dictionaries on the
event loop, no network, no clock of its own.

- Objects (``put``/``remove``) are answered as the API server's GET would: a dict with
  ``metadata`` (uid, labels, ``deletionTimestamp``), or None for a 404.
- ``reviews[token]`` is what a TokenReview of that token says (its ``status``), whatever the
  objects say now: the real API server caches a success for 10 s.
- ``key_set`` is the issuer's JWKS document.
- ``hold(call)`` makes every call of that kind wait until ``release(call)``; ``started[call]``
  is set when one begins; ``fail(exc)`` makes every call (or those named) raise ``exc``;
  ``calls`` counts
  them by kind. As with the real client, a call that raises ``KubeDown`` makes the client
  "down" (``down``), and one answered makes it up again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

from cp_token.kube.client import KubeDown, KubeError

__all__ = ["MemoryKube", "pod_status"]

POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"


def pod_status(namespace: str, sa: str, sa_uid: str, pod: str, pod_uid: str) -> dict[str, Any]:
    """A successful TokenReview ``status`` for a token bound to ``pod``."""
    return {
        "authenticated": True,
        "audiences": ["ambient-cp"],
        "user": {
            "username": f"system:serviceaccount:{namespace}:{sa}",
            "uid": sa_uid,
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ],
            "extra": {POD_NAME_KEY: [pod], POD_UID_KEY: [pod_uid]},
        },
    }


class MemoryKube:
    """The Kubernetes calls the CP makes, from memory (see the module's docstring)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.reviews: dict[str, dict[str, Any]] = {}
        self.key_set: dict[str, Any] = {"keys": []}
        self.calls: Counter[str] = Counter()
        self.started: dict[str, asyncio.Event] = {}
        self.down = False
        self.may_call = True
        self._failure: KubeError | None = None
        self._failing: frozenset[str] = frozenset()
        self._holds: dict[str, asyncio.Event] = {}

    # --- the state ----------------------------------------------------------------------

    def put(
        self,
        kind: str,
        namespace: str,
        name: str,
        *,
        uid: str | None = None,
        labels: dict[str, str] | None = None,
        deletion: str | None = None,
    ) -> str:
        """Create (or replace) an object; returns its uid. ``deletion``: the
        ``metadata.deletionTimestamp`` text (deleted, held by a finalizer)."""
        uid = uid or str(uuid.uuid4())
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid}
        if labels:
            meta["labels"] = dict(labels)
        if deletion is not None:
            meta["deletionTimestamp"] = deletion
            meta["deletionGracePeriodSeconds"] = 0
            meta["finalizers"] = ["example.com/hold"]
        self.objects[(kind, namespace, name)] = {"metadata": meta}
        return uid

    def remove(self, kind: str, namespace: str, name: str) -> None:
        """Delete an object (GET then answers 404)."""
        del self.objects[(kind, namespace, name)]

    def fail(self, failure: KubeError | None, *calls: str) -> None:
        """Every call (or every call of the kinds ``calls``) raises ``failure`` from now on
        (None: calls answer again)."""
        self._failure = failure
        self._failing = frozenset(calls)

    def hold(self, call: str) -> None:
        """Calls of kind ``call`` wait until :meth:`release`."""
        self._holds[call] = asyncio.Event()

    def release(self, call: str) -> None:
        """Let held calls of kind ``call`` go on."""
        self._holds.pop(call).set()

    def began(self, call: str) -> asyncio.Event:
        """The event set when a call of kind ``call`` begins."""
        return self.started.setdefault(call, asyncio.Event())

    # --- the calls ----------------------------------------------------------------------

    async def _call(self, call: str) -> None:
        self.calls[call] += 1
        self.began(call).set()
        held = self._holds.get(call)
        if held is not None:
            await held.wait()
        if self._failure is not None and (not self._failing or call in self._failing):
            if isinstance(self._failure, KubeDown):
                self.down = True
            raise self._failure
        self.down = False

    async def token_review(self, token: str, audiences: tuple[str, ...]) -> dict[str, Any]:
        """The scripted ``status`` for ``token`` (unknown: not authenticated)."""
        await self._call("tokenreview")
        return self.reviews.get(token, {"user": {}, "error": "invalid bearer token"})

    async def _get(self, call: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        await self._call(call)
        return self.objects.get((kind, namespace, name))

    async def get_namespace(self, name: str) -> dict[str, Any] | None:
        """GET a namespace."""
        return await self._get("namespace", "namespaces", "", name)

    async def get_service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        """GET a ServiceAccount."""
        return await self._get("serviceaccount", "serviceaccounts", namespace, name)

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """GET a pod."""
        return await self._get("pod", "pods", namespace, name)

    async def get_json(
        self, call: str, path: str, accept: str = "application/json"
    ) -> dict[str, Any]:
        """The JWKS document (``call`` "jwks")."""
        await self._call(call)
        return self.key_set
