"""The file-descriptor budget: the soft limit is raised towards the hard one, and the
connection caps are fitted below it, so accepting never fails for want of a descriptor."""

from __future__ import annotations

import logging
import resource
import socket

import pytest

from cp_token.http import serving
from cp_token.http.edge import EdgeListener
from cp_token.http.serving import FD_RESERVE, MIN_CONNECTIONS, fit_connection_caps, raise_fd_limit


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
