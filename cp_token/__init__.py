"""cp-token: pull-based short-lived API tokens for Kubernetes session pods."""

# The one version string: the package metadata reads it (pyproject.toml, dynamic version),
# `cp-token --version` and every build_info metric show it, every kustomization pins the
# image to it, CHANGELOG.md has a section for it (tests/unit/project/test_release.py).
__version__ = "0.1.0"
