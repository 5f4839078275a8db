"""The webhook's HTTP surface: ``POST /mutate`` and the probes; routes only.

The route decodes the AdmissionReview, calls :func:`cp_token.inject.patch.decide` and encodes
the answer; every AdmissionReview it can read is answered with the request's ``uid``. A body
that is not one is a 400 with the reason (413 when larger than the API server ever sends;
400 when nested deeper than any object the API server sends), never a 500. A log line says
at most a few hundred characters of anything the request carried.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cp_token.errors import CPTokenError, MethodNotAllowed, error_response
from cp_token.http.bodies import read_body
from cp_token.http.health import Readiness, probe_app
from cp_token.inject.errors import InvalidReview
from cp_token.inject.metrics import InjectMetrics
from cp_token.inject.patch import Decision, decide
from cp_token.settings.inject import InjectSettings

__all__ = [
    "MAX_DEPTH",
    "MAX_REVIEW_BYTES",
    "create_app",
    "create_metrics_app",
    "parse_review",
    "review_response",
]

log = logging.getLogger("cp_token.inject")

API_VERSION = "admission.k8s.io/v1"
# The API server refuses request bodies over 3 MiB, and a review carries one object for a
# CREATE, plus a small envelope; anything larger is not from the API server.
MAX_REVIEW_BYTES = 3 * 1024 * 1024 + 64 * 1024
# Kubernetes UIDs are UUIDs; allow any short printable token, refuse what could forge a log.
_UID = re.compile(r"[\x21-\x7e]{1,128}")
# A pod in its review is nested about 25 levels deep (managedFields included); deeper is
# not from the API server, and would make the walks over it (decide, the log) recurse.
MAX_DEPTH = 100
# What a log line may carry of one value taken from the request.
MAX_LOGGED_CHARS = 253


def _deeper_than(value: Any, limit: int) -> bool:
    """True when ``value`` (decoded JSON) nests objects and arrays more than ``limit`` deep;
    iterative, so the check itself cannot recurse."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def parse_review(body: bytes) -> dict[str, Any]:
    """The ``request`` of an AdmissionReview v1; raises :class:`InvalidReview` with the reason."""
    if not body:
        raise InvalidReview("empty body: expected an AdmissionReview (admission.k8s.io/v1)")
    too_deep = f"the AdmissionReview is nested more than {MAX_DEPTH} levels deep"
    try:
        review = json.loads(body)
    except RecursionError:
        raise InvalidReview(too_deep) from None
    except ValueError:  # UnicodeDecodeError is a ValueError
        raise InvalidReview("body is not JSON: expected an AdmissionReview") from None
    if not isinstance(review, dict):
        raise InvalidReview("body is not a JSON object: expected an AdmissionReview")
    # Nesting needs an opening bracket per level: most reviews have too few to walk at all.
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and _deeper_than(review, MAX_DEPTH):
        raise InvalidReview(too_deep)
    if review.get("kind") != "AdmissionReview":
        raise InvalidReview("kind must be AdmissionReview")
    if review.get("apiVersion") != API_VERSION:
        raise InvalidReview(f"apiVersion must be {API_VERSION} (admissionReviewVersions: [v1])")
    request = review.get("request")
    if not isinstance(request, dict):
        raise InvalidReview("the AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not _UID.fullmatch(uid):
        raise InvalidReview("request.uid must be a non-empty printable string")
    # Anything else is the decision's to judge: with a uid the review can be answered, and
    # a request that is not a pod CREATE is allowed unchanged.
    return request


def review_response(uid: str, decision: Decision) -> dict[str, Any]:
    """The AdmissionReview answering ``uid`` with ``decision``."""
    response: dict[str, Any] = {"uid": uid, "allowed": decision.action != "refused"}
    if decision.action == "refused":
        response["status"] = {
            "status": "Failure",
            "code": 409,
            "reason": "Conflict",
            "message": decision.message,
        }
    if decision.patch:
        raw = json.dumps(decision.patch, separators=(",", ":")).encode()
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(raw).decode()
    if decision.warnings:
        response["warnings"] = decision.warnings
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _failure(uid: str) -> dict[str, Any]:
    """The answer when the injector itself fails: refused, so no pod starts half-configured."""
    review = review_response(uid, Decision("refused"))
    review["response"]["status"] = {
        "status": "Failure",
        "code": 500,
        "reason": "InternalError",
        "message": "the token sidecar injector failed on this request; retry",
    }
    return review


def _str_or_none(value: Any) -> str | None:
    """A string from the request, safe for a log line: control characters escaped, at most
    :data:`MAX_LOGGED_CHARS` of it."""
    if not isinstance(value, str):
        return None
    if value.isprintable() and len(value) <= MAX_LOGGED_CHARS:
        return value
    return repr(value[:MAX_LOGGED_CHARS]) + ("..." if len(value) > MAX_LOGGED_CHARS else "")


def _describe(request: dict[str, Any]) -> dict[str, Any]:
    """What a log line may say about a request: never the pod's spec (env may hold secrets)."""
    obj = request.get("object")
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = request.get("name") or (
        meta.get("name") or meta.get("generateName") if isinstance(meta, dict) else None
    )
    return {
        "uid": request.get("uid"),  # checked: at most 128 printable characters
        "operation": _str_or_none(request.get("operation")),
        "namespace": _str_or_none(request.get("namespace")),
        "name": _str_or_none(name),
    }


class MutateEndpoint:
    """``/mutate`` as a plain ASGI endpoint: it sees every method, so it answers its own 405."""

    def __init__(self, settings: InjectSettings, metrics: InjectMetrics) -> None:
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handle(Request(scope, receive))
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        """Answer one request; counts it and writes one log line."""
        start = time.perf_counter()
        try:
            if request.method != "POST":
                raise MethodNotAllowed(
                    f"{request.method} is not allowed on /mutate; use POST", allow="POST"
                )
            review = parse_review(await read_body(request, MAX_REVIEW_BYTES))
        except CPTokenError as exc:
            self.metrics.request("error", time.perf_counter() - start)
            log.warning(
                "admission request refused: %s",
                exc.description,
                extra={"fields": {"result": "error", "status": exc.status}},
            )
            return error_response(exc)
        fields = _describe(review)
        try:
            decision = decide(review, self.settings)
            answer = review_response(review["uid"], decision)
            result: str = decision.action
            fields["message"] = decision.message or None  # ours: bounded
        except Exception as exc:  # a bug must still answer the review, and never 500
            answer, result = _failure(review["uid"]), "error"
            fields["error"] = type(exc).__name__
            log.error("injector failed on a review", extra={"fields": fields})
        elapsed = time.perf_counter() - start
        self.metrics.request(result, elapsed)
        fields.update(result=result, latency_ms=round(elapsed * 1000, 3))
        log.info("admission %s", result, extra={"fields": fields})
        body = json.dumps(answer, separators=(",", ":")).encode()
        return Response(body, media_type="application/json")


def create_app(
    settings: InjectSettings,
    metrics: InjectMetrics | None = None,
    *,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    """The webhook app: ``POST /mutate``."""
    metrics = metrics or InjectMetrics()
    app = Starlette(routes=[Route("/mutate", MutateEndpoint(settings, metrics))], lifespan=lifespan)
    app.state.metrics = metrics
    return app


def create_metrics_app(metrics: InjectMetrics, readiness: Readiness) -> Starlette:
    """The metrics port: ``/metrics``, ``/healthz``, ``/readyz``."""
    return probe_app(metrics.render, readiness)
