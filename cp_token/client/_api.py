"""Clients for the platform API that work the same in a sealed pod and in any other.

In a sealed pod (``AMBIENT_API_URL`` or ``AMBIENT_GRPC_ADDR`` set: SPEC "Sealed mode") no
container but the sidecar holds a token: calls go to the sidecar's egress routes, which add
the bearer, so these clients carry only the sidecar's opt-in header. Anywhere else they go
straight to the API with the bearer from :meth:`TokenSource.from_env`. Code written against
them runs unchanged in both.

grpcio is imported by :func:`grpc_channel` only (a client-only install is httpx alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from cp_token.runtime.errors import ConfigError
from cp_token.settings.client import ClientSettings, load_client_settings
from cp_token.settings.common import parse_url

from ._auth import TokenAuth
from ._errors import TokenError
from ._grpc import _grpc, grpc_channel_credentials
from ._http import SIDECAR_HEADER
from ._source import TokenSource

__all__ = ["api_async_client", "api_client", "grpc_channel"]


def _settings(env: Mapping[str, str] | None) -> ClientSettings:
    try:
        return load_client_settings(env)
    except ConfigError as exc:
        raise TokenError(str(exc)) from None


def _sealed_options(settings: ClientSettings, options: dict[str, Any]) -> dict[str, Any]:
    """The sealed pod's client: based on ``AMBIENT_API_URL``, with the guard header."""
    if not settings.api_url:
        raise TokenError(
            "this pod is sealed without an HTTP API (AMBIENT_GRPC_ADDR is set, AMBIENT_API_URL "
            "is not): use grpc_channel()"
        )
    headers = httpx.Headers(options.pop("headers", None))
    headers[SIDECAR_HEADER] = "true"
    return {"base_url": settings.api_url, "headers": headers, "trust_env": False, **options}


def _direct_options(
    base_url: str | None,
    settings: ClientSettings,
    source: TokenSource | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Any other pod's client: ``base_url`` with :class:`TokenAuth`."""
    if base_url is None:
        raise TokenError(
            "api_client() needs base_url outside a sealed pod (AMBIENT_API_URL is not set)"
        )
    try:
        parse_url("base_url", base_url)
    except ConfigError as exc:
        raise TokenError(str(exc)) from None
    auth = TokenAuth(source if source is not None else TokenSource.from_settings(settings))
    return {"base_url": base_url, "auth": auth, "trust_env": False, **options}


def api_client(
    base_url: str | None = None,
    *,
    source: TokenSource | None = None,
    env: Mapping[str, str] | None = None,
    **options: Any,
) -> httpx.Client:
    """An ``httpx.Client`` for the platform API, in both modes.

    Sealed: based on ``AMBIENT_API_URL`` (the sidecar's ``/upstream/<name>``) with the
    ``Ambient-Token-Request`` header; ``base_url`` is ignored and no token is involved.
    Otherwise: ``base_url`` (required) with :class:`TokenAuth` over ``source`` (default:
    :meth:`TokenSource.from_env`). Redirects are not followed and proxy variables are
    ignored in both; ``options`` go to ``httpx.Client`` (``timeout``, ``headers``, ...).
    Raises :class:`TokenError` for a missing or bad configuration.
    """
    settings = _settings(env)
    if settings.sealed:
        return httpx.Client(**_sealed_options(settings, options))
    return httpx.Client(**_direct_options(base_url, settings, source, options))


def api_async_client(
    base_url: str | None = None,
    *,
    source: TokenSource | None = None,
    env: Mapping[str, str] | None = None,
    **options: Any,
) -> httpx.AsyncClient:
    """:func:`api_client`'s async twin: an ``httpx.AsyncClient``."""
    settings = _settings(env)
    if settings.sealed:
        return httpx.AsyncClient(**_sealed_options(settings, options))
    return httpx.AsyncClient(**_direct_options(base_url, settings, source, options))


def grpc_channel(
    target: str | None = None,
    *,
    source: TokenSource | None = None,
    channel_credentials: Any = None,
    options: Any = None,
    env: Mapping[str, str] | None = None,
) -> Any:
    """A ``grpc.Channel`` to the platform's gRPC API, in both modes.

    Sealed: an insecure (plaintext, loopback) channel to ``AMBIENT_GRPC_ADDR``, the sidecar's
    gRPC listener, which forwards every call over TLS with the bearer; ``target`` is ignored.
    Otherwise: a TLS channel to ``target`` (required) whose every call carries the current
    token (:func:`grpc_channel_credentials` over ``source``, default
    :meth:`TokenSource.from_env`; ``channel_credentials`` default: TLS with the system
    roots). ``options`` are grpc channel options. Raises :class:`TokenError` without grpcio
    or for a missing or bad configuration.
    """
    grpc = _grpc()
    settings = _settings(env)
    if settings.sealed:
        if not settings.grpc_addr:
            raise TokenError(
                "this pod is sealed without a gRPC API (AMBIENT_API_URL is set, "
                "AMBIENT_GRPC_ADDR is not): use api_client()"
            )
        return grpc.insecure_channel(settings.grpc_addr, options=options)
    if not target:
        raise TokenError(
            "grpc_channel() needs a target outside a sealed pod (AMBIENT_GRPC_ADDR is not set)"
        )
    tokens = source if source is not None else TokenSource.from_settings(settings)
    credentials = grpc_channel_credentials(tokens, channel_credentials)
    return grpc.secure_channel(target, credentials, options=options)
