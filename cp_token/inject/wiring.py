"""Wiring of the injector: its settings -> its collaborators and apps, built once.

The same shape as the CP's :mod:`cp_token.wiring` and the sidecar's :mod:`sidecar.wiring`: one
``build`` that takes the settings and how a fatal failure ends the process, and returns
everything the serve command runs; nothing is patched onto it afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette

from cp_token import __version__
from cp_token.http.serving import TlsFiles, background
from cp_token.inject.app import create_app, create_metrics_app
from cp_token.inject.metrics import InjectMetrics
from cp_token.runtime.filewatch import FileWatcher
from cp_token.settings.common import redacted
from cp_token.settings.inject import InjectSettings

__all__ = ["Injector", "build_injector"]

log = logging.getLogger("cp_token.inject")


@dataclass
class Injector:
    """Everything a running injector needs, built from its settings."""

    settings: InjectSettings
    on_fatal: Callable[[str], None]
    metrics: InjectMetrics = field(default_factory=InjectMetrics)
    watcher: FileWatcher = field(default_factory=FileWatcher)
    started: bool = False
    app: Starlette = field(init=False)
    metrics_app: Starlette = field(init=False)

    def __post_init__(self) -> None:
        self.app = create_app(self.settings, self.metrics, lifespan=self.lifespan)
        self.metrics_app = create_metrics_app(self.metrics, self.readiness)

    @property
    def tls(self) -> TlsFiles:
        """The webhook's serving certificate and key (the API server calls webhooks over
        HTTPS only), re-read through :attr:`watcher` when they change."""
        return TlsFiles(
            ("CP_TOKEN_INJECT_TLS_CERT_FILE", self.settings.tls_cert_file),
            ("CP_TOKEN_INJECT_TLS_KEY_FILE", self.settings.tls_key_file),
        )

    def readiness(self) -> str | None:
        """None once the webhook's listener serves; else the reason class."""
        return None if self.started else "starting"

    def _died(self, name: str, exc: BaseException) -> None:
        self.on_fatal(f"background task {name} died")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """The file watcher (certificate renewals) runs while the webhook serves."""
        async with background({"file-watcher": self.watcher.run()}, self._died):
            self.started = True
            try:
                yield
            finally:
                self.started = False


def build_injector(settings: InjectSettings, on_fatal: Callable[[str], None]) -> Injector:
    """The injector's collaborators; ``on_fatal`` ends the process when a background task
    dies (the serve command passes its server group's stop)."""
    log.info(
        "cp-token inject %s configured",
        __version__,
        extra={"fields": {"config": redacted(settings)}},
    )
    return Injector(settings, on_fatal)
