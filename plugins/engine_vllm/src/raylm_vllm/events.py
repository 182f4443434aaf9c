"""vLLM's KV-cache events, as raylm's router follows them (the `precise` routing policy).

A replica's vLLM publishes its events on a ZeroMQ PUB socket (`--kv-events-config`, publisher
`zmq`): multipart messages of a topic, an 8-byte big-endian sequence number and a msgpack
`KVEventBatch` (`[ts, [event, ...], data_parallel_rank]`), each event a map tagged by `type`
(`BlockStored`, `BlockRemoved`, `AllBlocksCleared`; vLLM releases before 0.11 sent arrays whose
first item is the type, which are read too). `follow` runs on a thread of the router's own: it
subscribes, decodes each batch into `raylm.serving.prefix_index` events and hands them on; a gap in
the sequence (events lost: the engine restarted, the socket dropped messages) is said as `None`, so
that the router forgets what it believed the replica held.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from raylm.toolkit import Cleared, Removed, Stored

POLL_MS = 200  # how often the thread looks whether it should stop


def decode(payload: bytes) -> list[Stored | Removed | Cleared]:
    """One msgpack event batch as the router's events (medium other than the GPU's/CPU's own: ignored)."""
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
