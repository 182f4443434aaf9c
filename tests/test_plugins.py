"""The loader, through real entry points: distributions on sys.path that importlib.metadata finds."""

import pytest

from raylm.errors import PluginError, RuntimeMissingError, UnknownNameError
from raylm.plugins import Registry, StrictPluginError

GOOD_BACKEND = """
import raylm
from doubles import NullBackend

@raylm.hookimpl
def raylm_backends():
    yield raylm.BackendSpec(name="{name}", description="test backend", backend_class=NullBackend)
"""

GOOD_ENGINE = """
import raylm
from doubles import NullEngine

@raylm.hookimpl
def raylm_engines():
    yield raylm.EngineSpec(name="{name}", description="test engine", engine_class=NullEngine,
                           requires=[raylm.Requirement("{module}", "pip install 'raylm-{name}[runtime]'")])
"""


def test_an_installed_plugin_is_found_with_its_distribution(make_distribution):
    make_distribution("raylm-alpha", module="alpha_plugin", source=GOOD_BACKEND.format(name="alpha"), version="2.5")
    record = make_distribution.load_registry().plugins["alpha"]
    assert record.to_dict() == {
        "name": "raylm-alpha",
        "version": "2.5",
        "entry_point": "alpha = alpha_plugin",
        "engines": [],
        "backends": ["alpha"],
        "status": "ok",
        "error": None,
    }


def test_a_plugin_that_raises_on_import_is_isolated(make_distribution):
    make_distribution("raylm-alpha", module="alpha_plugin", source=GOOD_BACKEND.format(name="alpha"))
    make_distribution("raylm-broken", module="broken_plugin", source="raise RuntimeError('boom at import')")
    registry = make_distribution.load_registry()
    broken = registry.plugins["broken"]
    assert broken.status == "failed"
    assert broken.error == "import failed: RuntimeError: boom at import"
    assert registry.backend("alpha").name == "alpha"


def test_strict_mode_makes_a_broken_plugin_fatal_with_its_cause(make_distribution):
    make_distribution("raylm-broken", module="broken_plugin", source="raise RuntimeError('boom at import')")
    with pytest.raises(StrictPluginError, match="raylm-broken") as raised:
        make_distribution.load_registry(strict=True)
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_strict_and_disabled_come_from_the_environment(make_distribution):
    make_distribution("raylm-alpha", module="alpha_plugin", source=GOOD_BACKEND.format(name="alpha"))
    make_distribution("raylm-broken", module="broken_plugin", source="raise RuntimeError('boom')")
    registry = Registry.from_environment({"RAYLM_DISABLE_PLUGINS": "broken, other"})
    assert "broken" not in registry.plugins and "alpha" in registry.plugins
    with pytest.raises(StrictPluginError):
        Registry.from_environment({"RAYLM_STRICT_PLUGINS": "1"})


def test_a_hook_that_raises_fails_only_its_plugin(make_distribution):
    make_distribution("raylm-alpha", module="alpha_plugin", source=GOOD_BACKEND.format(name="alpha"))
    make_distribution(
        "raylm-bad",
        module="bad_plugin",
        source="""
        import raylm

        @raylm.hookimpl
        def raylm_engines():
            raise ValueError("cannot list engines")
    """,
    )
    registry = make_distribution.load_registry()
    assert registry.plugins["bad"].status == "failed"
    assert "raylm_engines raised ValueError: cannot list engines" in registry.plugins["bad"].error
    assert registry.plugins["alpha"].status == "ok"


def test_a_hook_returning_the_wrong_type_is_reported(make_distribution):
    make_distribution(
        "raylm-bad",
        module="bad_plugin",
        source="""
        import raylm

        @raylm.hookimpl
        def raylm_backends():
            return ["local"]
    """,
    )
    assert "expected a BackendSpec" in make_distribution.load_registry().plugins["bad"].error


def test_two_plugins_claiming_one_name_is_an_error_naming_both(make_distribution):
    make_distribution("raylm-alpha", module="alpha_plugin", source=GOOD_BACKEND.format(name="shared"))
    make_distribution("raylm-beta", module="beta_plugin", source=GOOD_BACKEND.format(name="shared"))
    registry = make_distribution.load_registry()
    with pytest.raises(PluginError, match="raylm-alpha and raylm-beta"):
        registry.backend("shared")
    assert registry.plugins["alpha"].status == registry.plugins["beta"].status == "failed"
    with pytest.raises(StrictPluginError, match="raylm-alpha and raylm-beta"):
        make_distribution.load_registry(strict=True)


def test_an_unknown_name_lists_what_is_installed_and_how_to_add_it(make_distribution):
    make_distribution("raylm-alpha", module="alpha_plugin", source=GOOD_BACKEND.format(name="alpha"))
    with pytest.raises(UnknownNameError) as raised:
        make_distribution.load_registry().backend("gamma")
    assert str(raised.value) == (
        "unknown backend 'gamma'; installed backends: alpha. To add it: pip install raylm-gamma"
    )


def test_an_unknown_name_mentions_plugins_that_failed_to_load(make_distribution):
    make_distribution("raylm-broken", module="broken_plugin", source="raise ImportError('no')")
    with pytest.raises(UnknownNameError, match="plugins that failed to load: raylm-broken"):
        make_distribution.load_registry().engine("vllm")


def test_a_missing_runtime_is_a_status_and_an_error_with_the_install_command(make_distribution):
    make_distribution(
        "raylm-delta",
        module="delta_plugin",
        source=GOOD_ENGINE.format(name="delta", module="delta_runtime_not_installed"),
    )
    registry = make_distribution.load_registry()
    record = registry.plugins["delta"]
    assert record.status == "missing"
    assert record.error == "missing delta_runtime_not_installed (pip install 'raylm-delta[runtime]')"
    with pytest.raises(RuntimeMissingError, match=r"pip install 'raylm-delta\[runtime\]'"):
        registry.engine("delta")


def test_an_installed_runtime_makes_the_engine_usable(make_distribution):
    make_distribution("raylm-delta", module="delta_plugin", source=GOOD_ENGINE.format(name="delta", module="json"))
    registry = make_distribution.load_registry()
    assert registry.plugins["delta"].status == "ok"
    assert registry.engine("delta").name == "delta"


def test_an_unavailable_implementation_is_not_ok_and_refuses_use(make_distribution):
    make_distribution(
        "raylm-eps",
        module="eps_plugin",
        source="""
        import raylm
        from doubles import NullEngine

        @raylm.hookimpl
        def raylm_engines():
            yield raylm.EngineSpec(name="eps", description="d", engine_class=NullEngine,
                                   unavailable_reason="not implemented yet")
    """,
    )
    registry = make_distribution.load_registry()
    assert registry.plugins["eps"].status == "failed"
    assert "not implemented yet" in registry.plugins["eps"].error
    with pytest.raises(PluginError, match="cannot be used: not implemented yet"):
        registry.engine("eps")


DEFAULT_BACKEND = """
import raylm

@raylm.hookimpl{marker}
def raylm_default_backend(environ):
    {body}
"""


def test_default_backend_takes_the_first_answer_and_the_last_resort_answers_last(make_distribution):
    make_distribution(
        "raylm-fallback",
        module="fallback_plugin",
        source=DEFAULT_BACKEND.format(marker="(trylast=True)", body='return "local"'),
    )
    make_distribution(
        "raylm-platform",
        module="platform_plugin",
        source=DEFAULT_BACKEND.format(marker="", body='return "cloud" if "ON_CLOUD" in environ else None'),
    )
    registry = make_distribution.load_registry()
    assert registry.default_backend({}) == "local"
    assert registry.default_backend({"ON_CLOUD": "1"}) == "cloud"


def test_default_backend_survives_a_plugin_that_raises(make_distribution):
    make_distribution(
        "raylm-fallback",
        module="fallback_plugin",
        source=DEFAULT_BACKEND.format(marker="(trylast=True)", body='return "local"'),
    )
    make_distribution("raylm-bad", module="bad_plugin", source=DEFAULT_BACKEND.format(marker="", body="1 / 0"))
    registry = make_distribution.load_registry()
    assert registry.default_backend({}) == "local"
    assert "ZeroDivisionError" in registry.plugins["bad"].error


def test_no_backend_plugin_means_a_clear_error():
    with pytest.raises(UnknownNameError, match="pip install raylm-local"):
        Registry().default_backend({})


def test_plugins_add_cli_commands_in_isolation(make_distribution):
    import click

    make_distribution(
        "raylm-good",
        module="good_plugin",
        source="""
        import click
        import raylm

        @raylm.hookimpl
        def raylm_cli(cli):
            @cli.command("hello")
            def hello():
                click.echo("hello from a plugin")
    """,
    )
    make_distribution(
        "raylm-bad",
        module="bad_plugin",
        source="""
        import raylm

        @raylm.hookimpl
        def raylm_cli(cli):
            raise RuntimeError("cannot add commands")
    """,
    )
    group = click.Group("raylm")
    registry = make_distribution.load_registry()
    registry.add_cli_commands(group)
    assert "hello" in group.commands
    assert registry.plugins["bad"].status == "failed"


def test_plugin_objects_can_be_added_directly(raylm_registry):
    import types

    from doubles import NullBackend

    import raylm

    module = types.ModuleType("direct")

    @raylm.hookimpl
    def raylm_backends():
        yield raylm.BackendSpec(name="direct", description="d", backend_class=NullBackend)

    module.raylm_backends = raylm_backends
    record = raylm_registry.add_plugin(module, name="direct")
    assert record.backends == ["direct"] and raylm_registry.backend("direct").name == "direct"
