"""Records of what raylm started, so `raylm status` and `raylm stop` find it from any shell.

They live under `$RAYLM_HOME` (default `~/.raylm`), one JSON file per record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` so that a reader sees the old content or the new, never half of it; a new
    file gets `mode` from its creation on (0o600: never readable by others, not even for a moment)."""
    # A temporary name of its own: two writers of one file (two processes, two threads) never share one.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def raylm_home() -> Path:
    return Path(os.environ.get("RAYLM_HOME") or Path.home() / ".raylm")


class Busy(Exception):
    """Another process holds the lock; `pid` is the one that took it (None if unknown)."""

    def __init__(self, pid: int | None):
        super().__init__(pid)
        self.pid = pid


@contextlib.contextmanager
def exclusive(kind: str, name: str) -> Iterator[None]:
    """Hold the lock of `name` among `kind` (e.g. one deployment's start) for the block, or raise `Busy` at
    once. The kernel lets go of it when the process ends, however it ends: no stale lock to clean up."""
    folder = raylm_home() / "locks" / kind
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            raise Busy(int(holder) if holder.isdigit() else None) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


class Records:
    """JSON records of one kind (e.g. "deployments"), keyed by name."""

    def __init__(self, kind: str):
        self.kind = kind

    @property
    def folder(self) -> Path:
        return raylm_home() / self.kind

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def save(self, name: str, record: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path(name), json.dumps(record, indent=2))

    def load(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(name).read_text())
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.exists() else []

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
