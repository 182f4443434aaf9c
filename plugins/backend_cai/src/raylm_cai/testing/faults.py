"""What FakeCML gets wrong on purpose, for tests: failing requests, applications that cannot run."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass


@dataclass
class _Rule:
    method: str
    path: re.Pattern
    status: int
    remaining: int


class Faults:
    """What the fake should get wrong on purpose."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._failing_apps: list[re.Pattern] = []

    def fail_requests(self, method: str, path_pattern: str, status: int, times: int = 1) -> None:
        """Answer the next `times` requests whose /api/v2 path matches `path_pattern` with `status`.

        A 429 carries `Retry-After: 1`, as a throttling gateway would.
        """
        with self._lock:
            self._rules.append(_Rule(method.upper(), re.compile(path_pattern), status, times))

    def fail_applications(self, name_pattern: str) -> None:
        """Applications whose name matches cannot be scheduled: they turn APPLICATION_FAILED, never run."""
        with self._lock:
            self._failing_apps.append(re.compile(name_pattern))

    def clear(self) -> None:
        """Forget every fault not yet used."""
        with self._lock:
            self._rules.clear()
            self._failing_apps.clear()

    def injected_status(self, method: str, path: str) -> int | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining > 0 and rule.method == method and rule.path.search(path):
                    rule.remaining -= 1
                    return rule.status
        return None

    def app_fails(self, name: str) -> bool:
        with self._lock:
            return any(pattern.search(name) for pattern in self._failing_apps)
