"""The injector's refusal of a body it cannot answer is a CP error type, rendered by the one
mapping (cp_token.errors): 400 ``invalid_review`` with its description, never a 500."""

from __future__ import annotations

import json

from cp_token.errors import CPTokenError, error_response
from cp_token.inject.errors import InvalidReview


def test_an_invalid_review_is_a_400_with_its_reason() -> None:
    error = InvalidReview("expected an AdmissionReview admission.k8s.io/v1 with a request")
    assert isinstance(error, CPTokenError)
    assert (error.status, error.error, error.reason) == (400, "invalid_review", "invalid_review")
    response = error_response(error)
    assert response.status_code == 400
    assert json.loads(response.body) == {
        "error": "invalid_review",
        "error_description": "expected an AdmissionReview admission.k8s.io/v1 with a request",
    }
    assert response.headers["cache-control"] == "no-store"
    assert "retry-after" not in response.headers and "www-authenticate" not in response.headers
