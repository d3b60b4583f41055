"""The layout's rules, checked: no import circle between pixart_cli's modules (imports inside functions count too),
no module over 450 lines, and diffusers/transformers imported only through models/facade.py (ruff's TID251, run
by `make test`, refuses them elsewhere; this checks the rule is configured)."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

PACKAGE = Path(__file__).parent.parent / "pixart_cli"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pixart_cli"):
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target in modules and target not in (name, "pixart_cli"):
                    graph[name].add(target)
                    break
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_no_stage_imports_another_stage():
    graph = _graph()
    for name, targets in graph.items():
        if name.startswith("pixart_cli.stages."):
            assert not [t for t in targets if t.startswith("pixart_cli.stages.")], name


def test_no_module_over_the_line_limit():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_diffusers_and_transformers_are_banned_outside_the_facade():
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "TID251" in config["select"]
    assert set(config["flake8-tidy-imports"]["banned-api"]) == {"diffusers", "transformers"}
    assert config["per-file-ignores"]["pixart_cli/models/facade.py"] == ["TID251"]
