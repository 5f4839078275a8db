"""Fixtures shared by the integration tests (helpers: tests/integration/*_rig.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cp_token.runtime.clock import FakeClock
from cp_token.settings.cp import load_settings
from cp_token.wiring import build_service
from tests.integration.cp_rig import CP, settings_env


@pytest.fixture(params=["tokenreview", "jwks"])
def authn(request: pytest.FixtureRequest) -> str:
    """Each case runs for both authenticators: the outcome must not depend on which one ran."""
    return str(request.param)


@pytest.fixture
async def make_cp(kubeconfig: Path) -> AsyncIterator[Any]:
    """``make_cp(authn, **env)``: a :class:`~tests.integration.cp_rig.CP` on a fake clock that
    starts now; every CP made is closed after the test."""
    made: list[CP] = []

    def make(authn: str, **extra: str) -> CP:
        clock = FakeClock(start=time.time())
        settings = load_settings(settings_env(kubeconfig, authn, **extra))
        cp = CP(build_service(settings, clock), clock)
        made.append(cp)
        return cp

    yield make
    for cp in made:
        await cp.aclose()
