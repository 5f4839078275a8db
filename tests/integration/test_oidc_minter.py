"""The oidc minter in-process on the real clock against the fake IdP: its background task
refreshes ahead of expiry with no request asking (real time: upstream tokens of 4 s)."""

from __future__ import annotations

import asyncio
import random

from cp_token.identity import Identity
from cp_token.minters.oidc import OidcMinter
from cp_token.runtime.clock import SystemClock
from tests.fakes.idp import FakeIdP

WHO = Identity("system:serviceaccount:ns:session-1-sa")


async def test_oidc_background_refresh_keeps_requests_off_the_idp(idp: FakeIdP) -> None:
    """With a short lifetime the background task refreshes before requests need it."""
    idp.set_expires_in(4)
    m = OidcMinter(
        token_url=idp.token_url,
        client_id=idp.client_id,
        client_secret=lambda: idp.client_secret,
        min_ttl=1,
        clock=SystemClock(),
        rng=random.Random(1),
    )
    task = asyncio.create_task(m.run())
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while idp.calls() < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert idp.calls() >= 3  # refreshed ahead of expiry, repeatedly, with no request
        tok = await m.mint(WHO)
        assert tok.expires_at is not None
    finally:
        task.cancel()
        await m.aclose()
