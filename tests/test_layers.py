"""The package's layers, as the README draws them: every import (function-level ones included)
points down the layer order or stays inside its own layer, and no modules import each other in
a circle. A layering slip fails here, not in review."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scenesweep"
# From the bottom up; a layer may import the layers below it (lower rank) and itself.
LAYERS = {"core": 0, "compute": 1, "services": 1, "specs": 2, "tracking": 3, "search": 3, "models": 4,
          "serving": 4.5, "runs": 5, "report": 6, "cli": 7, "__main__": 8}
# Model and data code, files users write, and the Optuna mechanics: none of these libraries.
FORBIDDEN = {"compute": ("mlflow", "optuna", "click"), "specs": ("mlflow", "optuna", "click"),
             "core": ("mlflow", "optuna", "click", "torch"), "search": ("mlflow", "click"),
             "tracking": ("optuna", "click"), "services": ("mlflow", "optuna", "click")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the file, function-level ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import sink`: the module imported is the package's member.
            found += [(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target, node.lineno)
                      for alias in node.names]
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _ in imports(path):
            if target in MODULES and target != module and not module.startswith(target + "."):
                edges[module].add(target)
    return edges


def test_imports_point_down_the_layers():
    slips = []
    for module in sorted(m for m in MODULES if layer(m) != "__init__"):
        own = layer(module)
        if own not in LAYERS:
            slips.append(f"{module}: its folder {own!r} is no layer of the README's picture")
            continue
        for target, line in imports(MODULES[module]):
            other = layer(target) if target.startswith("scenesweep.") else None
            if other is not None and other != own and not LAYERS.get(other, 99) < LAYERS[own]:
                slips.append(f"{module}:{line} imports {target} ({other} is not below {own})")
            if target.split(".")[0] in FORBIDDEN.get(own, ()):
                slips.append(f"{module}:{line} imports {target.split('.')[0]} ({own} stays free of it)")
    assert not slips, "\n".join(slips)


def test_no_modules_import_each_other_in_a_circle():
    edges, state, circles = graph(), {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_every_folder_of_the_package_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(LAYERS), folders - set(LAYERS)


# A module a newcomer reads in one sitting, a function seen whole on one screen: the package, its
# benchmarks and its tests alike.
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def test_no_module_over_400_lines_and_no_function_over_60():
    repository = PACKAGE.parents[1]
    too_long = []
    for path in sorted(p for folder in ("src", "benchmarks", "tests") for p in (repository / folder).rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(repository)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
