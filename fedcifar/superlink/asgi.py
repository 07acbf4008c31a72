"""What fedcifar's ASGI layers in front of Flower's SuperLink do themselves: read a small body (and
hand it on whole to Flower's path), and answer an error as Flower's own path would."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from flwr.supercore.error import FlowerError
from flwr.supercore.error.catalog import API_ERROR_MAP
from starlette.responses import JSONResponse

Receive = Callable[[], Awaitable[dict]]


async def read_body(receive: Receive, limit: int) -> tuple[bytes | None, Receive]:
    """The request's body if it is at most ``limit`` bytes (else None), and a ``receive`` that gives
    whoever the request goes to next the whole body again."""
    chunks, size, message = [], 0, {"more_body": True}
    while message.get("more_body") and size <= limit:
        message = await receive()
        if message["type"] != "http.request":  # the client left: Flower's path sees it too
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
    body = b"".join(chunks)
    more = message.get("more_body", False)
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        if message["type"] != "http.request":
            return message
        return {"type": "http.request", "body": body, "more_body": more}

    return (None if more or size > limit or message["type"] != "http.request" else body), replay


def flower_error_response(err: FlowerError) -> JSONResponse:
    """``err`` as Flower's error translator (``flwr.supercore.error.http``) answers it: its catalog's
    status, headers and public message, the code and public details."""
    spec = API_ERROR_MAP[err.code]
    return JSONResponse(err.to_json(spec.public_message), spec.http_status_code, spec.http_headers)
