"""``*_FILE`` values re-read when they change, without a restart.

Kubernetes Secret rotation swaps a ``..data`` symlink, so inotify on the file itself misses
it: we poll the content (cheap: these files are tiny) and re-parse when the bytes differ.
A file that becomes unreadable or unparsable keeps its last good value, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Generic, TypeVar

from cp_token.runtime.errors import ConfigError

__all__ = ["FileWatcher", "WatchedFile", "watch_tls"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class WatchedFile(Generic[T]):
    """A file's parsed content; :meth:`check` reloads it when its bytes changed."""

    def __init__(
        self,
        variable: str,
        path: str,
        parse: Callable[[bytes], T],
        on_change: Callable[[T], None] | None = None,
    ) -> None:
        """Load now; an unreadable or invalid file raises ConfigError naming ``variable``."""
        self.variable = variable
        self.path = path
        self._parse = parse
        self._on_change = on_change
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise ConfigError(variable, f"cannot read {path!r} ({exc.strerror or exc})") from None
        try:
            self._value = parse(raw)
        except ValueError as exc:
            raise ConfigError(variable, f"{path!r}: {exc}") from None
        self._raw = raw

    @property
    def value(self) -> T:
        """The last good parsed content."""
        return self._value

    def get(self) -> T:
        """The last good parsed content (a bound method to hand to whoever reads it later)."""
        return self._value

    def subscribe(self, on_change: Callable[[T], None]) -> None:
        """Call ``on_change(new value)`` after each reload (replacing an earlier callback):
        the object that needs the news can be built after the file was first read."""
        self._on_change = on_change

    def check(self) -> bool:
        """Re-read the file (blocking; call off the loop); True if the value changed."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            log.warning(
                "%s: cannot re-read %s (%s); keeping the last value",
                self.variable,
                self.path,
                exc.strerror or exc,
            )
            return False
        if raw == self._raw:
            return False
        try:
            value = self._parse(raw)
        except ValueError as exc:
            log.warning(
                "%s: %s changed but is invalid (%s); keeping the last value",
                self.variable,
                self.path,
                exc,
            )
            self._raw = raw
            return False
        self._raw = raw
        self._value = value
        log.info("%s: reloaded %s", self.variable, self.path)
        if self._on_change is not None:
            self._on_change(value)
        return True


class FileWatcher:
    """Polls every registered :class:`WatchedFile` on an interval, off the event loop."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self._files: list[WatchedFile[object]] = []

    def add(self, watched: WatchedFile[T]) -> WatchedFile[T]:
        """Register a file; returns it for chaining."""
        self._files.append(watched)  # type: ignore[arg-type]
        return watched

    def __len__(self) -> int:
        return len(self._files)

    def watch_tls(self, ctx: ssl.SSLContext, cert: tuple[str, str], key: tuple[str, str]) -> None:
        """Reload ``ctx`` when the certificate or the key changes (see :func:`watch_tls`)."""
        for watched in watch_tls(ctx, cert, key):
            self.add(watched)

    def check_all(self) -> int:
        """Check every file now (blocking); returns how many changed."""
        return sum(1 for f in self._files if f.check())

    async def run(self) -> None:
        """Poll forever (a background task)."""
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self.check_all)


def watch_tls(
    ctx: ssl.SSLContext, cert: tuple[str, str], key: tuple[str, str]
) -> list[WatchedFile[bytes]]:
    """Watch a serving certificate and its key, ``(variable, path)`` each, reloading ``ctx``.

    New connections get the new pair; open ones keep theirs. Cert and key change one after
    the other: a reload that fails keeps the previous pair, and the next change completes it.
    """

    def reload(_raw: bytes) -> None:
        try:
            ctx.load_cert_chain(cert[1], key[1])
            log.info("TLS certificate reloaded")
        except (ssl.SSLError, OSError) as exc:
            log.warning("TLS certificate reload failed (%s); keeping the previous one", exc)

    return [
        WatchedFile(cert[0], cert[1], bytes, on_change=reload),
        WatchedFile(key[0], key[1], bytes, on_change=reload),
    ]
