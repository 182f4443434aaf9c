"""Finding, loading and asking plugins.

Each entry point in the group `raylm` loads in isolation: a plugin that fails
to import, or whose hook raises, is recorded as failed and the others still
work. `RAYLM_STRICT_PLUGINS=1` turns any such failure into an exception, and
`RAYLM_DISABLE_PLUGINS=a,b` skips plugins by entry-point name.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any, Literal

import pluggy

from raylm import hookspecs
from raylm.errors import PluginError, RuntimeMissingError, UnknownNameError
from raylm.specs import BackendSpec, EngineSpec

ENTRY_POINT_GROUP = "raylm"
IMPLEMENTATION_MARK = f"{hookspecs.PROJECT}_impl"  # the attribute pluggy's HookimplMarker sets
LIST_HOOKS = ("raylm_engines", "raylm_backends")
STRICT_ENV = "RAYLM_STRICT_PLUGINS"
DISABLE_ENV = "RAYLM_DISABLE_PLUGINS"

Status = Literal["ok", "missing", "failed"]


class StrictPluginError(Exception):
    """A plugin failure under RAYLM_STRICT_PLUGINS=1; deliberately not a RaylmError, so it shows its traceback."""


@dataclass
class PluginRecord:
    """What `raylm plugins` shows about one installed plugin."""

    name: str  # the distribution, e.g. "raylm-vllm"
    version: str
    entry_point: str  # e.g. "vllm = raylm_vllm.plugin"
    engines: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def status(self) -> Status:
        if self.errors:
            return "failed"
        return "missing" if self.missing else "ok"

    @property
    def error(self) -> str | None:
        problems = self.errors or self.missing
        return "; ".join(problems) if problems else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "entry_point": self.entry_point,
            "engines": self.engines,
            "backends": self.backends,
            "status": self.status,
            "error": self.error,
        }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class _Isolated:
    """A plugin as pluggy sees it: its hook implementations, each guarded so that one that raises is
    reported against its plugin and counts as no answer, while pluggy calls the others as usual."""

    def __init__(self, plugin: ModuleType | object, record: PluginRecord, fail: Callable[..., None]):
        for attribute in dir(plugin):
            function = getattr(plugin, attribute)
            if attribute.startswith("raylm_") and callable(function) and hasattr(function, IMPLEMENTATION_MARK):
                setattr(self, attribute, _guarded(function, attribute, record, fail))


def _guarded(function: Callable[..., Any], hook_name: str, record: PluginRecord, fail: Callable[..., None]):
    @functools.wraps(function)  # pluggy reads the arguments and the hookimpl marker through it
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            result = function(*args, **kwargs)
            # A list hook's results are produced here, so that a failing generator is this plugin's failure.
            return list(result) if hook_name in LIST_HOOKS and result is not None else result
        except Exception as exc:
            fail(record, f"{hook_name} raised {_one_line(exc)}", exc)
            return None

    return guarded


class Registry:
    """The plugins of one process and the engines and backends they provide."""

    def __init__(self, *, strict: bool = False, disabled: Iterable[str] = ()):
        self.strict = strict
        self.disabled = frozenset(disabled)
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self._engines: dict[str, tuple[EngineSpec, PluginRecord]] = {}
        self._backends: dict[str, tuple[BackendSpec, PluginRecord]] = {}
        self._conflicts: dict[tuple[str, str], str] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Registry:
        """Load every installed plugin, honouring RAYLM_STRICT_PLUGINS and RAYLM_DISABLE_PLUGINS."""
        disabled = [n.strip() for n in environ.get(DISABLE_ENV, "").split(",") if n.strip()]
        registry = cls(strict=environ.get(STRICT_ENV, "") not in ("", "0"), disabled=disabled)
        registry.load_entry_points()
        return registry

    # -- loading -----------------------------------------------------------

    def load_entry_points(self, entry_points: Iterable[metadata.EntryPoint] | None = None) -> None:
        if entry_points is None:
            entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        for entry_point in sorted(entry_points, key=lambda ep: ep.name):
            if entry_point.name in self.disabled:
                continue
            dist = entry_point.dist
            record = PluginRecord(
                name=dist.metadata["Name"] if dist else entry_point.name,
                version=dist.version if dist else "unknown",
                entry_point=f"{entry_point.name} = {entry_point.value}",
            )
            try:
                module = entry_point.load()
            except Exception as exc:
                self._fail(record, f"import failed: {_one_line(exc)}", exc)
                self.plugins[entry_point.name] = record
                continue
            self.add_plugin(module, name=entry_point.name, record=record)

    def add_plugin(self, plugin: ModuleType | object, *, name: str, record: PluginRecord | None = None) -> PluginRecord:
        """Register a plugin object (a module of hook implementations) under an entry-point name."""
        record = record or PluginRecord(name=name, version="unknown", entry_point=f"{name} = {plugin!r}")
        self.plugins[name] = record
        try:
            self.plugin_manager.register(_Isolated(plugin, record, self._fail), name=name)
        except Exception as exc:
            self._fail(record, f"registration failed: {_one_line(exc)}", exc)
            return record
        for spec in self._results_of(name, "raylm_engines"):
            self._add_spec(spec, EngineSpec, self._engines, record.engines, record)
        for spec in self._results_of(name, "raylm_backends"):
            self._add_spec(spec, BackendSpec, self._backends, record.backends, record)
        return record

    def _results_of(self, name: str, hook_name: str) -> list[Any]:
        """What one plugin's implementation of a list hook returns, called by pluggy."""
        others = [p for p in self.plugin_manager.get_plugins() if self.plugin_manager.get_name(p) != name]
        results = self.plugin_manager.subset_hook_caller(hook_name, remove_plugins=others)()
        return [spec for result in results if result is not None for spec in result]

    def _add_spec(self, spec: Any, spec_type: type, table: dict, names: list[str], record: PluginRecord) -> None:
        kind = spec_type.kind
        if not isinstance(spec, spec_type):
            self._fail(record, f"raylm_{kind}s returned {spec!r}, expected a {spec_type.__name__}")
            return
        claimed = table.get(spec.name)
        if claimed is not None and claimed[1] is not record:
            other = claimed[1]
            message = (
                f"{kind} {spec.name!r} is provided by both {other.name} and {record.name}: "
                f"uninstall one, or disable one with {DISABLE_ENV}=<entry point name>"
            )
            self._conflicts[(kind, spec.name)] = message
            for owner in (other, record):
                owner.errors.append(message)
            if self.strict:
                raise StrictPluginError(message)
            return
        table[spec.name] = (spec, record)
        names.append(spec.name)
        if spec.unavailable_reason:
            record.errors.append(f"{kind} {spec.name!r}: {spec.unavailable_reason}")
        elif (requirement := spec.missing()) is not None:
            record.missing.append(f"missing {requirement.module} ({requirement.install})")

    def _fail(self, record: PluginRecord, message: str, exc: BaseException | None = None) -> None:
        if self.strict:
            raise StrictPluginError(f"plugin {record.name} ({record.entry_point}): {message}") from exc
        record.errors.append(message)

    # -- asking --------------------------------------------------------------

    def add_cli_commands(self, cli: Any) -> None:
        """Let each plugin add its subcommands; a plugin that fails adds nothing and is reported."""
        self.plugin_manager.hook.raylm_cli(cli=cli)

    def default_backend(self, environ: Mapping[str, str] = os.environ) -> str:
        """The backend the environment suggests: pluggy asks the plugins in order, the first answer wins."""
        answer = self.plugin_manager.hook.raylm_default_backend(environ=environ)
        if answer is None:
            raise UnknownNameError(
                "no cluster backend is installed: pip install raylm-local (Ray on this machine or an existing cluster)"
            )
        return answer

    def engine_names(self) -> list[str]:
        return sorted(self._engines)

    def backend_names(self) -> list[str]:
        return sorted(self._backends)

    def backend_specs(self) -> list[BackendSpec]:
        """Every registered backend's spec, usable or not (e.g. to offer its options)."""
        return [self._backends[name][0] for name in self.backend_names()]

    def engine(self, name: str, *, runtime_here: bool = True) -> EngineSpec:
        """The usable engine called `name`, or a RaylmError that says how to get it.

        `runtime_here=False` skips the runtime check, for engines that run in another environment.
        """
        return self._lookup("engine", name, self._engines, runtime_here)

    def backend(self, name: str) -> BackendSpec:
        """The usable backend called `name`, or a RaylmError that says how to get it."""
        return self._lookup("backend", name, self._backends)

    def _lookup(self, kind: str, name: str, table: dict, runtime_here: bool = True) -> Any:
        if (kind, name) in self._conflicts:
            raise PluginError(self._conflicts[(kind, name)])
        if name not in table:
            installed = ", ".join(sorted(table)) or "none"
            message = f"unknown {kind} {name!r}; installed {kind}s: {installed}. To add it: pip install raylm-{name}"
            # Only plugins that registered nothing can be hiding the name.
            broken = [r.name for r in self.plugins.values() if r.status == "failed" and not (r.engines or r.backends)]
            if broken:
                message += f" (plugins that failed to load: {', '.join(broken)}; see `raylm plugins`)"
            raise UnknownNameError(message)
        spec, record = table[name]
        if spec.unavailable_reason:
            raise PluginError(f"{kind} {name!r} from {record.name} cannot be used: {spec.unavailable_reason}")
        if runtime_here and (requirement := spec.missing()) is not None:
            raise RuntimeMissingError(
                f"{kind} {name!r} needs the Python module {requirement.module!r}, which is not installed: "
                f"{requirement.install}"
            )
        return spec


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    if _registry is None:
        _registry = Registry.from_environment()
    return _registry
