"""FakeCML's HTTP side: requests in, CML-shaped answers and errors out."""

from __future__ import annotations

import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from raylm_cai.testing.wire import GRPC_CODES, APIError

# FakeCML.handle(method, path below /api/v2/, query, body, API key) -> the answer's JSON
Handle = Callable[[str, str, dict[str, str], Any, "str | None"], Any]


def handler_for(handle: Handle) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            authorization = self.headers.get("authorization") or ""
            api_key = authorization[len("Bearer ") :] if authorization.startswith("Bearer ") else None
            try:
                if not parts.path.startswith("/api/v2/"):
                    raise APIError(404, f"no such endpoint: {parts.path}")
                try:
                    body = json.loads(raw) if raw.strip() else None
                except ValueError:
                    raise APIError(400, "request body is not valid JSON") from None
                answer, status = handle(self.command, parts.path[len("/api/v2/") :], query, body, api_key), 200
            except APIError as error:
                code = GRPC_CODES.get(error.status, 2)
                answer = {"error": error.message, "code": code, "message": error.message, "details": []}
                status = error.status
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            if status == 429:
                self.send_header("retry-after", "1")
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:  # requests are in FakeCML.requests, not on stderr
            pass

    return Handler
