"""A real ``cp-token inject`` process for integration tests: start it with trustme
certificates and send it AdmissionReviews over HTTPS."""

from __future__ import annotations

import json
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trustme

from tests.fakes.admission import admission_review, apply_review_patch
from tests.integration.procs import Proc, free_port

__all__ = ["Injector", "start_injector", "tls_files"]


@dataclass
class Injector:
    """A running ``cp-token inject``: its HTTPS base URL, metrics base URL, and a trusting
    client context."""

    proc: Proc
    url: str
    metrics: str
    ca: ssl.SSLContext

    def post(self, body: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        with httpx.Client(verify=self.ca, trust_env=False, timeout=10) as client:
            return client.post(
                f"{self.url}/mutate", content=content, headers={"Content-Type": "application/json"}
            )

    def review(self, obj: dict[str, Any] | None, **kw: Any) -> tuple[dict[str, Any], Any]:
        """Send a review of ``obj``; returns (the answer's response, ``obj`` as patched)."""
        review = admission_review(obj, **kw)
        resp = self.post(review)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == review["request"]["uid"]
        patched = apply_review_patch(obj, answer) if obj is not None else None
        return answer["response"], patched

    def count(self, result: str) -> float:
        text = httpx.get(f"{self.metrics}/metrics", trust_env=False).text
        line = f'cp_token_inject_requests_total{{result="{result}"}} '
        return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


def tls_files(directory: Path, ca: trustme.CA) -> tuple[Path, Path]:
    """A serving certificate for 127.0.0.1 and the in-cluster name, written as tls.crt/key."""
    leaf = ca.issue_cert("127.0.0.1", "cp-token-inject.ambient-code.svc")
    cert, key = directory / "tls.crt", directory / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def start_injector(
    cert: Path, key: Path, log: Path, ca: trustme.CA, image: str, cp_url: str
) -> Injector:
    """``cp-token inject`` on free loopback ports, ready; stop it with ``.proc.terminate()``."""
    port, mport = free_port(), free_port()
    env = {
        "CP_TOKEN_INJECT_LISTEN_ADDR": f"127.0.0.1:{port}",
        "CP_TOKEN_METRICS_ADDR": f"127.0.0.1:{mport}",
        "CP_TOKEN_INJECT_TLS_CERT_FILE": str(cert),
        "CP_TOKEN_INJECT_TLS_KEY_FILE": str(key),
        "CP_TOKEN_INJECT_IMAGE": image,
        "CP_TOKEN_INJECT_CP_URL": cp_url,
    }
    proc = Proc([sys.executable, "-m", "cp_token", "inject"], env, log)
    metrics = f"http://127.0.0.1:{mport}"
    proc.wait_http(f"{metrics}/readyz")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return Injector(proc, f"https://127.0.0.1:{port}", metrics, context)
