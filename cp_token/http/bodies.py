"""Reading a request body at the edge: bounded in size and in time.

Shared by every route that takes a body (the CP's token exchange, the injector's
``/mutate``): a body over the limit is refused (413) as soon as that is known, without
reading the rest; one that has not fully arrived within :data:`BODY_TIMEOUT` is a 400 (a
slow body would hold a connection); a client that goes away mid-body is a 400, never a 500.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from cp_token.errors import InvalidRequest, PayloadTooLarge

__all__ = ["BODY_TIMEOUT", "read_body"]

BODY_TIMEOUT = 10.0


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read chunk by chunk and abandoned (413) as soon as it exceeds ``limit``."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    receive = request.receive
    more = True
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    raise InvalidRequest("the body was cut short", reason="client_disconnect")
                chunk: bytes = message.get("body", b"")
                more = message.get("more_body", False)
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise InvalidRequest(
            f"the body did not arrive within {BODY_TIMEOUT:g} s", reason="body_timeout"
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
