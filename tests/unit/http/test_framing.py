"""The request framing the edge follows beside the parser: where heads and bodies end, in
any split of the stream into reads, and the limits it reports (head with trailer, chunk-size
line, malformed framing)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from cp_token.http.framing import BODY, HEAD, IDLE, RequestFraming, Violation, body_framing

MAX_HEAD = 1024
MAX_LINE = 64


def framing() -> RequestFraming:
    return RequestFraming(MAX_HEAD, MAX_LINE)


def feed_all(stream: bytes, cuts: list[int] | None = None) -> tuple[RequestFraming, object]:
    """Feed ``stream`` split at ``cuts``; the framing and the first violation."""
    f = framing()
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts or [])})
    body = 0
    for a, b in itertools.pairwise(points):
        problem = f.feed(stream[a:b])
        body += f.body_bytes
        if problem is not None:
            return f, problem
    f.body_bytes = body
    return f, None


GET = b"GET /token HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer x\r\n\r\n"


def post(body: bytes, extra: bytes = b"") -> bytes:
    head = b"POST /oauth2/token HTTP/1.1\r\nHost: cp\r\n" + extra
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(chunks: list[bytes], trailer: bytes = b"", ext: bytes = b"") -> bytes:
    out = b"POST /x HTTP/1.1\r\nHost: cp\r\nTransfer-Encoding: chunked\r\n\r\n"
    for chunk in chunks:
        out += b"%x%s\r\n%s\r\n" % (len(chunk), ext, chunk)
    return out + b"0\r\n" + trailer + b"\r\n"


def test_heads_and_bodies_end_where_the_parser_ends_them() -> None:
    f, problem = feed_all(GET + post(b"a=1&b=2") + chunked([b"hello", b"x" * 300]) + GET)
    assert problem is None
    assert (f.messages, f.phase) == (4, IDLE)
    assert f.body_bytes == len(b"a=1&b=2") + len(chunked([b"hello", b"x" * 300])) - len(
        b"POST /x HTTP/1.1\r\nHost: cp\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


def test_phases_in_order() -> None:
    f = framing()
    assert f.phase == IDLE
    f.feed(b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n")
    assert f.phase == HEAD and f.messages == 0
    f.feed(b"\r\nab")
    assert f.phase == BODY and f.messages == 1 and f.bodies_started == 1 and f.body_bytes == 2
    f.feed(b"cd")
    assert f.phase == IDLE and f.body_bytes == 2 and f.bodies_started == 0
    f.feed(b"\r\n")  # a stray CRLF between requests starts a head (bounded like one)
    assert f.phase == HEAD


def test_the_head_limit_counts_the_whole_head_and_blank_lines_before_it() -> None:
    assert feed_all(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n")[1] is (
        Violation.HEAD_TOO_LARGE
    )
    assert feed_all(b"\r\n" * MAX_HEAD)[1] is Violation.HEAD_TOO_LARGE
    just = b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD - 24) + b"\r\n\r\n"
    assert len(just) <= MAX_HEAD and feed_all(just)[1] is None


def test_a_trailer_counts_with_its_head() -> None:
    head_size = len(b"POST /x HTTP/1.1\r\nHost: cp\r\nTransfer-Encoding: chunked\r\n\r\n")
    fits = b"X-T: " + b"a" * (MAX_HEAD - head_size - 12) + b"\r\n"
    f, problem = feed_all(chunked([b"hi"], trailer=fits))
    assert problem is None and f.phase == IDLE
    endless = chunked([b"hi"])[:-2] + b"X-T: " + b"a" * MAX_HEAD
    assert feed_all(endless)[1] is Violation.TRAILER_TOO_LARGE
    many = chunked([b"hi"])[:-2] + b"A: b\r\n" * (MAX_HEAD // 6)
    assert feed_all(many)[1] is Violation.TRAILER_TOO_LARGE


def test_a_long_chunk_size_line_ends_it() -> None:
    ok = chunked([b"hello"], ext=b";n=" + b"v" * (MAX_LINE - 10))
    assert feed_all(ok)[1] is None
    long_ext = chunked([b"hello"], ext=b";n=" + b"v" * MAX_LINE)
    assert feed_all(long_ext)[1] is Violation.CHUNK_LINE_TOO_LONG
    endless = chunked([])[:-5] + b"1;" + b"e" * 10_000
    assert feed_all(endless, [90, 200])[1] is Violation.CHUNK_LINE_TOO_LONG
    zeros = chunked([])[:-5] + b"0" * (MAX_LINE + 3)
    assert feed_all(zeros)[1] is Violation.CHUNK_LINE_TOO_LONG
    exact = chunked([b"hello"], ext=b";" + b"n" * (MAX_LINE - 2))  # "5;nnn..." is MAX_LINE long
    assert feed_all(exact)[1] is None
    over = chunked([b"hello"], ext=b";" + b"n" * (MAX_LINE - 1))
    assert feed_all(over, [100, 130])[1] is Violation.CHUNK_LINE_TOO_LONG


def test_framing_no_parser_accepts_is_reported() -> None:
    base = b"POST /x HTTP/1.1\r\nHost: cp\r\n"
    for head in (
        base + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\n",
        base + b"Content-Length: -1\r\n\r\n",
        base + b"Content-Length: \xc2\xb9\r\n\r\n",  # superscript one
        base + b"Transfer-Encoding: gzip\r\n\r\n",
        base + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        base + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n",
        base + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabXY\r\n",
    ):
        assert feed_all(head)[1] is Violation.BAD_FRAMING, head


def test_body_framing_reads_what_parsers_read() -> None:
    def framing_of(headers: bytes) -> int | None:
        return body_framing(b"POST / HTTP/1.1\r\n" + headers + b"\r\n")

    assert framing_of(b"") == 0
    assert framing_of(b"Content-Length: 12\r\n") == 12
    assert framing_of(b"content-length:  7 \r\nContent-Length: 7\r\n") == 7
    assert framing_of(b"Content-Length: 7, 7\r\n") == 7
    assert framing_of(b"Transfer-Encoding: gzip, chunked\r\n") == -1
    assert framing_of(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n") == -1
    assert framing_of(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n") == -1
    assert framing_of(b"X-Content-Length: 3\r\n") == 0
    assert framing_of(b"Transfer-Encoding: gzip,\r\n chunked\r\n") == -1  # obs-fold
    assert framing_of(b"Content-Length: 1\r\n 2\r\n") is None  # "1 2"
    assert framing_of(b"TRANSFER-ENCODING: Chunked\r\n") == -1
    assert framing_of(b"X: a\r\nContent-Length : 3\r\n") == 0  # not a header parsers take


requests = st.one_of(
    st.just(GET),
    st.binary(max_size=300).map(post),
    st.lists(st.binary(min_size=1, max_size=200), max_size=4).map(chunked),
    st.tuples(st.lists(st.binary(min_size=1, max_size=50), max_size=3), st.binary(max_size=40)).map(
        lambda t: chunked(t[0], trailer=b"X-Sum: " + t[1].hex().encode() + b"\r\n", ext=b";a=b")
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(requests, min_size=1, max_size=6), st.lists(st.integers(0, 4000), max_size=12))
def test_any_split_of_well_formed_requests_frames_them_all(
    stream_parts: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(stream_parts)
    whole, problem = feed_all(stream)
    assert problem is None
    assert (whole.messages, whole.phase) == (len(stream_parts), IDLE)
    split, problem = feed_all(stream, cuts)
    assert problem is None
    assert (split.messages, split.phase, split.body_bytes) == (
        whole.messages,
        IDLE,
        whole.body_bytes,
    )
