"""Shared fixtures: the fake kube-apiserver and IdP.

Everything the tests talk to is on 127.0.0.1: proxy variables inherited from the machine
are dropped so they cannot reroute loopback calls (tests that check proxies are ignored set
their own).
"""

import os

from tests.fakes.fixtures import idp, kube_apiserver, kubeconfig

for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_name, None)

__all__ = ["idp", "kube_apiserver", "kubeconfig"]
