"""The probe port every server shares: ``/healthz`` while serving, ``/readyz`` 503 with a
reason class only (the port is reachable from the network: never configuration, identity or
an upstream's words), ``/metrics`` rendering the registry at each scrape."""

from __future__ import annotations

import httpx

from cp_token.http.health import METRICS_MEDIA_TYPE, probe_app


async def get(app: object, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        return await client.get(path)


async def test_healthz_answers_whatever_the_readiness() -> None:
    app = probe_app(lambda: b"", lambda: "the IdP is down")
    answer = await get(app, "/healthz")
    assert answer.status_code == 200 and answer.text == "ok"


async def test_readyz_follows_the_readiness_callback_at_each_request() -> None:
    problem: list[str | None] = [None]
    app = probe_app(lambda: b"", lambda: problem[0])
    assert (await get(app, "/readyz")).text == "ok"
    problem[0] = "signing_key"
    answer = await get(app, "/readyz")
    assert answer.status_code == 503 and answer.text == "not ready: signing_key"
    problem[0] = None
    assert (await get(app, "/readyz")).status_code == 200


async def test_anything_but_a_reason_class_is_not_shown() -> None:
    for words in ("invalid_client: OIDC_CLIENT_ID=cp " + "y" * 10_000, "Not A Class", "a" * 41):
        app = probe_app(lambda w=words: b"", lambda w=words: w)  # type: ignore[misc]
        answer = await get(app, "/readyz")
        assert (answer.status_code, answer.text) == (503, "not ready")


async def test_metrics_are_rendered_at_each_scrape() -> None:
    scrapes = [0]

    def render() -> bytes:
        scrapes[0] += 1
        return b"up %d\n" % scrapes[0]

    app = probe_app(render, lambda: None)
    first, second = await get(app, "/metrics"), await get(app, "/metrics")
    assert (first.text, second.text) == ("up 1\n", "up 2\n")
    assert first.headers["content-type"] == METRICS_MEDIA_TYPE
    assert (await get(app, "/token")).status_code == 404  # nothing else on this port
