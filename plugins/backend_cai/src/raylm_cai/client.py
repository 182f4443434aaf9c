"""A small client of the Cloudera ML REST API v2 (`/api/v2/...`), on `requests`.

Where it finds its settings, first match wins:

- workbench URL: the `cml_url` option, `RAYLM_CML_URL`, or inside a CML workload
  `CDSW_API_URL` (the v1 base; its scheme and host are kept);
- project: the `project` option (an id or a name), `RAYLM_CML_PROJECT`, or `CDSW_PROJECT_ID`;
- API v2 key: the file named by the `cml_api_key_file` option, `RAYLM_CML_API_KEY`, or
  `CDSW_APIV2_KEY`. Never a command-line value: those show in process listings.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from raylm.toolkit import ClusterError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Calls to CML wait this long for an answer; a request that times out is retried like a 503.
REQUEST_TIMEOUT_S = 30.0


class CMLError(ClusterError):
    """A CML API call failed; the message is one line that says what to do."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def inside_cml(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs in a CML workload (session, job or application)."""
    return bool(environ.get("CDSW_PROJECT_ID"))


@dataclass(frozen=True)
class CMLSettings:
    url: str
    api_key: str
    project: str

    def __repr__(self) -> str:  # never show the key, even in a traceback
        return f"CMLSettings(url={self.url!r}, project={self.project!r})"

    @classmethod
    def resolve(cls, options: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> CMLSettings:
        url = options.get("cml_url") or environ.get("RAYLM_CML_URL") or _v2_base(environ.get("CDSW_API_URL"))
        if not url:
            raise CMLError(
                "no CML workbench URL: pass --cml-url https://ml-xxxx.cloudera.site or set RAYLM_CML_URL "
                "(inside a CML session it comes from CDSW_API_URL)"
            )
        project = options.get("project") or environ.get("RAYLM_CML_PROJECT") or environ.get("CDSW_PROJECT_ID")
        if not project:
            raise CMLError("no CML project: pass --project NAME_OR_ID or set RAYLM_CML_PROJECT")
        return cls(url=url.rstrip("/"), api_key=_api_key(options.get("cml_api_key_file"), environ), project=project)


def _v2_base(api_v1_url: str | None) -> str | None:
    if not api_v1_url:
        return None
    parts = urlsplit(api_v1_url)
    return f"{parts.scheme}://{parts.netloc}"


def _api_key(key_file: str | None, environ: Mapping[str, str]) -> str:
    if key_file:
        try:
            key = Path(key_file).expanduser().read_text().strip()
        except OSError as exc:
            raise CMLError(f"cannot read the CML API key file {key_file}: {exc.strerror}") from None
        if not key:
            raise CMLError(f"the CML API key file {key_file} is empty")
        return key
    key = environ.get("RAYLM_CML_API_KEY") or environ.get("CDSW_APIV2_KEY")
    if not key:
        raise CMLError(
            "no CML API v2 key: create one under User Settings > API Keys, then pass --cml-api-key-file FILE "
            "or set RAYLM_CML_API_KEY (inside a CML session CDSW_APIV2_KEY is used)"
        )
    return key


class CMLClient:
    """JSON over HTTP with bearer auth, retries on 429/5xx/connection errors, and paged lists."""

    def __init__(self, url: str, api_key: str, *, retries: int = 5, backoff_s: float = 0.5, max_backoff_s=8.0):
        import requests

        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.session = requests.Session()
        self.session.headers.update({"authorization": f"Bearer {api_key}", "accept": "application/json"})

    def __repr__(self) -> str:
        return f"CMLClient({self.url!r})"

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None, **query: Any) -> dict[str, Any]:
        """One API call (`path` below /api/v2); the answer's JSON, or a CMLError with one clear line."""
        import requests

        url = f"{self.url}/api/v2/{path.lstrip('/')}"
        params = {k: (json.dumps(v) if isinstance(v, Mapping) else v) for k, v in query.items() if v is not None}
        for attempt in range(self.retries + 1):
            last_try = attempt == self.retries
            try:
                response = self.session.request(
                    method, url, json=body, params=params or None, timeout=REQUEST_TIMEOUT_S
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last_try:
                    raise CMLError(
                        f"cannot reach CML at {self.url} ({type(exc).__name__}): check the workbench URL and "
                        "your network"
                    ) from None
                self._wait(attempt, None)
                continue
            if response.status_code in RETRY_STATUSES and not last_try:
                self._wait(attempt, response.headers.get("retry-after"))
                continue
            if response.status_code >= 400:
                raise CMLError(_describe(method, path, response), status=response.status_code)
            return response.json() if response.content else {}
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        if retry_after and retry_after.isdigit():
            delay = min(self.max_backoff_s, float(retry_after))
        time.sleep(delay)

    def items(self, path: str, key: str, search_filter: Mapping[str, str] | None = None) -> Iterator[dict]:
        """Every item of a list endpoint, following `next_page_token` (same filter and page size on each page)."""
        token = None
        while True:
            page = self.call("GET", path, search_filter=search_filter, page_size=100, page_token=token)
            yield from page.get(key) or []
            token = page.get("next_page_token")
            if not token:
                return

    # -- what raylm uses ----------------------------------------------------------

    def find_project(self, name_or_id: str) -> dict[str, Any]:
        """A project by id, else by exact name; a CMLError that lists nothing secret when there is none."""
        try:
            return self.call("GET", f"projects/{name_or_id}")
        except CMLError as exc:
            if exc.status not in (400, 404):
                raise
        project = self.project_named(name_or_id)
        if project is None:
            raise CMLError(f"no CML project {name_or_id!r} visible to this API key: give its id or exact name")
        return project

    def project_named(self, name: str) -> dict[str, Any] | None:
        # search_filter matches substrings: pick the exact name.
        matches = [p for p in self.items("projects", "projects", {"name": name}) if p.get("name") == name]
        return matches[0] if matches else None

    def applications(self, project_id: str, name_contains: str) -> list[dict[str, Any]]:
        return list(self.items(f"projects/{project_id}/applications", "applications", {"name": name_contains}))


def _describe(method: str, path: str, response: Any) -> str:
    """One line for a failed call: what CML said, and what to do for the common cases."""
    try:
        message = response.json().get("message") or response.json().get("error")
    except ValueError:
        message = None
    message = (message or response.reason or "no message").strip().splitlines()[0][:300]
    status = response.status_code
    if status == 401:
        return f"CML refused the API key ({message}): it is wrong or expired; create an API v2 key in User Settings"
    if status == 403:
        return f"CML denied {method} {path} ({message}): the API key's user lacks access to this project"
    if status == 429:
        return f"CML is throttling or out of quota ({message}): retry later or ask for a larger quota"
    if status == 404:
        return f"CML has no {path} ({message}): check the project and names"
    return f"CML answered {status} to {method} {path}: {message}"
