"""The hooks a raylm plugin implements.

A plugin is a module named by an entry point in the group `raylm`; it holds
functions decorated with `raylm.hookimpl`. Implementations may take fewer
arguments than the spec; new arguments are only ever added.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from raylm.specs import BackendSpec, EngineSpec

PROJECT = "raylm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def raylm_engines() -> Iterable[EngineSpec]:
    """Return the inference engines this plugin provides, one `EngineSpec` each.

    Example::

        @raylm.hookimpl
        def raylm_engines():
            from raylm_vllm.engine import VLLMEngine
            yield raylm.EngineSpec(
                name="vllm", description="vLLM", engine_class=VLLMEngine,
                requires=[raylm.Requirement("vllm", "pip install 'raylm-vllm[vllm]'")])
    """


@hookspec
def raylm_backends() -> Iterable[BackendSpec]:
    """Return the cluster backends this plugin provides, one `BackendSpec` each.

    Example::

        @raylm.hookimpl
        def raylm_backends():
            from raylm_local.backend import LocalBackend
            yield raylm.BackendSpec(name="local", description="Ray on this machine",
                                    backend_class=LocalBackend)
    """


@hookspec(firstresult=True)
def raylm_default_backend(environ: Mapping[str, str]) -> str | None:
    """Name the backend to use when the user names none, or return None to pass.

    The first non-None answer wins; a backend for a platform answers when
    `environ` shows it runs there, the local backend answers last.

    Example::

        @raylm.hookimpl
        def raylm_default_backend(environ):
            return "cai" if "CDSW_PROJECT_ID" in environ else None
    """


@hookspec
def raylm_cli(cli: click.Group) -> None:
    """Add the plugin's own subcommands to the `raylm` command group.

    Import nothing heavy here: this runs on every `raylm` invocation, `--help` included.

    Example::

        @raylm.hookimpl
        def raylm_cli(cli):
            @cli.group()
            def cai():
                "Cloudera ML commands."
    """
