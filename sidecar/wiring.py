"""Wiring of the sidecar: its settings -> its collaborators and apps, built once.

The same shape as the CP's :mod:`cp_token.wiring` and the injector's
:mod:`cp_token.inject.wiring`: one ``build`` that takes the settings, the upstream (the CP) and
how a fatal failure ends the process, and returns everything the serve command runs; nothing
is patched onto it afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from cp_token.runtime.clock import Clock, SystemClock
from cp_token.settings.sidecar import SidecarSettings

from .app import create_app, create_metrics_app
from .asgi import Router
from .holder import HolderPolicy, TokenHolder
from .metrics import SidecarMetrics
from .refresher import Refresher
from .sealed import sealed_parts
from .sink import TokenFileSink
from .upstream import TokenFetcher

__all__ = ["Sidecar", "build_sidecar"]

log = logging.getLogger("sidecar")


@dataclass(frozen=True)
class Sidecar:
    """Everything a running sidecar needs: the token port's app (its lifespan runs the
    refresh loop and, sealed, the gRPC listener) and the probe port's."""

    settings: SidecarSettings
    holder: TokenHolder
    metrics: SidecarMetrics
    refresher: Refresher
    app: Router
    metrics_app: Router


async def build_sidecar(
    settings: SidecarSettings,
    source: TokenFetcher,
    on_fatal: Callable[[BaseException], None],
    clock: Clock | None = None,
) -> Sidecar:
    """The sidecar's collaborators. Sealed mode binds its gRPC listener here (``OSError``
    when it cannot: a busy port). ``on_fatal`` ends the process when the refresh loop dies
    (the serve command passes its server group's stop)."""
    clock = clock or SystemClock()
    holder = TokenHolder(clock, HolderPolicy(refresh_fraction=settings.refresh_fraction))
    metrics = SidecarMetrics(holder)
    sink = None
    if settings.token_file is not None:
        sink = TokenFileSink(settings.token_file, settings.token_file_mode)
    refresher = Refresher(source, holder, clock, metrics=metrics, sink=sink)
    sealed = await sealed_parts(settings, refresher, metrics)
    if settings.upstreams and not settings.sealed:
        log.warning(
            "SIDECAR_UPSTREAMS is set but SIDECAR_SEALED is not: the token is still served on "
            "/token; set SIDECAR_SEALED=true to keep it in the sidecar"
        )
    app = create_app(
        refresher,
        metrics=metrics,
        min_ttl=settings.min_ttl,
        on_fatal=on_fatal,
        token_route=sealed.token_route,
        prefixes=sealed.prefixes,
        contexts=sealed.contexts,
    )
    return Sidecar(settings, holder, metrics, refresher, app, create_metrics_app(holder, metrics))
