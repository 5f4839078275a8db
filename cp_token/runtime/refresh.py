"""Refresh-ahead, decided once: where a held credential stands in its life.

One pure rule, on injected times (monotonic seconds), for everything that holds a token and
fetches the next one ahead of time: the client library's :class:`TokenSource`, the sidecar's
holder and the ``oidc`` minter's upstream token. From the time a token was issued (its fetch
was sent), its expiry and one jitter draw, :meth:`RefreshPolicy.state` names where it stands::

    issued            advisory_at             expiry - mandatory       expiry
      |---- FRESH ---------|---- ADVISORY ----------|---- MANDATORY -----|---- EXPIRED ...

- **FRESH**: use it.
- **ADVISORY**: use it, and one holder-side actor (a background loop, or the one caller that
  wins the refresh) fetches the next one; everyone else keeps using the held token without
  waiting, and a failed refresh keeps it.
- **MANDATORY**: less than ``mandatory_before`` seconds left (or less than a caller's
  ``min_ttl``, when it asks for more): it must be refreshed before it is used, so callers
  wait for the refresh. A token inside the policy's own ``mandatory_before`` is never handed
  out; inside a caller's larger ``min_ttl`` only, it may be, best effort, when the refresh
  fails.
- **EXPIRED**: its lifetime is over.

The advisory window opens once ``fraction`` of the token's *usable* lifetime (its lifetime up
to the mandatory window) has passed, that delay moved by up to ``±jitter`` of itself (so a
fleet issued at once does not refresh at once), at the latest ``advisory_before`` seconds
before expiry, and never sooner than ``min_gap`` after the token was issued (or after the
``since`` a holder gives: no hot loop on a token that lives a second). A token of unknown
expiry is never MANDATORY nor EXPIRED; its advisory window opens ``unknown_expiry_refresh``
seconds (jittered) after it was issued (never, by default).

Standard library only, like the rest of :mod:`cp_token.runtime`; the model is botocore's
``RefreshableCredentials`` (advisory and mandatory refresh timeouts).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["Freshness", "RefreshPolicy", "Windows"]


class Freshness(enum.Enum):
    """Where a held token stands; the members are ordered in time (see :meth:`rank`)."""

    FRESH = "fresh"
    ADVISORY = "advisory"
    MANDATORY = "mandatory"
    EXPIRED = "expired"

    @property
    def rank(self) -> int:
        """0 (FRESH) to 3 (EXPIRED): a token's state never goes down as time passes."""
        return _RANK[self]

    @property
    def usable(self) -> bool:
        """Whether the token may be handed out without a refresh first (FRESH, ADVISORY)."""
        return self in (Freshness.FRESH, Freshness.ADVISORY)


_RANK = {state: n for n, state in enumerate(Freshness)}


@dataclass(frozen=True, slots=True)
class Windows:
    """One token's windows as instants (monotonic), computed once by
    :meth:`RefreshPolicy.windows`, so that asking where it stands is a few comparisons."""

    advisory_at: float
    mandatory_at: float  # the policy's own mandatory window (inf: unknown expiry)
    expiry: float  # inf: unknown

    def state(self, now: float, min_ttl: float = 0.0) -> Freshness:
        """Where the token stands at ``now``, for a caller that wants ``min_ttl`` seconds
        of it left (its own mandatory window when that is more than the policy's)."""
        expiry = self.expiry
        if now >= expiry:
            return Freshness.EXPIRED
        if now > self.mandatory_at or now > expiry - min_ttl:  # less than that left
            return Freshness.MANDATORY
        if now >= self.advisory_at:
            return Freshness.ADVISORY
        return Freshness.FRESH


@dataclass(frozen=True)
class RefreshPolicy:
    """The refresh-ahead windows of one holder (seconds; see the module docstring).

    ``fraction`` is the share of the usable lifetime after which the advisory window opens
    (0.5: half-life); ``jitter`` moves that delay by up to ± its share (``draw`` 0 and 1 are
    the ends, 0.5 no jitter); ``advisory_before`` is the latest the advisory window opens,
    before expiry; ``mandatory_before`` the width of the mandatory window; ``min_gap`` the
    least time from issue (or ``since``) to the advisory window; ``unknown_expiry_refresh``
    the advisory delay of a token of unknown expiry.
    """

    fraction: float = 0.5
    jitter: float = 0.0
    advisory_before: float = 0.0
    mandatory_before: float = 0.0
    min_gap: float = 0.0
    unknown_expiry_refresh: float = math.inf

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be within 0..1, not {self.fraction!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be within 0..1 (excluded), not {self.jitter!r}")
        for name in ("advisory_before", "mandatory_before", "min_gap", "unknown_expiry_refresh"):
            value = getattr(self, name)
            if not value >= 0.0:  # NaN too
                raise ValueError(f"{name} must be a number >= 0, not {value!r}")

    def advisory_at(
        self, issued: float, expiry: float | None, draw: float = 0.5, *, since: float | None = None
    ) -> float:
        """When the advisory window opens (monotonic): what a background loop sleeps until.

        ``draw`` is a uniform draw in 0..1 (the holder draws it once per token); ``since``
        (default ``issued``) is what ``min_gap`` counts from.
        """
        spread = 1.0 + self.jitter * (2.0 * min(max(draw, 0.0), 1.0) - 1.0)
        if expiry is None:
            at = issued + self.unknown_expiry_refresh * spread
        else:
            usable = max(0.0, expiry - self.mandatory_before - issued)
            at = min(issued + usable * self.fraction * spread, expiry - self.advisory_before)
        return max(at, (issued if since is None else since) + self.min_gap)

    def mandatory_at(self, expiry: float, min_ttl: float = 0.0) -> float:
        """The instant the mandatory window starts (for a caller asking ``min_ttl``): from
        then on, less than ``max(mandatory_before, min_ttl)`` seconds are left."""
        return expiry - max(self.mandatory_before, min_ttl)

    def windows(
        self, issued: float, expiry: float | None, draw: float = 0.5, *, since: float | None = None
    ) -> Windows:
        """The windows of a token issued at ``issued`` and expiring at ``expiry`` (None:
        unknown), to keep beside it (see :meth:`advisory_at` for ``draw`` and ``since``)."""
        advisory = self.advisory_at(issued, expiry, draw, since=since)
        if expiry is None:
            return Windows(advisory, math.inf, math.inf)
        return Windows(advisory, self.mandatory_at(expiry), expiry)

    def state(
        self,
        now: float,
        issued: float,
        expiry: float | None,
        draw: float = 0.5,
        *,
        min_ttl: float = 0.0,
    ) -> Freshness:
        """Where a token issued at ``issued`` and expiring at ``expiry`` (None: unknown)
        stands at ``now``, for a caller that wants ``min_ttl`` seconds of it left."""
        return self.windows(issued, expiry, draw).state(now, min_ttl)
