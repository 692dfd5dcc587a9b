"""The package's layers and the direction of its imports (issue 19): core <- models <- data <- training <-
eval <- app. A module may import its own layer and the layers below it, and every command-line entry
point (`if __name__ == "__main__":`) lives in the app layer (`vlm.app`; `vlm.bench`, the harness of
`python -m vlm.app.bench`, counts as app).

`python -m tests.test_layers` prints the graph between layers as Mermaid (docs/architecture.md).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vlm"
LAYERS = ("core", "models", "data", "training", "eval", "app")
CORE = {
    "vlm",
    "vlm.files",
    "vlm.contracts",
    "vlm.checkpoint",
    "vlm.corpus",
    "vlm.metrics",
    "vlm.text_accounting",
}
APP = {"vlm.reading", "vlm.config"}


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    if module in APP:
        return "app"
    if module == "vlm.generation":
        return "models"
    part = module.split(".")[1]
    return {"bench": "app"}.get(part, part)  # vlm.bench: `python -m vlm.app.bench`, a command


def module_name(file: Path) -> str:
    parts = file.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> set[tuple[str, str]]:
    """(importer, imported) for every `vlm` import in src/vlm, at module level or inside functions; a
    `from vlm.x import y` names vlm.x.y when that is a module."""
    modules = {module_name(f) for f in SRC.rglob("*.py")}
    edges = set()
    for file in SRC.rglob("*.py"):
        importer = module_name(file)
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            else:
                continue
            edges |= {(importer, name) for name in names if name in modules and name != importer}
    return edges


def upward(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in edges if LAYERS.index(layer(b)) > LAYERS.index(layer(a))}


def test_every_module_has_a_layer():
    assert {layer(m) for m, _ in imports()} <= set(LAYERS)
    assert {module_name(f) for f in SRC.rglob("*.py")} >= CORE | APP  # no stale names


def test_imports_point_down():
    assert upward(imports()) == set()


def test_entry_points_live_in_the_app_layer():
    mains = {
        module_name(file)
        for file in SRC.rglob("*.py")
        if 'if __name__ == "__main__":' in file.read_text(encoding="utf-8")
    }
    assert mains and {m for m in mains if layer(m) != "app"} == set()


def test_an_upward_import_is_found():
    assert upward({("vlm.models.vlm", "vlm.training.module"), ("vlm.training.module", "vlm.models.vlm")}) == {
        ("vlm.models.vlm", "vlm.training.module")
    }


def mermaid() -> str:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for a, b in imports():
        if layer(a) != layer(b):
            counts[layer(a), layer(b)] += 1
    lines = ["graph BT"]
    for (a, b), n in sorted(counts.items(), key=lambda kv: (LAYERS.index(kv[0][0]), LAYERS.index(kv[0][1]))):
        arrow = "-.->" if LAYERS.index(b) > LAYERS.index(a) else "-->"
        lines.append(f"  {a} {arrow}|{n}| {b}")
    return "\n".join(lines)


def test_the_graph_in_the_docs_is_the_generated_one():
    docs = (SRC.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = docs.split("```mermaid\n", 1)[1].split("\n```", 1)[0]
    assert block == mermaid(), "regenerate with: python -m tests.test_layers"


if __name__ == "__main__":
    print(mermaid())
