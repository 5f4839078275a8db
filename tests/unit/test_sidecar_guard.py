"""The sidecar's request guard under arbitrary headers: it never raises, and a token route is
only ever open to a loopback Host with the opt-in header and no Origin / X-Forwarded-For."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.app import refusal

HEADER_BYTES = st.binary(max_size=80)
LOOPBACK_HINTS = (b"127.", b"localhost", b"::1")


@settings(max_examples=500, deadline=None)
@given(
    host=st.one_of(st.none(), HEADER_BYTES, st.sampled_from([b"localhost:8099", b"[::1]:1"])),
    opt_in=st.one_of(st.none(), HEADER_BYTES, st.sampled_from([b"true", b"TRUE", b"True"])),
    origin=st.one_of(st.none(), HEADER_BYTES),
    xff=st.one_of(st.none(), HEADER_BYTES),
)
def test_guard_never_raises_and_only_opens_for_loopback_opt_in(
    host: bytes | None, opt_in: bytes | None, origin: bytes | None, xff: bytes | None
) -> None:
    headers: dict[bytes, bytes] = {}
    for name, value in (
        (b"host", host),
        (b"ambient-token-request", opt_in),
        (b"origin", origin),
        (b"x-forwarded-for", xff),
    ):
        if value is not None:
            headers[name] = value
    reason = refusal(headers)
    assert reason is None or isinstance(reason, str)
    if reason is None:
        assert origin is None and xff is None
        assert opt_in is not None and opt_in.lower() == b"true"
        assert host is not None and any(h in host.lower() for h in LOOPBACK_HINTS)
