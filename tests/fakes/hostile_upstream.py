"""A malicious upstream: a raw TCP server on 127.0.0.1 that answers chosen bytes.

The red team's malformed token answers (issue 17), as whole HTTP responses, in
:data:`HOSTILE_ANSWERS`; :class:`RawUpstream` serves them from a thread of its own (its own
event loop), so sync clients, async clients and child processes can all be pointed at it.
The path of the request picks the answer: ``/<case>`` answers ``HOSTILE_ANSWERS[case]``,
``/good-then/<case>`` a valid token first and that case from then on, ``/good`` always a
valid token. Every token these answers carry contains :data:`SECRET`, so a test can check
that no error line or log quotes it. :func:`check_bad_answer` is what every client must make
of one of these answers.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter

from cp_token.client import TokenError, TokenRejected, TokenUnavailable
from cp_token.client._http import MAX_DESCRIPTION

__all__ = [
    "GOOD_TOKEN",
    "HOSTILE_ANSWERS",
    "MAX_MESSAGE",
    "REFUSALS",
    "SECRET",
    "RawUpstream",
    "check_bad_answer",
    "good_answer",
]

SECRET = "SECRETTOKENTEXT"
GOOD_TOKEN = f"good-{SECRET}-1"


def _json(status: str, body: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (
        f"HTTP/1.1 {status}\r\n".encode()
        + head
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


def good_answer(token: str = GOOD_TOKEN, expires_in: int = 3600) -> bytes:
    """The CP's 200 with ``token``."""
    body = {"token": token, "token_type": "Bearer", "expires_in": expires_in}
    return _json("200 OK", json.dumps(body).encode())


def _token_body(token_json: str = json.dumps(f"t-{SECRET}"), expires_in: str = "900") -> bytes:
    """A 200 body written by hand, so the JSON can say what no encoder would."""
    return (
        f'{{"token": {token_json}, "token_type": "Bearer", "expires_in": {expires_in}}}'
    ).encode()


_BUSY = json.dumps({"error": "temporarily_unavailable", "error_description": "busy"}).encode()
_DEEP = b"[" * 200_000 + b"]" * 200_000
_LONG_TEXT = b"x" * 60_000

# name -> the whole raw HTTP response (the twelve of issue 17, and a few neighbours)
HOSTILE_ANSWERS: dict[str, bytes] = {
    "chunk-size-minus-1": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n"
        + _token_body()
        + b"\r\n0\r\n\r\n"
    ),
    "content-length-superscript": "HTTP/1.1 200 OK\r\nContent-Length: ¹²\r\n\r\n".encode()
    + _token_body(),
    # superscript digits in UTF-8, and as the single Latin-1 bytes a parser decoding
    # Latin-1 reads as "¹²³" (str.isdigit() says True; int() raises)
    "content-length-superscript-latin1": b"HTTP/1.1 200 OK\r\nContent-Length: \xb9\xb2\r\n\r\n"
    + _token_body(),
    "status-superscript": "HTTP/1.1 ²⁰⁰ OK\r\nContent-Length: 2\r\n\r\n{}".encode(),
    "status-superscript-latin1": b"HTTP/1.1 \xb9\xb2\xb3 OK\r\nContent-Length: 2\r\n\r\n{}",
    "retry-after-400-digits": _json(
        "503 Service Unavailable", _BUSY, b"Retry-After: " + b"9" * 400
    ),
    "retry-after-superscript": _json("503 Service Unavailable", _BUSY, "Retry-After: ¹".encode()),
    "retry-after-superscript-latin1": _json("503 Service Unavailable", _BUSY, b"Retry-After: \xb9"),
    "retry-after-overflowing-date": _json(
        "429 Too Many Requests",
        _BUSY,
        b"Retry-After: Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
    ),
    "json-200000-deep": _json("200 OK", _DEEP),
    "expires-in-400-digits": _json("200 OK", _token_body(expires_in="9" * 400)),
    "expires-in-1e308": _json("200 OK", _token_body(expires_in="1e308")),
    "token-lone-surrogate": _json("200 OK", _token_body(token_json=f'"{SECRET}\\ud800"')),
    "token-newline": _json("200 OK", _token_body(token_json=f'"{SECRET}\\nX-Injected: 1"')),
    "token-nul": _json("200 OK", _token_body(token_json=f'"{SECRET}\\u0000"')),
    "error-text-60kb": (
        b"HTTP/1.1 403 "
        + _LONG_TEXT
        + b"\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(_LONG_TEXT)
        + _LONG_TEXT
    ),
    # neighbours: the same families on the other paths
    "status-999": b"HTTP/1.1 999 Whatever\r\nContent-Length: 0\r\n\r\n",
    "error-text-60kb-503": (
        b"HTTP/1.1 503 "
        + _LONG_TEXT
        + b"\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(_LONG_TEXT)
        + _LONG_TEXT
    ),
    "error-json-200000-deep": _json("403 Forbidden", _DEEP),
    "expires-in-string": _json("200 OK", _token_body(expires_in='"²"')),
    "token-with-space": _json("200 OK", _token_body(token_json=f'"{SECRET} x"')),
}


class RawUpstream:
    """Answers every connection with one raw response picked by the request's path (see
    the module docstring), then closes it. Thread-safe counters of requests by path."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def url(self, path: str) -> str:
        """``http://127.0.0.1:<port>/<path>``."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def count(self, path: str) -> int:
        """Requests received for ``path`` (without its leading slash)."""
        with self._lock:
            return self.requests[path.lstrip("/")]

    def _answer(self, path: str, n: int) -> bytes:
        if path == "good":
            return good_answer()
        if path.startswith("good-then/"):
            case = path.removeprefix("good-then/")
            return good_answer() if n == 1 else HOSTILE_ANSWERS[case]
        return HOSTILE_ANSWERS[path]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode("latin-1")
            path = target.split("?", 1)[0].lstrip("/")
            with self._lock:
                self.requests[path] += 1
                n = self.requests[path]
            writer.write(self._answer(path, n))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
            pass
        except KeyError:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        finally:
            writer.close()

    def start(self) -> RawUpstream:
        """Listen on a free loopback port (in the thread's loop)."""
        self._thread.start()

        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", 0)

        self._server = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        """Close the server and end the thread."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> RawUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


REFUSALS = {"error-text-60kb", "error-json-200000-deep"}  # 403s: TokenRejected, not retried
# upstream text that may appear in a message, beyond the URL and our own words
MAX_MESSAGE = 2 * MAX_DESCRIPTION + 200


def check_bad_answer(exc: BaseException, case: str) -> None:
    """The error a bad answer must give: a ``TokenError`` (``TokenRejected`` for the
    refusals, else ``TokenUnavailable``) whose message is one line of bounded length that
    never quotes a token."""
    assert isinstance(exc, TokenError), f"{case}: {type(exc).__name__} escaped"
    if case in REFUSALS:
        assert isinstance(exc, TokenRejected)
        assert len(exc.description) <= MAX_DESCRIPTION
    else:
        assert isinstance(exc, TokenUnavailable), f"{case}: {exc!r}"
    message = str(exc)
    assert SECRET not in message
    assert "\n" not in message and "\r" not in message and "\x00" not in message
    message.encode("utf-8")  # no lone surrogate
    assert len(message) <= MAX_MESSAGE, f"{case}: {len(message)} characters"
