"""Which replicas serve which model, as the replicas register themselves; touched only on the router's loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

logger = logging.getLogger("raylm.router")


@dataclass(eq=False)
class Upstream:
    """One replica's engine server, with its requests in flight."""

    model: str
    host: str
    port: int
    replica_id: str
    api_key: str | None = None  # the key its engine server requires (each replica has its own)
    kv_events: tuple[str, str] | None = None  # (url, follower) of its engine's KV-cache events, if published
    in_flight: int = 0
    retiring: bool = False  # going away: finishes its requests, is given no new ones
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Lease:
    """A request's place in a replica's count of requests in flight: taken once, given back exactly once
    (then `on_release(model)` hears of it: a waiting request may go)."""

    def __init__(self, upstream: Upstream, on_release: Callable[[str], None] | None = None):
        self.upstream = upstream
        self.on_release = on_release
        self.held = True
        upstream.in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.upstream.in_flight -= 1
            if self.on_release is not None:
                self.on_release(self.upstream.model)


class RouteTable:
    """The replicas of each model, refreshed by their heartbeats, and what `/v1/models` says of them."""

    def __init__(self, expected_models: Iterable[str] = ()):
        self.expected_models = list(expected_models)
        self.upstreams: dict[str, list[Upstream]] = {}
        self.cards: dict[str, dict] = {}
        # Told the model whose replicas came or went (the router's queues wake who can go now).
        self.on_change: Callable[[str, list[Upstream]], None] = lambda model, replicas: None
        # Told of a replica that joined or left the table (the router follows its events, closes its connections).
        self.on_added: Callable[[Upstream], None] = lambda upstream: None
        self.on_removed: Callable[[Upstream], None] = lambda upstream: None

    def register(
        self, model: str, url: str, replica_id: str, card: dict | None = None, api_key: str | None = None,
        kv_events: tuple[str, str] | None = None,
    ) -> None:  # fmt: skip
        """Add a replica, or refresh it (replicas re-register as a heartbeat)."""
        parts = urlsplit(url)
        replicas = self.upstreams.setdefault(model, [])
        for upstream in replicas:
            if upstream.replica_id == replica_id:
                upstream.last_seen = time.monotonic()
                if (upstream.host, upstream.port, upstream.api_key) == (parts.hostname, parts.port, api_key):
                    break
                self._remove(replicas, upstream)
        else:
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            upstream = Upstream(model, host, port, replica_id, api_key, tuple(kv_events) if kv_events else None)
            replicas.append(upstream)
            logger.info("model %s: replica %s at %s", model, replica_id, url)
            self.on_added(upstream)
            self.on_change(model, replicas)
        if card:
            self.cards[model] = card

    def deregister(self, replica_id: str) -> None:
        for model, replicas in self.upstreams.items():
            for upstream in [u for u in replicas if u.replica_id == replica_id]:
                self._remove(replicas, upstream)
                self.on_change(model, replicas)

    def expire(self, older_than: float) -> None:
        """Forget replicas whose last heartbeat is older than `older_than` seconds."""
        cutoff = time.monotonic() - older_than
        for model, replicas in self.upstreams.items():
            for upstream in [u for u in replicas if u.last_seen < cutoff]:
                logger.warning("model %s: replica %s stopped answering; removed", upstream.model, upstream.replica_id)
                self._remove(replicas, upstream)
                self.on_change(model, replicas)

    def _remove(self, replicas: list[Upstream], upstream: Upstream) -> None:
        replicas.remove(upstream)
        self.on_removed(upstream)

    def retire(self, replica_id: str) -> int:
        """Give the replica no new requests (it is going away); how many it still has in flight."""
        retiring = [u for replicas in self.upstreams.values() for u in replicas if u.replica_id == replica_id]
        for upstream in retiring:
            upstream.retiring = True
        return sum(upstream.in_flight for upstream in retiring)

    def replicas(self, model: str) -> list[Upstream]:
        """The replicas new requests for `model` may go to."""
        return [upstream for upstream in self.upstreams.get(model) or () if not upstream.retiring]

    def in_flight(self) -> int:
        return sum(upstream.in_flight for replicas in self.upstreams.values() for upstream in replicas)

    def model_names(self) -> list[str]:
        return sorted(set(self.expected_models) | {m for m, r in self.upstreams.items() if r})

    def pending_models(self) -> list[str]:
        return [m for m in self.expected_models if not self.replicas(m)]

    def models_payload(self) -> dict:
        data = []
        for name in self.model_names():
            card = dict(self.cards.get(name) or {"id": name, "object": "model", "created": 0})
            card["owned_by"] = "raylm"
            card["replicas"] = len(self.replicas(name))  # raylm's addition: replicas routed to now
            data.append(card)
        return {"object": "list", "data": data}
