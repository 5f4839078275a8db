"""The only module that speaks to the Kubernetes API.

The ``kubernetes`` package does what it is good at, reading in-cluster configuration or a
kubeconfig (CA, client certificates, bearer tokens, exec plugins, token refresh); the calls
themselves go through ``aiohttp``, a maintained HTTP client (llhttp's C parser, asyncio's own
TLS), on the serving event loop without ever blocking it:

- keep-alive connections, at most as many as the caller's pool size (one per review slot and
  label read, so a call never waits for a connection: every wait is at a semaphore with a
  deadline);
- every call gives up after ``timeout`` (10 s), connecting, TLS and a slow body included;
- an answer's head is bounded by aiohttp (128 fields of at most 8 KiB) and its body here
  (``MAX_BODY_BYTES``): a huge or endless body never grows memory;
- anything malformed (status line, framing, a body that is not a JSON object, JSON nested too
  deep, a number too large) is :class:`KubeUnavailable`, never another exception;
- proxy variables are never read (the TokenReview body carries a ServiceAccount token),
  redirects are never followed (the CP's credentials go to the API server only), cookies are
  never kept, and no compression is asked for.

The credential provider may read a file or run an exec plugin: it runs on a worker thread,
once per ``token_refresh_interval``, shared by every caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import yarl

from cp_token import __version__
from cp_token.metrics import NO_METRICS, KubeMetrics
from cp_token.runtime.backoff import Backoff, Pacer, parse_retry_after
from cp_token.runtime.clock import Clock, SystemClock
from cp_token.runtime.singleflight import SharedCall

__all__ = [
    "API_BACKOFF",
    "MAX_BODY_BYTES",
    "MAX_RETRY_AFTER",
    "KubeClient",
    "KubeConnection",
    "KubeDown",
    "KubeError",
    "KubeForbidden",
    "KubeUnavailable",
    "load_connection",
]

log = logging.getLogger(__name__)

USER_AGENT = f"cp-token/{__version__}"
CALL_TIMEOUT = 10.0  # SPEC: every Kubernetes API call gives up after 10 s
CONNECT_TIMEOUT = 5.0
KEEPALIVE = 30.0  # idle connections are kept this long (kube-apiserver keeps them 90 s)
MAX_BODY_BYTES = 4 * 1024 * 1024  # a Pod with managed fields is tens of KiB
READ_BUFFER = 64 * 1024  # per connection: aiohttp pauses reading beyond twice this
# Calls to an API server that is down: one shared backoff (full jitter, 1 s doubling to 5 s,
# never under 0.5 s), one probe at a time; a 429's Retry-After is waited exactly, up to 30 s.
API_BACKOFF = Backoff(base=1.0, cap=5.0, floor=0.5)
MAX_RETRY_AFTER = 30.0


class KubeError(Exception):
    """A Kubernetes API call failed; ``reason`` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KubeUnavailable(KubeError):
    """The API server is unreachable, timed out, or answered 5xx/401."""


class KubeDown(KubeUnavailable):
    """The API server is unreachable, refused, timed out or answered 5xx or 429, or calls to
    it are held back by the backoff that follows: what the CP read recently may serve
    (stale-if-error). ``retry_after``: seconds until the next call may go."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class KubeForbidden(KubeError):
    """The API server refused the CP's own credentials for this call (its RBAC)."""


@dataclass
class KubeConnection:
    """How to reach the API server: base URL, TLS context and a bearer-token provider."""

    host: str
    ssl_context: ssl.SSLContext | bool
    token_provider: Callable[[], str | None]  # may refresh (in-cluster, exec plugins)


def load_connection(kubeconfig: str | None, in_cluster: bool) -> KubeConnection:
    """Build a connection from in-cluster config or a kubeconfig, via the kubernetes package.

    Raises ``kubernetes.config.ConfigException`` (or OSError) when there is no usable config.
    """
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    cfg = kclient.Configuration()
    if in_cluster:
        kconfig.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        kconfig.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=cfg
        )

    if cfg.verify_ssl:
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else True
        if isinstance(ctx, ssl.SSLContext) and cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        elif cfg.cert_file:
            ctx = ssl.create_default_context()
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    else:
        ctx = False

    def token_provider() -> str | None:
        # In-cluster and exec-plugin credentials rotate; the hook re-reads them when due.
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook(cfg)
        value = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if not value:
            return None
        prefix = (cfg.api_key_prefix or {}).get("authorization")
        value = str(value)
        if value.lower().startswith("bearer "):
            return value[7:]
        if prefix and prefix.lower() != "bearer":
            return None
        return value

    return KubeConnection(
        host=str(cfg.host).rstrip("/"), ssl_context=ctx, token_provider=token_provider
    )


class KubeClient:
    """Async Kubernetes API calls the CP needs, each with a timeout and a bounded pool.

    Measured back to back against the hand-written transport it replaced
    (``bench/profile_cold.py``, the fake API server over HTTPS, this 2-core VM): CP CPU per
    cold TokenReview 561-784 us against 606-721 us, and 1,040-1,710 us against 1,100-1,520 us
    per pod in a storm of 1,000 new pods end to end; urllib3 on worker threads cost about
    twice as much. The price is memory: asyncio's TLS transport keeps a 256 KiB read buffer
    per open connection (up to the pool size).
    """

    def __init__(
        self,
        connection: KubeConnection,
        *,
        timeout: float = CALL_TIMEOUT,
        max_connections: int = 10,
        token_refresh_interval: float = 30.0,
        metrics: KubeMetrics = NO_METRICS,
        clock: Clock | None = None,
        backoff: Backoff = API_BACKOFF,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._conn = connection
        self._clock = clock or SystemClock()
        self._pacer = Pacer(backoff, self._clock, rand)
        self._hold_until = -math.inf  # a 429's Retry-After: no call before this
        self._backing_off = False  # after a failure, until a call started since succeeds
        self._epoch = 0  # failures counted: a call counts only if none was since it started
        self._probing = False  # while backing off, one call at a time finds out
        self.timeout = timeout
        self.max_connections = max_connections
        self._base = connection.host.rstrip("/")
        self._tls: ssl.SSLContext | None = (
            _tls_context(connection.ssl_context) if self._base.startswith("https") else None
        )
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        # The provider may run an exec plugin: one worker thread, one refresh at a time.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kube-credentials"
        )
        self._token: str | None = None
        self._token_checked = float("-inf")
        self._token_refresh: SharedCall[str | None] = SharedCall()
        self._refresh_interval = token_refresh_interval
        self._metrics = metrics
        self._closed = False

    async def aclose(self) -> None:
        """Close the connections; calls made afterwards fail as KubeUnavailable."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            if self._session_loop is asyncio.get_running_loop():
                await session.close()
            else:  # made on another loop (a test's): it cannot be awaited here
                session.detach()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _client(self) -> aiohttp.ClientSession:
        """The session of the running loop (made at the first call on it)."""
        if self._closed:
            raise KubeUnavailable("the Kubernetes client is closed")
        session = self._session
        loop = asyncio.get_running_loop()
        if session is None or session.closed or self._session_loop is not loop:
            if session is not None:  # another loop's (a test's, a sync wrapper's)
                session.detach()
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,
                ssl=self._tls if self._tls is not None else False,
                # under the API server's own idle timeout, so a kept connection is rarely
                # one it is closing
                keepalive_timeout=KEEPALIVE,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # never a proxy: the TokenReview body is a credential
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding",),
                read_bufsize=READ_BUFFER,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=min(CONNECT_TIMEOUT, self.timeout)
                ),
            )
            self._session, self._session_loop = session, loop
        return session

    async def _bearer(self) -> str | None:
        """The CP's own bearer token, re-read from the provider when due (shared)."""
        if time.monotonic() - self._token_checked < self._refresh_interval:
            return self._token
        return await self._token_refresh.do(self._refresh_bearer)

    async def _refresh_bearer(self) -> str | None:
        loop = asyncio.get_running_loop()
        self._token = await loop.run_in_executor(self._executor, self._conn.token_provider)
        self._token_checked = time.monotonic()
        return self._token

    async def _exchange(
        self, method: str, path: str, body: dict[str, Any] | None, accept: str = "application/json"
    ) -> tuple[int, bytes, str | None]:
        """One HTTP exchange within ``timeout``: (status, body, Retry-After); raises
        KubeUnavailable."""
        try:
            async with asyncio.timeout(self.timeout):
                token = await self._bearer()
                headers = {"Accept": accept, "User-Agent": USER_AGENT}
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                data = None
                if body is not None:
                    data = json.dumps(body, separators=(",", ":")).encode()
                    headers["Content-Type"] = "application/json"
                url = yarl.URL(self._base + path, encoded=True)
                for attempt in (1, 2):
                    try:
                        return await self._send(method, url, headers, data)
                    except aiohttp.ServerDisconnectedError:
                        # A kept connection the server closed as it was reused: once more on a
                        # new one (every call made here is free of side effects).
                        if attempt == 2:
                            raise
                raise AssertionError("unreachable")
        except TimeoutError:
            raise KubeUnavailable("Kubernetes API timed out") from None
        except KubeUnavailable:
            raise
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
            raise KubeUnavailable(f"Kubernetes API unreachable ({_why(exc)})") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise KubeUnavailable(f"Kubernetes API failed ({_why(exc)})") from None
        except RuntimeError:  # the executor or session was shut down: the service is stopping
            raise KubeUnavailable("the Kubernetes client is closed") from None

    async def _send(
        self, method: str, url: yarl.URL, headers: dict[str, str], data: bytes | None
    ) -> tuple[int, bytes, str | None]:
        async with self._client().request(
            method, url, headers=headers, data=data, allow_redirects=False
        ) as resp:
            if (resp.content_length or 0) > MAX_BODY_BYTES:
                resp.close()
                raise KubeUnavailable(f"Kubernetes API sent a body over {MAX_BODY_BYTES} bytes")
            chunks: list[bytes] = []
            size = 0
            while chunk := await resp.content.readany():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    resp.close()  # an endless body ends here, its connection with it
                    raise KubeUnavailable(f"Kubernetes API sent a body over {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            return resp.status, b"".join(chunks), resp.headers.get("Retry-After")

    @property
    def down(self) -> bool:
        """Whether the API server is taken for down: a call failed (unreachable, timed out,
        5xx, 429) and none made since has been answered."""
        return self._backing_off

    @property
    def may_call(self) -> bool:
        """Whether a call made now would go to the API server (not held back)."""
        return not (self._backing_off and (self._probing or self.retry_wait() > 0))

    def retry_wait(self) -> float:
        """Seconds until the next call to the API server may go (0: now)."""
        return max(self._pacer.wait(), self._hold_until - self._clock.monotonic(), 0.0)

    def _admit(self, call: str) -> tuple[int, bool]:
        """(the failure epoch the call starts in, whether it is the probe); raises KubeDown
        while the backoff holds calls back, or while another call is the probe."""
        if not self._backing_off:
            return self._epoch, False
        wait = self.retry_wait()
        if wait > 0:
            raise KubeDown(
                f"{call}: the Kubernetes API is down; calls resume in {wait:.1f} s", wait
            )
        if self._probing:
            raise KubeDown(f"{call}: the Kubernetes API is down; a call is finding out", 1.0)
        self._probing = True
        return self._epoch, True

    def _failed(self, epoch: int, retry_after: float | None) -> float:
        """Count a failure, unless one was counted since this call started (concurrent
        failures count as one); returns the seconds until the next call may go."""
        if epoch == self._epoch:
            self._epoch += 1
            self._backing_off = True
            if retry_after is not None:  # the server said how long: exactly that, no longer
                self._pacer.reset()
                self._hold_until = self._clock.monotonic() + retry_after
            else:
                self._pacer.failed()
        return self.retry_wait()

    def _answered(self, epoch: int) -> None:
        """The API server answered a call made since the last failure: calls go freely."""
        if epoch == self._epoch and self._backing_off:
            self._backing_off = False
            self._pacer.succeeded()
            self._hold_until = -math.inf

    async def _request(
        self,
        call: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        accept: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        """One API call; returns (status, JSON body) for 2xx/404, raises KubeError otherwise:
        KubeDown when the API server is down (unreachable, timed out, 5xx, 429) or calls are
        held back after that."""
        epoch, probe = self._admit(call)
        start = time.perf_counter()
        result = "error"
        try:
            try:
                status, raw, retry_after = await self._exchange(method, path, body, accept)
            except KubeUnavailable as exc:
                wait = self._failed(epoch, None)
                raise KubeDown(f"{call}: {exc.reason}", wait) from None
            result = str(status)
            if status == 429 or status >= 500:
                wait = self._failed(epoch, _retry_after(retry_after) if status == 429 else None)
                raise KubeDown(f"{call}: Kubernetes API answered {status}", wait)
            self._answered(epoch)
            if status == 403:
                raise KubeForbidden(f"{call}: {_status_message(raw, status)}")
            if status == 401:
                self._token_checked = float("-inf")  # rotated credentials: re-read next time
                raise KubeUnavailable(
                    f"{call}: the Kubernetes API rejected the CP's own credentials (401)"
                )
            if status == 404 or 200 <= status < 300:
                return status, _json_object(call, raw)
            raise KubeUnavailable(f"{call}: Kubernetes API answered {status}")
        finally:
            if probe:
                self._probing = False
            self._metrics.kube_call(call, result, time.perf_counter() - start)

    async def token_review(self, token: str, audiences: tuple[str, ...]) -> dict[str, Any]:
        """POST a TokenReview; returns its ``status`` object."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        status, data = await self._request(
            "tokenreview", "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body
        )
        if status == 404:
            raise KubeUnavailable("tokenreview: the TokenReview API is not served")
        st = data.get("status")
        if not isinstance(st, dict):
            raise KubeUnavailable("tokenreview: response carries no status")
        return st

    async def _get_object(self, call: str, path: str) -> dict[str, Any] | None:
        status, data = await self._request(call, "GET", path)
        return None if status == 404 else data

    async def get_namespace(self, name: str) -> dict[str, Any] | None:
        """The Namespace object, or None if it does not exist."""
        return await self._get_object("namespace", f"/api/v1/namespaces/{quote(name, safe='')}")

    async def get_service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ServiceAccount object, or None if it does not exist."""
        path = (
            f"/api/v1/namespaces/{quote(namespace, safe='')}/serviceaccounts/{quote(name, safe='')}"
        )
        return await self._get_object("serviceaccount", path)

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Pod object, or None if it does not exist."""
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        return await self._get_object("pod", path)

    async def get_json(
        self, call: str, path: str, accept: str = "application/json"
    ) -> dict[str, Any]:
        """GET a JSON document served by the API server (issuer discovery, JWKS).

        ``accept`` must name what the route produces: the API server answers 406 otherwise
        (``/openid/v1/jwks`` produces ``application/jwk-set+json`` only)."""
        status, data = await self._request(call, "GET", path, accept=accept)
        if status == 404:
            raise KubeUnavailable(f"{call}: {path} is not served by the API server")
        return data

    async def can_i(self, verb: str, group: str, resource: str, namespace: str = "") -> bool:
        """SelfSubjectAccessReview: may the CP's own identity do this?"""
        attrs: dict[str, str] = {"verb": verb, "group": group, "resource": resource}
        if namespace:
            attrs["namespace"] = namespace
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs},
        }
        _, data = await self._request(
            "selfsubjectaccessreview",
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            body,
        )
        status = data.get("status")
        return bool(isinstance(status, dict) and status.get("allowed"))


def _tls_context(configured: ssl.SSLContext | bool) -> ssl.SSLContext:
    """The kubeconfig's TLS context; the system's CAs for True; no verification for False
    (``insecure-skip-tls-verify``)."""
    if isinstance(configured, ssl.SSLContext):
        return configured
    ctx = ssl.create_default_context()
    if configured is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _retry_after(value: str | None) -> float | None:
    """A 429's Retry-After in seconds, at most MAX_RETRY_AFTER; None when absent or not a
    number or date (superscript digits, 400 digits, an overflowing date included)."""
    try:
        seconds = parse_retry_after(value, time.time())
    except (ValueError, OverflowError):
        return None
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _why(exc: BaseException) -> str:
    """A short, safe description of a transport failure (its type; no answer text)."""
    return type(exc).__name__


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_no_constant)


def _json_object(call: str, raw: bytes) -> dict[str, Any]:
    """The answer as a JSON object; anything else (not UTF-8, not JSON, NaN, a number too
    long to convert, nesting past the recursion limit, not an object) is KubeUnavailable."""
    try:
        data = _JSON.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise KubeUnavailable(f"{call}: Kubernetes API sent a body that is not JSON") from None
    if not isinstance(data, dict):
        raise KubeUnavailable(f"{call}: Kubernetes API sent an unexpected body")
    return data


def _status_message(raw: bytes, status: int) -> str:
    """The message of a Kubernetes Status body (names the missing permission)."""
    try:
        data = _JSON.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return f"forbidden ({status})"
    msg = data.get("message") if isinstance(data, dict) else None
    return str(msg)[:300] if msg else f"forbidden ({status})"


def labels_of(obj: dict[str, Any] | None) -> dict[str, str]:
    """``metadata.labels`` of an API object (empty if absent)."""
    if not obj:
        return {}
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def uid_of(obj: dict[str, Any] | None) -> str | None:
    """``metadata.uid`` of an API object."""
    if not obj:
        return None
    uid = (obj.get("metadata") or {}).get("uid")
    return str(uid) if uid else None
