"""Microseconds per JWT signature: joserfc's ``jwt.encode`` (what the jwt minter used) against
``cp_token.minters.signer.JwsSigner`` (what it uses now), same key and claims, in-process.

    .venv/bin/python bench/bench_signer.py [--n 3000]

Prints one line per algorithm with the median of 5 timed batches (CPU time; the two
signers' batches alternate), and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from cp_token.minters.signer import JwsSigner

CLAIMS: dict[str, Any] = {
    "iss": "https://cp.example",
    "sub": "system:serviceaccount:session-ns:session-abc-sa",
    "aud": "ambient-api-server",
    "iat": 1_700_000_000,
    "nbf": 1_700_000_000,
    "exp": 1_700_000_900,
    "jti": "4b0c5e0e-4a4f-4f43-9d39-0d7d3c1e2b6a",
    "namespace": "session-ns",
    "service_account": "session-abc-sa",
    "session_id": "abc",
    "pod": "runner-abc",
}


def per_call_us(fns: tuple[Callable[[], object], ...], n: int) -> list[float]:
    """For each of ``fns``, the median over 5 batches of ``n`` calls, in CPU microseconds
    per call (CPU time of this process: other processes competing for the 2 cores do not
    inflate it). The batches alternate between the functions, so a slower or faster stretch
    of the machine falls on all of them alike."""
    batches: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(5):
        for i, fn in enumerate(fns):
            t0 = time.process_time()
            for _ in range(n):
                fn()
            batches[i].append((time.process_time() - t0) / n * 1e6)
    return [statistics.median(b) for b in batches]


def measure(n: int) -> dict[str, tuple[float, float]]:
    """``{alg: (joserfc us, JwsSigner us)}`` for ES256 and RS256."""
    keys = {
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    out = {}
    for alg, private in keys.items():
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        jose_key = (ECKey if alg == "ES256" else RSAKey).import_key(pem)
        kid = jose_key.thumbprint()
        header = {"alg": alg, "kid": kid, "typ": "JWT"}
        signer = JwsSigner(private, alg, kid)
        count = n if alg == "ES256" else max(1, n // 5)  # RSA signing is ~10x slower
        before, after = per_call_us(
            (
                lambda h=header, k=jose_key, a=alg: jwt.encode(h, CLAIMS, k, algorithms=[a]),
                lambda s=signer: s.sign(CLAIMS),
            ),
            count,
        )
        out[alg] = (before, after)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/bench_signer.py")
    parser.add_argument("--n", type=int, default=3000, help="signatures per timed batch")
    args = parser.parse_args(argv)
    for alg, (before, after) in measure(args.n).items():
        print(
            f"{alg}: joserfc {before:6.1f} us CPU/sign, cryptography direct {after:6.1f} us "
            f"({after / before:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
