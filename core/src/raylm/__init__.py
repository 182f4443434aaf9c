"""raylm: serve large language models on Ray Serve behind an OpenAI-compatible API.

The core defines the plugin contract (hook specs, `EngineSpec`/`BackendSpec`,
the `Engine` and `Backend` base classes, `ServerEngine` for engines that run their
own OpenAI server) and the serving runtime; engines and cluster backends are
separate distributions found through entry points.

What a plugin module imports at load time (`raylm.hookimpl`, the specs) is imported
here; the serving API and `ServerEngine` are imported when first used, so that
`raylm --help` and `raylm plugins` stay light.
"""

__version__ = "0.1.0"

from raylm.backend import Backend, ClusterStatus
from raylm.config import ServePlan, load_plan_file
from raylm.engine import Engine, ModelDeployment, ReplicaResources
from raylm.errors import RaylmError
from raylm.hookspecs import hookimpl
from raylm.specs import BackendOption, BackendSpec, EngineSpec, Requirement

# Imported on first use: name -> module.
LAZY = {
    "Deployment": "raylm.api",
    "serve": "raylm.api",
    "status": "raylm.api",
    "stop": "raylm.api",
    "ServerEngine": "raylm.server_engine",
}


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'raylm' has no attribute {name!r}")


__all__ = [
    "Backend",
    "BackendOption",
    "BackendSpec",
    "ClusterStatus",
    "Deployment",
    "Engine",
    "EngineSpec",
    "ModelDeployment",
    "RaylmError",
    "ReplicaResources",
    "Requirement",
    "ServePlan",
    "ServerEngine",
    "hookimpl",
    "load_plan_file",
    "serve",
    "status",
    "stop",
]
