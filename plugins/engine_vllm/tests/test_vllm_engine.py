"""The vLLM engine under raylm's engine contract, with a tiny model built offline."""

import pytest

from raylm import ModelDeployment
from raylm.errors import ConfigError
from raylm.testing.contracts import EngineContract
from raylm.testing.models import build_tiny_llama
from raylm_vllm.engine import VLLMEngine

TINY_ARGS = ("--max-model-len", "256", "--dtype", "float32", "--kv-cache-memory-bytes", str(64 * 2**20))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


class TestVLLMEngine(EngineContract):
    engine_name = "vllm"
    expected_resources = (1, 0)  # a CPU-only machine: replicas in CPU mode ask for no GPU
    plugin_module = "raylm_vllm.plugin"

    @pytest.fixture
    def model_deployment(self, tiny_llama):
        return ModelDeployment(model=str(tiny_llama), name="tiny-contract", engine="vllm", engine_args=TINY_ARGS)


@pytest.mark.parametrize("option", ["--port", "--host", "--served-model-name", "--model=/x"])
def test_options_raylm_sets_are_refused(option):
    with pytest.raises(ConfigError, match="raylm sets"):
        VLLMEngine(ModelDeployment(model="m", name="t", engine="vllm", engine_args=(option, "1")))


def test_a_missing_python_interpreter_is_reported(tiny_llama):
    engine = VLLMEngine(ModelDeployment(model=str(tiny_llama), name="t", engine="vllm", python="/no/such/python"))
    with pytest.raises(ConfigError, match="Python interpreter /no/such/python not found"):
        engine.validate()
