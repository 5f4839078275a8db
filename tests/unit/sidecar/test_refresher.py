"""The refresh loop and the app's lifespan: background fetches, the token file's life,
logging discipline, and a dying loop reported as fatal."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cp_token.runtime.clock import FakeClock
from tests.fakes.client import Script, ok, refused, unavailable
from tests.fakes.clock import SteppedClock
from tests.fakes.loop import run_until
from tests.fakes.sidecar_rig import ManualClock, Rig


async def settle(predicate: object, deadline: float = 10.0) -> None:
    """Let the event loop run until ``predicate()`` holds. Bounded in real time, not in
    rounds: the token file is written in a worker thread, which a loaded machine may
    schedule after thousands of rounds (time itself moves only on the fake clock)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not predicate():  # type: ignore[operator]
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0)


async def test_the_lifespan_fetches_before_any_request(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1")), tmp_path, clock=ManualClock())
    async with rig.app.lifespan_context():
        await settle(lambda: rig.holder.ready)
        assert (await rig.client.get("/readyz")).status_code == 200
        assert rig.cp.count == 1
    assert rig.cp.count == 1


async def test_a_dying_loop_is_reported_as_fatal(tmp_path: Path) -> None:
    """A bug in the loop itself (not an answer: any answer is a failed fetch) ends it."""

    def explode() -> float:
        raise RuntimeError("bug")

    fatal: list[BaseException] = []
    rig = Rig(Script(ok("t")), tmp_path, clock=ManualClock(), fatal=fatal)
    rig.holder.next_fetch_at = explode  # type: ignore[method-assign]
    async with rig.app.lifespan_context():
        await settle(lambda: fatal)
    assert isinstance(fatal[0], RuntimeError)


async def test_the_loop_refreshes_at_half_life_and_rewrites_the_file(tmp_path: Path) -> None:
    clock = FakeClock()
    token_file = tmp_path / "token"
    asked_at: list[float] = []

    def issue(token: str) -> Callable[[httpx.Request], httpx.Response]:
        def answer(request: httpx.Request) -> httpx.Response:
            asked_at.append(clock.monotonic())
            return ok(token, 100)

        return answer

    file_at_third_fetch: list[str] = []

    def third(request: httpx.Request) -> httpx.Response:
        # read here: on the fake clock the loop runs on to the token's expiry (file removed)
        # before the test can look
        file_at_third_fetch.append(token_file.read_text())
        return unavailable()

    rig = Rig(
        Script(issue("t1"), issue("t2"), third),
        tmp_path,
        clock=clock,
        token_file=token_file,
    )
    task = asyncio.create_task(rig.refresher.run())
    await settle(lambda: rig.cp.count >= 3)
    task.cancel()
    assert 45 <= asked_at[1] - asked_at[0] <= 55  # half of 100 s, +-10 %
    assert file_at_third_fetch == ["t2"]


async def test_outage_keeps_the_token_then_removes_the_file_at_expiry(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    cp = Script(ok("t1", 100), unavailable())
    rig = Rig(cp, tmp_path, token_file=token_file)
    task = asyncio.create_task(rig.refresher.run())
    await settle(lambda: token_file.exists() and rig.holder.ready)
    expiry = rig.holder.current().expiry  # type: ignore[union-attr]
    observed_before_expiry = []

    def gone() -> bool:
        if token_file.exists():
            # never past expiry (the loop wakes at the expiry instant to remove it)
            assert rig.clock.monotonic() <= expiry
            observed_before_expiry.append(rig.clock.monotonic())
            return False
        return True

    await settle(gone)
    task.cancel()
    assert rig.clock.monotonic() >= expiry
    assert not rig.holder.ready
    assert cp.count > 3  # it kept retrying through the outage
    retries_before = [r for r in observed_before_expiry if r > expiry - 2]
    assert retries_before  # and was still holding the token right up to the end


async def test_refusals_are_logged_once_per_description(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar")
    cp = Script(
        refused(403, "not managed"),
        refused(403, "not managed"),
        refused(403, "not pod-bound"),
        refused(403, "not managed"),
        ok("secret-token-value"),
        unavailable(),
    )
    rig = Rig(cp, tmp_path)
    for _ in range(6):
        await rig.refresher.fetch()
    refusals = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.fields["description"] for r in refusals] == [  # type: ignore[attr-defined]
        "not managed",
        "not pod-bound",
    ]
    assert "secret-token-value" not in caplog.text
    assert "sa-token" not in caplog.text


async def test_the_file_is_written_before_the_token_is_served(tmp_path: Path) -> None:
    """Ready means the file is there: a consumer started by /readyz reads it at once."""
    token_file = tmp_path / "token"
    rig = Rig(Script(ok("t1", 100)), tmp_path, clock=FakeClock(), token_file=token_file)
    seen: list[bool] = []
    served = rig.holder.succeeded

    def succeeded(token: object) -> None:
        seen.append(token_file.exists())
        served(token)  # type: ignore[arg-type]

    rig.holder.succeeded = succeeded  # type: ignore[method-assign]
    await rig.refresher.fetch()
    assert seen == [True]
    assert rig.holder.ready and token_file.read_text() == "t1"


# --- a token file an earlier run left ------------------------------------------------------


def jwt(exp: float | str | None) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    claims: dict[str, object] = {"sub": "system:serviceaccount:ns:session-1-sa"}
    if exp is not None:
        claims["exp"] = exp
    return f"{part({'alg': 'ES256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


async def test_a_left_over_unexpired_jwt_is_served_then_removed_at_its_expiry(
    tmp_path: Path,
) -> None:
    """A sidecar restarted during a CP outage: the token the file holds is served, on the
    monotonic clock, and the file goes when it expires (before: it stayed there, 21.6 s
    past expiry in the finding)."""
    clock = FakeClock()
    token_file = tmp_path / "token"
    left = jwt(clock.time() + 100)
    token_file.write_text(left)
    cp = Script(httpx.ConnectError("the CP is down"))
    rig = Rig(cp, tmp_path, clock=clock, token_file=token_file)
    start = clock.monotonic()
    await rig.refresher.adopt_left_over()
    served = await rig.get()
    assert served.status_code == 200
    assert served.json()["token"] == left
    assert 98 <= served.json()["expires_in"] <= 100
    assert rig.holder.next_fetch_at() <= clock.monotonic()  # type: ignore[operator]
    task = asyncio.create_task(rig.refresher.run())  # a fetch at once, failing, and on
    await settle(lambda: not token_file.exists())
    task.cancel()
    assert 99 <= clock.monotonic() - start <= 100.5
    assert cp.count >= 2  # it kept trying the CP meanwhile
    assert not rig.holder.ready


@pytest.mark.parametrize(
    "content",
    ["expired", "no-exp", "string-exp", "huge-exp", "not-a-jwt", "garbage", "newline", "empty"],
)
async def test_anything_else_left_in_the_token_file_is_removed_at_once(
    tmp_path: Path, content: str
) -> None:
    clock = FakeClock()
    token_file = tmp_path / "token"
    data = {
        "expired": jwt(clock.time() - 1).encode(),
        "no-exp": jwt(None).encode(),
        "string-exp": jwt("soon").encode(),
        "huge-exp": jwt(1e300).encode(),
        "not-a-jwt": b"opaque-static-token",
        "garbage": b"\xff\xfe\x00binary",
        "newline": jwt(clock.time() + 100).encode() + b"\nX",
        "empty": b"",
    }[content]
    token_file.write_bytes(data)
    rig = Rig(Script(httpx.ConnectError("down")), tmp_path, clock=clock, token_file=token_file)
    await rig.refresher.adopt_left_over()
    assert not token_file.exists()
    assert not rig.holder.ready


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
        await run_until(lambda: rig.holder.rejection is not None, "the refusal")
        assert (await rig.get()).status_code == 401  # relayed
        for _ in range(4):  # the file is unchanged: no new fetch, however often it is polled
            await run_until(lambda: clock.sleepers > 0, "the refresher asleep")
            clock.advance(0.5)
            await run_until(lambda: clock.sleepers > 0, "the refresher asleep again")
        assert cp.count == 1
        sa = tmp_path / "sa-token"
        (tmp_path / "sa-token.new").write_text("rotated-sa-token")
        os.replace(tmp_path / "sa-token.new", sa)  # as kubelet swaps it
        await run_until(lambda: clock.sleepers > 0, "the refresher asleep")
        clock.advance(0.5)
        await run_until(lambda: rig.holder.ready, "a token after the rotation")
        assert cp.count == 2
        assert rig.holder.rejection is None
        assert (await rig.get()).json()["token"] == "t1"
        assert clock.monotonic() - 1000 < 3  # not the 30-60 s slow retry
    finally:
        loop.cancel()
