"""Libraries never import the demo or an entry point: the demo plugs into the trainer through config and hooks."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jsft"
ENTRY_POINTS = ("jsft.train.__main__",)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_libraries_do_not_import_the_demo_or_entry_points():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parts[1] == "demo" or path.name == "__main__.py":
            continue
        bad = [m for m in _imports(path) if m == "jsft.demo" or m.startswith(("jsft.demo.", *ENTRY_POINTS))]
        if bad:
            offenders[str(rel)] = sorted(bad)
    assert not offenders, offenders
