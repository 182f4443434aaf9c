"""What plugins hand to the core: self-validating, frozen descriptions.

Hook implementations return these; the core never imports a plugin's runtime to
read them, so building one must stay cheap (no `ray`, `vllm`, `torch` imports).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from raylm.backend import Backend
from raylm.engine import Engine
from raylm.names import check_name


@dataclass(frozen=True)
class Requirement:
    """A module the implementation needs at run time, and how to install it.

    >>> Requirement(module="vllm", install="pip install 'raylm-vllm[vllm]'")
    """

    module: str
    install: str

    def __post_init__(self) -> None:
        if not self.module or not self.install:
            raise ValueError("Requirement needs both `module` and `install`")

    def is_installed(self) -> bool:
        # find_spec locates the top-level module without importing it.
        return importlib.util.find_spec(self.module.split(".")[0]) is not None


@dataclass(frozen=True)
class _ImplementationSpec:
    name: str
    description: str
    requires: tuple[Requirement, ...] = ()
    # Registered but not usable here, and why (e.g. "not implemented yet").
    unavailable_reason: str | None = None

    kind = "implementation"

    def __post_init__(self) -> None:
        check_name(self.kind, self.name)
        if not self.description:
            raise ValueError(f"{self.kind} {self.name!r} needs a one-line description")
        object.__setattr__(self, "requires", tuple(self.requires))
        for requirement in self.requires:
            if not isinstance(requirement, Requirement):
                raise TypeError(f"{self.kind} {self.name!r}: requires holds {requirement!r}, not a Requirement")

    def missing(self) -> Requirement | None:
        """The first runtime requirement that is not installed, if any."""
        return next((r for r in self.requires if not r.is_installed()), None)


@dataclass(frozen=True)
class EngineSpec(_ImplementationSpec):
    """One inference engine a plugin provides.

    >>> EngineSpec(name="vllm", description="vLLM", engine_class=VLLMEngine,
    ...            requires=(Requirement("vllm", "pip install 'raylm-vllm[vllm]'"),))
    """

    engine_class: type[Engine] | None = field(default=None, kw_only=True)
    kind = "engine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.engine_class, type) and issubclass(self.engine_class, Engine)):
            raise TypeError(f"engine {self.name!r}: engine_class must be a subclass of raylm.Engine")


@dataclass(frozen=True)
class BackendOption:
    """A backend-specific option, offered as `--NAME` on `raylm serve` and `raylm cluster up`.

    >>> BackendOption("address", "Ray address of an existing cluster", default=None)
    """

    name: str
    help: str
    default: str | int | float | bool | None = None
    type: type = str

    def __post_init__(self) -> None:
        check_name("option", self.name)


@dataclass(frozen=True)
class BackendSpec(_ImplementationSpec):
    """One cluster backend a plugin provides.

    >>> BackendSpec(name="local", description="Ray on this machine", backend_class=LocalBackend)
    """

    backend_class: type[Backend] | None = field(default=None, kw_only=True)
    options: tuple[BackendOption, ...] = field(default=(), kw_only=True)
    kind = "backend"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.backend_class, type) and issubclass(self.backend_class, Backend)):
            raise TypeError(f"backend {self.name!r}: backend_class must be a subclass of raylm.Backend")
        object.__setattr__(self, "options", tuple(self.options))
