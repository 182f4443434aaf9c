"""The endpoint's API keys: read from a file, one key per line, and read again when the file changes,
so a key is rotated by adding the new one first and removing the old one later."""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger("raylm.router")

RELOAD_CHECK_S = 1.0  # how often, at most, the file's modification time is looked at


class KeyFile:
    """The keys of one file; a request's `Authorization: Bearer KEY` either names one of them or not."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.keys: list[bytes] = []
        self.changed = -1.0
        self.checked = 0.0
        self.reload()
        if not self.keys:
            raise ValueError(f"the API key file {self.path} holds no key (one key per line)")

    def reload(self) -> None:
        changed = os.stat(self.path).st_mtime
        if changed != self.changed:
            lines = self.path.read_text().splitlines()
            self.keys = [line.strip().encode() for line in lines if line.strip() and not line.startswith("#")]
            self.changed = changed
            logger.info("API keys: %d read from %s", len(self.keys), self.path)  # how many, never which

    def allows(self, authorization: bytes | None) -> bool:
        now = time.monotonic()
        if now - self.checked > RELOAD_CHECK_S:
            self.checked = now
            try:
                self.reload()
            except OSError as exc:  # a file being replaced: keep the keys it had
                logger.warning("API keys: %s unreadable (%s); keeping the last ones", self.path, exc)
        scheme, _, key = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not key:
            return False
        # Constant time for each key, and every key compared: how long it takes says nothing of which matched.
        matches = [hmac.compare_digest(key.strip(), known) for known in self.keys]
        return any(matches)
