"""The replicas' KV-cache events, followed for the precise routing policy.

An engine that publishes its events names a follower (`Engine.kv_events_follower`,
"module:function"): `follow(url, deliver, stopping)` subscribes to one replica's events and calls
`deliver(events)` with each batch (`raylm.serving.prefix_index` events), `deliver(None)` when some
were lost, until `stopping` is set. The router runs one follower per replica on a thread of its own
(so decoding never sits on the router's loop) and applies what it delivers to the model's index on
its loop; a replica that leaves, or whose events were lost, is forgotten by the index.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Callable

from raylm.serving.prefix_index import PrefixIndex

logger = logging.getLogger("raylm.router")


def load_follower(path: str) -> Callable[..., None]:
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)


class EventFeeds:
    """One follower thread per replica that publishes events."""

    def __init__(self, loop: Callable[[], asyncio.AbstractEventLoop]):
        self.loop = loop
        self.following: dict[str, threading.Event] = {}

    def follow(self, replica: str, url: str, follower: str, index: PrefixIndex) -> None:
        if replica in self.following:
            return
        stopping = threading.Event()
        self.following[replica] = stopping
        loop = self.loop()

        def deliver(events: list | None) -> None:
            if events is None:
                loop.call_soon_threadsafe(index.forget, replica)
            elif events:
                loop.call_soon_threadsafe(index.apply, replica, events)

        def run() -> None:
            try:
                load_follower(follower)(url, deliver, stopping)
            except Exception as exc:  # the router keeps routing: by load, for this replica
                logger.warning("replica %s: its KV-cache events at %s cannot be followed: %s", replica, url, exc)
                loop.call_soon_threadsafe(index.forget, replica)

        threading.Thread(target=run, name=f"raylm-kv-events-{replica}", daemon=True).start()
        logger.info("replica %s: following its KV-cache events at %s", replica, url)

    def stop(self, replica: str) -> None:
        stopping = self.following.pop(replica, None)
        if stopping is not None:
            stopping.set()

    def stop_all(self) -> None:
        for replica in list(self.following):
            self.stop(replica)
