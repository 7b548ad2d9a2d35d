"""The package's import structure: no cycles, and imports point downward through its layers.

Layers, top to bottom (README, Architecture): the command line and nnU-Net's start-up hook; trainers
and inference; networks, losses, evaluation, planners, data, label handling, pictures; input checks;
the dataset model and text encoders; io (atomic writes, orientation, checkpoints); errors, settings,
vocabulary. A module may import its own package and
any package of a lower layer, never one of its own layer or above. Imports inside functions count
too: deferring an import keeps start-up light, it does not change which way the dependency points.
"""

import ast
from pathlib import Path

import pytest

import nnunetv2_dsm

PACKAGE = Path(nnunetv2_dsm.__file__).parent
LAYERS = [
    {"cli", "_hook"},
    {"trainers", "inference"},
    {"networks", "losses", "evaluation", "planners", "data", "label_handling", "visualization"},
    {"checks"},
    {"dataset", "text"},
    {"io"},
    {"errors", "settings", "vocabulary"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported nnunetv2_dsm module, at module level) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "nnunetv2_dsm" or name.startswith("nnunetv2_dsm."):
                found.append((name, id(node) in top_level))
    return found


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def test_every_package_has_a_layer() -> None:
    units = {_unit(m) for m in MODULES} - {None, "__init__"}
    assert units <= set(RANK), f"add {sorted(units - set(RANK))} to LAYERS here and in the README"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module: str) -> None:
    own = _unit(module)
    if own is None:
        return
    upward = []
    for name, _ in _imports(MODULES[module], module):
        target = _unit(name)
        if target is None or target == own or target not in RANK:
            continue
        if RANK[target] <= RANK[own]:
            upward.append(name)
    assert not upward, f"{module} (layer {RANK[own]}) imports {sorted(set(upward))} from its own layer or above"


def test_no_import_cycles() -> None:
    known = set(MODULES)
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, top_level in _imports(path, module):
            if top_level:
                target = name if name in known else name.rpartition(".")[0]
                if target in known and target != module:
                    graph[module].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                # A package's __init__ importing its own submodules is not a cycle between modules.
                if not all(m.startswith(target + ".") or m == target for m in cycle):
                    raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
