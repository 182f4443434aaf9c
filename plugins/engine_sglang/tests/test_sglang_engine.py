"""The SGLang engine, run for real from its own environment (.venv-sglang, made by scripts/sglang-env).

On this CPU-only machine SGLang needs the test-only stand-ins in tests/support
(see its README); a GPU machine needs neither them nor SGLANG_USE_CPU_ENGINE.
"""

import pytest
from sglang_setup import CPU_ARGS, CPU_ENV

from raylm import ModelDeployment
from raylm.errors import ConfigError
from raylm.testing.contracts import EngineContract
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


@pytest.mark.parametrize("option", ["--model-path", "--port", "--served-model-name"])
def test_options_raylm_sets_are_refused(option):
    with pytest.raises(ConfigError, match="raylm sets"):
        SGLangEngine(ModelDeployment(model="m", name="t", engine="sglang", engine_args=(option, "x")))


def test_an_environment_without_sglang_is_named(tiny_llama):
    import sys

    engine = SGLangEngine(ModelDeployment(model=str(tiny_llama), name="t", engine="sglang", python=sys.executable))
    with pytest.raises(ConfigError, match=r"cannot import what SGLang needs \(ModuleNotFoundError: No module named"):
        engine.validate()
