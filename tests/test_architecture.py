"""The package's plan holds: layers import downward only (function-level imports included), no
pass mutates a graph except through the Rewriter, and ARCHITECTURE.md's example pass runs."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fxrewrite"
FRONT_DOORS = {"api", "backend", "cli", "onnx_export", "calibrate", "fuzz", "__main__", "__init__"}


def _layer(path: Path) -> str:
    part = path.relative_to(PACKAGE).parts
    if part[0] in ("rewrite", "passes", "codegen"):
        return part[0]
    return "front"


def _imported_layers(path: Path) -> set[str]:
    """The package layers a module imports, at any depth of its code (imports inside functions count)."""
    layers = set()
    pkg = path.relative_to(PACKAGE).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[:len(pkg) - node.level + 1]) if node.level <= len(pkg) + 1 else []
                names = (node.module or "").split(".") if node.module else []
                target = base + [n for n in names if n]
                if not target:  # `from . import x` at the package root
                    target = [node.names[0].name]
            elif node.module and node.module.startswith("fxrewrite"):
                target = node.module.split(".")[1:] or [node.names[0].name]
            else:
                continue
            if not target:
                continue
            if target[0] in ("rewrite", "passes", "codegen"):
                layers.add(target[0])
            elif target[0] in FRONT_DOORS or target == []:
                layers.add("front")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fxrewrite" and len(parts) > 1:
                    layers.add(parts[1] if parts[1] in ("rewrite", "passes", "codegen") else "front")
    return layers


ALLOWED = {"rewrite": {"rewrite"}, "passes": {"rewrite", "passes"}, "codegen": {"rewrite", "codegen"},
           "front": {"rewrite", "passes", "codegen", "front"}}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_import_downward_only(path):
    layer = _layer(path)
    assert _imported_layers(path) <= ALLOWED[layer], f"{path.name} ({layer}) imports {_imported_layers(path)}"


_GRAPH_SURGERY = re.compile(r"\.(erase_node|inserting_before|inserting_after|replace_all_uses_with|replace_input_with"
                            r"|node_copy)\(")


def test_only_the_core_changes_graphs_directly():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py") if _layer(p) != "rewrite"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if _GRAPH_SURGERY.search(line)]
    assert not offenders, offenders


def test_the_example_pass_in_architecture_md_runs():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "ARCHITECTURE.md should hold exactly one python example"
    namespace: dict = {}
    exec(compile(blocks[0], "ARCHITECTURE.md", "exec"), namespace)  # its own asserts check the result
    assert namespace["fast"].report.count("fold_scale") == 1
