"""Where each request of an HTTP/1.1 byte stream starts and ends, followed beside the parser.

The server's parser (httptools' llhttp, or h11) decides what a request *means*; this class
only follows the same framing, so the edge (:mod:`cp_token.http.edge`) can hold limits that the
parsers do not: a head (with the trailer of its chunked body) within ``max_head`` bytes, a
chunk-size line (extensions included) within ``max_chunk_line`` bytes, how many bytes of
bodies are in progress, and whether a connection is between requests, in a head or in a
body (the head and body deadlines).

It is deliberately no more demanding than the parsers on well-formed input: a head ends at
its first empty line (``\\r\\n\\r\\n``, or a bare ``\\n`` as h11 allows), its body is
``Transfer-Encoding: chunked`` (last coding) or ``Content-Length`` (equal values), else
empty (RFC 9112 §6.3 for requests). Framing both parsers refuse (a chunk size that is not
hex, differing lengths, a transfer coding that does not end in ``chunked``) is reported as
:attr:`Violation.BAD_FRAMING`, and the parser would have refused it too. No byte is kept
but the head of a request that arrives in several reads (bounded by ``max_head``) and the
chunk-size line in progress (bounded by ``max_chunk_line``).
"""

from __future__ import annotations

import enum
import re

__all__ = ["BODY", "HEAD", "IDLE", "RequestFraming", "Violation"]

IDLE, HEAD, BODY = 0, 1, 2  # between requests (no byte of the next yet), in a head, in a body
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)  # where in a chunked body

_HEAD_END = re.compile(rb"\n\r?\n")
# One pass over a head that arrived whole: its framing headers, then its end.
_HEAD_SCAN = re.compile(rb"\n(?:(content-length|transfer-encoding):([^\n]*)|\r?\n)", re.IGNORECASE)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class Violation(enum.Enum):
    """A limit or a framing rule the stream broke; nothing after it is followed."""

    HEAD_TOO_LARGE = "the request head is too large"
    TRAILER_TOO_LARGE = "the request head and trailer are too large"
    CHUNK_LINE_TOO_LONG = "a chunk-size line is too long"
    BAD_FRAMING = "the request body's framing is malformed"


# The two headers that frame a request body, with their values (names in any case).
_FRAMING_HEADER = re.compile(rb"\n(content-length|transfer-encoding):([^\n]*)", re.IGNORECASE)


def _framing_values(head: bytes, start: int, end: int) -> tuple[list[bytes], list[bytes]]:
    """The ``Transfer-Encoding`` and ``Content-Length`` values of the head in
    ``head[start:end]``, in order."""
    codings: list[bytes] = []
    lengths: list[bytes] = []
    for match in _FRAMING_HEADER.finditer(head, start, end):
        name, value = match.groups()
        if head[match.end() + 1 : match.end() + 2] in (b" ", b"\t"):  # obsolete line folding
            return _framing_values(re.sub(rb"\r?\n[ \t]+", b" ", head[start:end]), 0, end)
        (codings if name[0] in b"tT" else lengths).append(value.strip(b" \t\r"))
    return codings, lengths


def body_framing(head: bytes, start: int = 0, end: int | None = None) -> int | None:
    """The body a request head announces: its length, ``-1`` for chunked, or ``None`` for
    framing no parser accepts. The head (from its request line to its empty line) is
    ``head[start:end]``."""
    return _framing_of(*_framing_values(head, start, len(head) if end is None else end))


def _framing_of(codings: list[bytes], values: list[bytes]) -> int | None:
    if codings:
        last = b",".join(codings).rsplit(b",", 1)[-1].strip(b" \t")
        return -1 if last.lower() == b"chunked" else None
    if not values:
        return 0
    lengths = {v.strip(b" \t") for value in values for v in value.split(b",")}
    if len(lengths) != 1:
        return None
    (length,) = lengths
    return int(length) if length.isdigit() and length.isascii() else None


class RequestFraming:
    """Follows the requests of one connection, fed every byte it receives, in order.

    After each :meth:`feed`: :attr:`phase` (``IDLE``, ``HEAD`` or ``BODY``), :attr:`changes`
    (counts every start of a head, of a body, and every return to ``IDLE``),
    :attr:`messages` (heads completed so far), :attr:`body_bytes` and
    :attr:`bodies_started` (of that feed: bytes that belonged to bodies, framing and
    trailers included, and bodies that began), and :attr:`expected` (bytes the body in
    progress still announces by its ``Content-Length``; 0 for a chunked one, or none).
    """

    def __init__(self, max_head: int, max_chunk_line: int) -> None:
        self.max_head = max_head
        self.max_chunk_line = max_chunk_line
        self.phase = IDLE
        self.changes = 0
        self.messages = 0
        self.body_bytes = 0
        self.bodies_started = 0
        self.head_bytes = 0  # of the current request: head, then its trailer too
        self._head = bytearray()  # a head that arrived over several reads, from its first line
        self._in_line = False  # a byte other than CR/LF arrived: the request line started
        self._remaining = 0  # of a Content-Length body, or of a chunk's data
        self._chunked = False
        self._chunk_state = _SIZE
        self._line = bytearray()  # a chunk-size line (or a chunk's CRLF) in progress
        self._trailer_line = 0  # bytes of the trailer line in progress
        self._trailer_cr = False  # that line so far is a lone CR

    def feed(self, data: bytes) -> Violation | None:
        """Follow ``data``; the first rule it breaks (nothing after it is followed)."""
        self.body_bytes = 0
        self.bodies_started = 0
        size = len(data)
        if self.phase == IDLE and size <= self.max_head and data[:1] not in b"\r\n":
            # The usual read: one whole head without a body (a GET), nothing after it.
            match = _HEAD_SCAN.search(data)
            if match is not None and match.group(1) is None and match.end() == size:
                self.messages += 1
                self.changes += 2  # a head started, and the stream is idle again
                self.head_bytes = size
                return None
        pos = 0
        while pos < size:
            if self.phase == BODY:
                end = self._chunk(data, pos) if self._chunked else self._length(data, pos)
                if end < 0:
                    return self._violation
                self.body_bytes += end - pos
                pos = end
            else:
                result = self._head_part(data, pos)
                if isinstance(result, Violation):
                    self._head.clear()
                    return result
                pos = result
        return None

    # --- heads ------------------------------------------------------------------------------

    def _head_part(self, data: bytes, pos: int) -> int | Violation:
        """Follow a head from ``pos``; where it ended (the whole of ``data`` if it did not)."""
        if self.phase == IDLE:
            self.phase = HEAD
            self.changes += 1
            self.head_bytes = 0
            self._in_line = False
        size = len(data)
        if not self._in_line:  # blank lines before a request line are skipped by parsers
            skip = pos
            while skip < size and data[skip] in b"\r\n":
                skip += 1
            self.head_bytes += skip - pos
            if self.head_bytes > self.max_head:
                return Violation.HEAD_TOO_LARGE
            if skip == size:
                return size
            pos = skip
            self._in_line = True
        held = len(self._head)
        if held:  # the head began in an earlier read
            self._head += data[pos:]
            match = _HEAD_END.search(self._head, max(0, held - 2))
            end = size if match is None else pos + match.end() - held
        else:  # the usual case: one pass finds the framing headers and the end
            codings: list[bytes] = []
            lengths: list[bytes] = []
            folded = False
            match = _HEAD_SCAN.search(data, pos)
            while match is not None and match.group(1) is not None:
                name, value = match.groups()
                (codings if name[0] in b"tT" else lengths).append(value.strip(b" \t\r"))
                folded = folded or data[match.end() + 1 : match.end() + 2] in (b" ", b"\t")
                match = _HEAD_SCAN.search(data, match.end())
            end = size if match is None else match.end()
        self.head_bytes += end - pos
        if self.head_bytes > self.max_head:
            return Violation.HEAD_TOO_LARGE
        if match is None:
            if not held:
                self._head += data[pos:]
            return size
        if held:
            framing = body_framing(bytes(self._head), 0, match.end())
            self._head.clear()
        elif folded:  # obsolete line folding: the values span lines
            framing = body_framing(data, pos, end)
        else:
            framing = _framing_of(codings, lengths)
        return self._head_done(framing, end)

    def _head_done(self, framing: int | None, end: int) -> int | Violation:
        self.messages += 1
        if framing is None:
            return Violation.BAD_FRAMING
        if framing == 0:
            self._to_idle()
            return end
        self.phase = BODY
        self.changes += 1
        self.bodies_started += 1
        self._chunked = framing < 0
        self._remaining = max(framing, 0)
        self._chunk_state = _SIZE
        self._line.clear()
        return end

    def _to_idle(self) -> None:
        self.phase = IDLE
        self.changes += 1

    # --- bodies -----------------------------------------------------------------------------

    @property
    def expected(self) -> int:
        """Bytes of the body in progress still to come by its ``Content-Length`` (0 when
        chunked, or between bodies)."""
        return self._remaining if self.phase == BODY and not self._chunked else 0

    def _length(self, data: bytes, pos: int) -> int:
        take = min(self._remaining, len(data) - pos)
        self._remaining -= take
        if not self._remaining:
            self._to_idle()
        return pos + take

    _violation: Violation | None = None

    def _fail(self, violation: Violation) -> int:
        """Record ``violation`` for :meth:`feed`; the position that says so."""
        self._violation = violation
        return -1

    def _chunk(self, data: bytes, pos: int) -> int:
        """Follow a chunked body from ``pos``; where it (or ``data``) ended, or -1 for a
        violation (:attr:`_violation`)."""
        size = len(data)
        while pos < size:
            state = self._chunk_state
            if state == _DATA:
                take = min(self._remaining, size - pos)
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._chunk_state = _DATA_END
                continue
            if state == _TRAILER:
                nl = data.find(b"\n", pos)
                end = size if nl < 0 else nl + 1
                self.head_bytes += end - pos
                if self.head_bytes > self.max_head:
                    return self._fail(Violation.TRAILER_TOO_LARGE)
                piece_len = (end if nl < 0 else nl) - pos
                if piece_len:
                    self._trailer_cr = (
                        self._trailer_line == 0 and piece_len == 1 and (data[pos] == 13)
                    )
                    self._trailer_line += piece_len
                pos = end
                if nl >= 0:
                    empty = self._trailer_line == 0 or (
                        self._trailer_line == 1 and self._trailer_cr
                    )
                    self._trailer_line, self._trailer_cr = 0, False
                    if empty:
                        self._to_idle()
                        return pos
                continue
            # a chunk-size line, or the CRLF after a chunk's data
            nl = data.find(b"\n", pos)
            end = size if nl < 0 else nl + 1
            if len(self._line) + (end - pos) > self.max_chunk_line + 2:  # CRLF not counted
                return self._fail(Violation.CHUNK_LINE_TOO_LONG)
            self._line += data[pos:end]
            pos = end
            if nl < 0:
                continue
            line = bytes(self._line).rstrip(b"\n").rstrip(b"\r")
            self._line.clear()
            if state == _DATA_END:
                if line:
                    return self._fail(Violation.BAD_FRAMING)
                self._chunk_state = _SIZE
                continue
            digits = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(digits):
                return self._fail(Violation.BAD_FRAMING)
            self._remaining = int(digits, 16)
            if self._remaining:
                self._chunk_state = _DATA
            else:
                self._chunk_state = _TRAILER
                self._trailer_line, self._trailer_cr = 0, False
        return pos
