import pytest
from doubles import NullBackend, NullEngine

from raylm import BackendOption, BackendSpec, EngineSpec, ModelDeployment, Requirement
from raylm.engine import args_to_argv
from raylm.errors import ConfigError


def test_engine_spec_accepts_a_valid_engine():
    spec = EngineSpec(name="null", description="does nothing", engine_class=NullEngine)
    assert spec.missing() is None and spec.unavailable_reason is None


@pytest.mark.parametrize("name", ["", "Upper", "1digit", "has space", "x" * 41, None])
def test_spec_names_are_validated(name):
    with pytest.raises(ValueError, match="name"):
        EngineSpec(name=name, description="d", engine_class=NullEngine)


def test_engine_spec_needs_an_engine_subclass():
    with pytest.raises(TypeError, match="subclass of raylm.Engine"):
        EngineSpec(name="x", description="d", engine_class=NullBackend)


def test_backend_spec_needs_a_backend_subclass_and_description():
    with pytest.raises(TypeError, match="subclass of raylm.Backend"):
        BackendSpec(name="x", description="d", backend_class=NullEngine)
    with pytest.raises(ValueError, match="description"):
        BackendSpec(name="x", description="", backend_class=NullBackend)


def test_specs_are_frozen():
    spec = BackendSpec(name="x", description="d", backend_class=NullBackend, options=[BackendOption("address", "a")])
    assert spec.options == (BackendOption("address", "a"),)
    with pytest.raises(AttributeError):
        spec.name = "y"


def test_requirement_reports_missing_modules_without_importing():
    assert Requirement("json", "stdlib").is_installed()
    assert not Requirement("raylm_no_such_module", "pip install it").is_installed()
    spec = EngineSpec(
        name="x",
        description="d",
        engine_class=NullEngine,
        requires=[Requirement("raylm_no_such_module", "pip install raylm-x[x]")],
    )
    assert spec.missing().install == "pip install raylm-x[x]"


def test_args_to_argv_uses_the_engines_cli_spelling():
    argv = args_to_argv(
        {
            "max_model_len": 512,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "lora_modules": ["a", "b"],
            "override": {"k": 1},
            "unset": None,
        }
    )
    assert argv == (
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--lora-modules",
        "a",
        "b",
        "--override",
        '{"k": 1}',
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "", "name": "x"}, "path or an id"),
        ({"model": "m", "name": "has space"}, "invalid"),
        ({"model": "m", "name": "x", "replicas": 0}, "replicas"),
    ],
)
def test_model_deployment_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelDeployment(engine="vllm", **kwargs)
