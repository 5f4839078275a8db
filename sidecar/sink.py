"""The token file: written atomically with a fixed mode, removed once it expires.

Vault Agent's file sink in miniature: a consumer that reads the file sees either the old
token or the new one, never a torn write, and never a file wider than the configured mode.
"""

from __future__ import annotations

import contextlib
import os
import secrets

__all__ = ["TokenFileSink"]


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
