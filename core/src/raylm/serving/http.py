"""HTTP framing and OpenAI's error shape: what the router writes itself."""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus

MAX_BODY_BYTES = 64 * 1024 * 1024
# Headers that describe one connection, not the request; the router sets its own framing.
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"expect",
    b"content-length",
}
NOT_FORWARDED = HOP_BY_HOP | {b"authorization"}


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(status: int, body: bytes) -> dict | None:
    """An engine's error body in OpenAI's shape, or None when it already is in it.

    Engines differ: vLLM answers `{"error": {...}}`, SGLang `{"object": "error", "message": ...}`,
    a crashed handler plain text.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return None
    if isinstance(payload, dict):
        message = payload.get("message") or payload.get("detail") or payload.get("error") or json.dumps(payload)
        shaped = error_body(status, str(message), param=payload.get("param"))
        shaped["error"]["code"] = payload.get("code", status)
        return shaped
    text = body.decode(errors="replace").strip()
    return error_body(status, text or reason(status), code=str(status))


class BodyReader:
    """httptools callbacks that keep a response's body."""

    def __init__(self) -> None:
        self.body = bytearray()

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk


def response_body(response: bytes) -> bytes:
    """The body of a whole raw HTTP response, its transfer encoding undone."""
    import httptools  # here, not at import: plugins use this module's helpers where httptools is not installed

    reader = BodyReader()
    httptools.HttpResponseParser(reader).feed_data(response)
    return bytes(reader.body)


def json_body(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def raw_response(
    status: int, content_type: str, body: bytes, keep_alive: bool = True, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}", f"content-type: {content_type}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def with_header(response_head: bytes, name: bytes, value: bytes) -> bytes:
    """An engine's response head (or the start of it) with one header more, unless the engine sent it."""
    status_line, _, rest = response_head.partition(b"\r\n")
    head = rest.split(b"\r\n\r\n", 1)[0].lower()
    if head.startswith(name + b":") or b"\r\n" + name + b":" in head:
        return response_head
    return status_line + b"\r\n" + name + b": " + value + b"\r\n" + rest


def forwarded_request(
    method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes, api_key: str | None, own_key: bool
) -> bytes:
    """The request as the router sends it on to an engine: the client's headers but the router's framing.

    With `api_key` (the engine's own), it is sent instead of the client's; a client's key that was the
    endpoint's (`own_key`) is never passed on; otherwise the client's `authorization` goes through.
    """
    drop = NOT_FORWARDED if api_key is not None or own_key else HOP_BY_HOP
    head = [method + b" " + url + b" HTTP/1.1\r\n"]
    head += [name + b": " + value + b"\r\n" for name, value in headers if name.lower() not in drop]
    if api_key is not None:
        head.append(b"authorization: Bearer " + api_key.encode() + b"\r\n")
    head.append(b"content-length: %d\r\n\r\n" % len(body))
    return b"".join(head) + body
