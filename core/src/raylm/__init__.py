"""raylm: serve large language models on Ray Serve behind an OpenAI-compatible API.

The core defines the plugin contract (hook specs, `EngineSpec`/`BackendSpec`,
the `Engine` and `Backend` base classes, `ServerEngine` for engines that run their
own OpenAI server) and the serving runtime; engines and cluster backends are
separate distributions found through entry points.
"""

__version__ = "0.1.0"

from raylm.api import Deployment, serve, status, stop
from raylm.backend import Backend, ClusterStatus
from raylm.config import ServePlan, load_plan_file
from raylm.engine import Engine, ModelDeployment, ReplicaResources
from raylm.errors import RaylmError
from raylm.hookspecs import hookimpl
from raylm.server_engine import ServerEngine
from raylm.specs import BackendOption, BackendSpec, EngineSpec, Requirement

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
