"""The serving helpers the CP, the sidecar and the injector share: ``ServerGroup`` (servers run
and stop together), binding both ports, the HTTPS server with certificate reload, background
tasks that end the process, and the file-descriptor budget (the soft limit is raised towards
the hard one and the connection caps are fitted below it, so accepting never fails for want of
a descriptor)."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from pathlib import Path

import pytest
import trustme
import uvicorn
from starlette.applications import Starlette

from cp_token.http import serving
from cp_token.http.edge import EdgeListener
from cp_token.http.serving import (
    FD_RESERVE,
    MIN_CONNECTIONS,
    QuietSignalsServer,
    ServerGroup,
    TlsFiles,
    api_server,
    background,
    bind_listener,
    bind_serving,
    fit_connection_caps,
    raise_fd_limit,
)
from cp_token.runtime.errors import ConfigError
from cp_token.runtime.filewatch import FileWatcher
from tests.fakes.loop import run_until


def server() -> QuietSignalsServer:
    config = uvicorn.Config(Starlette(), lifespan="off", log_config=None, access_log=False)
    return QuietSignalsServer(config)


async def wait_started(*servers: QuietSignalsServer) -> None:
    """Starting binds nothing new (the sockets are bound): a few rounds of the loop."""
    await run_until(lambda: all(s.started for s in servers), "the servers started")


async def test_stop_with_a_code_stops_every_server_and_is_the_exit_code() -> None:
    group = ServerGroup()
    api, metrics = server(), server()
    pairs = ((api, bind_listener("127.0.0.1", 0)), (metrics, bind_listener("127.0.0.1", 0)))
    serving = asyncio.create_task(group.serve(*pairs))
    await wait_started(api, metrics)
    group.stop(1)  # a background task died
    assert await asyncio.wait_for(serving, 10) == 1
    assert api.should_exit and metrics.should_exit


async def test_a_second_stop_forces_exit() -> None:
    group = ServerGroup()
    api = server()
    serving = asyncio.create_task(group.serve((api, bind_listener("127.0.0.1", 0))))
    await wait_started(api)
    group.stop(0)
    assert not api.force_exit
    group.stop(0)
    assert api.force_exit
    assert await asyncio.wait_for(serving, 10) == 0


async def test_a_stop_before_serving_is_kept() -> None:
    group = ServerGroup()
    group.stop(1)
    api = server()
    code = await asyncio.wait_for(group.serve((api, bind_listener("127.0.0.1", 0))), 10)
    assert code == 1


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


class FakeRlimit:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.soft, self.hard = limits


@pytest.mark.parametrize(
    ("soft", "hard", "refuse", "expected"),
    [
        (1024, 1048576, False, 1048576),
        (1024, resource.RLIM_INFINITY, False, serving.FD_TARGET_UNLIMITED),
        (4096, 4096, False, 4096),
        (1024, 8192, True, 1024),
    ],
)
def test_the_soft_limit_is_raised_towards_the_hard_one(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, refuse: bool, expected: int
) -> None:
    fake = FakeRlimit(soft, hard, refuse)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    assert raise_fd_limit() == expected
    assert fake.soft == expected


def listener(cap: int) -> EdgeListener:
    return EdgeListener(socket.AF_INET, max_connections=cap, limit_name="CP_TOKEN_MAX_CONNECTIONS")


def test_caps_that_fit_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    api, probes = listener(4096), listener(64)
    with api, probes:
        fit_connection_caps([api, probes], 4096 + 64 + FD_RESERVE)
        assert (api.max_connections, probes.max_connections) == (4096, 64)
    assert not caplog.records


def test_the_primary_cap_gives_way_to_the_descriptor_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api, probes = listener(4096), listener(64)
    with api, probes, caplog.at_level(logging.WARNING):
        fit_connection_caps([api, probes], 1024)
        assert api.max_connections == 1024 - FD_RESERVE - 64
        assert probes.max_connections == 64
    assert "CP_TOKEN_MAX_CONNECTIONS=4096" in caplog.text and "1024" in caplog.text
    tiny = listener(4096)
    with tiny:
        fit_connection_caps([tiny], 100)
        assert tiny.max_connections == MIN_CONNECTIONS
