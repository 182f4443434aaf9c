"""The SGLang engine, run for real from its own environment (.venv-sglang, made by scripts/sglang-env).

On this CPU-only machine SGLang needs the test-only stand-ins in tests/support
(see its README); a GPU machine needs neither them nor SGLANG_USE_CPU_ENGINE.
"""

import pytest
from sglang_setup import CPU_ARGS, CPU_ENV

from raylm import ModelDeployment
from raylm.testing.contracts import EngineContract
from raylm.toolkit import ConfigError
from raylm_sglang.engine import SGLangEngine


def sglang_deployment(model, python, name="tiny-sglang", args=CPU_ARGS):
    return ModelDeployment(model=str(model), name=name, engine="sglang", engine_args=args, python=python, env=CPU_ENV)


class TestSGLangEngine(EngineContract):
    engine_name = "sglang"
    expected_resources = (1, 0)  # a CPU-only machine: replicas in CPU mode ask for no GPU
    plugin_module = "raylm_sglang.plugin"

    @pytest.fixture
    def model_deployment(self, tiny_llama, sglang_python):
        return sglang_deployment(tiny_llama, sglang_python)


def test_sglangs_own_parser_rejects_a_bad_choice(tiny_llama, sglang_python):
    engine = SGLangEngine(sglang_deployment(tiny_llama, sglang_python, args=(*CPU_ARGS, "--dtype", "float17")))
    with pytest.raises(ConfigError, match="SGLang rejected the arguments: argument --dtype: invalid choice"):
        engine.validate()


@pytest.mark.parametrize("option", ["--model-path", "--port", "--served-model-name", "--config", "--api_key", "--conf"])
def test_options_raylm_sets_are_refused(option):
    with pytest.raises(ConfigError, match="raylm sets"):
        SGLangEngine(ModelDeployment(model="m", name="t", engine="sglang", engine_args=(option, "x")))


def test_an_environment_without_sglang_is_named(tiny_llama):
    import sys

    engine = SGLangEngine(ModelDeployment(model=str(tiny_llama), name="t", engine="sglang", python=sys.executable))
    with pytest.raises(ConfigError, match=r"cannot import what SGLang needs \(ModuleNotFoundError: No module named"):
        engine.validate()


def test_a_gpu_launch_is_sized_by_sglangs_own_count(tiny_llama, sglang_python):
    # No --device cpu: what a GPU node runs, parsed by SGLang's own ServerArgs on this machine.
    engine = SGLangEngine(sglang_deployment(tiny_llama, sglang_python, args=("--tp-size", "2", "--pp-size", "2")))
    engine.validate()
    assert engine.checked["device"] == "cuda" and engine.checked["sglang"] == "0.5.23"
    assert (engine.resources().num_cpus, engine.resources().num_gpus) == (1, 4)
