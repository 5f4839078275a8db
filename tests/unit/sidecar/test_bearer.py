"""The held token as sealed mode's egress sees it, on the sidecar's holder and refresher over
a scripted CP and a fake clock: the ``GET /token`` rules for a call (fetch when nothing usable
is held, one fetch shared), ``NoToken`` with the reason and the wait when there is none, a
token that cannot go in a header never sent, and an upstream's 401 forcing one fresh token
(not within 5 s of the last fetch)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from cp_token.client import FetchedToken
from sidecar.bearer import HeldBearer, NoToken
from tests.fakes.client import Script, ok, refused
from tests.fakes.sidecar_rig import Rig


async def test_a_call_with_nothing_held_fetches_once_for_everyone(tmp_path: Path) -> None:
    cp = Script(ok("t1"), ok("t2"))
    rig = Rig(cp, tmp_path)
    bearer = HeldBearer(rig.refresher, min_ttl=60)
    assert await asyncio.gather(*(bearer.current() for _ in range(5))) == ["t1"] * 5
    assert await bearer.current() == "t1"  # held: no fetch
    assert cp.count == 1


async def test_less_than_min_ttl_left_fetches_first(tmp_path: Path) -> None:
    cp = Script(ok("t1", 100), ok("t2", 100))
    rig = Rig(cp, tmp_path)
    bearer = HeldBearer(rig.refresher, min_ttl=60)
    assert await bearer.current() == "t1"
    rig.clock.advance(50)  # 50 s left, under min_ttl
    assert await bearer.current() == "t2"
    assert cp.count == 2


async def test_no_token_says_why_and_when_to_come_back(tmp_path: Path) -> None:
    rig = Rig(Script(httpx.ConnectError("connection refused")), tmp_path)
    with pytest.raises(NoToken) as down:
        await HeldBearer(rig.refresher, min_ttl=60).current()
    assert down.value.reason.startswith("no unexpired token held: ")
    assert down.value.retry_after >= 1
    rig = Rig(Script(refused(403, "not a session runner")), tmp_path)
    with pytest.raises(NoToken) as refusal:
        await HeldBearer(rig.refresher, min_ttl=60).current()
    assert refusal.value.reason == "no unexpired token held: the CP refused this pod (403)"
    assert (refusal.value.rejected, refusal.value.description) == (403, "not a session runner")
    assert down.value.rejected is None


async def test_a_token_that_cannot_be_sent_in_a_header_is_never_sent(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    now = rig.clock.monotonic()
    rig.holder.succeeded(FetchedToken("a b\r\nX-Evil: 1", 900, None, now))
    with pytest.raises(NoToken) as info:
        await HeldBearer(rig.refresher, min_ttl=60).current()
    assert info.value.reason == "the held token cannot be sent in a header"
    assert "Evil" not in str(info.value)


async def test_an_upstream_401_forces_one_fresh_token_but_not_within_5_s(tmp_path: Path) -> None:
    cp = Script(ok("t1"), ok("t2"), ok("t2"))
    rig = Rig(cp, tmp_path)
    bearer = HeldBearer(rig.refresher, min_ttl=60)
    assert await bearer.current() == "t1"
    assert await bearer.after_rejection("t1") is None  # fetched moments ago: no new fetch
    assert cp.count == 1
    rig.clock.advance(6)
    assert await bearer.after_rejection("t1") == "t2"  # the call is repeated with it
    assert cp.count == 2
    rig.clock.advance(6)
    assert await bearer.after_rejection("t2") is None  # the CP gave the same one back
    assert cp.count == 3
