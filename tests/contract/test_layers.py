"""The package's layers (README, "How the code is laid out"): every import goes down, never up.

Each module of ``src/langcell`` is read with :mod:`ast`; every ``import`` / ``from ... import`` of a
langcell module, lazy ones inside functions included, must go to a lower layer or stay inside the
importer's own unit (one subpackage, or one leaf module). Imports inside ``if TYPE_CHECKING:`` blocks
count too. No module takes another module's private (underscore) names, and the modules' import graph
has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "langcell"

#: Layer of each unit (a leaf module or a subpackage); a unit imports only units of a lower layer.
LAYERS: dict[str, int] = {
    "_version": 0, "errors": 0, "_docs": 0,
    "_checks": 1, "_progress": 1, "_atomic": 1, "precision": 1, "_distributed": 1,
    "metrics": 2, "_labels": 2,
    "ontology": 3,
    "data": 4,
    "models": 5,
    "inference": 6,
    "train": 7,
    "tl": 8,
    "evaluation": 9, "convert": 9, "pl": 9,
    "demo": 10,
    "cli": 11,
    "__init__": 12, "__main__": 12,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit_of(module: str) -> str:
    """``langcell.data.corpus`` -> ``data``; the root package itself is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` for every langcell import in ``path``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.split(".")[0] == "langcell"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "langcell":
                continue
            for alias in node.names:
                # "from langcell import tl" imports the module langcell.tl
                submodule = f"{target}.{alias.name}"
                if (PACKAGE.parent / Path(*submodule.split("."))).with_suffix(".py").is_file() or (
                    PACKAGE.parent / Path(*submodule.split(".")) / "__init__.py"
                ).is_file():
                    found.append((submodule, "", node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def layer_violations(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or ``None`` when the import goes down (or stays)."""
    source, target = unit_of(importer), unit_of(imported)
    if source == target:
        return None
    if source not in LAYERS or target not in LAYERS:
        return f"{importer} -> {imported}: unit {source if source not in LAYERS else target!r} has no layer in LAYERS"
    if LAYERS[target] >= LAYERS[source]:
        return (
            f"{importer} (layer {LAYERS[source]}, {source}) imports {imported} "
            f"(layer {LAYERS[target]}, {target}): imports must go to a lower layer"
        )
    return None


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_import_goes_down_a_layer():
    problems = []
    for path in all_modules():
        importer = module_name(path)
        for imported, _, line in imports_of(path):
            why = layer_violations(importer, imported)
            if why:
                problems.append(f"{path.relative_to(PACKAGE)}:{line}: {why}")
    assert not problems, "\n".join(problems)


def test_the_check_fails_on_an_upward_import():
    # The check itself: a model module reaching up into tl, or the data layer into models, is refused;
    # imports inside one subpackage and downward imports pass.
    assert layer_violations("langcell.models.langcell", "langcell.tl._annotate")
    assert layer_violations("langcell.data.corpus", "langcell.models.serialization")
    assert layer_violations("langcell.inference.zero_shot", "langcell.train.supervised")
    assert layer_violations("langcell.tl._annotate", "langcell.evaluation.report")
    assert layer_violations("langcell.metrics", "langcell.no_such_unit")
    assert layer_violations("langcell.models.langcell", "langcell.models.serialization") is None
    assert layer_violations("langcell.tl._annotate", "langcell.inference.zero_shot") is None


def test_an_upward_import_in_a_module_is_reported(tmp_path, monkeypatch):
    # The same reading as above, over a copy of one module with an upward import added.
    source = (PACKAGE / "data" / "batching.py").read_text(encoding="utf-8")
    copy = tmp_path / "langcell" / "data" / "batching.py"
    copy.parent.mkdir(parents=True)
    copy.write_text(source + "\n\ndef _up():\n    from ..models.langcell import LangCell\n\n    return LangCell\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "langcell")
    imported = [target for target, _, _ in imports_of(copy)]
    assert "langcell.models.langcell" in imported
    assert layer_violations(module_name(copy), "langcell.models.langcell")


def test_no_module_takes_another_modules_private_names():
    problems = []
    for path in all_modules():
        for imported, name, line in imports_of(path):
            if name.startswith("_") and not name.startswith("__"):
                problems.append(f"{path.relative_to(PACKAGE)}:{line}: imports {name} from {imported}")
    assert not problems, "\n".join(problems)


def test_the_import_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for path in all_modules():
        graph[module_name(path)] = {imported for imported, _, _ in imports_of(path)}
    # Only explicit imports are edges: Python runs a package's __init__ before its modules, so the
    # implicit parent import is no cycle unless a module imports its package's names by name.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


@pytest.mark.slow
def test_annotating_loads_no_training_or_evaluation_module():
    code = (
        "import sys\n"
        "import langcell.tl\n"
        "langcell.tl.annotate\n"
        "langcell.tl.embed\n"
        "langcell.tl.retrieve_cells\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('langcell.train', 'langcell.evaluation')))\n"
        "print(loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_finetune_is_still_reachable_from_tl():
    from langcell import tl
    from langcell.tl._finetune import finetune

    assert tl.finetune is finetune and "finetune" in tl.__all__


def test_the_ontology_and_data_layers_import_no_torch():
    # ARCHITECTURE: ontology/ and data/ turn files into arrays; tensors start in models/.
    problems = []
    for unit in ("ontology", "data"):
        for path in sorted((PACKAGE / unit).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                )
                problems += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert not problems, "\n".join(problems)
