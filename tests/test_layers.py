"""The package's layers and the direction of its imports (issue 19): core <- models <- data <- training <-
eval <- app. A module may import its own layer and the layers below it; `KNOWN_UPWARD` lists the edges
that still point up (command-line entry points inside the library, to move to the app layer), so a new
one fails here and a removed one must leave the list.

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
# (importer, imported) still pointing up, each a command line or Hydra glue inside a lower layer
KNOWN_UPWARD = {
    ("vlm.data.synthetic", "vlm.config"),  # `python -m vlm.data.synthetic`: composes the data config
    ("vlm.models.llms.lora", "vlm.training.checkpointing"),  # `... lora merge`: rebuilds a checkpoint
    ("vlm.eval.ocr_engines", "vlm.config"),  # `python -m vlm.eval.ocr_engines`: composes a benchmark
    ("vlm.eval.ocr_engines", "vlm.app.run"),  # ... and reads its data as eval.py does
}


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    if module in APP:
        return "app"
    if module == "vlm.generation":
        return "models"
    part = module.split(".")[1]
    return {"bench": "app"}.get(part, part)  # vlm.bench: `python -m vlm.bench`, a command


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


def test_imports_point_down_but_for_the_listed_entry_points():
    found = upward(imports())
    assert found - KNOWN_UPWARD == set(), "new upward imports"
    assert KNOWN_UPWARD - found == set(), "gone: remove them from KNOWN_UPWARD"


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
