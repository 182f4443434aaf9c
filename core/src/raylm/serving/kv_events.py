"""The replicas' KV-cache events, followed for the precise routing policy.

An engine that publishes its events names a follower (`Engine.kv_events_follower`,
"module:function"): `follow(url, deliver, stopping)` subscribes to one replica's events and calls
`deliver(events)` with each batch (`raylm.serving.prefix_index` events), `deliver(None)` when some
were lost, until `stopping` is set. The router runs one follower per replica on a thread of its own
(so decoding never sits on the router's loop) and applies what it delivers to the model's index on
its loop; a replica that leaves, or whose events were lost, is forgotten by the index.

`follow` here reads the stream vLLM and SGLang both publish (`--kv-events-config`, publisher
`zmq`; the same encoding, which Dynamo also reads with one decoder): multipart messages of a topic,
an 8-byte big-endian sequence number and a msgpack batch (`[ts, [event, ...], data_parallel_rank]`),
each event a map tagged by `type` (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`; vLLM releases
before 0.11 sent arrays whose first item is the type, which are read too). A gap in the sequence
(the engine restarted, the socket dropped messages) is said as `None`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from raylm.serving.prefix_index import Cleared, PrefixIndex, Removed, Stored

logger = logging.getLogger("raylm.router")
FOLLOWER = "raylm.serving.kv_events:follow"  # the follower of vLLM's and SGLang's streams
POLL_MS = 200  # how often the thread looks whether it should stop


def decode(payload: bytes) -> list[Stored | Removed | Cleared]:
    """One msgpack event batch as the router's events."""
    import msgpack

    batch = msgpack.unpackb(payload, raw=False)
    events = []
    for event in batch[1]:
        if isinstance(event, list):  # the array form of older releases
            kind, fields = event[0], dict(zip(("block_hashes", "parent_block_hash", "token_ids", "block_size",
                                                "lora_id", "medium"), event[1:]))  # fmt: skip
        else:
            kind, fields = event.get("type"), event
        if kind == "BlockStored":
            events.append(
                Stored(
                    tuple(_hashable(h) for h in fields["block_hashes"]),
                    _hashable(fields.get("parent_block_hash")),
                    tuple(fields["token_ids"]),
                    fields["block_size"],
                    fields.get("lora_name"),
                )  # fmt: skip
            )
        elif kind == "BlockRemoved":
            events.append(Removed(tuple(_hashable(h) for h in fields["block_hashes"])))
        elif kind == "AllBlocksCleared":
            events.append(Cleared())
    return events


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def follow(url: str, deliver: Callable[[list | None], None], stopping: threading.Event) -> None:
    """Subscribe to the events at `url` until `stopping` is set; `deliver(events)` per batch, `deliver(None)`
    when some were lost."""
    import zmq

    context = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(url)
    expected = None
    try:
        while not stopping.is_set():
            if not socket.poll(POLL_MS):
                continue
            parts = socket.recv_multipart()
            if len(parts) != 3:
                continue
            _, sequence, payload = parts
            number = int.from_bytes(sequence, "big", signed=True)
            if expected is not None and number != expected:
                deliver(None)
            expected = number + 1
            deliver(decode(payload))
    finally:
        socket.close()


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
