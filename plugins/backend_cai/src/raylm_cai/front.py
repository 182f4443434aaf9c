"""The head application's port (`CDSW_APP_PORT`): what CML's ingress reaches at the application's URL,
`https://SUBDOMAIN.CDSW_DOMAIN`.

Each connection is passed, byte for byte, to the router of the deployment served on the head (this
pod's IP, port `RAYLM_CAI_API_PORT`, 8000 by default as for `raylm serve`), so the application's URL is
the OpenAI endpoint, keys and all, and CML's polling of `/` reaches the router's `/`. While no
deployment listens there, the front answers itself: `/` 200 once the Ray head runs (503 before), so
CML marks the application running; any other path 503 in OpenAI's shape, saying what to do.
"""

from __future__ import annotations

import asyncio
import json
import threading

from raylm.toolkit import error_body, raw_response

DEFAULT_API_PORT = 8000
READ_TIMEOUT_S = 10.0


class Front:
    """Listens on 127.0.0.1:`port` (CML proxies the application port from there) in a thread of its own."""

    def __init__(self, port: int, target: tuple[str, int], cluster: str):
        self.port, self.target, self.cluster = port, target, cluster
        self.ray_running = False  # set once the Ray head runs: CML's polling gets 200 from then on
        started = threading.Event()
        threading.Thread(target=asyncio.run, args=(self._serve(started),), name="raylm-front", daemon=True).start()
        started.wait(10)

    async def _serve(self, started: threading.Event) -> None:
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        started.set()
        async with server:
            await server.serve_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:  # no router listens: nothing is served yet
            await self._answer(reader, writer)
            return
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:  # a request line and headers within the reader's limit (64 KiB) and READ_TIMEOUT_S
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        path = head.split(b" ", 2)[1].split(b"?", 1)[0] if head.count(b" ") >= 2 else b""
        if path == b"/":
            status = 200 if self.ray_running else 503
            state = "running" if self.ray_running else "starting"
            body = f"raylm: the Ray head of cluster {self.cluster!r} is {state}; no deployment serves here yet\n"
            writer.write(raw_response(status, "text/plain", body.encode(), keep_alive=False))
        else:
            message = (
                f"no deployment serves on cluster {self.cluster!r} yet: start one with "
                f"`raylm serve --backend cai --cluster {self.cluster} ...` (on port {self.target[1]})"
            )
            payload = json.dumps(error_body(503, message, code="no_deployment")).encode()
            writer.write(raw_response(503, "application/json", payload, keep_alive=False))
        try:
            await writer.drain()
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side ends; then end the other, so neither connection lingers."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
