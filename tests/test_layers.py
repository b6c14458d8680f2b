"""The package's shape: core -> build -> eval / serve -> poc -> cli, with no import cycles.

Every ``import`` of a ttmm module anywhere in a file counts (in functions too), so a cycle
cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ttmm"

# A module may import its own layer or a lower one. eval and serve share a rank but may not
# import each other: they are separate wings. poc (the adoption report) builds, evaluates and
# writes a rollout file, so it sits above them.
LAYERS = {"core": 0, "build": 1, "eval": 2, "serve": 2, "poc": 3, "cli": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LAYERS else "core"


def ttmm_imports(path: Path, known: set[str]) -> set[str]:
    """The ttmm modules ``path`` imports, resolved to modules that exist."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from ttmm.x import y": y may be a submodule or a name in ttmm.x
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("ttmm") and name != "ttmm":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: ttmm_imports(path, known) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is not a cycle of concern
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_sees_the_wings():
    graph = import_graph()
    assert {"ttmm.model", "ttmm.build.pipeline", "ttmm.eval.harness", "ttmm.serve.app"} <= set(
        graph
    )
    assert "ttmm.routing" in graph["ttmm.model"]
    assert "ttmm.cli.options" in graph["ttmm.cli.build"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_from_core_to_cli():
    wrong = []
    for module, imports in import_graph().items():
        here = layer(module)
        for target in imports:
            there = layer(target)
            if LAYERS[there] > LAYERS[here] or (LAYERS[there] == LAYERS[here] and there != here):
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"ttmm.a": {"ttmm.b"}, "ttmm.b": {"ttmm.a"}}, ["ttmm.a", "ttmm.b", "ttmm.a"]),
        ({"ttmm.a": {"ttmm.b"}, "ttmm.b": set()}, None),
    ],
)
def test_cycle_finder_itself(graph, expected):
    assert find_cycle(graph) == expected


def test_layer_rule_catches_an_upward_import():
    assert layer("ttmm.model") == "core"
    assert layer("ttmm.cli.app") == "cli"
    assert LAYERS[layer("ttmm.serve.app")] > LAYERS[layer("ttmm.model")]


def test_no_noqa_e402_in_the_package():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "noqa: E402" in p.read_text(encoding="utf-8")
    ]
    assert not offenders
