"""The token file: written atomically with a fixed mode, removed once it expires.

Vault Agent's file sink in miniature: a consumer that reads the file sees either the old
token or the new one, never a torn write, and never a file wider than the configured mode.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import os
import secrets

from cp_token.client._http import MAX_LIFETIME, MAX_TOKEN, decode_json, token_problem

__all__ = ["TokenFileSink", "unverified_exp"]


def unverified_exp(token: str) -> float | None:
    """The ``exp`` claim of a compact JWT, read without verifying it (the sidecar wrote the
    file itself; only the token's lifetime is wanted), or None when ``token`` is no JWT
    or has no finite numeric ``exp``."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = decode_json(raw)
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        value = float(exp)
    except OverflowError:  # an int of hundreds of digits
        return None
    return value if math.isfinite(value) else None


class TokenFileSink:
    """Writes the bare token to ``path`` with ``mode`` (umask does not apply)."""

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = os.path.abspath(path)
        self.mode = mode
        self._dir = os.path.dirname(self.path)

    def write(self, token: str) -> None:
        """Replace the file's content with ``token``: temp file in the same directory,
        created exclusively with the mode, fsync, rename over, fsync the directory."""
        name = os.path.basename(self.path)
        tmp = os.path.join(self._dir, f".{name}.{secrets.token_hex(6)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, self.mode)
        try:
            try:
                os.fchmod(fd, self.mode)  # os.open's mode is filtered by the umask
                data = token.encode()
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._sync_dir()

    def left_over(self, now: float) -> tuple[str, float] | None:
        """What an earlier run left in the file, if it may be kept: ``(token, exp)`` for a
        JWT whose ``exp`` is after ``now`` (wall clock) and within ten years of it.
        Anything else there (expired, not a JWT, garbage, unreadable) is removed at once:
        a token file never outlives its token."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(MAX_TOKEN + 1)
        except FileNotFoundError:
            return None
        except OSError:
            raw = b""
        try:
            token = raw.decode("ascii")
        except UnicodeDecodeError:
            token = ""
        exp = unverified_exp(token) if token_problem(token) is None else None
        if exp is not None and now < exp <= now + MAX_LIFETIME:
            return token, exp
        self.remove()
        return None

    def remove(self) -> None:
        """Delete the file (the token expired unrenewed); a missing file is fine."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
