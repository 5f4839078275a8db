"""Riding out a key rotation against the real API server, in both authn modes: kube-apiserver
starts signing ServiceAccount tokens with a key the CP has never seen (the old one still
published). A pod whose token was signed by the new key gets its token within 2 s (SPEC
"Riding out faults": the unknown kid makes the CP re-read the issuer keys at once, and the
token waits for that read instead of being refused), and a token of the old key still works.
"""

from __future__ import annotations

import base64
import json
import time

from .cluster import Cluster
from .conftest import AUTHN_MODES, StartCp
from .session import make_session, pod_token

WITHIN = 2.0


def kid_of(token: str) -> str:
    header = token.split(".", 1)[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def test_a_token_signed_by_a_key_published_a_moment_ago_is_served_at_once(
    cluster: Cluster, start_cp: StartCp
) -> None:
    cps = {mode: start_cp(mode) for mode in AUTHN_MODES}
    before = make_session(cluster, "rotbefore")
    old_token = pod_token(cluster, before)
    for mode, cp in cps.items():  # each CP has read the key set, and holds only the old key
        assert cp.get_token(old_token).status_code == 200, mode
    cluster.rotate_signing_key()
    after = make_session(cluster, "rotafter")
    new_token = pod_token(cluster, after)
    assert kid_of(new_token) != kid_of(old_token)
    for mode, cp in cps.items():
        start = time.monotonic()
        resp = cp.get_token(new_token)
        took = time.monotonic() - start
        assert resp.status_code == 200, (mode, resp.text)
        assert took <= WITHIN, (mode, took)
        assert cp.get_token(old_token).status_code == 200, mode  # the old key still counts
