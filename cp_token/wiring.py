"""Wiring: the CP's Settings -> its collaborators -> its apps, plus start-up checks and
background tasks.

This is where configuration becomes objects; nothing else reads Settings wholesale. Each
collaborator is built by one small function here, after what it depends on; a file whose
change it must hear about tells it through a bound method
(:meth:`~cp_token.runtime.filewatch.WatchedFile.subscribe`). The lifespan starts the background
tasks (file watcher, the oidc minter's refresher, start-up checks) and, if one of them dies,
calls ``on_fatal`` so the process exits instead of serving half-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette

from cp_token import __version__
from cp_token.app import ExchangeConfig, create_app, create_metrics_app
from cp_token.authn import Authenticator, Reviewer
from cp_token.authn.cache import CachedAuthenticator
from cp_token.authn.issuer_keys import IssuerKeys, SignatureCheck
from cp_token.authn.jwks import JwksReviewer
from cp_token.authn.static import StaticReviewer, parse_identities
from cp_token.authn.tokenreview import FORBIDDEN_HINT, TokenReviewer
from cp_token.http.serving import background
from cp_token.kube.client import KubeClient, KubeConnection, KubeError, load_connection
from cp_token.kube.objects import MAX_OBJECT_READS, ObjectCache
from cp_token.metrics import Metrics
from cp_token.minters import Minter
from cp_token.minters.jwt import JwtMinter
from cp_token.minters.oidc import OidcMinter
from cp_token.minters.static import StaticMinter, parse_static_token
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter
from cp_token.runtime.clock import Clock, SystemClock
from cp_token.runtime.errors import ConfigError
from cp_token.runtime.filewatch import FileWatcher, WatchedFile
from cp_token.settings.common import redacted
from cp_token.settings.cp import Settings, issuer_from_url

__all__ = [
    "Service",
    "build_authenticator",
    "build_minter",
    "build_policy",
    "build_reviewer",
    "build_service",
    "exchange_config",
    "kube_pool_size",
]

log = logging.getLogger(__name__)

# Kubernetes calls not made from a review slot or a label read: the shared issuer-key fetch,
# issuer discovery, the start-up permission checks.
KUBE_SHARED_CALLS = 4


def kube_pool_size(max_reviews: int, calls_per_review: int = 1) -> int:
    """Connections to the API server: as many per review slot as a review makes at once
    (``tokenreview``: its TokenReview, then its ServiceAccount and pod reads together;
    ``jwks``: one read at a time), one per label read, plus the shared calls,
    so a call never waits for a connection: every wait is at a semaphore with a deadline
    (CP_TOKEN_MAX_REVIEWS, the label-read bound)."""
    return max_reviews * calls_per_review + MAX_OBJECT_READS + KUBE_SHARED_CALLS


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

    def _died(self, name: str, exc: BaseException) -> None:
        self.on_fatal(f"background task {name} died")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start background tasks; stop them (and close pools) on shutdown."""
        jobs = {"minter": self.minter.run()}
        if len(self.watcher):
            jobs["file-watcher"] = self.watcher.run()
        # minters without background work return at once; the checks run once, and a
        # failure there is logged, not fatal
        checks = asyncio.create_task(self.startup_checks(), name="startup-checks")
        try:
            async with background(jobs, self._died, may_return={"minter"}):
                yield
        finally:
            checks.cancel()
            await asyncio.gather(checks, return_exceptions=True)
            await self.authenticator.aclose()
            await self.minter.aclose()
            if self.kube is not None:
                await self.kube.aclose()

    async def startup_checks(self) -> None:
        """Say plainly, once, when the CP lacks a permission it needs."""
        if self.kube is None:
            return
        for verb, group, resource, why in self.needed_permissions():
            try:
                allowed = await self.kube.can_i(verb, group, resource)
            except KubeError as exc:
                log.warning("permission self-check failed: %s", exc.reason)
                return
            if allowed:
                log.info("permission check: may %s %s", verb, resource)
            else:
                where = f"{resource}.{group}" if group else resource
                log.error("permission check: the CP may NOT %s %s: %s", verb, where, why)

    def needed_permissions(self) -> list[tuple[str, str, str, str]]:
        """``(verb, group, resource, why)`` for each API permission this configuration uses."""
        s = self.settings
        needed: list[tuple[str, str, str, str]] = []
        if s.authn == "tokenreview":
            needed.append(("create", "authentication.k8s.io", "tokenreviews", FORBIDDEN_HINT))
        if s.authn in ("tokenreview", "jwks"):
            needed.append(("get", "", "pods", f"{s.authn} authn checks that the pod still exists"))
            needed.append(
                ("get", "", "serviceaccounts", f"{s.authn} authn checks the ServiceAccount")
            )
        if self.objects is not None and s.managed_label is not None:
            needed.append(("get", "", "serviceaccounts", "for CP_TOKEN_MANAGED_LABEL"))
        if self.objects is not None and s.namespace_label is not None:
            needed.append(("get", "", "namespaces", "for CP_TOKEN_NAMESPACE_LABEL"))
        return list(dict.fromkeys(needed))


def exchange_config(s: Settings) -> ExchangeConfig:
    """The token exchange's allow-lists, and the RFC 8414 issuer and endpoint (from the URL)."""
    base = issuer_from_url(s.url) if s.url else None
    return ExchangeConfig(
        audiences=s.exchange_audiences,
        scopes=s.exchange_scopes,
        issuer=s.issuer or base,
        token_endpoint=f"{base}/oauth2/token" if base else None,
    )


# --- minters ---------------------------------------------------------------------------------


def build_minter(s: Settings, clock: Clock, watcher: FileWatcher, metrics: Metrics) -> Minter:
    """The configured minter, its files registered with the watcher."""
    if s.minter == "static":
        return _static_minter(s, clock, watcher)
    if s.minter == "jwt":
        return _jwt_minter(s, clock, watcher)
    return _oidc_minter(s, clock, watcher, metrics)


def _static_minter(s: Settings, clock: Clock, watcher: FileWatcher) -> StaticMinter:
    if not s.static_token_file:
        return StaticMinter(token=s.static_token, min_ttl=s.min_ttl, clock=clock)
    name = "CP_TOKEN_STATIC_TOKEN_FILE"
    return StaticMinter(
        file=watcher.add(WatchedFile(name, s.static_token_file, parse_static_token)),
        min_ttl=s.min_ttl,
        clock=clock,
    )


def _jwt_minter(s: Settings, clock: Clock, watcher: FileWatcher) -> JwtMinter:
    assert s.issuer is not None
    key_file = None
    if s.signing_key_file:
        key_file = watcher.add(WatchedFile("CP_TOKEN_SIGNING_KEY_FILE", s.signing_key_file, bytes))
    minter = JwtMinter(
        issuer=s.issuer,
        audience=s.token_audience,
        ttl=s.ttl,
        clock=clock,
        key_pem=None if key_file is None else key_file.value,
    )
    if key_file is not None:
        key_file.subscribe(minter.reload)
    return minter


def _oidc_minter(s: Settings, clock: Clock, watcher: FileWatcher, metrics: Metrics) -> OidcMinter:
    assert s.oidc_token_url and s.oidc_client_id
    secret_file = None
    if s.oidc_client_secret_file:
        secret_file = watcher.add(
            WatchedFile("OIDC_CLIENT_SECRET_FILE", s.oidc_client_secret_file, parse_static_token)
        )
    fixed_secret = s.oidc_client_secret or ""
    minter = OidcMinter(
        token_url=s.oidc_token_url,
        client_id=s.oidc_client_id,
        client_secret=(lambda: fixed_secret) if secret_file is None else secret_file.get,
        min_ttl=s.min_ttl,
        clock=clock,
        scope=s.oidc_scope,
        audience=s.oidc_audience,
        metrics=metrics,
    )
    if secret_file is not None:
        secret_file.subscribe(lambda _secret: minter.credentials_changed())
    return minter


# --- authentication and policy -------------------------------------------------------------


def build_reviewer(
    s: Settings,
    kube: KubeClient | None,
    objects: ObjectCache | None,
    clock: Clock,
    watcher: FileWatcher,
    issuer_keys: IssuerKeys | None = None,
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
        return JwksReviewer(
            kube,
            objects,
            clock=clock,
            audiences=s.audiences,
            issuers=s.sa_issuers,
            keys=issuer_keys,
        )
    # the ServiceAccount and the bound pod are read after each review (kube-apiserver
    # caches a successful review for 10 s, so its answer alone outlives a deleted pod)
    return TokenReviewer(kube, s.audiences, objects=objects, clock=clock)


def build_authenticator(
    s: Settings,
    reviewer: Reviewer,
    clock: Clock,
    metrics: Metrics,
    kube: KubeClient | None,
    issuer_keys: IssuerKeys | None,
) -> CachedAuthenticator:
    """The review cache and its admission control in front of ``reviewer``."""
    # With jwks authn the review cache must not outlive the liveness check it depends on.
    ttl = min(s.review_cache_ttl, s.liveness_cache_ttl) if s.authn == "jwks" else s.review_cache_ttl
    # The API server's issuer keys check signatures in front of TokenReview: forged tokens
    # cost the API server nothing.
    signature_check = None
    if issuer_keys is not None and s.authn == "tokenreview":
        signature_check = SignatureCheck(issuer_keys)
    return CachedAuthenticator(
        reviewer,
        clock=clock,
        audiences=s.audiences,
        ttl=ttl,
        # Stale-if-error: while the API server is down a TokenReview's answer stands in for
        # up to CP_TOKEN_REVIEW_CACHE_TTL, as the object cache's reads do (a new review would
        # need the API server). The jwks authenticator rides out on those reads themselves.
        stale_ttl=s.review_cache_ttl,
        upstream=kube if s.authn == "tokenreview" else None,
        max_in_flight=s.max_reviews,
        jwt_precheck=s.authn != "static",
        signature_check=signature_check,
        call_timeout=kube.timeout if kube is not None else 10.0,
        metrics=metrics,
    )


def build_policy(s: Settings) -> RunnerPolicy:
    """The runner policy; static identities have no labels to check."""
    static = s.authn == "static"
    return RunnerPolicy(
        allowed_sa=s.allowed_sa,
        allowed_namespaces=s.allowed_namespaces,
        require_bound=s.require_bound,
        managed_label=None if static else s.managed_label,
        namespace_label=None if static else s.namespace_label,
    )


def _kube_client(
    s: Settings, metrics: Metrics, connection: KubeConnection | None, clock: Clock
) -> KubeClient | None:
    """The Kubernetes client (None with static authn); ConfigError when it cannot load."""
    if s.authn == "static":
        return None
    if connection is None:
        try:
            connection = load_connection(s.kubeconfig, s.in_cluster)
        except Exception as exc:  # the kubernetes loader raises several types
            variable = "KUBECONFIG" if not s.in_cluster else "KUBERNETES_SERVICE_HOST"
            why = str(exc)[:200]
            if isinstance(exc, TypeError | AttributeError | KeyError | IndexError):
                # the loader indexes what it parsed: the file is YAML, but not a kubeconfig
                why = "not a kubeconfig: expected a YAML mapping of clusters, users and contexts"
            raise ConfigError(variable, f"no usable Kubernetes configuration ({why})") from None
    return KubeClient(
        connection,
        max_connections=kube_pool_size(s.max_reviews, 2 if s.authn == "tokenreview" else 1),
        metrics=metrics,
        clock=clock,
    )


def build_service(
    s: Settings,
    clock: Clock | None = None,
    *,
    kube_connection: KubeConnection | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> Service:
    """Build every collaborator; raises ConfigError for what cannot work at all.

    ``on_fatal`` is how a dead background task ends the process: the serve command passes
    its server group's stop, so nothing is patched onto the service after it is built."""
    clock = clock or SystemClock()
    metrics = Metrics(authn=s.authn, minter=s.minter, min_ttl=s.min_ttl)
    watcher = FileWatcher()
    kube = _kube_client(s, metrics, kube_connection, clock)
    # One object cache for label checks and jwks liveness checks: each object read once;
    # the issuer keys serve the jwks authenticator and the signature pre-check.
    objects = None
    if kube is not None:
        # reads answer for CP_TOKEN_LIVENESS_CACHE_TTL, and while the API server is down for
        # up to CP_TOKEN_REVIEW_CACHE_TTL (stale-if-error). With tokenreview authn a review is
        # reused only while its pod read is, and SPEC bounds a deleted pod's token by
        # CP_TOKEN_REVIEW_CACHE_TTL there: the reads then answer for the shorter of the two.
        read_ttl = s.liveness_cache_ttl
        if s.authn == "tokenreview":
            read_ttl = min(read_ttl, s.review_cache_ttl)
        objects = ObjectCache(
            kube,
            clock,
            ttl=read_ttl,
            stale_ttl=s.review_cache_ttl,
            metrics=metrics,
        )
    issuer_keys = None if kube is None else IssuerKeys(kube, clock)
    reviewer = build_reviewer(s, kube, objects, clock, watcher, issuer_keys)
    service = Service(
        settings=s,
        clock=clock,
        metrics=metrics,
        authenticator=build_authenticator(s, reviewer, clock, metrics, kube, issuer_keys),
        policy=build_policy(s),
        minter=build_minter(s, clock, watcher, metrics),
        limiter=RateLimiter(s.rate, s.burst, clock),
        watcher=watcher,
        kube=kube,
        objects=objects,
        **({} if on_fatal is None else {"on_fatal": on_fatal}),
    )
    oidc = service.minter if isinstance(service.minter, OidcMinter) else None
    metrics.watch(
        ready=lambda: service.readiness() is None,
        idp_token_expiry=None if oidc is None else (lambda: oidc.held_until),
    )
    log.info("cp-token %s configured", __version__, extra={"fields": {"config": redacted(s)}})
    return service
