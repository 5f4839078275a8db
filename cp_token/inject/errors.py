"""The injector's refusal of a request that is not an admission review it can answer.

They are :class:`~cp_token.errors.CPTokenError` types, so :func:`cp_token.errors.error_response`
(the one mapping from error type to HTTP) renders them. A review the injector *can* answer is
never one of these: a refusal of the pod is an AdmissionReview with ``allowed: false``.
Oversized bodies (413) and other methods (405) use the shared
:class:`~cp_token.errors.PayloadTooLarge` and :class:`~cp_token.errors.MethodNotAllowed`.
"""

from __future__ import annotations

from cp_token.errors import CPTokenError

__all__ = ["InvalidReview"]


class InvalidReview(CPTokenError):
    """400: the body is not an AdmissionReview ``admission.k8s.io/v1`` with a request."""

    status = 400
    error = "invalid_review"
