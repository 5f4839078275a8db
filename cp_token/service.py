"""Wiring: Settings -> the collaborators -> the apps, plus start-up checks and background tasks.

This is where configuration becomes objects; nothing else reads Settings wholesale. The
lifespan starts the background tasks (file watcher, the oidc minter's refresher, start-up
checks) and, if one of them dies, calls ``on_fatal`` so the process exits instead of serving
half-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette

from cp_token import __version__
from cp_token.app import ExchangeConfig, create_app, create_metrics_app
from cp_token.authn import Authenticator, Reviewer
from cp_token.authn.cache import CachedAuthenticator
from cp_token.authn.jwks import JwksReviewer
from cp_token.authn.static import StaticReviewer, parse_identities
from cp_token.authn.tokenreview import FORBIDDEN_HINT, TokenReviewer
from cp_token.clock import Clock, SystemClock
from cp_token.config import ConfigError, Settings, issuer_from_url, redacted
from cp_token.filewatch import FileWatcher, WatchedFile
from cp_token.kube import KubeClient, KubeConnection, KubeError, load_connection
from cp_token.metrics import Metrics
from cp_token.minters import Minter
from cp_token.minters.jwt import JwtMinter
from cp_token.minters.oidc import OidcMinter
from cp_token.minters.static import StaticMinter, parse_static_token
from cp_token.objects import ObjectCache
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter

__all__ = ["Service", "build_service"]

log = logging.getLogger(__name__)

# Connections (and worker threads) to the API server: at ~5 ms API latency, 10 carry ~2,000
# calls/s; CP_TOKEN_MAX_REVIEWS still bounds how many reviews wait for them.
KUBE_POOL_CONNECTIONS = 10


@dataclass
class Service:
    """Everything a running CP needs, built from Settings."""

    settings: Settings
    clock: Clock
    metrics: Metrics
    authenticator: Authenticator
    policy: RunnerPolicy
    minter: Minter
    limiter: RateLimiter
    watcher: FileWatcher
    kube: KubeClient | None = None
    objects: ObjectCache | None = None
    on_fatal: Callable[[str], None] = field(default=lambda reason: None)
    app: Starlette = field(init=False)
    metrics_app: Starlette = field(init=False)

    def __post_init__(self) -> None:
        self.app = create_app(
            authenticator=self.authenticator,
            policy=self.policy,
            minter=self.minter,
            clock=self.clock,
            limiter=self.limiter,
            objects=self.objects,
            metrics=self.metrics,
            readiness=self.readiness,
            lifespan=self.lifespan,
            exchange=exchange_config(self.settings),
        )
        self.metrics_app = create_metrics_app(self.metrics, self.readiness)

    def readiness(self) -> str | None:
        """None when this replica can serve; else a permanent misconfiguration."""
        return self.minter.problem

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start background tasks; stop them (and close pools) on shutdown."""
        jobs: dict[str, Coroutine[Any, Any, None]] = {"minter": self.minter.run()}
        if len(self.watcher):
            jobs["file-watcher"] = self.watcher.run()
        tasks = {asyncio.create_task(coro, name=name): name for name, coro in jobs.items()}
        checks = asyncio.create_task(self.startup_checks(), name="startup-checks")

        def died(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                return
            exc = task.exception()
            name = tasks.get(task, task.get_name())
            if name == "minter" and exc is None:
                return  # minters without background work return at once
            log.error("background task %s stopped (%s); exiting", name, exc or "returned")
            self.on_fatal(f"background task {name} died")

        for task in tasks:
            task.add_done_callback(died)
        try:
            yield
        finally:
            for task in [*tasks, checks]:
                task.cancel()
            await asyncio.gather(*tasks, checks, return_exceptions=True)
            await self.authenticator.aclose()
            await self.minter.aclose()
            if self.kube is not None:
                await self.kube.aclose()

    async def startup_checks(self) -> None:
        """Say plainly, once, when the CP lacks a permission it needs."""
        if self.kube is None:
            return
        s = self.settings
        needed: list[tuple[str, str, str, str]] = []
        if s.authn == "tokenreview":
            needed.append(("create", "authentication.k8s.io", "tokenreviews", FORBIDDEN_HINT))
        if s.authn == "jwks":
            needed.append(("get", "", "pods", "jwks authn checks that the pod still exists"))
            needed.append(("get", "", "serviceaccounts", "jwks authn checks the ServiceAccount"))
        if self.objects is not None and s.managed_label is not None:
            needed.append(("get", "", "serviceaccounts", "for CP_TOKEN_MANAGED_LABEL"))
        if self.objects is not None and s.namespace_label is not None:
            needed.append(("get", "", "namespaces", "for CP_TOKEN_NAMESPACE_LABEL"))
        for verb, group, resource, why in dict.fromkeys(needed):
            try:
                allowed = await self.kube.can_i(verb, group, resource)
            except KubeError as exc:
                log.warning("permission self-check failed: %s", exc.reason)
                return
            if allowed:
                log.info("permission check: may %s %s", verb, resource)
            else:
                log.error(
                    "permission check: the CP may NOT %s %s%s: %s",
                    verb,
                    resource,
                    f".{group}" if group else "",
                    why,
                )


def exchange_config(s: Settings) -> ExchangeConfig:
    """The token exchange's allow-lists, and the RFC 8414 issuer and endpoint (from the URL)."""
    base = issuer_from_url(s.url) if s.url else None
    return ExchangeConfig(
        audiences=s.exchange_audiences,
        scopes=s.exchange_scopes,
        issuer=s.issuer or base,
        token_endpoint=f"{base}/oauth2/token" if base else None,
    )


def build_minter(s: Settings, clock: Clock, watcher: FileWatcher, metrics: Metrics) -> Minter:
    """The configured minter, its files registered with the watcher."""
    if s.minter == "static":
        if s.static_token_file:
            file = watcher.add(
                WatchedFile("CP_TOKEN_STATIC_TOKEN_FILE", s.static_token_file, parse_static_token)
            )
            return StaticMinter(file=file)
        return StaticMinter(token=s.static_token)
    if s.minter == "jwt":
        assert s.issuer is not None
        pem: bytes | None = None
        minter_holder: list[JwtMinter] = []
        if s.signing_key_file:
            key_file = watcher.add(
                WatchedFile(
                    "CP_TOKEN_SIGNING_KEY_FILE",
                    s.signing_key_file,
                    bytes,
                    on_change=lambda raw: minter_holder[0].reload(raw),
                )
            )
            pem = key_file.value
        jwt_minter = JwtMinter(
            issuer=s.issuer, audience=s.token_audience, ttl=s.ttl, clock=clock, key_pem=pem
        )
        minter_holder.append(jwt_minter)
        return jwt_minter
    assert s.oidc_token_url and s.oidc_client_id
    secret: Callable[[], str]
    oidc_holder: list[OidcMinter] = []
    if s.oidc_client_secret_file:
        secret_file = watcher.add(
            WatchedFile(
                "OIDC_CLIENT_SECRET_FILE",
                s.oidc_client_secret_file,
                parse_static_token,
                on_change=lambda _v: oidc_holder[0].credentials_changed(),
            )
        )

        def secret() -> str:
            return secret_file.value

    else:
        fixed = s.oidc_client_secret or ""

        def secret() -> str:
            return fixed

    oidc = OidcMinter(
        token_url=s.oidc_token_url,
        client_id=s.oidc_client_id,
        client_secret=secret,
        min_ttl=s.min_ttl,
        clock=clock,
        scope=s.oidc_scope,
        audience=s.oidc_audience,
        metrics=metrics,
    )
    oidc_holder.append(oidc)
    return oidc


def build_reviewer(
    s: Settings,
    kube: KubeClient | None,
    objects: ObjectCache | None,
    clock: Clock,
    watcher: FileWatcher,
    metrics: Metrics,
) -> Reviewer:
    """The configured authenticator's upstream half (no caching)."""
    if s.authn == "static":
        assert s.static_identities_file is not None
        identities = watcher.add(
            WatchedFile(
                "CP_TOKEN_STATIC_IDENTITIES_FILE", s.static_identities_file, parse_identities
            )
        )
        return StaticReviewer(identities)
    assert kube is not None and objects is not None
    if s.authn == "jwks":
        return JwksReviewer(kube, objects, clock=clock, audiences=s.audiences, issuers=s.sa_issuers)
    return TokenReviewer(kube, s.audiences)


def build_service(
    s: Settings,
    clock: Clock | None = None,
    *,
    kube_connection: KubeConnection | None = None,
) -> Service:
    """Build every collaborator; raises ConfigError for what cannot work at all."""
    clock = clock or SystemClock()
    metrics = Metrics(authn=s.authn, minter=s.minter)
    watcher = FileWatcher()
    kube: KubeClient | None = None
    if s.authn != "static":
        if kube_connection is None:
            try:
                kube_connection = load_connection(s.kubeconfig, s.in_cluster)
            except Exception as exc:  # the kubernetes loader raises several types
                variable = "KUBECONFIG" if not s.in_cluster else "KUBERNETES_SERVICE_HOST"
                raise ConfigError(
                    variable, f"no usable Kubernetes configuration ({str(exc)[:200]})"
                ) from None
        kube = KubeClient(kube_connection, max_connections=KUBE_POOL_CONNECTIONS, metrics=metrics)
    # One object cache for label checks and jwks liveness checks: each object read once.
    objects = (
        None
        if kube is None
        else ObjectCache(kube, clock, ttl=s.liveness_cache_ttl, metrics=metrics)
    )
    reviewer = build_reviewer(s, kube, objects, clock, watcher, metrics)
    # With jwks authn the review cache must not outlive the liveness check it depends on.
    review_ttl = s.review_cache_ttl
    if s.authn == "jwks":
        review_ttl = min(review_ttl, s.liveness_cache_ttl)
    authenticator = CachedAuthenticator(
        reviewer,
        clock=clock,
        audiences=s.audiences,
        ttl=review_ttl,
        max_in_flight=s.max_reviews,
        jwt_precheck=s.authn != "static",
        metrics=metrics,
    )
    static = s.authn == "static"
    policy = RunnerPolicy(
        allowed_sa=s.allowed_sa,
        allowed_namespaces=s.allowed_namespaces,
        require_bound=s.require_bound,
        managed_label=None if static else s.managed_label,
        namespace_label=None if static else s.namespace_label,
    )
    minter = build_minter(s, clock, watcher, metrics)
    limiter = RateLimiter(s.rate, s.burst, clock)
    log.info(
        "cp-token %s configured",
        __version__,
        extra={"fields": {"config": redacted(s)}},
    )
    return Service(
        settings=s,
        clock=clock,
        metrics=metrics,
        authenticator=authenticator,
        policy=policy,
        minter=minter,
        limiter=limiter,
        watcher=watcher,
        kube=kube,
        objects=objects,
    )
