"""Namespace and ServiceAccount labels, looked up through the Kubernetes API, cached briefly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import TTLCache

from cp_token.clock import Clock
from cp_token.errors import Unavailable
from cp_token.kube import KubeClient, KubeForbidden, KubeUnavailable, labels_of

__all__ = ["LabelLookup"]

log = logging.getLogger(__name__)
_MISSING: dict[str, str] = {}


class LabelLookup:
    """Cached, coalesced label reads; a missing object is remembered as None."""

    def __init__(
        self, kube: KubeClient, clock: Clock, *, ttl: float = 10.0, metrics: Any = None
    ) -> None:
        self._kube = kube
        self._cache: TTLCache[tuple[str, str, str], dict[str, str] | None] = TTLCache(
            maxsize=50_000, ttl=ttl, timer=clock.monotonic
        )
        self._inflight: dict[tuple[str, str, str], asyncio.Future[dict[str, str] | None]] = {}
        self._metrics = metrics
        self._forbidden_logged: set[str] = set()

    async def namespace(self, name: str) -> dict[str, str] | None:
        """Labels of a namespace (None if it does not exist)."""
        return await self._get(("ns", "", name), lambda: self._kube.get_namespace(name))

    async def service_account(self, namespace: str, name: str) -> dict[str, str] | None:
        """Labels of a ServiceAccount (None if it does not exist)."""
        return await self._get(
            ("sa", namespace, name), lambda: self._kube.get_service_account(namespace, name)
        )

    async def _get(
        self,
        key: tuple[str, str, str],
        fetch: Callable[[], Awaitable[dict[str, Any] | None]],
    ) -> dict[str, str] | None:
        if key in self._cache:
            if self._metrics is not None:
                self._metrics.cache("labels", True)
            return self._cache[key]
        if self._metrics is not None:
            self._metrics.cache("labels", False)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[dict[str, str] | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            try:
                obj = await fetch()
            except KubeForbidden as exc:
                kind = "namespaces" if key[0] == "ns" else "serviceaccounts"
                if kind not in self._forbidden_logged:
                    log.error("label lookup refused: %s (the CP needs 'get %s')", exc.reason, kind)
                    self._forbidden_logged.add(kind)
                raise Unavailable(
                    "the token service cannot read labels (missing permission)",
                    reason="kube_forbidden",
                    retry_after=30,
                ) from None
            except KubeUnavailable as exc:
                log.warning("label lookup failed: %s", exc.reason)
                raise Unavailable(
                    "the Kubernetes API is unavailable", reason="kube_unavailable"
                ) from None
            labels = None if obj is None else labels_of(obj)
            self._cache[key] = labels
            fut.set_result(labels)
            return labels
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
            raise
        finally:
            self._inflight.pop(key, None)
