"""The injector's refusals of a request that is not an admission review it can answer.

They are :class:`~cp_token.errors.CPTokenError` types, so :func:`cp_token.errors.error_response`
(the one mapping from error type to HTTP) renders them. A review the injector *can* answer is
never one of these: a refusal of the pod is an AdmissionReview with ``allowed: false``.
"""

from __future__ import annotations

from cp_token.errors import CPTokenError

__all__ = ["InvalidReview", "PostOnly", "ReviewTooLarge"]


class InvalidReview(CPTokenError):
    """400: the body is not an AdmissionReview ``admission.k8s.io/v1`` with a request."""

    status = 400
    error = "invalid_review"


class ReviewTooLarge(CPTokenError):
    """413: the body is larger than any review the API server sends."""

    status = 413
    error = "too_large"


class PostOnly(CPTokenError):
    """405: ``/mutate`` takes POST only."""

    status = 405
    error = "method_not_allowed"

    def headers(self) -> dict[str, str]:
        """RFC 9110: list the allowed methods."""
        return {"Allow": "POST"}
