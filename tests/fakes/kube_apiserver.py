"""A fake kube-apiserver that speaks the real wire format, for tests.

`FakeKubeAPIServer` serves, over HTTPS on 127.0.0.1, the handful of Kubernetes API routes the
CP token service uses (TokenReview, SelfSubjectAccessReview, GET namespace / ServiceAccount /
Pod, the ServiceAccount issuer discovery documents), with Kubernetes' JSON shapes, status
codes and `Status` errors. It mints real ServiceAccount JWTs (bound and legacy) with its own
signing keys and reviews them the way the API server does: signature, time claims with
go-jose's 60 s leeway, issuer, audience intersection, and liveness of the bound objects; a
successful authentication is remembered for 10 s per token and audiences, as kube-apiserver's
token cache does (so a deleted pod's token keeps authenticating that long after a review).

Held to the real thing: tests/cluster/test_fake_vs_real.py sends the same requests to this
fake and to a real kube-apiserver and compares status codes and JSON shapes. Like the real
server it authenticates first (no credentials: ``system:anonymous``), then authorizes with
the request's attributes (403 before 404 or 405, for unknown paths too), then routes.

Tests drive it through a thread-safe Python API (objects, tokens, caller RBAC, faults).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.servers import BASE_FAULT_MODES, FaultPlan, LoopbackFake, LoopbackServer, gate

__all__ = [
    "DEFAULT_CALLER_TOKEN",
    "DEFAULT_CALLER_USERNAME",
    "DEFAULT_ISSUER",
    "DEFAULT_PERMISSIONS",
    "LEGACY_ISSUER",
    "ROUTES",
    "FakeKubeAPIServer",
    "RecordedRequest",
]

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
LEGACY_ISSUER = "kubernetes/serviceaccount"
DEFAULT_CALLER_TOKEN = "cp-sa-token"
DEFAULT_CALLER_USERNAME = "system:serviceaccount:cp:cp-token"

#: Route keys accepted by `set_latency`, `fail` and `calls`.
ROUTES: frozenset[str] = frozenset(
    {
        "tokenreviews",
        "selfsubjectaccessreviews",
        "namespaces",
        "serviceaccounts",
        "pods",
        "jwks",
        "openid-configuration",
    }
)

#: What a caller may do by default: (verb, API group, resource); non-resource URLs are
#: written as (verb, "", "/path").
DEFAULT_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("create", "authentication.k8s.io", "tokenreviews"),
        ("create", "authorization.k8s.io", "selfsubjectaccessreviews"),
        ("get", "", "namespaces"),
        ("get", "", "serviceaccounts"),
        ("get", "", "pods"),
        ("get", "", "/openid/v1/jwks"),
        ("get", "", "/.well-known/openid-configuration"),
    }
)

_PKEY = "kubernetes.io/serviceaccount/"
_EXTRA = "authentication.kubernetes.io/"
_DISCOVERY_CACHE_CONTROL = "public, max-age=3600"
# What kube-apiserver sends on every API answer but the discovery documents.
_API_CACHE_CONTROL = "no-cache, private"
# kube-apiserver's token authenticator remembers a success this long (not configurable there).
TOKEN_SUCCESS_CACHE_TTL = 10.0
ANONYMOUS = "system:anonymous"
# Routes whose group/version the fake serves: an unknown resource in them is a JSON 404, an
# unknown group a plain-text one (as the real server's API-group and fallback handlers).
_SERVED_GROUP_VERSIONS = frozenset(
    {("", "v1"), ("authentication.k8s.io", "v1"), ("authorization.k8s.io", "v1")}
)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64url_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode()))


def _go_quote_list(items: Iterable[str]) -> str:
    """Format like Go's %q of a []string: ["a" "b"]."""
    return "[" + " ".join(json.dumps(i) for i in items) + "]"


@dataclass
class _Obj:
    name: str
    namespace: str | None
    uid: str
    labels: dict[str, str]
    resource_version: str
    created: float
    service_account: str = ""  # pods
    node: str = ""  # pods
    data: dict[str, str] = field(default_factory=dict)  # secrets
    secret_type: str = "Opaque"
    deletion: float | None = None  # metadata.deletionTimestamp: deleted, held by a finalizer
    finalizers: list[str] = field(default_factory=list)


@dataclass
class _SigningKey:
    key: RSAKey | ECKey
    alg: str
    kid: str
    published: bool = True  # served at /openid/v1/jwks (it verifies tokens either way)


@dataclass
class _Caller:
    username: str
    groups: list[str]
    permissions: set[tuple[str, str, str]]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received (for assertions on what the product sent)."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    json: Any


class _ReviewFailure(Exception):
    """A token that does not authenticate; `str()` is the TokenReview `status.error`."""


class FakeKubeAPIServer(LoopbackFake):
    """An HTTPS fake of the Kubernetes API server (see module docstring).

    Use as a context manager or call `start()` / `stop()`. Every control method is
    thread-safe and may be called while requests are in flight.
    """

    def __init__(
        self,
        *,
        issuer: str = DEFAULT_ISSUER,
        api_audiences: Sequence[str] = (DEFAULT_ISSUER,),
        caller_token: str = DEFAULT_CALLER_TOKEN,
        caller_username: str = DEFAULT_CALLER_USERNAME,
        clock: Callable[[], float] = time.time,
        leeway_seconds: float = 60.0,
        signing_alg: str = "RS256",
        token_cache_ttl: float = TOKEN_SUCCESS_CACHE_TTL,
    ) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self._leeway = leeway_seconds
        self._issuer = issuer
        self._accepted_issuers: list[str] = [issuer]
        self._api_audiences = list(api_audiences)
        self._keys: list[_SigningKey] = [self._new_key(signing_alg)]
        self._rv = 0
        self._namespaces: dict[str, _Obj] = {}
        self._service_accounts: dict[tuple[str, str], _Obj] = {}
        self._pods: dict[tuple[str, str], _Obj] = {}
        self._secrets: dict[tuple[str, str], _Obj] = {}
        self._nodes: dict[str, str] = {}
        self._callers: dict[str, _Caller] = {}
        self._default_caller_token = caller_token
        self.add_caller(caller_token, caller_username)
        self._requests: dict[str, list[RecordedRequest]] = {}
        self._token_cache_ttl = token_cache_ttl
        # (token, audiences) -> (review status, expiry on self._clock)
        self._token_cache: dict[tuple[str, tuple[str, ...]], tuple[dict[str, Any], float]] = {}
        self._app = self._build_app()
        self._server = LoopbackServer(self._app, tls=True, name="fake-kube-apiserver")
        self._faults = FaultPlan(BASE_FAULT_MODES | {"429"}, on_change=self._server.notify)
        self._retry_after: str | None = "1"  # the Retry-After of a "429" fault

    # -- lifecycle and addresses -------------------------------------------------------------

    def write_kubeconfig(
        self, path: str | Path, *, user_token: str | None = None, namespace: str = "cp"
    ) -> Path:
        """Write a kubeconfig for this server (CA inline, bearer-token user); return the path.

        `user_token` defaults to the default caller token; an unregistered token is written as
        is (the server then answers 401), to test a CP with bad credentials.
        """
        token = self._default_caller_token if user_token is None else user_token
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "cp-token", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "cp-token", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        out = Path(path)
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        return out

    # -- issuer and keys ---------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """The `iss` of bound tokens minted from now on."""
        with self._lock:
            return self._issuer

    @property
    def accepted_issuers(self) -> list[str]:
        """Issuers TokenReview accepts for bound tokens (legacy tokens are always accepted)."""
        with self._lock:
            return list(self._accepted_issuers)

    def set_issuer(self, issuer: str, *, also_accept: Sequence[str] = ()) -> None:
        """Change the issuer (like `--service-account-issuer`, repeated for a rotation)."""
        with self._lock:
            self._issuer = issuer
            self._accepted_issuers = [issuer, *[i for i in also_accept if i != issuer]]

    @property
    def api_audiences(self) -> list[str]:
        """The API server's own audiences (`--api-audiences`)."""
        with self._lock:
            return list(self._api_audiences)

    @property
    def signing_kid(self) -> str:
        """`kid` of the key that signs new tokens."""
        with self._lock:
            return self._keys[-1].kid

    @staticmethod
    def _new_key(alg: str) -> _SigningKey:
        key: RSAKey | ECKey
        curves = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}  # as kube-apiserver
        if alg == "RS256":
            key = RSAKey.generate_key(2048, private=True)
        elif alg in curves:
            key = ECKey.generate_key(curves[alg], private=True)
        else:
            raise ValueError(f"unsupported signing algorithm {alg!r} (RS256, ES256/384/512)")
        return _SigningKey(key=key, alg=alg, kid=key.thumbprint())

    def rotate_signing_key(self, alg: str = "RS256", *, publish: bool = True) -> str:
        """Add a key that signs from now on; older keys keep verifying. Returns its kid.

        ``publish=False``: the key signs (and TokenReview accepts its tokens) but is not yet
        served at /openid/v1/jwks, until :meth:`publish_keys`.
        """
        new = self._new_key(alg)
        new.published = publish
        with self._lock:
            self._keys.append(new)
        return new.kid

    def publish_keys(self) -> None:
        """Serve every key at /openid/v1/jwks (see ``rotate_signing_key(publish=False)``)."""
        with self._lock:
            for key in self._keys:
                key.published = True

    def drop_old_keys(self) -> None:
        """Forget every key but the current signing key (tokens they signed stop verifying)."""
        with self._lock:
            self._keys = self._keys[-1:]

    def jwks(self) -> dict[str, Any]:
        """The public JWK set, as served at /openid/v1/jwks."""
        with self._lock:
            keys = [k for k in self._keys if k.published]
        out = []
        for k in keys:
            pub = dict(k.key.as_dict(private=False))
            pub.pop("kid", None)
            out.append({"use": "sig", "kid": k.kid, "alg": k.alg, **pub})
        return {"keys": out}

    def sign_claims(
        self, claims: Mapping[str, Any], *, header: Mapping[str, Any] | None = None
    ) -> str:
        """Sign arbitrary claims with the current key (header: alg + kid, plus `header`)."""
        with self._lock:
            k = self._keys[-1]
        hdr = {"alg": k.alg, "kid": k.kid, **(header or {})}
        payload = json.dumps(dict(claims), separators=(",", ":")).encode()
        return jws.serialize_compact(hdr, payload, k.key, algorithms=[k.alg])

    # -- objects -----------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _new_obj(self, name: str, namespace: str | None, labels: Mapping[str, str]) -> _Obj:
        return _Obj(
            name=name,
            namespace=namespace,
            uid=str(uuid.uuid4()),
            labels=dict(labels),
            resource_version=self._next_rv(),
            created=self._clock(),
        )

    def add_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> str:
        """Create a namespace; returns its uid. Like Kubernetes, it also gets the
        `kubernetes.io/metadata.name` label."""
        with self._lock:
            if name in self._namespaces:
                raise ValueError(f'namespaces "{name}" already exists')
            obj = self._new_obj(name, None, {**(labels or {}), "kubernetes.io/metadata.name": name})
            self._namespaces[name] = obj
            return obj.uid

    def set_namespace_labels(self, name: str, labels: Mapping[str, str]) -> None:
        """Replace a namespace's labels (`kubernetes.io/metadata.name` is kept)."""
        with self._lock:
            obj = self._namespaces[name]
            obj.labels = {**labels, "kubernetes.io/metadata.name": name}
            obj.resource_version = self._next_rv()

    def delete_namespace(self, name: str) -> None:
        """Delete a namespace and everything in it."""
        with self._lock:
            del self._namespaces[name]
            for table in (self._service_accounts, self._pods, self._secrets):
                for key in [k for k in table if k[0] == name]:
                    del table[key]

    def _require_ns(self, namespace: str) -> None:
        if namespace not in self._namespaces:
            raise ValueError(f'namespaces "{namespace}" not found')

    def add_service_account(
        self, namespace: str, name: str, labels: Mapping[str, str] | None = None
    ) -> str:
        """Create a ServiceAccount; returns its uid."""
        with self._lock:
            self._require_ns(namespace)
            if (namespace, name) in self._service_accounts:
                raise ValueError(f'serviceaccounts "{name}" already exists')
            obj = self._new_obj(name, namespace, labels or {})
            self._service_accounts[(namespace, name)] = obj
            return obj.uid

    def set_service_account_labels(
        self, namespace: str, name: str, labels: Mapping[str, str]
    ) -> None:
        """Replace a ServiceAccount's labels."""
        with self._lock:
            obj = self._service_accounts[(namespace, name)]
            obj.labels = dict(labels)
            obj.resource_version = self._next_rv()

    def delete_service_account(self, namespace: str, name: str) -> None:
        """Delete a ServiceAccount (tokens for it stop authenticating)."""
        with self._lock:
            del self._service_accounts[(namespace, name)]

    def add_pod(
        self, namespace: str, name: str, service_account: str, *, node: str = "fake-node-1"
    ) -> str:
        """Create a running Pod using `service_account` on `node`; returns its uid."""
        with self._lock:
            self._require_ns(namespace)
            if (namespace, service_account) not in self._service_accounts:
                # The ServiceAccount admission plugin refuses such a pod.
                raise ValueError(f'serviceaccount "{service_account}" not found')
            if (namespace, name) in self._pods:
                raise ValueError(f'pods "{name}" already exists')
            obj = self._new_obj(name, namespace, {})
            obj.service_account = service_account
            obj.node = node
            self._nodes.setdefault(node, str(uuid.uuid4()))
            self._pods[(namespace, name)] = obj
            return obj.uid

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a Pod (tokens bound to it stop authenticating)."""
        with self._lock:
            del self._pods[(namespace, name)]

    def hold_deletion(
        self,
        resource: str,
        namespace: str,
        name: str,
        *,
        at: float | None = None,
        finalizer: str = "example.com/hold",
    ) -> None:
        """Delete a pod or ServiceAccount that a finalizer holds: it stays readable, with
        ``metadata.deletionTimestamp`` (``at``, default now; whole seconds, as the real
        server writes it), ``deletionGracePeriodSeconds: 0`` and the finalizer. Tokens bound
        to it keep authenticating until 60 s (the leeway) after that time, as kube-apiserver's
        (pkg/serviceaccount/claims.go)."""
        with self._lock:
            table = {"pods": self._pods, "serviceaccounts": self._service_accounts}[resource]
            obj = table[(namespace, name)]
            obj.deletion = float(int(self._clock() if at is None else at))
            obj.finalizers = [finalizer]
            obj.resource_version = self._next_rv()

    def add_secret(
        self,
        namespace: str,
        name: str,
        *,
        data: Mapping[str, str] | None = None,
        secret_type: str = "Opaque",
    ) -> str:
        """Create a Secret (only used to bind tokens to); returns its uid."""
        with self._lock:
            self._require_ns(namespace)
            if (namespace, name) in self._secrets:
                raise ValueError(f'secrets "{name}" already exists')
            obj = self._new_obj(name, namespace, {})
            obj.data = dict(data or {})
            obj.secret_type = secret_type
            self._secrets[(namespace, name)] = obj
            return obj.uid

    def delete_secret(self, namespace: str, name: str) -> None:
        """Delete a Secret (legacy and secret-bound tokens for it stop authenticating)."""
        with self._lock:
            del self._secrets[(namespace, name)]

    def uid(self, resource: str, namespace: str, name: str = "") -> str:
        """The uid of an object: resource is namespaces/serviceaccounts/pods/secrets."""
        with self._lock:
            if resource == "namespaces":
                return self._namespaces[namespace].uid
            table = {
                "serviceaccounts": self._service_accounts,
                "pods": self._pods,
                "secrets": self._secrets,
            }[resource]
            return table[(namespace, name)].uid

    # -- tokens ------------------------------------------------------------------------------

    def _sa_or_raise(self, namespace: str, name: str) -> _Obj:
        sa = self._service_accounts.get((namespace, name))
        if sa is None:
            raise ValueError(f'serviceaccounts "{name}" not found')
        return sa

    def issue_bound_token(
        self,
        namespace: str,
        service_account: str,
        pod: str | None = None,
        audiences: Sequence[str] = ("ambient-cp",),
        expiration_seconds: int = 3600,
        now: float | None = None,
    ) -> str:
        """A TokenRequest token (projected volume), pod-bound when `pod` is given."""
        with self._lock:
            sa = self._sa_or_raise(namespace, service_account)
            ref: dict[str, Any] = {
                "namespace": namespace,
                "serviceaccount": {"name": sa.name, "uid": sa.uid},
            }
            if pod is not None:
                p = self._pods.get((namespace, pod))
                if p is None:
                    raise ValueError(f'pods "{pod}" not found')
                if p.service_account != service_account:
                    raise ValueError(
                        f'cannot bind token for pod "{pod}" to service account "{service_account}"'
                    )
                ref["node"] = {"name": p.node, "uid": self._nodes[p.node]}
                ref["pod"] = {"name": p.name, "uid": p.uid}
            return self._sign_bound(
                namespace, service_account, ref, audiences, expiration_seconds, now
            )

    def issue_secret_bound_token(
        self,
        namespace: str,
        service_account: str,
        secret: str,
        audiences: Sequence[str] = ("ambient-cp",),
        expiration_seconds: int = 3600,
        now: float | None = None,
    ) -> str:
        """A TokenRequest token bound to a Secret instead of a pod (not pod-bound)."""
        with self._lock:
            sa = self._sa_or_raise(namespace, service_account)
            s = self._secrets.get((namespace, secret))
            if s is None:
                raise ValueError(f'secrets "{secret}" not found')
            ref = {
                "namespace": namespace,
                "secret": {"name": s.name, "uid": s.uid},
                "serviceaccount": {"name": sa.name, "uid": sa.uid},
            }
            return self._sign_bound(
                namespace, service_account, ref, audiences, expiration_seconds, now
            )

    def _sign_bound(
        self,
        namespace: str,
        service_account: str,
        ref: dict[str, Any],
        audiences: Sequence[str],
        expiration_seconds: int,
        now: float | None,
    ) -> str:
        iat = int(self._clock() if now is None else now)
        claims = {
            "aud": list(audiences),
            "exp": iat + int(expiration_seconds),
            "iat": iat,
            "iss": self._issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": ref,
            "nbf": iat,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        return self.sign_claims(claims)

    def issue_legacy_token(
        self, namespace: str, service_account: str, secret_name: str | None = None
    ) -> str:
        """An old Secret-based token: never expires, no `aud`, iss ``kubernetes/serviceaccount``.

        Creates the `kubernetes.io/service-account-token` Secret holding it; deleting that
        Secret or the ServiceAccount invalidates the token, as in Kubernetes.
        """
        with self._lock:
            sa = self._sa_or_raise(namespace, service_account)
            name = secret_name or f"{service_account}-token-{secrets.token_hex(3)[:5]}"
            claims = {
                "iss": LEGACY_ISSUER,
                _PKEY + "namespace": namespace,
                _PKEY + "secret.name": name,
                _PKEY + "service-account.name": service_account,
                _PKEY + "service-account.uid": sa.uid,
                "sub": f"system:serviceaccount:{namespace}:{service_account}",
            }
            token = self.sign_claims(claims)
            self.add_secret(
                namespace,
                name,
                data={"token": token},
                secret_type="kubernetes.io/service-account-token",
            )
            return token

    # -- callers and RBAC --------------------------------------------------------------------

    def add_caller(
        self,
        token: str,
        username: str,
        *,
        groups: Sequence[str] | None = None,
        permissions: Iterable[tuple[str, str, str]] = DEFAULT_PERMISSIONS,
    ) -> None:
        """Register a bearer token the API accepts from clients, with its identity and RBAC."""
        if groups is None:
            groups = ["system:authenticated"]
            parts = username.split(":")
            if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
                groups = ["system:serviceaccounts", f"system:serviceaccounts:{parts[2]}", *groups]
        with self._lock:
            self._callers[token] = _Caller(username, list(groups), set(permissions))

    def remove_caller(self, token: str) -> None:
        """Forget a caller token (its requests then get 401)."""
        with self._lock:
            self._callers.pop(token, None)

    def _caller_for(self, token: str | None) -> _Caller:
        return self._callers[self._default_caller_token if token is None else token]

    def deny(self, verb: str, group: str, resource: str, *, token: str | None = None) -> None:
        """Take a permission away from a caller (default: the kubeconfig's caller).

        E.g. ``deny("create", "authentication.k8s.io", "tokenreviews")``; a non-resource URL
        is ``deny("get", "", "/openid/v1/jwks")``.
        """
        with self._lock:
            self._caller_for(token).permissions.discard((verb, group, resource))

    def allow(self, verb: str, group: str, resource: str, *, token: str | None = None) -> None:
        """Grant a permission to a caller (default: the kubeconfig's caller)."""
        with self._lock:
            self._caller_for(token).permissions.add((verb, group, resource))

    # -- faults, counters, recorded requests -------------------------------------------------

    def set_latency(self, seconds: float, route: str | None = None) -> None:
        """Delay answers on `route` (a key of `ROUTES`), or with None on every route."""
        self._check_route(route)
        self._faults.set_latency(seconds, route)

    def fail(
        self,
        route: str | None,
        mode: str | None,
        *,
        times: int | None = None,
        retry_after: int | str | None = 1,
    ) -> None:
        """Fail `route` (None: all): "500", "hang" (held until the next fault change or stop),
        "reset" (TCP reset, no response), "429" (API Priority and Fairness refusing, with
        ``Retry-After: retry_after``; None sends none), or None to clear. `times`: only the
        next N calls. A server that refuses connections: :meth:`stop` (then :meth:`start`)."""
        self._check_route(route)
        with self._lock:
            self._retry_after = None if retry_after is None else str(retry_after)
        self._faults.fail(route, mode, times=times)

    def clear_faults(self) -> None:
        """Remove every latency and fault."""
        self._faults.clear()

    def calls(self, route: str | None = None) -> int:
        """Requests received on `route` (None: all routes), faulted ones included."""
        self._check_route(route)
        return self._faults.calls(route)

    def wait_for_calls(self, route: str, n: int, timeout: float = 5.0) -> bool:
        """Block until `route` has received at least `n` requests (a request from another
        thread has arrived); False if `timeout` seconds pass first."""
        self._check_route(route)
        return self._faults.wait_for_calls(route, n, timeout)

    def reset_counts(self) -> None:
        """Zero the call counters and forget recorded requests."""
        self._faults.reset_counts()
        with self._lock:
            self._requests.clear()

    def requests(self, route: str) -> list[RecordedRequest]:
        """The requests received on `route`, oldest first."""
        self._check_route(route)
        with self._lock:
            return list(self._requests.get(route, []))

    @staticmethod
    def _check_route(route: str | None) -> None:
        if route is not None and route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {sorted(ROUTES)}")

    # -- TokenReview -------------------------------------------------------------------------

    def review(self, token: str, audiences: Sequence[str] = ()) -> dict[str, Any]:
        """The `status` a TokenReview of `token` for `audiences` gets (no HTTP involved).

        A success is remembered for ``token_cache_ttl`` seconds per (token, audiences), as
        kube-apiserver's token cache does: a token whose pod was deleted after it was
        reviewed keeps authenticating that long. Failures are not remembered."""
        key = (token, tuple(audiences))
        with self._lock:
            now = self._clock()
            cached = self._token_cache.get(key)
            if cached is not None and cached[1] > now:
                return json.loads(json.dumps(cached[0]))
            try:
                user, auds = self._authenticate(token, list(audiences))
            except _ReviewFailure as exc:
                # The review runs the request authenticator on "Bearer <token>", whose
                # failures read "invalid bearer token" (plus the cause when there is one).
                msg = str(exc)
                error = f"[invalid bearer token, {msg}]" if msg else "invalid bearer token"
                return {"user": {}, "error": error}
            status = {"authenticated": True, "user": user, "audiences": auds}
            if self._token_cache_ttl > 0:
                for k in [k for k, v in self._token_cache.items() if v[1] <= now]:
                    del self._token_cache[k]
                self._token_cache[key] = (status, now + self._token_cache_ttl)
            return json.loads(json.dumps(status))

    def forget_reviews(self) -> None:
        """Empty the token cache (as if ``token_cache_ttl`` had passed for every entry)."""
        with self._lock:
            self._token_cache.clear()

    def _authenticate(self, token: str, requested: list[str]) -> tuple[dict[str, Any], list[str]]:
        parts = token.split(".")
        if len(parts) != 3:
            raise _ReviewFailure("")  # not a JWT: no authenticator claims it
        try:
            header = _b64url_json(parts[0])
            unverified = _b64url_json(parts[1])
        except (ValueError, TypeError):
            raise _ReviewFailure("") from None
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            raise _ReviewFailure("")
        iss = unverified.get("iss")
        legacy = iss == LEGACY_ISSUER
        if not legacy and iss not in self._accepted_issuers:
            raise _ReviewFailure("")  # another issuer's token: not ours to judge
        claims = self._verify_signature(token, header)

        token_auds = claims.get("aud")
        if isinstance(token_auds, str):
            token_auds = [token_auds]
        if not token_auds:
            token_auds = list(self._api_audiences)  # implicit audiences
        if not requested:
            requested = list(self._api_audiences)
        auds = [a for a in token_auds if a in requested]
        if not auds:
            raise _ReviewFailure(
                f"token audiences {_go_quote_list(token_auds)} is invalid for the target "
                f"audiences {_go_quote_list(requested)}"
            )
        if legacy:
            return self._validate_legacy(token, claims), auds
        return self._validate_bound(claims), auds

    def _verify_signature(self, token: str, header: dict[str, Any]) -> dict[str, Any]:
        kid = header.get("kid")
        candidates = [k for k in self._keys if kid is None or k.kid == kid]
        if not candidates:  # the real verifier picks keys by kid
            raise _ReviewFailure("invalid signature, no keys found")
        for k in candidates:
            try:
                obj = jws.deserialize_compact(token, k.key, algorithms=[k.alg])
            except (JoseError, ValueError):
                continue
            claims = json.loads(obj.payload)
            if isinstance(claims, dict):
                return claims
        raise _ReviewFailure("go-jose/go-jose: error in cryptographic primitive")

    def _validate_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if isinstance(nbf, int | float) and now + self._leeway < nbf:
            raise _ReviewFailure("service account token is not valid yet")
        if isinstance(exp, int | float) and now - self._leeway > exp:
            raise _ReviewFailure("service account token has expired")
        if isinstance(iat, int | float) and now + self._leeway < iat:
            raise _ReviewFailure("service account token is issued in the future")

    def _validate_bound(self, claims: dict[str, Any]) -> dict[str, Any]:
        self._validate_times(claims)
        ref = claims.get("kubernetes.io")
        if not isinstance(ref, dict):
            raise _ReviewFailure("service account token claims are missing kubernetes.io")
        namespace = ref.get("namespace", "")
        sa_ref = ref.get("serviceaccount") or {}
        sa = self._service_accounts.get((namespace, sa_ref.get("name", "")))
        if sa is None:
            raise _ReviewFailure(f'serviceaccounts "{sa_ref.get("name", "")}" not found')
        if sa.uid != sa_ref.get("uid"):
            raise _ReviewFailure(
                f"service account UID ({sa.uid}) does not match claim ({sa_ref.get('uid')})"
            )
        # claims.go: deleted before now - leeway (held by a finalizer): no longer vouches
        invalid_if_deleted_before = self._clock() - self._leeway
        if sa.deletion is not None and sa.deletion < invalid_if_deleted_before:
            raise _ReviewFailure(f"service account {namespace}/{sa.name} has been deleted")
        extra: dict[str, list[str]] = {}
        pod_ref, secret_ref, node_ref = ref.get("pod"), ref.get("secret"), ref.get("node")
        if isinstance(secret_ref, dict):
            s = self._secrets.get((namespace, secret_ref.get("name", "")))
            if s is None:
                raise _ReviewFailure("service account token has been invalidated")
            if s.uid != secret_ref.get("uid"):
                raise _ReviewFailure(
                    f"secret UID ({s.uid}) does not match service account secret ref claim "
                    f"({secret_ref.get('uid')})"
                )
        if isinstance(pod_ref, dict):
            p = self._pods.get((namespace, pod_ref.get("name", "")))
            if p is None:
                raise _ReviewFailure("service account token has been invalidated")
            if p.uid != pod_ref.get("uid"):
                raise _ReviewFailure(
                    f"pod UID ({p.uid}) does not match service account pod ref claim "
                    f"({pod_ref.get('uid')})"
                )
            if p.deletion is not None and p.deletion < invalid_if_deleted_before:
                raise _ReviewFailure("service account token has been invalidated")
            extra[_EXTRA + "pod-name"] = [p.name]
            extra[_EXTRA + "pod-uid"] = [p.uid]
        if isinstance(node_ref, dict):
            extra[_EXTRA + "node-name"] = [str(node_ref.get("name", ""))]
            extra[_EXTRA + "node-uid"] = [str(node_ref.get("uid", ""))]
        if claims.get("jti"):
            extra[_EXTRA + "credential-id"] = [f"JTI={claims['jti']}"]
        return self._user(namespace, sa, extra)

    def _validate_legacy(self, token: str, claims: dict[str, Any]) -> dict[str, Any]:
        namespace = claims.get(_PKEY + "namespace", "")
        sa_name = claims.get(_PKEY + "service-account.name", "")
        sa_uid = claims.get(_PKEY + "service-account.uid", "")
        secret_name = claims.get(_PKEY + "secret.name", "")
        if not (namespace and sa_name and sa_uid and secret_name):
            raise _ReviewFailure("service account token is missing required claims")
        secret = self._secrets.get((namespace, secret_name))
        if secret is None or secret.data.get("token") != token:
            raise _ReviewFailure("service account token has been invalidated")
        sa = self._service_accounts.get((namespace, sa_name))
        if sa is None:
            raise _ReviewFailure(f'serviceaccounts "{sa_name}" not found')
        if sa.uid != sa_uid:
            raise _ReviewFailure(f"ServiceAccount UID ({sa.uid}) does not match claim ({sa_uid})")
        return self._user(namespace, sa, {})

    @staticmethod
    def _user(namespace: str, sa: _Obj, extra: dict[str, list[str]]) -> dict[str, Any]:
        user: dict[str, Any] = {
            "username": f"system:serviceaccount:{namespace}:{sa.name}",
            "uid": sa.uid,
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ],
        }
        if extra:
            user["extra"] = extra
        return user

    # -- HTTP --------------------------------------------------------------------------------

    def _build_app(self) -> Starlette:
        routes = [
            Route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                self._ep_tokenreviews,
                methods=["POST"],
            ),
            Route(
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                self._ep_ssar,
                methods=["POST"],
            ),
            Route("/api/v1/namespaces/{ns}", self._ep_namespace, methods=["GET"]),
            Route(
                "/api/v1/namespaces/{ns}/serviceaccounts/{name}",
                self._ep_service_account,
                methods=["GET"],
            ),
            Route("/api/v1/namespaces/{ns}/pods/{name}", self._ep_pod, methods=["GET"]),
            Route("/.well-known/openid-configuration", self._ep_openid, methods=["GET"]),
            Route("/openid/v1/jwks", self._ep_jwks, methods=["GET"]),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={404: self._not_routed, 405: self._not_routed},
        )

    def _caller(self, request: Request) -> _Caller | None:
        """Authentication: the bearer's caller; ``system:anonymous`` without credentials (the
        real server's default); None for credentials it does not know (401)."""
        auth = request.headers.get("authorization")
        if auth is None:
            return _Caller(ANONYMOUS, ["system:unauthenticated"], set())
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            return None
        with self._lock:
            return self._callers.get(token.strip())

    async def _not_routed(self, request: Request, exc: Exception) -> Response:
        """What the real server answers for a path or method the fake does not route:
        401 for unknown credentials, 403 when RBAC denies the request's attributes (before
        any routing), else 405 (a known resource, another method) or 404 (JSON for an
        unknown resource of a served group, plain text elsewhere)."""
        caller = self._caller(request)
        if caller is None:
            return _status(401, "Unauthorized", "Unauthorized")
        info = _request_info(request.method, request.url.path)
        if info is None:  # a non-resource URL
            verb = request.method.lower()
            if (verb, "", request.url.path) not in caller.permissions:
                return _forbidden(caller.username, verb, "", request.url.path, "", "")
            return Response("404 page not found\n", status_code=404, media_type="text/plain")
        if (info.verb, info.group, info.resource) not in caller.permissions:
            return _forbidden(
                caller.username,
                info.verb,
                info.group,
                info.resource,
                info.name,
                info.namespace,
                info.subresource,
            )
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return _status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                {},
            )
        if (info.group, info.version) in _SERVED_GROUP_VERSIONS:
            return _status(404, "NotFound", "the server could not find the requested resource", {})
        return Response("404 page not found\n", status_code=404, media_type="text/plain")

    async def _prologue(
        self,
        request: Request,
        route: str,
        verb: str,
        group: str,
        resource: str,
        name: str = "",
        namespace: str = "",
    ) -> tuple[Response | None, _Caller | None, Any]:
        """Record, apply faults, authenticate, authorize: (early answer, caller, JSON body)."""
        body: Any = None
        if request.method == "POST":
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
        with self._lock:
            self._requests.setdefault(route, []).append(
                RecordedRequest(
                    method=request.method,
                    path=request.url.path,
                    query=request.url.query,
                    headers=dict(request.headers),
                    json=body,
                )
            )
        early = await gate(
            self._server,
            self._faults,
            route,
            request,
            error_500=_internal_error,
            custom={"429": self._too_many_requests},
        )
        if early is not None:
            return early, None, body
        caller = self._caller(request)
        if caller is None:
            return _status(401, "Unauthorized", "Unauthorized"), None, body
        with self._lock:
            allowed = (verb, group, resource) in caller.permissions
        if not allowed:
            return _forbidden(caller.username, verb, group, resource, name, namespace), None, body
        return None, caller, body

    async def _ep_tokenreviews(self, request: Request) -> Response:
        early, _, body = await self._prologue(
            request, "tokenreviews", "create", "authentication.k8s.io", "tokenreviews"
        )
        if early is not None:
            return early
        bad = _check_body(request, body, "TokenReview", "authentication.k8s.io/v1")
        if bad is not None:
            return bad
        spec = body.get("spec")
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            return _status(400, "BadRequest", "the body of the request was in an unknown format")
        token = spec.get("token", "")
        auds = spec.get("audiences") or []
        if not isinstance(token, str) or not isinstance(auds, list):
            return _status(400, "BadRequest", "the body of the request was in an unknown format")
        if not token:
            return _status(400, "BadRequest", "token is required for TokenReview in authentication")
        status = self.review(token, [str(a) for a in auds])
        echoed = {k: v for k, v in spec.items() if v not in (None, [], "")}  # omitempty
        out = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": _review_metadata(request, "authentication.k8s.io/v1", echoed),
            "spec": echoed,
            "status": status,
        }
        return _json(out, 201)

    async def _ep_ssar(self, request: Request) -> Response:
        early, caller, body = await self._prologue(
            request,
            "selfsubjectaccessreviews",
            "create",
            "authorization.k8s.io",
            "selfsubjectaccessreviews",
        )
        if early is not None:
            return early
        assert caller is not None
        bad = _check_body(request, body, "SelfSubjectAccessReview", "authorization.k8s.io/v1")
        if bad is not None:
            return bad
        spec = body.get("spec") or {}
        if not isinstance(spec, dict):
            return _status(400, "BadRequest", "the body of the request was in an unknown format")
        ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if isinstance(ra, dict) and nra is None:
            perm = (ra.get("verb", ""), ra.get("group", ""), ra.get("resource", ""))
        elif isinstance(nra, dict) and ra is None:
            perm = (nra.get("verb", ""), "", nra.get("path", ""))
        else:
            why = "exactly one of nonResourceAttributes or resourceAttributes must be specified"
            return _status(
                422,
                "Invalid",
                f'.authorization.k8s.io "" is invalid: spec: Invalid value: null: {why}',
                {
                    "group": "authorization.k8s.io",
                    "causes": [
                        {
                            "reason": "FieldValueInvalid",
                            "message": f"Invalid value: null: {why}",
                            "field": "spec",
                        }
                    ],
                },
            )
        with self._lock:
            allowed = perm in caller.permissions
        status: dict[str, Any] = {"allowed": allowed}
        if allowed:
            status["reason"] = (
                'RBAC: allowed by ClusterRoleBinding "fake" of ClusterRole "fake" to '
                f"{_rbac_subject(caller.username)}"
            )
        out = {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": _review_metadata(request, "authorization.k8s.io/v1", spec),
            "spec": spec,
            "status": status,
        }
        return _json(out, 201)

    async def _ep_namespace(self, request: Request) -> Response:
        ns = request.path_params["ns"]
        # a namespace's own request attributes carry it as their namespace too
        early, _, _ = await self._prologue(request, "namespaces", "get", "", "namespaces", ns, ns)
        if early is not None:
            return early
        with self._lock:
            obj = self._namespaces.get(ns)
            if obj is None:
                return _not_found("namespaces", ns)
            doc = {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": _metadata(obj),
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }
        return _json(doc)

    async def _ep_service_account(self, request: Request) -> Response:
        ns, name = request.path_params["ns"], request.path_params["name"]
        early, _, _ = await self._prologue(
            request, "serviceaccounts", "get", "", "serviceaccounts", name, ns
        )
        if early is not None:
            return early
        with self._lock:
            obj = self._service_accounts.get((ns, name))
            if obj is None:
                return _not_found("serviceaccounts", name)
            doc = {"kind": "ServiceAccount", "apiVersion": "v1", "metadata": _metadata(obj)}
        return _json(doc)

    async def _ep_pod(self, request: Request) -> Response:
        ns, name = request.path_params["ns"], request.path_params["name"]
        early, _, _ = await self._prologue(request, "pods", "get", "", "pods", name, ns)
        if early is not None:
            return early
        with self._lock:
            obj = self._pods.get((ns, name))
            if obj is None:
                return _not_found("pods", name)
            doc = {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": _metadata(obj),
                "spec": {
                    "containers": [{"name": "runner", "image": "runner:latest"}],
                    "serviceAccountName": obj.service_account,
                    "serviceAccount": obj.service_account,
                    "nodeName": obj.node,
                },
                "status": {"phase": "Running", "startTime": _rfc3339(obj.created)},
            }
        return _json(doc)

    async def _ep_openid(self, request: Request) -> Response:
        early, _, _ = await self._prologue(
            request, "openid-configuration", "get", "", "/.well-known/openid-configuration"
        )
        if early is not None:
            return early
        with self._lock:
            algs = sorted({k.alg for k in self._keys})
            doc = {
                "issuer": self._issuer,
                # like the real server without --service-account-jwks-uri: its own address
                "jwks_uri": f"{self.url}/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": algs,
            }
        return JSONResponse(doc, headers={"Cache-Control": _DISCOVERY_CACHE_CONTROL})

    async def _ep_jwks(self, request: Request) -> Response:
        early, _, _ = await self._prologue(request, "jwks", "get", "", "/openid/v1/jwks")
        if early is not None:
            return early
        if not _accepts(request.headers.get("accept", "*/*"), "application/jwk-set+json"):
            # like go-restful's Produces(): the route serves only its own media type
            return _status(
                406,
                "NotAcceptable",
                "406: Not Acceptable\n\nAvailable representations: application/jwk-set+json",
                {},
            )
        return Response(
            json.dumps(self.jwks()),
            media_type="application/jwk-set+json",
            headers={"Cache-Control": _DISCOVERY_CACHE_CONTROL},
        )

    def _too_many_requests(self) -> Response:
        """What kube-apiserver's API Priority and Fairness answers when a flow is full."""
        with self._lock:
            retry_after = self._retry_after
        details: dict[str, Any] = {}
        if retry_after is not None and retry_after.isdecimal():
            details["retryAfterSeconds"] = int(retry_after)
        response = _status(
            429, "TooManyRequests", "Too many requests, please try again later.", details
        )
        if retry_after is not None:
            response.headers["Retry-After"] = retry_after
        return response


@dataclass(frozen=True)
class _RequestInfo:
    """The attributes the real server authorizes a resource request with."""

    verb: str
    group: str
    version: str
    resource: str
    subresource: str
    namespace: str
    name: str


def _request_info(method: str, path: str) -> _RequestInfo | None:
    """Like kube-apiserver's RequestInfoFactory: None for a non-resource URL."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return None  # discovery documents are non-resource requests
    namespace = name = subresource = ""
    if rest[0] == "namespaces" and len(rest) >= 2:
        namespace = rest[1]
        if len(rest) >= 3:
            rest = rest[2:]
        else:  # the namespace itself: its name is also its namespace
            rest = ["namespaces", namespace]
    resource = rest[0]
    if len(rest) >= 2:
        name = rest[1]
    if len(rest) >= 3:
        subresource = rest[2]
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch"}
    if method in ("GET", "HEAD"):
        verb = "get" if name else "list"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = verbs.get(method, method.lower())
    return _RequestInfo(verb, group, version, resource, subresource, namespace, name)


def _rbac_subject(username: str) -> str:
    """How an RBAC reason names a subject: ``ServiceAccount "name/namespace"`` for one."""
    parts = username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return f'ServiceAccount "{parts[3]}/{parts[2]}"'
    return f'User "{username}"'


def _fields_v1(spec: Mapping[str, Any], top: bool = True) -> dict[str, Any]:
    """The managed-fields set of ``spec`` (``f:`` per field, ``.`` for a set map)."""
    out: dict[str, Any] = {} if top else {".": {}}
    for key, value in sorted(spec.items()):
        out[f"f:{key}"] = _fields_v1(value, top=False) if isinstance(value, dict) else {}
    return out


def _review_metadata(request: Request, api_version: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A review's metadata as the real server answers it: the managed fields of the request
    (the manager is the first part of the User-Agent)."""
    agent = request.headers.get("user-agent", "unknown").split("/", 1)[0][:128]
    return {
        "managedFields": [
            {
                "manager": agent,
                "operation": "Update",
                "apiVersion": api_version,
                "time": _rfc3339(time.time()),
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": _fields_v1(spec)},
            }
        ]
    }


def _json(doc: Any, status_code: int = 200) -> JSONResponse:
    """An API answer with the real server's ``Cache-Control``."""
    return JSONResponse(doc, status_code=status_code, headers={"Cache-Control": _API_CACHE_CONTROL})


def _accepts(accept: str, media_type: str) -> bool:
    """Whether an Accept header admits ``media_type`` as go-restful's Produces() does: the
    type itself or ``*/*`` (``application/*`` is a 406 on the real server)."""
    for part in accept.split(","):
        value = part.split(";", 1)[0].strip().lower()
        if value in (media_type, "*/*"):
            return True
    return False


def _metadata(obj: _Obj) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": obj.name}
    if obj.namespace is not None:
        meta["namespace"] = obj.namespace
    meta["uid"] = obj.uid
    meta["resourceVersion"] = obj.resource_version
    meta["creationTimestamp"] = _rfc3339(obj.created)
    if obj.deletion is not None:
        meta["deletionTimestamp"] = _rfc3339(obj.deletion)
        meta["deletionGracePeriodSeconds"] = 0
    if obj.labels:  # like Kubernetes: no labels, no key
        meta["labels"] = dict(obj.labels)
    if obj.finalizers:
        meta["finalizers"] = list(obj.finalizers)
    return meta


def _status(
    code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> JSONResponse:
    doc: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        doc["details"] = dict(details)
    doc["code"] = code
    return _json(doc, code)


def _check_body(request: Request, body: Any, kind: str, api_version: str) -> JSONResponse | None:
    """Like the API server: a JSON body (no Content-Type means JSON, another type is 415);
    kind/apiVersion default from the URL, but must match if sent."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("", "application/json"):
        return _status(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: "
            "application/json, application/yaml, application/vnd.kubernetes.protobuf",
        )
    if not isinstance(body, dict):
        return _status(400, "BadRequest", "the body of the request was in an unknown format")
    sent_version = body.get("apiVersion") or api_version
    if sent_version != api_version:
        return _status(
            400,
            "BadRequest",
            f"the API version in the data ({sent_version}) does not match the expected API "
            f"version ({api_version})",
        )
    sent_kind = body.get("kind") or kind
    if sent_kind != kind:
        return _status(
            400,
            "BadRequest",
            f'{sent_kind} in version "{sent_version.rsplit("/", 1)[-1]}" cannot be handled as a '
            f'{kind}: no kind "{sent_kind}" is registered for version "{api_version}" in scheme '
            '"pkg/runtime/scheme.go:111"',
        )
    return None


def _not_found(resource: str, name: str) -> JSONResponse:
    return _status(
        404, "NotFound", f'{resource} "{name}" not found', {"name": name, "kind": resource}
    )


def _internal_error() -> Response:
    return _status(
        500,
        "InternalError",
        "Internal error occurred: injected fault",
        {"causes": [{"message": "injected fault"}]},
    )


def _forbidden(
    username: str,
    verb: str,
    group: str,
    resource: str,
    name: str,
    namespace: str,
    subresource: str = "",
) -> JSONResponse:
    if resource.startswith("/"):
        return _status(
            403, "Forbidden", f'forbidden: User "{username}" cannot {verb} path "{resource}"', {}
        )
    qualified = f"{resource}.{group}" if group else resource
    subject = f'{qualified} "{name}"' if name else qualified
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    what = f"{resource}/{subresource}" if subresource else resource
    message = (
        f'{subject} is forbidden: User "{username}" cannot {verb} resource "{what}" '
        f'in API group "{group}" {scope}'
    )
    details: dict[str, Any] = {"kind": resource}
    if name:
        details = {"name": name, **details}
    if group:
        details["group"] = group
    return _status(403, "Forbidden", message, details)
