"""Who is calling: the parts of an Identity, whichever authenticator made it."""

from __future__ import annotations

from cp_token.identity import POD_NAME_KEY, POD_UID_KEY, Identity

BOUND = {POD_NAME_KEY: ("runner",), POD_UID_KEY: ("uid-1",)}


def ident(username: str, bound: bool = True) -> Identity:
    return Identity(username=username, extra=BOUND if bound else {})


def test_identity_parts() -> None:
    i = ident("system:serviceaccount:ns1:session-42-sa")
    assert (i.namespace, i.service_account, i.pod_name, i.pod_uid) == (
        "ns1",
        "session-42-sa",
        "runner",
        "uid-1",
    )
    assert i.pod_bound
    assert ident("alice").namespace is None
    assert ident("system:serviceaccount:a:b:c").namespace is None
