"""TokenHolder: the sidecar's token state machine, on an injected clock.

No I/O and no sleeping: the driver (:mod:`sidecar.refresher`) reports what happened
(:meth:`~TokenHolder.begin_fetch`, :meth:`~TokenHolder.succeeded`,
:meth:`~TokenHolder.failed`, :meth:`~TokenHolder.rejected`) and asks what to do next
(:meth:`~TokenHolder.next_fetch_at`, :meth:`~TokenHolder.should_fetch`,
:meth:`~TokenHolder.should_force`). The HTTP routes ask what to serve
(:meth:`~TokenHolder.current`, :attr:`~TokenHolder.rejection`,
:meth:`~TokenHolder.retry_after`).

States (derived from the facts and the clock, never stored)::

    EMPTY         --begin_fetch-->      FETCHING  --succeeded-->   FRESH
    FETCHING      --failed/rejected-->  EMPTY (EXPIRED if a token was ever held)
    FRESH         --refresh due-->      STALE     --begin_fetch--> REFRESHING
    REFRESHING    --succeeded-->        FRESH;    --failed-->      STALE (token still valid)
    FRESH, STALE  --lifetime over-->    EXPIRED   --begin_fetch--> FETCHING

Rules (SPIRE's rotation, the one :class:`~cp_token.runtime.backoff.Backoff`): refresh once
``refresh_fraction`` of the lifetime has passed, +-10 % jitter, never later than
``expiry_margin`` before expiry nor sooner than ``min_refresh_interval`` after the fetch ended
(the advisory window of the one :class:`~cp_token.runtime.refresh.RefreshPolicy`, which also
decides whether a request's ``min_ttl`` leaves the held token usable); after a transient failure
retry with capped exponential backoff and full jitter (capped at 60 s while a token is held,
at 2 s while none is), at least ``Retry-After`` (itself honoured up to 60 s, or 5 s while
no token is held), with jitter on top of it up to the backoff's cap; after a
401/403 retry slowly (30-60 s), or at once when the SA token file changes
(:meth:`~TokenHolder.credentials_changed`), or at a consumer's request once 5 s have passed
since the last ask; and while a token is held, never schedule a
retry past its expiry. Only attempts made on the backoff schedule raise the backoff's
exponent: the last-chance retries just before expiry and the attempts requests make early
(with nothing held a request fetches at once, at most once a second, whatever the
backoff) leave it alone, so a long outage does not push the first retry after it near the
cap.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from cp_token.client import FetchedToken
from cp_token.client._retry import jitter_retry_after
from cp_token.runtime.backoff import Backoff
from cp_token.runtime.clock import Clock
from cp_token.runtime.refresh import RefreshPolicy, Windows
from cp_token.settings.sidecar import REFRESH_FRACTION

__all__ = [
    "SIDECAR_BACKOFF",
    "SIDECAR_EMPTY_BACKOFF",
    "HolderPolicy",
    "Rejection",
    "State",
    "TokenHolder",
]

SIDECAR_BACKOFF = Backoff(base=1.0, cap=60.0, floor=0.25)
# With no unexpired token held the pod has nothing to serve (and the token file is gone), so
# the schedule stays short: a CP that heals is found within about 2 s even by a consumer that
# only reads the file. It is no more load than requests already make (with nothing held a
# request fetches at once, at most once a second), and a CP's Retry-After still comes first.
SIDECAR_EMPTY_BACKOFF = Backoff(base=1.0, cap=2.0, floor=0.25)


class State(enum.Enum):
    """Where the holder stands; see the module docstring."""

    EMPTY = "empty"
    FETCHING = "fetching"
    FRESH = "fresh"
    REFRESHING = "refreshing"
    STALE = "stale"
    EXPIRED = "expired"


@dataclass(frozen=True)
class HolderPolicy:
    """The holder's timing rules (seconds)."""

    refresh_fraction: float = REFRESH_FRACTION
    jitter: float = 0.1
    backoff: Backoff = SIDECAR_BACKOFF
    empty_backoff: Backoff = SIDECAR_EMPTY_BACKOFF  # while no unexpired token is held
    # A CP's (or a proxy's) Retry-After is honoured up to these many seconds, so one absurd
    # value cannot stall the pod: while a token is held (retries stay before its expiry
    # anyway), and while none is (then the pod is dark: the CP's own hints are 1-30 s)
    max_retry_after: float = 60.0
    empty_max_retry_after: float = 5.0
    rejected_min: float = 30.0
    rejected_max: float = 60.0
    expiry_margin: float = 1.0
    recent_window: float = 5.0
    unknown_expiry_refresh: float = 300.0
    min_refresh_interval: float = 1.0
    empty_fetch_interval: float = 1.0  # nothing held: a request fetches at most this often
    sa_poll_interval: float = 0.5  # refused: how often the driver checks the SA token file

    def refresh_policy(self) -> RefreshPolicy:
        """The refresh-ahead windows these rules give: the advisory window opens at
        ``refresh_fraction`` of the lifetime (jittered), at the latest ``expiry_margin``
        before expiry, at least ``min_refresh_interval`` after the fetch ended; no mandatory
        window of its own (a token is served until it expires; a request's ``min_ttl`` asks
        for one)."""
        return RefreshPolicy(
            fraction=self.refresh_fraction,
            jitter=self.jitter,
            advisory_before=self.expiry_margin,
            min_gap=self.min_refresh_interval,
            unknown_expiry_refresh=self.unknown_expiry_refresh,
        )


@dataclass(frozen=True)
class Rejection:
    """The CP refused this pod (401/403) with this ``error_description``."""

    status: int
    description: str


class TokenHolder:
    """Holds at most one token and decides when to fetch the next one."""

    def __init__(
        self,
        clock: Clock,
        policy: HolderPolicy | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self.policy = policy or HolderPolicy()
        self._refresh = self.policy.refresh_policy()
        self._rand = rand
        self._token: FetchedToken | None = None
        self._windows: Windows | None = None  # the held token's, from the refresh policy
        self._fetching = False
        self._refresh_at: float | None = None
        self._retry_at: float | None = None
        self._backoff_due = -math.inf  # the unclamped backoff schedule
        self._on_schedule = True  # whether the attempt in progress was due by that schedule
        self._failures = 0
        self._last_attempt = -math.inf
        self._not_before = -math.inf  # the CP's Retry-After, which requests respect too
        self._rejection: Rejection | None = None
        self._last_error: str | None = None
        self._last_kind: str | None = None  # the reason class of the last failure

    # --- what happened --------------------------------------------------------------------

    def begin_fetch(self) -> None:
        """A fetch towards the CP has started."""
        now = self._clock.monotonic()
        retry_at = self._retry_at
        # early (a request's) or clamped before expiry: not a step of the backoff
        self._on_schedule = retry_at is None or (now >= retry_at and retry_at >= self._backoff_due)
        self._fetching = True

    def succeeded(self, token: FetchedToken) -> None:
        """A fetch returned ``token``: hold it and schedule its refresh."""
        now = self._clock.monotonic()
        self._end_attempt(now)
        self._token = token
        self._failures = 0
        self._retry_at = None
        self._backoff_due = -math.inf
        self._rejection = None
        self._last_error = None
        self._last_kind = None
        self._windows = self._refresh.windows(
            token.fetched_at, token.expiry, self._rand(), since=now
        )
        self._refresh_at = self._windows.advisory_at

    def failed(
        self, reason: str, retry_after: float | None = None, *, kind: str = "cp_unavailable"
    ) -> None:
        """A fetch failed transiently (connect error, timeout, 429, 5xx, a bad answer, ...).

        ``kind`` is the reason class ``/readyz`` may show (``cp_unavailable``, ``cp_error``):
        never the reason itself, which may name the pod's identity or the CP's policy."""
        now = self._clock.monotonic()
        p = self.policy
        on_schedule = self._on_schedule
        self._end_attempt(now)
        self._rejection = None
        self._last_error = reason
        self._last_kind = kind
        empty = self.current() is None  # nothing to serve: stay close to the CP
        backoff = p.empty_backoff if empty else p.backoff
        hint: float | None = None  # the CP's Retry-After, jittered: when this sidecar retries
        if retry_after is not None:
            retry_after = min(retry_after, p.empty_max_retry_after if empty else p.max_retry_after)
            hint = jitter_retry_after(retry_after, backoff.cap, self._rand)
        if on_schedule or self._failures == 0:
            self._failures += 1
            due = now + backoff.delay(self._failures, self._rand, hint)
        else:  # an extra attempt failed: the schedule it jumped stands
            due = max(self._backoff_due, now + p.backoff.floor, now + (hint or 0.0))
            if empty:  # ... unless it was drawn while a token was held
                due = min(due, now + p.empty_backoff.delay(self._failures, self._rand, hint))
        self._backoff_due = due
        self._not_before = now + (retry_after or 0.0)
        self._retry_at = self._before_expiry(now, due)

    def rejected(self, status: int, description: str) -> None:
        """The CP refused the pod (401/403): retry slowly, relay while holding nothing."""
        now = self._clock.monotonic()
        p = self.policy
        self._end_attempt(now)
        self._failures += 1
        self._rejection = Rejection(status, description)
        self._last_error = f"the CP refused the pod ({status}): {description}"
        self._last_kind = "refused"
        delay = p.rejected_min + self._rand() * (p.rejected_max - p.rejected_min)
        self._backoff_due = now + delay
        self._retry_at = self._before_expiry(now, now + delay)

    def adopt(self, token: FetchedToken) -> None:
        """Hold ``token``, found at start (the token file an earlier run left, still
        unexpired): it is served while unexpired, and a fetch is due at once (its backoff,
        should the CP be down, is the one of a held token)."""
        self._token = token
        self._windows = self._refresh.windows(token.fetched_at, token.expiry)
        self._refresh_at = self._clock.monotonic()

    def credentials_changed(self) -> None:
        """The SA token file changed: after a refusal, try the new one at once."""
        if self._rejection is not None and not self._fetching:
            now = self._clock.monotonic()
            self._retry_at = self._backoff_due = now

    def _end_attempt(self, now: float) -> None:
        self._fetching = False
        self._on_schedule = True
        self._last_attempt = now

    def _before_expiry(self, now: float, wanted: float) -> float:
        """Never let a retry land after the held token expires: one last chance a margin
        before expiry, and, if that is past, one more as it expires."""
        token = self.current()
        expiry = None if token is None else token.expiry
        margin = self.policy.expiry_margin
        if expiry is None or wanted <= expiry - margin:
            return wanted
        if expiry - margin >= now + self.policy.backoff.floor:
            return expiry - margin
        return min(wanted, expiry)  # held, so expiry > now

    # --- what to serve ----------------------------------------------------------------------

    def current(self) -> FetchedToken | None:
        """The held token while unexpired, else None."""
        token = self._token
        if token is None or not token.valid_at(self._clock.monotonic()):
            return None
        return token

    def serving(self) -> tuple[FetchedToken, float | None] | None:
        """The held token while unexpired, with its remaining lifetime read at the same
        instant (None for an unknown expiry); None when nothing valid is held."""
        token = self._token
        if token is None:
            return None
        now = self._clock.monotonic()
        return (token, token.remaining(now)) if token.valid_at(now) else None

    def remaining(self) -> float | None:
        """Seconds the held token has left (None: none held, or unknown expiry)."""
        token = self.current()
        return None if token is None else token.remaining(self._clock.monotonic())

    @property
    def ready(self) -> bool:
        """True while an unexpired token is held."""
        return self.current() is not None

    @property
    def state(self) -> State:
        """The current state (derived from the facts and the clock)."""
        token = self.current()
        if self._fetching:
            return State.REFRESHING if token is not None else State.FETCHING
        if token is None:
            return State.EXPIRED if self._token is not None else State.EMPTY
        if self._refresh_at is not None and self._clock.monotonic() >= self._refresh_at:
            return State.STALE
        return State.FRESH

    @property
    def rejection(self) -> Rejection | None:
        """The CP's refusal, when the last attempt was refused."""
        return self._rejection

    @property
    def last_error(self) -> str | None:
        """Why the last attempt failed (None after a success)."""
        return self._last_error

    def unready_class(self) -> str | None:
        """None while ready, else why not, as a class only (what a probe port reachable
        from the network may say): ``refused`` (the CP refused the pod), ``cp_unavailable``
        (the CP could not be reached or answered badly), ``cp_error`` (an error retrying
        may not fix, e.g. an untrusted certificate), ``expired`` (the token ran out before
        a refresh was tried), ``starting`` (no token fetched yet)."""
        if self.current() is not None:
            return None
        if self._last_kind is not None:
            return self._last_kind
        return "expired" if self._token is not None else "starting"

    @property
    def failures(self) -> int:
        """Consecutive failed attempts."""
        return self._failures

    def retry_after(self) -> int:
        """Whole seconds (>= 1) until the next attempt (N)."""
        due = self.next_fetch_at()
        if due is None:
            return 1
        if self.current() is None and self._rejection is None:
            due = min(due, self._empty_fetch_at())  # a request would fetch then
        return max(1, math.ceil(max(0.0, due - self._clock.monotonic())))

    def advertised_retry_after(self) -> int:
        """A 503's ``Retry-After``: :meth:`retry_after` N with jitter, a whole number of
        seconds drawn from N..2N, so the pod's consumers told to come back do not all come
        back in the same second (SPEC "Riding out faults")."""
        wait = self.retry_after()
        return wait + min(wait, math.floor(self._rand() * (wait + 1)))

    # --- what to do next --------------------------------------------------------------------

    def next_fetch_at(self) -> float | None:
        """Monotonic time of the next background fetch (None while one is running)."""
        if self._fetching:
            return None
        if self._retry_at is not None:
            return self._retry_at
        if self._refresh_at is not None:
            return self._refresh_at
        return -math.inf  # nothing held, nothing tried: now

    def should_fetch(self, min_ttl: float) -> bool:
        """Whether a ``GET`` asking for ``min_ttl`` seconds must wait for a fetch.

        Not when the held token has enough left; join a fetch in progress. With nothing
        held: fetch at once (at most once per ``empty_fetch_interval``) whatever the
        backoff. After the CP refused the pod: once ``recent_window`` has passed since the
        last ask (a ServiceAccount labelled a moment too late is let in at the next
        request, not at the slow retry), else its answer is relayed (the SA token file
        changing brings a fetch too). With a token held: not while retries are backing off,
        and within ``recent_window`` of the last fetch only when that fetch's token lived at
        least ``min_ttl`` (otherwise another fetch would return the same lifetime).
        """
        token = self.current()
        now = self._clock.monotonic()
        windows = self._windows
        if token is not None and windows is not None and windows.state(now, min_ttl).usable:
            return False
        if self._fetching:
            return True
        if token is None:
            return self._may_fetch_empty(now)
        if self._rejection is not None and now - self._last_attempt >= self.policy.recent_window:
            return True
        if self._retry_at is not None:
            return now >= self._retry_at
        if now - self._last_attempt >= self.policy.recent_window:
            return True
        return token.expires_in is not None and token.expires_in >= min_ttl

    def should_force(self) -> bool:
        """Whether a ``POST`` (force) must fetch: yes, unless the last attempt ended less
        than ``recent_window`` seconds ago (then the held token is served); with nothing
        held, as a ``GET`` would."""
        if self._fetching:
            return True
        now = self._clock.monotonic()
        if self.current() is None and self._rejection is None:
            return self._may_fetch_empty(now)
        return now - self._last_attempt >= self.policy.recent_window

    def _may_fetch_empty(self, now: float) -> bool:
        if self._rejection is not None:  # refused: ask again at most once per recent_window
            return (
                self._retry_at is None
                or now >= self._retry_at
                or now - self._last_attempt >= self.policy.recent_window
            )
        return now >= self._empty_fetch_at()

    def _empty_fetch_at(self) -> float:
        """With nothing held, when a request may fetch next."""
        return max(self._last_attempt + self.policy.empty_fetch_interval, self._not_before)
