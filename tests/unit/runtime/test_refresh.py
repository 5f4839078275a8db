"""RefreshPolicy: the one refresh-ahead rule, on plain numbers (no clock, no sleeping)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cp_token.runtime.refresh import Freshness, RefreshPolicy

F, A, M, E = Freshness.FRESH, Freshness.ADVISORY, Freshness.MANDATORY, Freshness.EXPIRED
ISSUED = 1000.0


def states(policy: RefreshPolicy, lifetime: float, *at: float, min_ttl: float = 0.0) -> list:
    """The state at each ``at`` seconds after issue."""
    expiry = ISSUED + lifetime
    return [policy.state(ISSUED + t, ISSUED, expiry, min_ttl=min_ttl) for t in at]


# --- the three holders' rules, as numbers ---------------------------------------------------


def test_the_clients_windows() -> None:
    """Advisory with 10 % of the usable lifetime (or 30 s) left, mandatory under 10 s."""
    policy = RefreshPolicy(fraction=0.9, advisory_before=30.0, mandatory_before=10.0)
    # usable = 900 - 10 = 890; advisory at 0.9 * 890 = 801 s, i.e. 99 s before expiry
    assert policy.advisory_at(ISSUED, ISSUED + 900) == pytest.approx(ISSUED + 801)
    assert states(policy, 900, 0, 800.9, 801, 889.9, 890, 890.1, 899.9, 900, 1e6) == [
        F, F, A, A, A, M, M, E, E,
    ]  # fmt: skip
    # a short token: the 30 s floor comes first (0.9 * 90 = 81 would be 19 s before expiry)
    assert policy.advisory_at(ISSUED, ISSUED + 100) == ISSUED + 70


def test_a_callers_min_ttl_moves_the_mandatory_window_for_that_caller_only() -> None:
    policy = RefreshPolicy(fraction=0.9, advisory_before=30.0, mandatory_before=10.0)
    assert states(policy, 900, 299, 301, min_ttl=600) == [F, M]
    assert states(policy, 900, 301) == [F]
    assert states(policy, 900, 895, min_ttl=5) == [M]  # never below the policy's own


def test_the_sidecars_half_life_with_jitter_and_margins() -> None:
    policy = RefreshPolicy(
        fraction=0.5, jitter=0.1, advisory_before=1.0, min_gap=1.0, unknown_expiry_refresh=300
    )
    expiry = ISSUED + 900
    assert policy.advisory_at(ISSUED, expiry, 0.5) == ISSUED + 450
    assert policy.advisory_at(ISSUED, expiry, 0.0) == pytest.approx(ISSUED + 405)
    assert policy.advisory_at(ISSUED, expiry, 1.0) == pytest.approx(ISSUED + 495)
    assert policy.advisory_at(ISSUED, None, 0.5) == ISSUED + 300  # unknown expiry
    # no mandatory window of its own: served until it expires
    assert states(policy, 900, 449, 450, 899.99, 900) == [F, A, A, E]
    # a zero-lifetime token: not due again before the gap, counted from `since`
    assert policy.advisory_at(ISSUED, ISSUED, 0.5, since=ISSUED + 3) == ISSUED + 4


def test_the_oidc_minters_halfway_through_the_usable_window() -> None:
    policy = RefreshPolicy(fraction=0.5, mandatory_before=300.0, min_gap=1.0)
    assert policy.advisory_at(ISSUED, ISSUED + 3600) == ISSUED + 1650
    assert states(policy, 3600, 1649, 1650, 3300, 3300.5, 3600) == [F, A, A, M, E]
    # a token living less than the mandatory window: refreshed no sooner than the gap
    assert policy.advisory_at(ISSUED, ISSUED + 200) == ISSUED + 1
    assert states(policy, 200, 0) == [M]


def test_a_token_of_unknown_expiry_is_fresh_forever_by_default() -> None:
    policy = RefreshPolicy(fraction=0.9, mandatory_before=10.0)
    assert policy.state(ISSUED + 1e9, ISSUED, None, min_ttl=1e6) is F
    assert policy.advisory_at(ISSUED, None) == math.inf


def test_windows_hold_the_instants_computed_once() -> None:
    policy = RefreshPolicy(fraction=0.5, mandatory_before=300.0, min_gap=1.0)
    windows = policy.windows(ISSUED, ISSUED + 3600)
    assert (windows.advisory_at, windows.mandatory_at, windows.expiry) == (
        ISSUED + 1650,
        ISSUED + 3300,
        ISSUED + 3600,
    )
    assert windows.state(ISSUED + 3300) is A
    assert windows.state(ISSUED + 3300, min_ttl=600) is M
    unknown = policy.windows(ISSUED, None)
    assert unknown.expiry == math.inf
    assert unknown.state(ISSUED + 1e12, min_ttl=1e9) is F


def test_usable_is_fresh_and_advisory_only() -> None:
    assert [s.usable for s in Freshness] == [True, True, False, False]
    assert [s.rank for s in Freshness] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "bad",
    [
        {"fraction": 1.5},
        {"fraction": -0.1},
        {"jitter": 1.0},
        {"mandatory_before": -1.0},
        {"min_gap": math.nan},
        {"advisory_before": -0.5},
    ],
)
def test_nonsense_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        RefreshPolicy(**bad)  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------------

policies = st.builds(
    RefreshPolicy,
    fraction=st.floats(0.0, 1.0),
    jitter=st.floats(0.0, 0.5),
    advisory_before=st.floats(0.0, 600.0),
    mandatory_before=st.floats(0.0, 600.0),
    min_gap=st.floats(0.0, 10.0),
    unknown_expiry_refresh=st.floats(1.0, 1e5),
)
lifetimes = st.floats(0.0, 1e6)
draws = st.floats(0.0, 1.0)


@given(
    policies,
    lifetimes,
    draws,
    st.floats(0.0, 1e6),
    st.lists(st.floats(-10.0, 2e6), min_size=2, max_size=20),
)
def test_states_are_ordered_in_time(
    policy: RefreshPolicy, lifetime: float, draw: float, min_ttl: float, offsets: list[float]
) -> None:
    """FRESH -> ADVISORY -> MANDATORY -> EXPIRED: as time passes a token never goes back."""
    expiry = ISSUED + lifetime
    ranks = [
        policy.state(ISSUED + t, ISSUED, expiry, draw, min_ttl=min_ttl).rank
        for t in sorted(offsets)
    ]
    assert ranks == sorted(ranks)
    assert policy.state(expiry, ISSUED, expiry, draw).rank == E.rank


@given(policies, lifetimes, draws)
def test_the_windows_sit_where_the_policy_says(
    policy: RefreshPolicy, lifetime: float, draw: float
) -> None:
    expiry = ISSUED + lifetime
    advisory = policy.advisory_at(ISSUED, expiry, draw)
    mandatory = policy.mandatory_at(expiry)
    # just before the advisory point: fresh, unless a later window has already opened
    before = policy.state(advisory - 1e-6 * max(1.0, advisory), ISSUED, expiry, draw)
    assert before is F or before.rank >= M.rank
    if advisory <= mandatory and advisory < expiry:
        assert policy.state(advisory, ISSUED, expiry, draw) is A
    mid = (mandatory + expiry) / 2
    if mandatory < mid < expiry:
        assert policy.state(mid, ISSUED, expiry, draw) is M


@given(policies, lifetimes, draws, st.floats(0.0, 100.0))
def test_the_advisory_point_respects_jitter_bounds_and_gaps(
    policy: RefreshPolicy, lifetime: float, draw: float, late: float
) -> None:
    expiry = ISSUED + lifetime
    since = ISSUED + late
    at = policy.advisory_at(ISSUED, expiry, draw, since=since)
    usable = max(0.0, lifetime - policy.mandatory_before)
    nominal = usable * policy.fraction
    low = nominal * (1 - policy.jitter)
    high = nominal * (1 + policy.jitter)
    eps = 1e-6 * max(1.0, lifetime)
    assert at >= since + policy.min_gap - eps  # never sooner than the gap
    gap_won = at <= since + policy.min_gap + eps
    # within the jitter band of the fraction, or pulled earlier by advisory_before
    assert gap_won or at - ISSUED <= high + eps
    assert gap_won or at - ISSUED >= low - eps or at <= expiry - policy.advisory_before + eps
    assert gap_won or at <= expiry - policy.advisory_before + eps  # never past the margin


@given(policies, draws)
def test_unknown_expiry_is_jittered_around_its_interval(policy: RefreshPolicy, draw: float) -> None:
    at = policy.advisory_at(ISSUED, None, draw)
    interval = policy.unknown_expiry_refresh
    gap_at = ISSUED + policy.min_gap
    assert at >= gap_at
    assert at == gap_at or ISSUED + interval * (1 - policy.jitter) - 1e-6 <= at
    assert at == gap_at or at <= ISSUED + interval * (1 + policy.jitter) + 1e-6
