"""The serving helpers the CP, the sidecar and the injector share: binding both ports,
the HTTPS server with certificate reload, and background tasks that end the process."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import trustme

from cp_token.http.serving import TlsFiles, api_server, background, bind_serving
from cp_token.runtime.errors import ConfigError
from cp_token.runtime.filewatch import FileWatcher, WatchedFile


async def app(scope: object, receive: object, send: object) -> None:
    """An ASGI app that is never called."""


async def forever() -> None:
    await asyncio.Event().wait()


async def fails() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("boom")


async def returns() -> None:
    await asyncio.sleep(0)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_job_that_raises_is_reported_with_its_exception() -> None:
    deaths: list[tuple[str, BaseException]] = []
    async with background({"job": fails(), "other": forever()}, lambda *d: deaths.append(d)):
        await settle()
    assert [(name, str(exc)) for name, exc in deaths] == [("job", "boom")]


async def test_returning_is_fatal_unless_allowed() -> None:
    deaths: list[str] = []
    jobs = {"may": returns(), "must-not": returns()}
    async with background(jobs, lambda name, exc: deaths.append(name), may_return={"may"}):
        await settle()
    assert deaths == ["must-not"]


async def test_leaving_cancels_every_job_without_reporting_it() -> None:
    deaths: list[str] = []
    task_names: set[str] = set()
    async with background({"a": forever(), "b": forever()}, lambda n, e: deaths.append(n)):
        await settle()
        task_names = {t.get_name() for t in asyncio.all_tasks()}
    assert {"a", "b"} <= task_names
    assert not {t.get_name() for t in asyncio.all_tasks()} & {"a", "b"}
    assert deaths == []


def test_a_busy_probe_port_names_its_variable_and_leaves_nothing_open() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            probes = ("PROBE_ADDR", "127.0.0.1", port)
            bind_serving("API_ADDR", "127.0.0.1", 0, limit_name="cap", probes=probes)
    assert info.value.variable == "PROBE_ADDR"
    assert f"127.0.0.1:{port}" in str(info.value)


def test_both_ports_are_bound() -> None:
    sockets = bind_serving(
        "API_ADDR", "127.0.0.1", 0, limit_name="cap", probes=("PROBE_ADDR", "127.0.0.1", 0)
    )
    try:
        assert len(sockets) == 2
        assert sockets[0].limit_name == "cap"
        assert sockets[0].max_connections > sockets[1].max_connections
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def tls_pair(tmp_path: Path) -> TlsFiles:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf = trustme.CA().issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return TlsFiles(("CERT_FILE", str(cert)), ("KEY_FILE", str(key)))


def test_https_server_loads_now_and_reloads_on_change(tls_pair: TlsFiles) -> None:
    watcher = FileWatcher()
    server = api_server(app, graceful_seconds=1, tls=tls_pair, watcher=watcher)
    assert server.config.ssl is not None
    assert server.config.lifespan == "on"
    assert len(watcher) == 2  # the certificate and the key


def test_a_certificate_that_does_not_load_names_its_variable(tls_pair: TlsFiles) -> None:
    Path(tls_pair.cert[1]).write_text("not a certificate")
    with pytest.raises(ConfigError) as info:
        api_server(app, graceful_seconds=1, tls=tls_pair)
    assert info.value.variable == "CERT_FILE"


def test_plain_http_needs_no_certificate() -> None:
    server = api_server(app, graceful_seconds=1)
    assert server.config.ssl_certfile is None and not server.config.loaded  # nothing to load


def test_a_watched_file_tells_a_subscriber_built_later(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_text("one")
    watched = WatchedFile("VALUE_FILE", str(path), bytes.decode)
    heard: list[str] = []
    watched.subscribe(heard.append)
    assert watched.get() == "one"
    path.write_text("two")
    assert watched.check() is True
    assert heard == ["two"] and watched.get() == "two"
