"""Test doubles that speak the real wire formats: a fake kube-apiserver and a fake IdP."""
