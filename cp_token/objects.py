"""Namespaces, ServiceAccounts and Pods read through the Kubernetes API, cached briefly.

One cache serves the policy's label checks and the ``jwks`` authenticator's liveness checks,
so a cold request reads each object once. Reads are coalesced; a missing object is
remembered as None for the same time as a found one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import TTLCache

from cp_token.clock import Clock
from cp_token.errors import Unavailable
from cp_token.kube import KubeClient, KubeForbidden, KubeUnavailable
from cp_token.singleflight import Singleflight

__all__ = ["ObjectCache"]

log = logging.getLogger(__name__)

Obj = dict[str, Any] | None


class ObjectCache:
    """Cached, coalesced GETs of the objects the CP's decisions depend on."""

    def __init__(
        self, kube: KubeClient, clock: Clock, *, ttl: float = 10.0, metrics: Any = None
    ) -> None:
        self._kube = kube
        self._cache: TTLCache[tuple[str, str, str], Obj] = TTLCache(
            maxsize=50_000, ttl=ttl, timer=clock.monotonic
        )
        self._inflight: Singleflight[tuple[str, str, str], Obj] = Singleflight()
        self._metrics = metrics
        self._forbidden_logged: set[str] = set()

    async def namespace(self, name: str) -> Obj:
        """The Namespace (None if it does not exist)."""
        return await self._get("namespaces", "", name, lambda: self._kube.get_namespace(name))

    async def service_account(self, namespace: str, name: str) -> Obj:
        """The ServiceAccount (None if it does not exist)."""
        return await self._get(
            "serviceaccounts",
            namespace,
            name,
            lambda: self._kube.get_service_account(namespace, name),
        )

    async def pod(self, namespace: str, name: str) -> Obj:
        """The Pod (None if it does not exist)."""
        return await self._get("pods", namespace, name, lambda: self._kube.get_pod(namespace, name))

    async def _get(
        self, kind: str, namespace: str, name: str, fetch: Callable[[], Awaitable[Obj]]
    ) -> Obj:
        key = (kind, namespace, name)
        if key in self._cache:
            if self._metrics is not None:
                self._metrics.cache(kind, True)
            return self._cache[key]
        if self._metrics is not None:
            self._metrics.cache(kind, False)
        return await self._inflight.do(key, lambda: self._fetch(kind, key, fetch))

    async def _fetch(
        self, kind: str, key: tuple[str, str, str], fetch: Callable[[], Awaitable[Obj]]
    ) -> Obj:
        try:
            obj = await fetch()
        except KubeForbidden as exc:
            if kind not in self._forbidden_logged:
                log.error("reading %s refused: %s (the CP needs 'get %s')", kind, exc.reason, kind)
                self._forbidden_logged.add(kind)
            raise Unavailable(
                f"the token service cannot read {kind} (missing permission)",
                reason="kube_forbidden",
                retry_after=30,
            ) from None
        except KubeUnavailable as exc:
            log.warning("reading %s failed: %s", kind, exc.reason)
            raise Unavailable(
                "the Kubernetes API is unavailable", reason="kube_unavailable"
            ) from None
        self._cache[key] = obj
        return obj
