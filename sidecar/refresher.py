"""The async driver: fetches from the CP when the holder says so, one fetch at a time.

"Get a token from the CP" is the client library's (:meth:`TokenSource.afetch_once`, a
single attempt); the holder owns the backoff; this module only runs the loop, shares one
fetch between every caller (:class:`~cp_token.runtime.singleflight.SharedCall`), writes the token
file and removes it when the token expires unrenewed. While the CP refuses the pod it
watches the SA token file's content, so a rotated token is tried at once.
"""

from __future__ import annotations

import asyncio
import logging

from cp_token.client import FetchedToken, TokenError, TokenRejected, TokenUnavailable
from cp_token.runtime.clock import Clock, rfc3339, sleep_or_wake
from cp_token.runtime.singleflight import SharedCall

from .holder import TokenHolder
from .metrics import SidecarMetrics
from .sink import TokenFileSink
from .upstream import TokenFetcher

__all__ = ["Refresher"]

log = logging.getLogger("sidecar.refresher")


class Refresher:
    """Runs the refresh loop (:meth:`run`) and serves on-demand fetches (:meth:`fetch`)."""

    def __init__(
        self,
        source: TokenFetcher,
        holder: TokenHolder,
        clock: Clock,
        *,
        metrics: SidecarMetrics,
        sink: TokenFileSink | None = None,
    ) -> None:
        self.source = source
        self.holder = holder
        self._clock = clock
        self._metrics = metrics
        self._sink = sink
        self._sink_expiry: float | None = None
        self._flight: SharedCall[None] = SharedCall()
        self._wake = asyncio.Event()
        self._logged_rejections: set[tuple[int, str]] = set()

    async def fetch(self) -> None:
        """Fetch from the CP, or join the fetch in progress. Never raises a fetch failure:
        the outcome is recorded in the holder."""
        await self._flight.do(self._fetch)

    async def _fetch(self) -> None:
        try:
            await self._attempt()
        finally:
            self._wake.set()  # the schedule may have moved

    async def _attempt(self) -> None:
        self.holder.begin_fetch()
        started = self._clock.monotonic()
        try:
            token = await self.source.afetch_once()
        except TokenRejected as exc:
            self.holder.rejected(exc.status, exc.description)
            self._metrics.fetches["rejected"].inc()
            if (exc.status, exc.description) not in self._logged_rejections:
                self._logged_rejections.add((exc.status, exc.description))
                log.error(
                    "the CP refused this pod; retrying slowly",
                    extra={"fields": {"status": exc.status, "description": exc.description}},
                )
            return
        except TokenError as exc:
            transient = isinstance(exc, TokenUnavailable)
            retry_after = exc.retry_after if isinstance(exc, TokenUnavailable) else None
            self.holder.failed(
                str(exc), retry_after, kind="cp_unavailable" if transient else "cp_error"
            )
            self._metrics.fetches["transient" if transient else "error"].inc()
            self._log_failure(str(exc))
            return
        except Exception as exc:  # the fetcher maps every answer to TokenError; defence in
            # depth: an unforeseen one is still a failed fetch with backoff, not a dead loop.
            # Its message is not logged: it might quote the answer.
            self.holder.failed(
                f"the fetch failed unexpectedly ({type(exc).__name__})", kind="cp_error"
            )
            self._metrics.fetches["error"].inc()
            self._log_failure(f"unexpected {type(exc).__name__}")
            return
        except BaseException:
            self.holder.failed("fetch interrupted")
            raise
        finally:
            self._metrics.fetch_seconds.observe(self._clock.monotonic() - started)
        try:
            # The file first: once the holder has the token /readyz says ready, and what that
            # starts (app containers behind a native sidecar's startupProbe) reads the file.
            await self._write_sink(token.token, token.expiry)
        finally:
            recovered = self.holder.failures
            self.holder.succeeded(token)
        self._metrics.fetches["ok"].inc()
        self._logged_rejections.clear()
        log.info(
            "token refreshed",
            extra={"fields": {"expires_in": token.expires_in, "after_failures": recovered}},
        )

    def _log_failure(self, reason: str) -> None:
        remaining = self.holder.remaining()
        due = self.holder.next_fetch_at()
        fields = {
            "reason": reason,
            "failures": self.holder.failures,
            "retry_in": None if due is None else round(due - self._clock.monotonic(), 3),
            "token_expires_in": None if remaining is None else int(remaining),
        }
        log.warning("token fetch failed", extra={"fields": fields})

    async def _write_sink(self, token: str, expiry: float | None) -> None:
        if self._sink is None:
            return
        try:
            await asyncio.to_thread(self._sink.write, token)
        except OSError as exc:
            self._metrics.file_writes["error"].inc()
            log.error(
                "cannot write the token file",
                extra={"fields": {"path": self._sink.path, "error": str(exc)}},
            )
            return
        self._metrics.file_writes["ok"].inc()
        self._sink_expiry = expiry

    async def _expire_sink(self) -> None:
        expiry = self._sink_expiry
        if self._sink is None or expiry is None or self._clock.monotonic() < expiry:
            return
        self._sink_expiry = None
        try:
            await asyncio.to_thread(self._sink.remove)
        except OSError as exc:
            log.error("cannot remove the expired token file", extra={"fields": {"error": str(exc)}})
            return
        self._metrics.file_writes["removed"].inc()
        log.warning("the token expired unrenewed; token file removed")

    async def adopt_left_over(self) -> None:
        """At start: hold the token an earlier run left in the token file while it is a
        JWT whose ``exp`` is in the future (a sidecar restarted during a CP outage serves
        it, and removes the file when it expires); anything else there is removed now."""
        if self._sink is None:
            return
        now = self._clock.time()
        try:
            found = await asyncio.to_thread(self._sink.left_over, now)
        except OSError as exc:
            log.error("cannot clear the token file", extra={"fields": {"error": str(exc)}})
            return
        if found is None:
            return
        token, exp = found
        # on the monotonic clock from here: the wall clock only told how much is left
        held = FetchedToken(token, int(exp - now), rfc3339(exp), self._clock.monotonic())
        self.holder.adopt(held)
        self._sink_expiry = held.expiry
        log.info(
            "kept the token file an earlier run left until it expires; fetching a new token",
            extra={"fields": {"expires_in": held.expires_in}},
        )

    async def run(self) -> None:
        """The refresh loop: first :meth:`adopt_left_over`, then forever fetch when due,
        remove the file at expiry, and while the CP refuses the pod, try again as soon as
        the SA token file changes."""
        await self.adopt_left_over()
        while True:
            self._wake.clear()
            await self._expire_sink()
            self.check_sa_token()
            due = self.holder.next_fetch_at()
            now = self._clock.monotonic()
            if due is not None and due <= now:
                await self.fetch()
                continue
            poll = None
            if self.holder.rejection is not None:
                poll = now + self.holder.policy.sa_poll_interval
            wakes = [t for t in (due, self._sink_expiry, poll) if t is not None]
            await sleep_or_wake(self._clock, min(wakes) - now if wakes else None, self._wake)

    def check_sa_token(self) -> None:
        """After a refusal, a changed SA token file is worth a fetch now (a small read)."""
        if self.holder.rejection is not None and self.source.sa_token_changed():
            log.info("the ServiceAccount token file changed; fetching again")
            self.holder.credentials_changed()
