"""The router on a thread and event loop of its own: in a Ray Serve replica, Serve's event loop never
sits in the data path; in a test, the test's thread stays free to be a client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from typing import Any

from raylm.ray_nodes import leave_batch_scheduling
from raylm.serving.router import Router, run
from raylm.serving.routes import RouteTable


class RouterThread:
    """A running router: `start` returns once it listens; `call` runs a function on its loop."""

    def __init__(self, expected_models: Iterable[str] = (), expire_after_s: float | None = None, **router_options: Any):
        self.table = RouteTable(expected_models)
        self.router = Router(self.table, **router_options)
        self.expire_after_s = expire_after_s  # forget replicas whose heartbeats stopped this long ago
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.stopping: asyncio.Event | None = None

    def start(self, host: str, port: int) -> None:
        """Listen on host:port; raise OSError when the router cannot."""
        started = threading.Event()
        failure: list[OSError] = []

        async def main() -> None:
            leave_batch_scheduling()  # the data path; the rest of a Ray node is batch (raylm.ray_nodes)
            self.loop = asyncio.get_running_loop()
            self.stopping = asyncio.Event()
            try:
                await self.router.start(host, port)
            except OSError as exc:
                failure.append(exc)
                return
            finally:
                started.set()
            while not await _set_within(self.stopping, 1.0):
                if self.expire_after_s is not None:
                    self.table.expire(self.expire_after_s)
            await self.router.stop()

        self.thread = threading.Thread(target=run, args=(main(),), name="raylm-router", daemon=True)
        self.thread.start()
        started.wait()
        if failure:
            raise failure[0]

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on the router's loop, where the route table may be touched."""

        async def on_loop() -> Any:
            return function(*args)

        return asyncio.run_coroutine_threadsafe(on_loop(), self.loop).result(timeout=10)

    # The router's front for its replicas (`raylm.serving.replicas`): each call runs on the router's loop.
    def register(self, *registration: Any) -> None:
        """A replica joins, or beats: see `RouteTable.register`."""
        self.call(self.table.register, *registration)

    def deregister(self, replica_id: str) -> None:
        self.call(self.table.deregister, replica_id)

    def retire(self, replica_id: str) -> int:
        return self.call(self.router.retire, replica_id)

    def load(self, model: str, replica_id: str) -> float:
        return self.call(self.router.load, model, replica_id)

    def start_draining(self) -> int:
        return self.call(self.router.start_draining)

    def unfinished(self) -> int:
        return self.call(self.router.unfinished)

    def is_alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stopping.set)
            self.thread.join(timeout=10)


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True
