"""The shape of the code: no import cycles in any distribution (every import counts, those under
`TYPE_CHECKING` and inside functions included), and plugins use only what core offers them."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(REPO.glob("core/src")) + sorted(REPO.glob("plugins/*/src")) + sorted(REPO.glob("examples/*/src"))


def modules() -> dict[str, Path]:
    """Every module of every distribution, by dotted name."""
    found = {}
    for source in SOURCES:
        for path in source.rglob("*.py"):
            parts = path.relative_to(source).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules `name` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a.b import c` imports module a.b.c when there is one, else a name of a.b
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {target for target in targets if target in known and target != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_import_graph_is_read_whole():
    graph = import_graph()
    assert "raylm.serving.exchange" in graph["raylm.serving.router"]  # a plain import
    assert "raylm.serving.replicas" in graph["raylm.serving.apps"]  # one inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_distribution_has_an_import_cycle():
    assert cycles(import_graph()) == []


PLUGIN_FILES = sorted(path for folder in ("plugins", "examples") for path in (REPO / folder).glob("*/**/*.py"))
OFFERED = ("raylm", "raylm.toolkit")  # and raylm.testing, for tests and test support


def core_imports(path: Path) -> set[str]:
    """The modules of core (`raylm.*`) a file imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return {name for name in found if name == "raylm" or name.startswith("raylm.")}


def test_plugins_import_only_what_core_offers_them():
    assert len(PLUGIN_FILES) > 40
    private = {
        f"{path.relative_to(REPO)}: {name}"
        for path in PLUGIN_FILES
        for name in core_imports(path)
        if name not in OFFERED and not (name == "raylm.testing" or name.startswith("raylm.testing."))
    }
    assert private == set(), "import these from raylm or raylm.toolkit (or offer them there)"


def test_the_toolkit_offers_what_it_says():
    import raylm.toolkit

    assert all(hasattr(raylm.toolkit, name) for name in raylm.toolkit.__all__)
    assert core_imports(REPO / "plugins/engine_vllm/src/raylm_vllm/validate.py") == {"raylm.toolkit"}  # it reads them
