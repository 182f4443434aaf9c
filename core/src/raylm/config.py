"""What to serve: a `ServePlan`, from command-line options or a deployment file.

A deployment file (`raylm serve -f deploy.yaml`)::

    name: demo                     # deployment name, used by `raylm status` / `raylm stop`
    cluster:
      backend: local               # optional: the default backend answers otherwise
      num_cpus: 8                  # backend options, as on the command line
    server:
      host: 127.0.0.1
      port: 8000
    models:
      - model: ./models/tiny-llama # path or hub id
        name: tiny                 # the `model` clients ask for (default: the path's last part)
        engine: vllm
        replicas: 1
        engine_args:               # the engine's own options, passed through unchanged
          max_model_len: 512
        python: /opt/venvs/vllm/bin/python   # optional: run this model's replicas in that environment
        env: {VLLM_LOGGING_LEVEL: WARNING}  # optional: extra environment of the replicas
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from raylm.engine import ModelDeployment, args_to_argv
from raylm.errors import ConfigError
from raylm.model_settings import DEFAULT_READ_TIMEOUT_S, Autoscaling, Routing
from raylm.net import port_is_free

DEFAULT_ENGINE = "vllm"
DEPLOYMENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")

T = TypeVar("T")


@dataclass(frozen=True)
class ServePlan:
    """Models to serve behind one endpoint, and the cluster to serve them on."""

    models: tuple[ModelDeployment, ...]
    name: str = "default"
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str | None = None
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    api_key_file: str | None = None  # the endpoint's keys, one per line; None: the endpoint is open
    access_log: bool = True  # a line per model request in the router's log
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # an engine silent this long with a request: 504

    def __post_init__(self) -> None:
        if not DEPLOYMENT_NAME.match(self.name):
            raise ConfigError(f"deployment name {self.name!r} is invalid: use lowercase letters, digits, '-' or '_'")
        if not self.models:
            raise ConfigError("nothing to serve: name at least one model")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"two models are served as {', '.join(duplicates)}: give each a distinct `name`")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"port must be between 1 and 65535, got {self.port!r}")
        if not isinstance(self.read_timeout_s, (int, float)) or self.read_timeout_s <= 0:
            raise ConfigError(f"read_timeout_s must be a number of seconds > 0, got {self.read_timeout_s!r}")
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "backend_options", dict(self.backend_options))

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


def default_model_name(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def check_model_path(model: str) -> None:
    """A model written as a path must exist; anything else is left to the engine as a hub id."""
    looks_like_path = model.startswith(("/", "./", "../", "~")) or os.path.exists(model)
    if looks_like_path and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(f"model path {model} does not exist")


def check_port_free(host: str, port: int) -> None:
    if not port_is_free(host, port):
        raise ConfigError(f"port {port} on {host} is in use: choose another with --port")


def model_from_mapping(entry: Mapping[str, Any], where: str) -> ModelDeployment:
    allowed = {
        "model", "name", "engine", "replicas", "engine_args", "python", "env", "max_ongoing_requests",
        "max_queued_requests", "autoscaling", "routing",
    }  # fmt: skip
    _reject_unknown(entry, allowed, where)
    if "model" not in entry:
        raise ConfigError(f"{where}: `model` (a path or id) is required")
    engine_args = entry.get("engine_args") or {}
    if isinstance(engine_args, Mapping):
        argv = args_to_argv(engine_args)
    elif isinstance(engine_args, list):
        argv = tuple(map(str, engine_args))
    else:
        raise ConfigError(f"{where}: engine_args must be a mapping or a list of command-line tokens")
    model = str(entry["model"])
    autoscaling = entry.get("autoscaling")
    if autoscaling is not None:
        if "replicas" in entry:
            raise ConfigError(f"{where}: give `replicas` or `autoscaling`, not both")
        autoscaling = _settings(Autoscaling, autoscaling, where, "autoscaling")
    routing = entry.get("routing", {})
    routing = _settings(Routing, {"policy": routing} if isinstance(routing, str) else routing, where, "routing")
    return ModelDeployment(
        model=model,
        name=str(entry.get("name") or default_model_name(model)),
        engine=str(entry.get("engine") or DEFAULT_ENGINE),
        engine_args=argv,
        replicas=entry.get("replicas", 1),
        python=entry.get("python"),
        env={str(k): str(v) for k, v in (entry.get("env") or {}).items()},
        **{key: entry[key] for key in ("max_ongoing_requests", "max_queued_requests") if key in entry},
        autoscaling=autoscaling,
        routing=routing,
    )


def load_plan_file(path: str | Path) -> ServePlan:
    """Read a deployment file; relative model paths are taken from the file's folder."""
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, Mapping):
        raise ConfigError(f"{path}: expected a mapping with `models`, `server`, `cluster`")
    _reject_unknown(document, {"name", "cluster", "server", "models"}, str(path))
    server = document.get("server") or {}
    cluster = dict(document.get("cluster") or {})
    _reject_unknown(server, {"host", "port", "api_key_file", "access_log", "read_timeout_s"}, f"{path}: server")
    models = document.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{path}: `models` must be a non-empty list")
    deployments = []
    for index, entry in enumerate(models):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{path}: models[{index}] must be a mapping")
        entry = dict(entry)
        model = str(entry.get("model", ""))
        if model.startswith(("./", "../")):
            entry["model"] = str((path.parent / model).resolve())
        deployments.append(model_from_mapping(entry, f"{path}: models[{index}]"))
    return ServePlan(
        models=tuple(deployments),
        name=str(document.get("name") or "default"),
        host=str(server.get("host", "127.0.0.1")),
        port=server.get("port", 8000),
        backend=cluster.pop("backend", None),
        backend_options=cluster,
        api_key_file=str(path.parent / server["api_key_file"]) if server.get("api_key_file") else None,
        access_log=bool(server.get("access_log", True)),
        read_timeout_s=server.get("read_timeout_s", DEFAULT_READ_TIMEOUT_S),
    )


def plan_document(plan: ServePlan) -> dict[str, Any]:
    """`plan` as a deployment file's content: `load_plan_file` reads it back to an equal plan.

    Model paths that exist here are written absolute, so the file serves the same models from anywhere.
    """
    models = []
    for model in plan.models:
        entry: dict[str, Any] = {
            "model": os.path.abspath(model.model) if os.path.exists(model.model) else model.model,
            "name": model.name,
            "engine": model.engine,
            "engine_args": list(model.engine_args),
            "max_ongoing_requests": model.max_ongoing_requests,
            "max_queued_requests": model.max_queued_requests,
            "routing": dataclasses.asdict(model.routing),
        }
        if model.autoscaling is None:
            entry["replicas"] = model.replicas
        else:
            entry["autoscaling"] = dataclasses.asdict(model.autoscaling)
        if model.python:
            entry["python"] = model.python
        if model.env:
            entry["env"] = dict(model.env)
        models.append(entry)
    server: dict[str, Any] = {
        "host": plan.host, "port": plan.port, "access_log": plan.access_log, "read_timeout_s": plan.read_timeout_s,
    }  # fmt: skip
    if plan.api_key_file:
        server["api_key_file"] = os.path.abspath(plan.api_key_file)
    cluster = {**({"backend": plan.backend} if plan.backend else {}), **plan.backend_options}
    return {"name": plan.name, "cluster": cluster, "server": server, "models": models}


def _settings(kind: type[T], value: Any, where: str, key: str) -> T:
    """Settings (a dataclass that checks itself) from the mapping of its fields under `key`; errors say where."""
    fields = [field.name for field in dataclasses.fields(kind)]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {key} must be a mapping of {', '.join(fields)}")
    _reject_unknown(value, set(fields), f"{where}: {key}")
    try:
        return kind(**value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _reject_unknown(entry: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
