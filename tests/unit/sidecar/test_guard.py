"""The sidecar's request guard: the headers as sent (duplicates kept), proxies, absolute-form
targets; a property test under arbitrary header lists; the same cases over ASGI."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.app import PROXY_HEADERS, refusal
from tests.fakes.client import Script, ok
from tests.fakes.sidecar_rig import Rig

HOST = (b"host", b"127.0.0.1:8099")
OPT_IN = (b"ambient-token-request", b"true")
LOOPBACK_HINTS = (b"127.", b"localhost", b"::1")


def test_a_plain_loopback_request_passes() -> None:
    assert refusal([HOST, OPT_IN]) is None
    assert refusal({b"host": b"localhost", b"ambient-token-request": b"TRUE"}) is None


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        # the last of two used to win: `false` then `true` passed
        ([HOST, (b"ambient-token-request", b"false"), OPT_IN], "exactly once"),
        ([HOST, OPT_IN, OPT_IN], "exactly once"),
        ([HOST], "Ambient-Token-Request"),
        # `Host: evil` then `Host: 127.0.0.1` passed
        ([(b"host", b"evil.example"), HOST, OPT_IN], "more than one Host"),
        ([HOST, HOST, OPT_IN], "more than one Host"),
        ([OPT_IN], "loopback"),
        ([HOST, OPT_IN, (b"origin", b"null")], "Origin"),
    ],
)
def test_duplicates_and_missing_headers_are_refused(
    headers: list[tuple[bytes, bytes]], fragment: str
) -> None:
    reason = refusal(headers)
    assert reason is not None and fragment in reason


@pytest.mark.parametrize("name", sorted(PROXY_HEADERS))
def test_every_proxy_header_is_refused(name: bytes) -> None:
    reason = refusal([HOST, OPT_IN, (name, b"10.0.0.1")])
    assert reason is not None and PROXY_HEADERS[name] in reason


def test_an_absolute_form_target_is_refused() -> None:
    reason = refusal([HOST, OPT_IN], absolute_target=True)
    assert reason is not None and "absolute-form" in reason


HEADER_NAMES = st.sampled_from(
    [b"host", b"ambient-token-request", b"origin", *PROXY_HEADERS, b"accept", b"user-agent"]
)
HEADER_VALUES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"true", b"TRUE", b"false", b"localhost:8099", b"[::1]:1", b"127.0.0.1"]),
)


@settings(max_examples=500, deadline=None)
@given(headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8))
def test_guard_never_raises_and_only_opens_for_one_loopback_host_and_one_opt_in(
    headers: list[tuple[bytes, bytes]],
) -> None:
    reason = refusal(headers)
    assert reason is None or isinstance(reason, str)
    if reason is None:
        names = [name for name, _ in headers]
        assert b"origin" not in names and not set(names) & set(PROXY_HEADERS)
        hosts = [value for name, value in headers if name == b"host"]
        opt_ins = [value for name, value in headers if name == b"ambient-token-request"]
        assert len(hosts) == 1 and any(h in hosts[0].lower() for h in LOOPBACK_HINTS)
        assert len(opt_ins) == 1 and opt_ins[0].lower() == b"true"


# --- over ASGI (duplicate Host and absolute-form need a real socket: test_sidecar_edge.py) --


async def test_a_false_then_true_opt_in_is_refused(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    headers = [("Ambient-Token-Request", "false"), ("Ambient-Token-Request", "true")]
    response = await rig.client.get("/token", headers=headers)
    assert response.status_code == 403
    assert "exactly once" in response.json()["error_description"]
    assert rig.cp.count == 0


@pytest.mark.parametrize(
    "header",
    ["Forwarded", "X-Real-IP", "Via", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"],
)
async def test_proxy_headers_are_refused_over_asgi(tmp_path: Path, header: str) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    for method in (rig.get, rig.post):
        response = await method(headers={header: "1.0 proxy"})
        assert response.status_code == 403
        named = header if not header.startswith("X-Forwarded-") else "X-Forwarded-"
        assert named in response.json()["error_description"]
    assert rig.cp.count == 0
