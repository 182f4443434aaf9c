"""The endpoint's API keys: read from a file, one key per line, and read again when the file changes,
so a key is rotated by adding the new one first and removing the old one later."""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from raylm.errors import ConfigError
from raylm.state import raylm_home, write_atomically

logger = logging.getLogger("raylm.router")

RELOAD_CHECK_S = 1.0  # how often, at most, the file's modification time is looked at
API_KEY_ENV = "RAYLM_API_KEY"  # one key, for who cannot write a file (the file wins when both are given)


class KeyFile:
    """The keys of one file; a request's `Authorization: Bearer KEY` either names one of them or not."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.keys: list[bytes] = []
        self.changed = -1.0
        self.checked = 0.0
        self.reload()
        if not self.keys:
            raise ValueError(f"the API key file {self.path} holds no key")

    def reload(self) -> None:
        changed = os.stat(self.path).st_mtime
        if changed != self.changed:
            lines = [line.strip() for line in self.path.read_text().splitlines()]
            self.keys = [line.encode() for line in lines if line and not line.startswith("#")]
            self.changed = changed
            logger.info("API keys: %d read from %s", len(self.keys), self.path)  # how many, never which

    def allows(self, authorization: bytes | None) -> bool:
        now = time.monotonic()
        if now - self.checked > RELOAD_CHECK_S:
            self.checked = now
            try:
                self.reload()
            except FileNotFoundError:  # removed (a replacement by rename never is): no key holds any more
                if self.keys:
                    logger.error("API keys: %s is gone; every request is refused until it is back", self.path)
                self.keys, self.changed = [], -1.0
            except OSError as exc:  # unreadable for a moment: keep the keys it had
                logger.warning("API keys: %s unreadable (%s); keeping the last ones", self.path, exc)
        scheme, _, key = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not key:
            return False
        # Constant time for each key, and every key compared: how long it takes says nothing of which matched.
        matches = [hmac.compare_digest(key.strip(), known) for known in self.keys]
        return any(matches)


def key_file_from_environment(deployment: str) -> Path:
    """Where the key from $RAYLM_API_KEY is written for the router of `deployment` (removed by its stop)."""
    return raylm_home() / "keys" / f"{deployment}.keys"


def endpoint_key_file(deployment: str, given: str | None, environ: Mapping[str, str]) -> str | None:
    """The file the router reads the endpoint's keys from: the one given, else one written from
    $RAYLM_API_KEY (mode 0600, under $RAYLM_HOME/keys); None when neither is set. The router reads it on
    the head node: a path it can read there (on Cloudera ML, the project's files are on every pod)."""
    if given is None:
        key = environ.get(API_KEY_ENV, "").strip()
        if not key:
            return None
        path = key_file_from_environment(deployment)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(path, key + "\n", mode=0o600)
        given = str(path)
    try:
        KeyFile(given)
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {given}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{exc}: write one key per line") from None
    return str(Path(given).resolve())
