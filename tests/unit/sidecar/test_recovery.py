"""The sidecar's recovery, through its routes and its refresh loop on a fake clock: with
nothing held a request fetches at once (at most once a second); after a refusal a rotated SA
token file is tried at once; ``?min_ttl`` within 5 s fetches unless the last token was
already shorter."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.fakes.client import Script, ok, refused
from tests.fakes.clock import SteppedClock
from tests.fakes.sidecar_rig import Rig


async def settle(predicate: Callable[[], bool], what: str, rounds: int = 5000) -> None:
    """Let the event loop run until ``predicate()`` holds (bounded, no wall-clock waits)."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not reached: {what}")


async def test_with_nothing_held_a_request_fetches_at_once_after_a_long_outage(
    tmp_path: Path,
) -> None:
    down = httpx.ConnectError("connection refused")
    cp = Script(ok("t1", 10), *[down] * 12, ok("t2", 10))
    rig = Rig(cp, tmp_path)
    assert (await rig.get()).json()["token"] == "t1"
    # the CP goes away for longer than the token's life; the holder backs off (to 2 s at
    # most, now that nothing is held)
    start = rig.clock.monotonic()
    while True:
        due = rig.holder.next_fetch_at()
        assert due is not None
        assert due - rig.clock.monotonic() <= 2 or rig.holder.ready
        if rig.clock.monotonic() - start > 10 and due - rig.clock.monotonic() > 1.2:
            break
        rig.clock.advance(max(0.0, due - rig.clock.monotonic()))
        await rig.refresher.fetch()
    assert not rig.holder.ready
    fetched = cp.count
    rig.clock.advance(1)
    response = await rig.get()  # a request, whatever the backoff: one fetch (still down)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"  # ask again in a second
    assert cp.count == fetched + 1
    assert (await rig.get()).status_code == 503
    assert cp.count == fetched + 1  # at most one fetch a second
    while cp.count < 13:  # the outage lasts: one fetch per second of requests
        rig.clock.advance(1)
        assert (await rig.get()).status_code == 503
    rig.clock.advance(1)  # the CP is back: the next request gets a token at once
    response = await rig.get()
    assert response.status_code == 200 and response.json()["token"] == "t2"


async def test_after_a_refusal_a_rotated_sa_token_is_tried_at_once(tmp_path: Path) -> None:
    def cp_answer(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer rotated-sa-token":
            return ok("t1")
        return refused(401, "the ServiceAccount token is not valid")

    cp = Script(cp_answer)
    clock = SteppedClock()
    rig = Rig(cp, tmp_path, clock=clock)
    loop = asyncio.create_task(rig.refresher.run())
    try:
        await settle(lambda: rig.holder.rejection is not None, "the refusal")
        assert (await rig.get()).status_code == 401  # relayed
        for _ in range(4):  # the file is unchanged: no new fetch, however often it is polled
            await settle(lambda: clock.sleepers > 0, "the refresher asleep")
            clock.advance(0.5)
            await settle(lambda: True, "")
        assert cp.count == 1
        sa = tmp_path / "sa-token"
        (tmp_path / "sa-token.new").write_text("rotated-sa-token")
        os.replace(tmp_path / "sa-token.new", sa)  # as kubelet swaps it
        await settle(lambda: clock.sleepers > 0, "the refresher asleep")
        clock.advance(0.5)
        await settle(lambda: rig.holder.ready, "a token after the rotation")
        assert cp.count == 2
        assert rig.holder.rejection is None
        assert (await rig.get()).json()["token"] == "t1"
        assert clock.monotonic() - 1000 < 3  # not the 30-60 s slow retry
    finally:
        loop.cancel()


async def test_min_ttl_within_5_s_of_a_fetch_fetches_unless_the_token_was_shorter(
    tmp_path: Path,
) -> None:
    rig = Rig(Script(ok("t1", 100), ok("t2", 100), ok("t3", 100)), tmp_path)
    assert (await rig.get(params={"min_ttl": "5"})).json()["token"] == "t1"
    rig.clock.advance(2)  # 98 s left
    fresh = await rig.get(params={"min_ttl": "99"})  # the CP gives 100 s: worth a fetch
    assert fresh.json()["token"] == "t2" and fresh.json()["expires_in"] == 100
    rig.clock.advance(2)
    held = await rig.get(params={"min_ttl": "150"})  # it gave 100 s moments ago: no fetch
    assert held.json()["token"] == "t2" and held.json()["expires_in"] == 98
    assert rig.cp.count == 2


async def test_a_request_right_after_the_sa_token_rotates_gets_a_token(tmp_path: Path) -> None:
    """No wait for the loop's poll: the request itself sees the new file (SPEC: "as soon as
    the SA token file has changed")."""

    def cp_answer(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer rotated-sa-token":
            return ok("t1")
        return refused(403, "not a session runner")

    cp = Script(cp_answer)
    rig = Rig(cp, tmp_path, clock=SteppedClock())
    assert (await rig.get()).status_code == 403  # relayed
    assert (await rig.get()).status_code == 403  # the file is unchanged: no new fetch
    assert cp.count == 1
    (tmp_path / "sa-token.new").write_text("rotated-sa-token")
    os.replace(tmp_path / "sa-token.new", tmp_path / "sa-token")
    answer = await rig.get()  # no time has passed
    assert answer.status_code == 200 and answer.json()["token"] == "t1"
    assert cp.count == 2
