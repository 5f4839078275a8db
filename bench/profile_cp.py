"""The CP's own cost per warm ``GET /token``, in-process: no sockets, no HTTP parser.

    .venv/bin/python bench/profile_cp.py [--requests 20000] [--minter jwt|static] [--no-reuse]
                                         [--profile]

Builds the service the way ``cp-token serve`` does (``build_service``; static authn, so no
API server is needed) and calls its ASGI app directly with a prepared scope, so what is
measured is everything behind uvicorn: routing, bearer parsing, the review cache, the rate
limit, the policy, the minter, the body, metrics and the audit line (written to /dev/null
through the configured handler). ``--no-reuse`` makes the ``jwt`` minter sign every request
(no reuse window). ``--profile`` prints cProfile's top functions. The audit
handler, levels and format are the real ones (``setup_logging``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cp_token.runtime.logs import setup_logging  # noqa: E402
from cp_token.settings.cp import load_settings  # noqa: E402
from cp_token.wiring import build_service  # noqa: E402

TOKEN = "bench-static-sa-token"
IDENTITY = {
    "token": TOKEN,
    "username": "system:serviceaccount:session-a:session-b0-sa",
    "extra": {
        "authentication.kubernetes.io/pod-name": ["runner-b0"],
        "authentication.kubernetes.io/pod-uid": ["u0"],
    },
}


def build(workdir: Path, minter: str) -> Any:
    """The service's ASGI app, static authn, the given minter."""
    ids = workdir / "ids.json"
    ids.write_text(json.dumps({"identities": [IDENTITY]}))
    env = {
        "CP_TOKEN_URL": "http://127.0.0.1:8080/token",
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
        "CP_TOKEN_MINTER": minter,
        "CP_TOKEN_STATIC_TOKEN": "bench-static-api-token",
        "CP_TOKEN_RATE_LIMIT": "100000/s,100000",
    }
    return build_service(load_settings(env)).app


async def drive(app: Any, n: int) -> float:
    """Seconds for ``n`` sequential requests through the ASGI app."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/token",
        "raw_path": b"/token",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"authorization", f"Bearer {TOKEN}".encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(dict(scope), receive, send)  # warm the caches
    if status != [200]:
        raise RuntimeError(f"first request answered {status}")
    started = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    took = time.perf_counter() - started
    if set(status) != {200}:
        raise RuntimeError(f"answers: {set(status)}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--minter", default="jwt", choices=("jwt", "static"))
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-reuse", action="store_true", help="sign every request")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    with tempfile.TemporaryDirectory() as tmp:
        os.dup2(devnull, 2)  # the audit lines (and the start-up lines) go nowhere
        try:
            setup_logging(args.log_level, "json")
            app = build(Path(tmp), args.minter)
            if args.no_reuse and args.minter == "jwt":
                app.state.minter.reuse_window = 0.0
            loop = asyncio.new_event_loop()
            profiler = cProfile.Profile() if args.profile else None
            if profiler:
                profiler.enable()
            took = loop.run_until_complete(drive(app, args.requests))
            if profiler:
                profiler.disable()
            loop.close()
        finally:
            os.dup2(saved, 2)
    reuse = " (a new signature every request)" if args.no_reuse else ""
    print(f"{args.minter} minter{reuse}: {took / args.requests * 1e6:.1f} us per request")
    if profiler:
        stats = pstats.Stats(profiler).strip_dirs().sort_stats("tottime")
        stats.print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
