"""``POST /oauth2/token`` on a real ``cp-token serve``, driven by OAuth libraries nobody here wrote.

google-auth's identity-pool credentials (loaded from a credential-config file whose
``credential_source`` is the pod's SA token file, as a consumer configures it), authlib's
``OAuth2Session`` as a public client (it sends ``client_id=None``), and a plain ``curl -d``
as docs/reference.md shows it. Each issued JWT is verified against the CP's JWKS. The CP reaches the
fake kube-apiserver through a kubeconfig (TokenReview authn, jwt minter).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import urllib3
from authlib.integrations.requests_client import OAuth2Session
from google.auth import identity_pool
from google.auth.transport.urllib3 import Request as GoogleRequest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.procs import Proc, cp_serve

RUNNER = f"system:serviceaccount:{SESSION_NS}:{SESSION_SA}"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TYPE = "urn:ietf:params:oauth:token-type:access_token"


class RunningCP:
    """A ``cp-token serve`` process and the pod's SA token, written where a pod mounts it."""

    def __init__(self, proc: Proc, base: str, sa_token_file: Path) -> None:
        self.proc, self.base, self.sa_token_file = proc, base, sa_token_file
        self.token_url = f"{base}/oauth2/token"

    @property
    def sa_token(self) -> str:
        return self.sa_token_file.read_text()

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a token the CP issued, verified against its published JWKS."""
        jwks = httpx.get(f"{self.base}/.well-known/jwks.json", trust_env=False, timeout=10)
        keys = KeySet.import_key_set(jwks.json())
        return dict(jwt.decode(token, keys, algorithms=["ES256", "RS256"]).claims)


@pytest.fixture
def cp(kube_apiserver: FakeKubeAPIServer, kubeconfig: Path, tmp_path: Path) -> Iterator[RunningCP]:
    env = {
        "KUBECONFIG": str(kubeconfig),
        "CP_TOKEN_AUTHN": "tokenreview",
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_EXCHANGE_AUDIENCES": "ambient-api-server,mcp-github",
        "CP_TOKEN_EXCHANGE_SCOPES": "sessions:read,sessions:write",
    }
    proc, base, metrics = cp_serve(env, tmp_path / "cp.log")
    sa_file = tmp_path / "ambient-cp"
    sa_file.write_text(kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD))
    try:
        proc.wait_http(f"{metrics}/readyz")
        yield RunningCP(proc, base, sa_file)
    finally:
        code = proc.terminate()
    out = proc.output()
    assert code == 0, out
    assert sa_file.read_text() not in out and sa_file.read_text()[-16:] not in out


def test_google_auth_identity_pool_with_a_file_credential_source(
    cp: RunningCP, tmp_path: Path
) -> None:
    config = {
        "type": "external_account",
        "audience": "mcp-github",
        "subject_token_type": JWT_TYPE,
        "token_url": cp.token_url,
        "credential_source": {"file": str(cp.sa_token_file)},
    }
    config_file = tmp_path / "credential-config.json"
    config_file.write_text(json.dumps(config))
    credentials = identity_pool.Credentials.from_file(str(config_file), scopes=["sessions:read"])
    credentials.refresh(GoogleRequest(urllib3.PoolManager()))
    assert credentials.valid
    claims = cp.verify(credentials.token)
    assert claims["sub"] == RUNNER and claims["pod"] == SESSION_POD
    assert claims["aud"] == "mcp-github"
    assert claims["scope"] == "sessions:read"
    assert 890 <= claims["exp"] - time.time() <= 900


def test_authlib_public_client_token_exchange(cp: RunningCP) -> None:
    with OAuth2Session(client_id=None) as session:  # sends client_id=None in the form
        session.trust_env = False
        token = session.fetch_token(
            cp.token_url,
            grant_type=GRANT,
            subject_token=cp.sa_token,
            subject_token_type=JWT_TYPE,
            requested_token_type=JWT_TYPE,
            audience="ambient-api-server",
            scope="sessions:read sessions:write",
        )
    assert token["token_type"] == "Bearer"
    assert token["issued_token_type"] == JWT_TYPE
    assert token["scope"] == "sessions:read sessions:write"
    assert 890 <= token["expires_in"] <= 900
    claims = cp.verify(token["access_token"])
    assert claims["sub"] == RUNNER and claims["aud"] == "ambient-api-server"
    assert claims["scope"] == "sessions:read sessions:write"
    assert claims["session_id"] == "abc" and claims["namespace"] == SESSION_NS


def test_plain_curl_as_the_reference_shows_it(cp: RunningCP) -> None:
    readme = (Path(__file__).resolve().parents[2] / "docs" / "reference.md").read_text()
    assert "--data-urlencode subject_token@/var/run/secrets/tokens/ambient-cp" in readme
    done = subprocess.run(
        [
            "curl", "-s", "--noproxy", "*",
            "-d", f"grant_type={GRANT}",
            "-d", f"subject_token_type={JWT_TYPE}",
            "-d", "audience=mcp-github",
            "--data-urlencode", f"subject_token@{cp.sa_token_file}",
            cp.token_url,
        ],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    body = json.loads(done.stdout)
    assert body["issued_token_type"] == ACCESS_TYPE and "scope" not in body
    assert cp.verify(body["access_token"])["aud"] == "mcp-github"


def test_refusals_over_http_and_metadata(cp: RunningCP) -> None:
    def post(**fields: str) -> httpx.Response:
        base = {"grant_type": GRANT, "subject_token": cp.sa_token, "subject_token_type": JWT_TYPE}
        return httpx.post(cp.token_url, data={**base, **fields}, trust_env=False, timeout=15)

    assert post(audience="elsewhere").json()["error"] == "invalid_target"
    assert post(scope="admin").json()["error"] == "invalid_scope"
    assert post(grant_type="client_credentials").json()["error"] == "unsupported_grant_type"
    assert post(actor_token=cp.sa_token).json()["error"] == "invalid_request"
    refused = post(subject_token="garbage")
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_request")
    assert httpx.get(cp.token_url, trust_env=False).headers["allow"] == "POST"
    assert httpx.post(f"{cp.base}/token", trust_env=False).headers["allow"] == "GET"

    meta = httpx.get(f"{cp.base}/.well-known/oauth-authorization-server", trust_env=False)
    assert meta.status_code == 200
    assert meta.json()["token_endpoint"] == cp.token_url
    assert meta.json()["issuer"] == cp.base
    assert meta.json()["jwks_uri"] == f"{cp.base}/.well-known/jwks.json"

    audit = [
        json.loads(line)
        for line in cp.proc.output().splitlines()
        if '"event":"token_exchange"' in line
    ]
    assert {a["outcome"] for a in audit} >= {"invalid_target", "invalid_token"}


def test_a_huge_body_is_refused_without_being_read(cp: RunningCP) -> None:
    """413 as soon as the declared length is seen; the connection is closed, not drained."""
    host, port = cp.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /oauth2/token HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            "Content-Length: 1073741824\r\n\r\n"
        )
        sock.sendall(head.encode() + b"grant_type=x&" * 100)
        answer, closed = b"", False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not closed:
            chunk = sock.recv(65536)
            closed = not chunk  # the server closed the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error":"invalid_request"' in answer
    assert closed
