"""cp-token: pull-based short-lived API tokens for Kubernetes session pods."""

__version__ = "0.1.0"
