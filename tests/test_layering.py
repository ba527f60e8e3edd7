"""The import structure of jsft/, read from the source (ast, function-level imports included):

    0  config, verl (veRL key table), sharding, distributed (and data.config, the data section of the config)
    1  data, models, generate, eval          (may import layer 0 and each other, without a circle)
    2  train                                 (the trainer, its set-up and the memory planner)
    3  the entry points and the demo         (python -m jsft.train / plan / export / inspect / plot, jsft.demo)

No module imports a higher layer, the graph has no circle, and a function-level `from jsft...` import remains
only where an entry point must configure the environment before jax loads (at most 5, each with its reason).
"""

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jsft"
ENTRY_POINTS = ("jsft.train.__main__", "jsft.plan", "jsft.export", "jsft.inspect", "jsft.plot", "jsft.demo.job")
MAX_FUNCTION_LEVEL = 5


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    if module in ENTRY_POINTS or module.startswith("jsft.demo") or module.endswith(".__main__"):
        return 3
    if module in ("jsft", "jsft.config", "jsft.verl", "jsft.sharding", "jsft.distributed", "jsft.data.config"):
        return 0
    if module.startswith(("jsft.data", "jsft.models", "jsft.eval")) or module == "jsft.generate":
        return 1
    if module.startswith("jsft.train"):
        return 2
    raise AssertionError(f"{module}: no layer assigned (add it to tests/test_layering.py)")


def _targets(node) -> list[str]:
    """The jsft modules an import statement loads (`from jsft.models import lora` -> jsft.models.lora)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "jsft"]
    if not (node.module or "").startswith("jsft"):
        return []
    return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]


def _imports(module: str):
    """(target module, line, function-level?, source line) of each jsft import of `module`."""
    path = MODULES[module]
    source = path.read_text()
    lines = source.splitlines()
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend((t, child.lineno, in_function, lines[child.lineno - 1]) for t in _targets(child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer_and_every_entry_point_exists():
    for module in MODULES:
        layer(module)
    for entry in ENTRY_POINTS:
        assert entry in MODULES, entry
        importlib.import_module(entry)


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} ({layer(m)}) -> {t} ({layer(t)}) at line {line}"
              for m, edges in GRAPH.items() for t, line, _, _ in edges if layer(t) > layer(m)]
    assert not upward, upward


def test_the_import_graph_has_no_circle():
    edges = {m: sorted({t for t, *_ in GRAPH[m] if t in MODULES and t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(m, path):
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                circle = path[path.index(t):] + [t]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if t not in state:
                walk(t, path + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            walk(m, [m])


def test_function_level_jsft_imports_are_few_and_explained():
    found = [(m, line, text.strip()) for m, edges in GRAPH.items() for _, line, inner, text in edges if inner]
    found = sorted(set(found))
    assert len(found) <= MAX_FUNCTION_LEVEL, found
    unexplained = [f for f in found if "#" not in f[2]]
    assert not unexplained, unexplained


def test_layers_are_read_from_imports_the_check_would_catch():
    """The checker itself: an upward import and a circle in a made-up graph are found."""
    assert layer("jsft.train.loop") > layer("jsft.models.decoder") > layer("jsft.config")
    assert _targets(ast.parse("from jsft.models import lora").body[0]) == ["jsft.models.lora"]
    assert _targets(ast.parse("from jsft.models.params import flat_params").body[0]) == ["jsft.models.params"]
    assert _targets(ast.parse("import numpy").body[0]) == []
