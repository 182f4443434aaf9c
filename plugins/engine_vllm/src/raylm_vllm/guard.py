"""An ASGI middleware for vLLM's server that refuses every route but `/health` without the replica's key.

vLLM's own key (`VLLM_API_KEY`) guards only `/v1`, `/v2`, `/inference` and `/cohere`: on the
engine's port, `/invocations` (which generates), `/tokenize`, `/detokenize`, `/classify`,
`/abort_requests`, `/metrics` and more answer anyone who reaches it. raylm starts vLLM with
`--middleware raylm_vllm.guard.RequireReplicaKey`, so that only the router (which has each
replica's key) reaches any of them; `/health` stays open for the replica's own health checks.
Imported by vLLM's server in the engine's environment: it needs nothing but the standard library.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

OPEN_PATHS = frozenset({"/health"})
REFUSAL = json.dumps(
    {"error": {"message": "this engine answers its replica's router only", "type": "invalid_request_error",
               "param": None, "code": "invalid_api_key"}}
).encode()  # fmt: skip

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RequireReplicaKey:
    """Every HTTP request and WebSocket but `/health` needs `Authorization: Bearer $VLLM_API_KEY`."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app
        key = os.environ.get("VLLM_API_KEY")
        self.expected = b"Bearer " + key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(REFUSAL)).encode())]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": REFUSAL})
