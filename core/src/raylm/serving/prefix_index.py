"""Which replica holds which prefix: the index prefix-aware routing scores replicas by.

A prefix is a chain of blocks (token ids, or digests of text for the approximate index), each
block's key made from the key before it and the block's own content, so a key names the whole
prefix up to its block. Keys are computed here from content (Python's hash of tuples of ints,
which no process salts, from a root digest), never copied from an engine, so two routers fed the
same engine events hold the same keys and decide alike.

Fed two ways:
- precise: from each replica's engine, as KV-cache events (a block stored with its token ids and
  the engine's own hashes, blocks removed by those hashes, everything cleared). A block whose
  parent the index never saw (an event lost) starts no chain: the index only claims what it was
  told.
- approximate: from the router's own decisions (`record`): what it sent where, bounded to
  `max_blocks` and forgotten after `ttl_s`, for engines that publish no events.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

ROOT = 0


def digest(value: object) -> int:
    """A 64-bit digest of `value`'s repr, the same in every process (Python salts the hash of strings)."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "big")


def root_key(root: Hashable) -> int:
    """The key chains start from: `root` separates chains that must never match (another LoRA adapter's
    blocks, another model's text)."""
    return digest(("raylm-prefix", root))


def chain_keys(blocks: Iterable[Hashable], root: Hashable = ROOT) -> list[int]:
    """The key of every prefix of `blocks` (tuples of ints, or ints): key i names blocks 0..i."""
    keys = []
    key = root_key(root)
    for block in blocks:
        key = hash((key, block))
        keys.append(key)
    return keys


def token_blocks(tokens: Sequence[int], block_size: int) -> list[tuple[int, ...]]:
    """The full blocks of `tokens` (an engine caches only full blocks)."""
    return [tuple(tokens[i : i + block_size]) for i in range(0, len(tokens) - block_size + 1, block_size)]


@dataclass(frozen=True)
class Stored:
    """An engine stored blocks: `block_hashes` (the engine's own, one per block) of `token_ids`, chained to
    the engine's block `parent` (None: the first of a prompt), under a LoRA adapter's name (or None)."""

    block_hashes: tuple[Hashable, ...]
    parent: Hashable | None
    token_ids: tuple[int, ...]
    block_size: int
    adapter: str | None = None


@dataclass(frozen=True)
class Removed:
    block_hashes: tuple[Hashable, ...]


@dataclass(frozen=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared


class PrefixIndex:
    """Which replicas hold each prefix, by replica id."""

    def __init__(self, max_blocks: int = 200_000, ttl_s: float | None = None):
        self.holders: dict[int, set[str]] = {}
        self.engine_keys: dict[str, dict[Hashable, int]] = {}  # replica -> engine's block hash -> our key
        self.key_counts: dict[str, Counter[int]] = {}  # replica -> our key -> engine blocks with it
        self.recorded: OrderedDict[tuple[str, int], float] = OrderedDict()  # approximate: (replica, key) -> when
        self.max_blocks, self.ttl_s = max_blocks, ttl_s
        self.block_size: int | None = None  # the engines' block size, as their events say

    # precise: the engines' own events
    def apply(self, replica: str, events: Iterable[Event]) -> None:
        own = self.engine_keys.setdefault(replica, {})
        counts = self.key_counts.setdefault(replica, Counter())
        for event in events:
            if isinstance(event, Stored):
                self.block_size = event.block_size
                if event.parent is None:
                    parent_key = root_key(event.adapter or ROOT)
                elif event.parent in own:
                    parent_key = own[event.parent]
                else:
                    continue  # its chain's start was never seen: claim nothing
                blocks = token_blocks(event.token_ids, event.block_size)
                for engine_hash, block in zip(event.block_hashes, blocks):
                    parent_key = hash((parent_key, block))
                    if engine_hash not in own:
                        own[engine_hash] = parent_key
                        counts[parent_key] += 1
                        self.holders.setdefault(parent_key, set()).add(replica)
            elif isinstance(event, Removed):
                for engine_hash in event.block_hashes:
                    key = own.pop(engine_hash, None)
                    if key is not None:
                        counts[key] -= 1
                        if not counts[key]:  # (two engine blocks of one content: another salt)
                            del counts[key]
                            self._drop(key, replica)
            else:
                self.forget(replica)
                own = self.engine_keys.setdefault(replica, {})
                counts = self.key_counts.setdefault(replica, Counter())

    def forget(self, replica: str) -> None:
        """The replica holds nothing we know of (its engine restarted, its events stopped, it left)."""
        self.engine_keys.pop(replica, None)
        for key in self.key_counts.pop(replica, {}):
            self._drop(key, replica)
        for entry in [e for e in self.recorded if e[0] == replica]:
            del self.recorded[entry]
            self._drop(entry[1], replica)

    # approximate: what the router sent where
    def record(self, replica: str, keys: Sequence[int]) -> None:
        now = time.monotonic()
        for key in keys:
            self.holders.setdefault(key, set()).add(replica)
            self.recorded[(replica, key)] = now
            self.recorded.move_to_end((replica, key))
        while len(self.recorded) > self.max_blocks:
            (old_replica, old_key), _ = self.recorded.popitem(last=False)
            self._drop(old_key, old_replica)
        if self.ttl_s is not None:
            while self.recorded:
                (old_replica, old_key), when = next(iter(self.recorded.items()))
                if now - when < self.ttl_s:
                    break
                del self.recorded[(old_replica, old_key)]
                self._drop(old_key, old_replica)

    def _drop(self, key: int, replica: str) -> None:
        holders = self.holders.get(key)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self.holders[key]

    # what routing asks
    def matched(self, keys: Sequence[int], replicas: Iterable[str]) -> dict[str, int]:
        """For each replica, how many blocks of the prefix `keys` it holds from the start."""
        matched = dict.fromkeys(replicas, 0)
        still = set(matched)
        for depth, key in enumerate(keys, start=1):
            still &= self.holders.get(key, set())
            if not still:
                break
            for replica in still:
                matched[replica] = depth
        return matched

    def blocks(self) -> int:
        return len(self.holders)
