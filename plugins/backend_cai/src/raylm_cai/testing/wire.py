"""The shapes of CML's API v2 that FakeCML speaks: errors, ids, timestamps, fields, lists."""

from __future__ import annotations

import base64
import json
import secrets
import string
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

# gRPC status codes CML's gateway returns, with their HTTP status.
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 501: 12, 502: 14, 503: 14, 504: 4}


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cml_id() -> str:
    """Ids shaped like CML's: four groups of four lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(4))


def field_of(row: Mapping[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        value = value.get(part, "") if isinstance(value, Mapping) else ""
    return value


def object_field(body: Mapping[str, Any], key: str) -> dict[str, str]:
    value = body.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise APIError(400, f"{key} must be an object of strings on create")
    return value


def json_string_field(body: Mapping[str, Any], key: str) -> str:
    """Updates carry `environment` as a JSON-encoded string."""
    value = body[key]
    try:
        decoded = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict):
        raise APIError(400, f"{key} must be a JSON-encoded object in updates")
    return value


def resources(body: Mapping[str, Any]) -> tuple[float, float, int]:
    try:
        cpu, memory = float(body.get("cpu") or 1), float(body.get("memory") or 1)
        gpus = int(body.get("nvidia_gpu") or 0)
    except (TypeError, ValueError):
        raise APIError(400, "cpu and memory must be numbers, nvidia_gpu an integer") from None
    if cpu <= 0 or memory <= 0 or gpus < 0:
        raise APIError(400, "cpu and memory must be positive, nvidia_gpu not negative")
    return cpu, memory, gpus


PROJECT_CREATE_FIELDS = {
    "name", "description", "visibility", "parent_project", "git_url", "git_ref", "template",
    "organization_permission", "default_project_engine_type", "environment", "shared_memory_limit", "team_name",
}  # fmt: skip
PROJECT_UPDATE_FIELDS = {"name", "description", "visibility", "shared_memory_limit", "environment"}
APPLICATION_UPDATE_FIELDS = {
    "name", "subdomain", "description", "script", "bypass_authentication", "kernel", "cpu", "memory",
    "nvidia_gpu", "environment", "runtime_identifier",
}  # fmt: skip
APPLICATION_CREATE_FIELDS = APPLICATION_UPDATE_FIELDS | {
    "project_id", "runtime_addon_identifiers", "run_as", "cdv_app", "accelerator_label_id",
}  # fmt: skip
JOB_UPDATE_FIELDS = {
    "schedule", "parent_id", "name", "timeout", "cpu", "memory", "nvidia_gpu", "environment", "script",
    "arguments", "kill_on_timeout", "runtime_identifier",
}  # fmt: skip
JOB_CREATE_FIELDS = JOB_UPDATE_FIELDS | {
    "project_id", "parent_job_id", "kernel", "timezone", "paused", "runtime_addon_identifiers", "recipients",
    "attachments", "success_recipients", "failure_recipients", "timeout_recipients", "stopped_recipients",
    "run_as", "accelerator_label_id",
}  # fmt: skip
RUN_CREATE_FIELDS = {"project_id", "job_id", "environment", "arguments"}


def page(rows, key: str, query: Mapping[str, str]) -> dict[str, Any]:
    """A list answer: filtered by `search_filter` (substrings), sorted, one page of `page_size` with its token."""
    rows = [public(row) for row in rows]
    if query.get("search_filter"):
        try:
            wanted = json.loads(query["search_filter"])
        except ValueError:
            wanted = None
        if not isinstance(wanted, dict):
            raise APIError(400, "search_filter must be a JSON object")
        rows = [r for r in rows if all(str(v).lower() in str(field_of(r, k)).lower() for k, v in wanted.items())]
    for sort_key in reversed([k for k in query.get("sort", "").split(",") if k]):
        name = sort_key.lstrip("+-")
        rows.sort(key=lambda r: str(field_of(r, name)), reverse=sort_key.startswith("-"))
    try:
        size = int(query.get("page_size") or 10)
        start = int(base64.urlsafe_b64decode(query["page_token"]).decode()) if query.get("page_token") else 0
    except ValueError:
        raise APIError(400, "invalid page_size or page_token") from None
    end = start + max(size, 1)
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(rows) else ""
    return {key: rows[start:end], "next_page_token": token}


def public(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as the API shows it: no internal keys."""
    return {k: v for k, v in record.items() if not k.startswith("_")}
