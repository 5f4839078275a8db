"""Run an ASGI app on loopback in a background thread, and inject faults into it.

Both test doubles (the fake kube-apiserver and the fake IdP) are real HTTP servers: uvicorn
serves a Starlette app on 127.0.0.1 from its own thread and event loop, so the product's
clients reach them through real sockets, TLS and HTTP parsing, from sync and async code alike.

`LoopbackServer` owns the thread, the socket and (optionally) a trustme CA. `FaultPlan` is
the thread-safe record of latency, failure modes and call counts per route, and `gate()` is
the coroutine every endpoint awaits first so those faults take effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Self

import trustme
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["BASE_FAULT_MODES", "FaultPlan", "LoopbackFake", "LoopbackServer", "gate"]

#: Fault modes every fake understands; a fake may accept more (the IdP adds "invalid_client").
BASE_FAULT_MODES: frozenset[str] = frozenset({"500", "hang", "reset"})

_HOST = "127.0.0.1"


def _bind_loopback(port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1 (port 0 picks a free one), not yet listening.

    Bound but not listening, it reserves the port while connections to it are refused,
    which is what a client sees of a server that is down; uvicorn calls listen() at start.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((_HOST, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that reports readiness and can be woken instead of ticking 0.1 s."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._wake: asyncio.Event | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._wake = asyncio.Event()
        await super().startup(sockets=sockets)
        if self.started:
            self._on_ready()

    async def main_loop(self) -> None:
        # Same as uvicorn's loop, but stop() can wake it at once (faster fixture teardown).
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            assert self._wake is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own shutdown sleeps a fixed 0.1 s and polls every 0.1 s; a fake is torn
        # down after every test, so do the same steps but poll finely.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.timeout_graceful_shutdown or 1)
        state = self.server_state
        while (state.connections or state.tasks) and not self.force_exit:
            if loop.time() > deadline:
                for task in state.tasks:
                    task.cancel(msg="fake server stopping")
                break
            await asyncio.sleep(0.005)
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    def wake(self) -> None:
        """Make the main loop re-check `should_exit` now (call in the loop thread)."""
        if self._wake is not None:
            self._wake.set()


class LoopbackServer:
    """Serve an ASGI app with uvicorn on 127.0.0.1 from a background thread.

    The port is chosen once (lazily, on first use of `port`/`url` or on `start()`) and kept
    across `stop()`/`start()`, so a test can take a dependency "down" and bring it back on the
    same address. With `tls=True` a fresh trustme CA issues the server certificate for
    127.0.0.1 and localhost; `ca_pem` is what clients must trust.
    """

    def __init__(self, app: ASGIApp, *, tls: bool = False, name: str = "fake-server") -> None:
        self._app = app
        self._name = name
        self._ca: trustme.CA | None = trustme.CA() if tls else None
        self._leaf: trustme.LeafCert | None = (
            self._ca.issue_cert(_HOST, "localhost") if self._ca is not None else None
        )
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._server: _Uvicorn | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        # Loop-thread-only state (created at startup, in the server's loop).
        self._changed: asyncio.Event | None = None
        self._transports: dict[tuple[str, int], asyncio.Transport] = {}

    # -- addresses ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Always 127.0.0.1."""
        return _HOST

    @property
    def port(self) -> int:
        """The TCP port (allocated on first access, stable across restarts)."""
        with self._lock:
            if self._port is None:
                self._sock = _bind_loopback()
                self._port = int(self._sock.getsockname()[1])
            return self._port

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "https" if self._ca is not None else "http"

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``https://127.0.0.1:41234``."""
        return f"{self.scheme}://{_HOST}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        """PEM of the CA that signed the server certificate (TLS only)."""
        if self._ca is None:
            raise RuntimeError(f"{self._name} serves plain HTTP; it has no CA")
        return self._ca.cert_pem.bytes()

    @property
    def running(self) -> bool:
        """True between a successful `start()` and `stop()`."""
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    @property
    def stopping(self) -> bool:
        """True once `stop()` has begun (hanging handlers use it to give up)."""
        return self._stopping.is_set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name} is already running")
        port = self.port
        with self._lock:
            sock = self._sock if self._sock is not None else _bind_loopback(port)
            self._sock = None
        self._ready.clear()
        self._stopping.clear()
        with tempfile.TemporaryDirectory(prefix="fake-tls-") as tmp:
            certfile: str | None = None
            if self._leaf is not None:
                path = Path(tmp) / "server.pem"
                self._leaf.private_key_and_cert_chain_pem.write_to_path(str(path))
                certfile = str(path)
            config = uvicorn.Config(
                self._app,
                http=self._protocol_class(),
                ws="none",
                lifespan="off",
                log_config=None,
                log_level="warning",
                access_log=False,
                ssl_certfile=certfile,
                timeout_graceful_shutdown=1,
                timeout_keep_alive=5,
            )
            config.load()  # builds the SSL context now, so the key file can go at once
        server = _Uvicorn(config, on_ready=self._on_ready)
        self._server = server
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=self._name, daemon=True
        )
        self._thread = thread
        thread.start()
        if not self._ready.wait(timeout) or not thread.is_alive():
            self._stopping.set()
            server.should_exit = True
            thread.join(timeout)
            self._thread = None
            self._server = None
            with contextlib.suppress(OSError):
                sock.close()
            raise RuntimeError(f"{self._name} did not start within {timeout} s")

    def _on_ready(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: release hanging handlers (their connections are aborted), drain, join.

        Idempotent. Raises if the thread did not end within `timeout` seconds.
        """
        thread, server, loop = self._thread, self._server, self._loop
        if thread is None or server is None:
            return
        self._stopping.set()
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._pulse)
        server.should_exit = True
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(server.wake)
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._thread = None
        self._server = None
        self._loop = None
        self._changed = None
        self._ready.clear()
        with self._lock, contextlib.suppress(OSError):
            # Keep the port for a restart; meanwhile connections are refused.
            if self._sock is None:
                self._sock = _bind_loopback(self._port or 0)
        if thread.is_alive():
            raise RuntimeError(f"{self._name} did not stop within {2 * timeout} s")

    def close(self) -> None:
        """Stop, and release a port that was allocated but never served."""
        self.stop()
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # -- cross-thread signalling -------------------------------------------------------------

    def notify(self) -> None:
        """Wake every handler waiting in `wait_until()` (thread-safe, any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._pulse)

    def _pulse(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """In a handler: wait until `predicate()` or the server stops; True if predicate held.

        Re-evaluated whenever `notify()` is called (the control API calls it on every change).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if predicate():
                return True
            if self.stopping:
                return False
            event = self._changed
            if event is None:
                return False
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    async def sleep(self, seconds: float) -> None:
        """In a handler: sleep, but return early when the server stops."""
        if seconds > 0:
            await self.wait_until(lambda: False, timeout=seconds)

    # -- connection control ------------------------------------------------------------------

    def _protocol_class(self) -> type[H11Protocol]:
        transports = self._transports

        class _TrackedH11(H11Protocol):
            """h11 protocol that lets a handler find (and abort) its own connection."""

            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                super().connection_made(transport)
                if self.client is not None:
                    transports[self.client] = transport

            def shutdown(self) -> None:
                # uvicorn close()s idle connections at shutdown; over TLS that waits for the
                # client's close_notify, which an idle pooled client never sends. Drop them.
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.abort()
                else:
                    super().shutdown()

            def connection_lost(self, exc: Exception | None) -> None:
                if self.client is not None and transports.get(self.client) is self.transport:
                    del transports[self.client]
                super().connection_lost(exc)

        return _TrackedH11

    async def abort(self, request: Request) -> None:
        """In a handler: reset the caller's TCP connection (RST, no HTTP response).

        Returns once uvicorn has seen the disconnect, so whatever the handler returns next
        is dropped instead of written.
        """
        client = request.scope.get("client")
        transport = self._transports.get(tuple(client)) if client else None
        if transport is None:
            return
        sock: Any = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # linger 0: close() sends RST instead of FIN, like a crashed peer or a proxy reset.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while (await request.receive())["type"] != "http.disconnect":
                    pass

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> LoopbackServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoopbackFake:
    """Lifecycle and addresses shared by the fakes: they serve through ``self._server``."""

    _server: LoopbackServer

    def start(self) -> Self:
        """Start serving; returns once connections are accepted. Restartable on the same port."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving (hanging requests are reset). The port is kept for a later `start()`."""
        self._server.stop()

    def close(self) -> None:
        """Stop and release the port."""
        self._server.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``https://127.0.0.1:41234`` (the port is fixed on first use)."""
        return self._server.url

    @property
    def port(self) -> int:
        """The TCP port."""
        return self._server.port

    @property
    def ca_pem(self) -> bytes:
        """PEM of the CA that signed the serving certificate (TLS fakes only)."""
        return self._server.ca_pem

    @property
    def running(self) -> bool:
        """True while serving."""
        return self._server.running


class FaultPlan:
    """Thread-safe latency, failure modes and call counters, per route key.

    Precedence: a route's own setting wins; otherwise the setting made with ``route=None``
    applies. `fail(route, mode, times=N)` fails the next N calls, then clears itself.
    Every change calls `on_change` (the server's `notify`), which also releases requests
    currently held by a "hang" fault: they are then answered normally.
    """

    def __init__(
        self,
        modes: Collection[str] = BASE_FAULT_MODES,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._modes = frozenset(modes)
        self._on_change = on_change
        self._lock = threading.Lock()
        self._counted = threading.Condition(self._lock)  # notified on every call
        self._latency: dict[str | None, float] = {}
        self._faults: dict[str | None, tuple[str, int | None]] = {}
        self._counts: dict[str, int] = {}
        self._epoch = 0

    def set_latency(self, seconds: float, route: str | None = None) -> None:
        """Delay answers on `route` (or, with None, on every route without its own delay)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        with self._lock:
            self._latency[route] = float(seconds)
            self._epoch += 1
        self._changed()

    def fail(self, route: str | None, mode: str | None, *, times: int | None = None) -> None:
        """Make `route` (None: every route) fail with `mode`; `mode=None` clears.

        ``fail(None, None)`` clears every fault; ``fail(route, None)`` clears that route's.
        """
        if mode is not None and mode not in self._modes:
            raise ValueError(f"unknown fault mode {mode!r}; expected one of {sorted(self._modes)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            if mode is None:
                if route is None:
                    self._faults.clear()
                else:
                    self._faults.pop(route, None)
            else:
                self._faults[route] = (mode, times)
            self._epoch += 1
        self._changed()

    def clear(self) -> None:
        """Remove all latency and faults (counts are kept)."""
        with self._lock:
            self._latency.clear()
            self._faults.clear()
            self._epoch += 1
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    @property
    def epoch(self) -> int:
        """Increases on every change; a hung request waits for it to move."""
        with self._lock:
            return self._epoch

    def latency(self, route: str) -> float:
        """The delay currently configured for `route`."""
        with self._lock:
            if route in self._latency:
                return self._latency[route]
            return self._latency.get(None, 0.0)

    def take_fault(self, route: str) -> str | None:
        """The fault mode for this call to `route`, consuming one use of a counted fault."""
        with self._lock:
            key: str | None = route if route in self._faults else None
            entry = self._faults.get(key)
            if entry is None:
                return None
            mode, times = entry
            if times is not None:
                if times <= 1:
                    del self._faults[key]
                else:
                    self._faults[key] = (mode, times - 1)
            return mode

    def record_call(self, route: str) -> None:
        """Count one call to `route`."""
        with self._counted:
            self._counts[route] = self._counts.get(route, 0) + 1
            self._counted.notify_all()

    def wait_for_calls(self, route: str, n: int, timeout: float = 5.0) -> bool:
        """Block until `route` has received at least `n` calls: woken by each call, no
        polling; False if `timeout` seconds pass first."""
        with self._counted:
            return self._counted.wait_for(lambda: self._counts.get(route, 0) >= n, timeout)

    def calls(self, route: str | None = None) -> int:
        """Calls received on `route` (None: on all routes) since the last `reset_counts()`."""
        with self._lock:
            if route is None:
                return sum(self._counts.values())
            return self._counts.get(route, 0)

    def reset_counts(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._counts.clear()


async def gate(
    server: LoopbackServer,
    plan: FaultPlan,
    route: str,
    request: Request,
    *,
    error_500: Callable[[], Response],
    custom: Mapping[str, Callable[[], Response]] | None = None,
) -> Response | None:
    """Count the call and apply latency and faults; a Response means "answer this instead".

    - "500": the fake's own error document with status 500;
    - "reset": the TCP connection is reset with no response (the returned Response is dropped);
    - "hang": no answer until the fault plan changes (then answered normally) or the server
      stops (then the connection is reset);
    - a mode in `custom`: that response.
    """
    plan.record_call(route)
    await server.sleep(plan.latency(route))
    if server.stopping:
        await server.abort(request)
        return Response(status_code=503)
    mode = plan.take_fault(route)
    if mode is None:
        return None
    if mode == "500":
        return error_500()
    if mode == "reset":
        await server.abort(request)
        return Response(status_code=503)
    if mode == "hang":
        epoch = plan.epoch
        if not await server.wait_until(lambda: plan.epoch != epoch):
            await server.abort(request)
            return Response(status_code=503)
        return None
    if custom is not None and mode in custom:
        return custom[mode]()
    raise AssertionError(f"fault mode {mode!r} has no handler")
