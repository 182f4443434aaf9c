"""Sustained streaming load from threads, for tests and benchmarks that change a deployment under load."""

from __future__ import annotations

import json
import threading
import time

import httpx


class Streams:
    """Streamed completions one after another from each of `count` threads; each outcome is `whole` (ended
    with [DONE]), `cut` (began, did not end), the error code of a refusal, or `unreachable`."""

    def __init__(self, url, model, count, headers=None):
        self.url, self.model, self.headers = url, model, headers or {}
        self.outcomes, self.stopped = [], threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self):
        request = {"model": self.model, "prompt": "Hi", "max_tokens": 64, "ignore_eos": True, "stream": True}
        while not self.stopped.is_set():
            began = False
            try:
                with httpx.stream(
                    "POST", f"{self.url}/v1/completions", json=request, headers=self.headers, timeout=60
                ) as response:
                    if response.status_code != 200:
                        self.outcomes.append(json.loads(response.read())["error"]["code"])
                        time.sleep(0.1)
                        continue
                    began = True
                    body = "".join(response.iter_text())
                self.outcomes.append("whole" if body.rstrip().endswith("data: [DONE]") else "cut")
            except httpx.HTTPError:
                self.outcomes.append("cut" if began else "unreachable")
                time.sleep(0.1)

    def stop(self):
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=90)
        return self.outcomes
