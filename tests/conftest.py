"""Shared fixtures: the fake kube-apiserver and IdP."""

from tests.fakes.fixtures import idp, kube_apiserver, kubeconfig

__all__ = ["idp", "kube_apiserver", "kubeconfig"]
