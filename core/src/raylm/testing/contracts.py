"""Contract tests every engine and backend plugin should pass. Subclass them in your tests:

    from raylm.testing.contracts import BackendContract

    class TestMyBackend(BackendContract):
        backend_name = "mine"
        plugin_module = "raylm_mine.plugin"

        @pytest.fixture
        def backend_options(self):
            return {"cluster": "contract-test"}

Your distribution must be installed (editable is fine): the contracts load it
through its entry point, as raylm does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from dataclasses import replace
from typing import Any

import pytest

from raylm.backend import Backend, ClusterStatus
from raylm.engine import Engine, ModelDeployment, ReplicaResources
from raylm.errors import ConfigError
from raylm.net import address_answers
from raylm.plugins import Registry
from raylm.specs import BackendSpec, EngineSpec

HEAVY_MODULES = ("ray", "vllm", "sglang", "torch", "transformers")


def _installed_registry() -> Registry:
    registry = Registry(strict=True)
    registry.load_entry_points()
    return registry


def _imports_of(module: str) -> set[str]:
    """Top-level modules present after importing `module` in a fresh interpreter."""
    code = f"import sys, json, {module}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout))


class _PluginContract:
    plugin_module: str

    def test_plugin_module_imports_nothing_heavy(self) -> None:
        heavy = _imports_of(self.plugin_module) & set(HEAVY_MODULES)
        assert not heavy, f"importing {self.plugin_module} imports {sorted(heavy)}; import them where they are used"


class EngineContract(_PluginContract):
    """Checks an engine plugin; subclasses set `engine_name`, `plugin_module` and a `model_deployment` fixture."""

    engine_name: str
    # (num_cpus, num_gpus) one replica of `model_deployment` asks for on the test machine; None: not checked.
    expected_resources: tuple[float, float] | None = None

    @pytest.fixture
    def model_deployment(self) -> ModelDeployment:
        raise NotImplementedError("override the model_deployment fixture with a small real model")

    @pytest.fixture
    def engine_spec(self, model_deployment: ModelDeployment) -> EngineSpec:
        # An engine in its own environment (`python`) need not be importable here.
        return _installed_registry().engine(self.engine_name, runtime_here=model_deployment.python is None)

    def test_spec_is_valid(self, engine_spec: EngineSpec) -> None:
        assert isinstance(engine_spec, EngineSpec)
        assert engine_spec.name == self.engine_name
        assert issubclass(engine_spec.engine_class, Engine)
        assert engine_spec.description

    def test_validate_rejects_an_unknown_argument(self, engine_spec: EngineSpec, model_deployment: ModelDeployment):
        bad = replace(model_deployment, engine_args=(*model_deployment.engine_args, "--no-such-option-raylm"))
        with pytest.raises(ConfigError, match="no-such-option-raylm"):
            engine_spec.engine_class(bad).validate()

    def test_validate_accepts_the_deployment_and_sizes_its_replicas(
        self, engine_spec: EngineSpec, model_deployment: ModelDeployment
    ) -> None:
        engine = engine_spec.engine_class(model_deployment)
        engine.validate()
        resources = engine.resources()
        assert isinstance(resources, ReplicaResources)
        assert resources.num_cpus >= 0 and resources.num_gpus >= 0
        if self.expected_resources is not None:
            assert (resources.num_cpus, resources.num_gpus) == self.expected_resources

    @pytest.mark.engine
    def test_serves_openai_and_stops_cleanly(self, engine_spec: EngineSpec, model_deployment: ModelDeployment):
        engine = engine_spec.engine_class(model_deployment)
        engine.validate()

        async def lifecycle() -> tuple[dict, Any]:
            url = await engine.start("127.0.0.1")
            try:
                await engine.check_health()
                with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
                    models = json.load(response)
            finally:
                await engine.stop()
                await engine.stop()  # a second stop is harmless
            return models, url

        models, url = asyncio.run(lifecycle())
        assert model_deployment.name in [m["id"] for m in models["data"]]
        assert not address_answers(url.removeprefix("http://")), "the engine server still listens after stop()"


class BackendContract(_PluginContract):
    """Checks a backend plugin; subclasses set `backend_name`, `plugin_module` and a `backend_options` fixture.

    Set `starts_clusters = False` for a backend that only connects to clusters it
    did not start: then `down` must leave the cluster running.
    """

    backend_name: str
    starts_clusters: bool = True

    @pytest.fixture
    def backend_options(self) -> dict[str, Any]:
        return {"cluster": "raylm-contract"}

    @pytest.fixture
    def backend_spec(self) -> BackendSpec:
        return _installed_registry().backend(self.backend_name)

    @pytest.fixture
    def backend(self, backend_spec: BackendSpec, backend_options: dict[str, Any]) -> Backend:
        from raylm.api import make_backend

        return make_backend(self.backend_name, backend_options, _installed_registry())

    def test_spec_is_valid(self, backend_spec: BackendSpec) -> None:
        assert isinstance(backend_spec, BackendSpec)
        assert backend_spec.name == self.backend_name
        assert issubclass(backend_spec.backend_class, Backend)
        assert len({o.name for o in backend_spec.options}) == len(backend_spec.options)

    def test_lifecycle(self, backend: Backend) -> None:
        messages: list[str] = []
        first = backend.up(messages.append)
        try:
            assert isinstance(first, ClusterStatus) and first.backend == self.backend_name
            assert address_answers(first.address), f"nothing listens at the cluster address {first.address}"
            assert backend.up(messages.append).address == first.address, "a second up must reuse the cluster"
            current = backend.status()
            assert current is not None and current.address == first.address
        finally:
            backend.down(messages.append)
        if self.starts_clusters:
            assert backend.status() is None
            assert not address_answers(first.address), "the cluster still answers after down"
        else:
            assert address_answers(first.address), "down stopped a cluster the backend did not start"
