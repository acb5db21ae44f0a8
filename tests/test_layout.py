"""The house's rules, checked: no import cycles, layers that only look down, CLI messages.

The import graph is read from the source (every ``import`` statement, function-level ones
included) with ``ast``; an edge goes from a module to each ``jxent`` module it imports.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Each layer may import only from the layers before it (and from itself).
LAYERS = [
    (
        "core",
        [
            "jxent._options",
            "jxent._validate",
            "jxent._kernel",
            "jxent._problem",
            "jxent._loss",
            "jxent._log_probs",
            "jxent._divergence",
            "jxent._vjp",
            "jxent._plain",
            "jxent._fd",
            "jxent._checked",
            "jxent._policy",
            "jxent.predictors",
        ],
    ),
    ("head", ["jxent._head"]),
    ("curvature", ["jxent._curvature"]),
    ("check", ["jxent._check"]),
    ("train", ["jxent.train"]),
    ("cli", ["jxent._cli", "jxent.__main__"]),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The jxent modules ``path`` imports (``from jxent.x import y``: ``jxent.x.y`` if a module)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jxent")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jxent"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in SRC.joinpath("jxent").rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) - {name} for name, path in paths.items()}


def _layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return len(LAYERS)  # jxent itself (the public surface): above everything


def test_no_import_cycles_function_level_imports_included():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_layers_only_import_downwards():
    wrong = [
        f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
        for a, targets in _graph().items()
        for b in targets
        if _layer(a) < len(LAYERS) and _layer(b) > _layer(a)
    ]
    assert not wrong, wrong


def test_no_module_reaches_into_another_modules_private_names():
    """``from jxent.x import _name`` only for modules (``_kernel``), never a private function."""
    graph_modules = set(_graph())
    wrong = []
    for path in SRC.joinpath("jxent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jxent"):
                for alias in node.names:
                    private = alias.name.startswith("_")
                    if private and f"{node.module}.{alias.name}" not in graph_modules:
                        wrong.append(
                            f"{_module_name(path)}: from {node.module} import {alias.name}"
                        )
    assert not wrong, wrong
