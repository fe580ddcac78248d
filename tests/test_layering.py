"""The package's floors, read from its source with ast (nothing is imported): models/, rewards/ and inference/
never reach training/, rewards/ never reach inference/, and no module reaches itself through a chain of imports.

Every import statement counts, at module level or inside a function: a lazy import that goes back up is still an
arrow back up, and a cycle closed by a lazy import still ties its modules together. An arrow points at the module
an import statement names (`from P import name` at the submodule P.name when there is one, else at P); the parent
packages a Python import also runs are not arrows, so the root's lazy `VideoPipeline` attribute
(reward_forcing/__init__.py) does not make every module import inference/.
"""
import ast
from pathlib import Path

import pytest

import reward_forcing

PACKAGE = Path(reward_forcing.__file__).parent

# floor -> the floors it must not reach, directly or through other modules
FORBIDDEN = {
    "reward_forcing.models": ("reward_forcing.training",),
    "reward_forcing.inference": ("reward_forcing.training",),
    "reward_forcing.rewards": ("reward_forcing.training", "reward_forcing.inference"),
}


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under package_dir (a package is its __init__.py)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _known(name: str, modules) -> str | None:
    """The longest prefix of `name` that is a module of the package (None for other packages)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules) -> dict[str, int]:
    """The package modules that `module` imports anywhere in its source -> the line of the first such import."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [_known(alias.name, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in a/b/c.py is a/b/x
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else _known(base, modules)
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target is not None and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    modules = module_files(package_dir)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def within(module: str, floor: str) -> bool:
    return module == floor or module.startswith(floor + ".")


def chain_to(graph, start: str, floor: str) -> list[str] | None:
    """A shortest chain of imports from `start` to a module of `floor`, or None."""
    previous, frontier = {start: None}, [start]
    while frontier:
        following = []
        for module in frontier:
            for target in graph.get(module, {}):
                if target in previous:
                    continue
                previous[target] = module
                if within(target, floor):
                    chain = [target]
                    while previous[chain[-1]] is not None:
                        chain.append(previous[chain[-1]])
                    return chain[::-1]
                following.append(target)
        frontier = following
    return None


def find_cycle(graph) -> list[str] | None:
    """One cycle of the graph as [m0, m1, ..., m0], or None (depth-first search, iterative)."""
    state = {}  # module -> "open" while on the current path, "done" once every path from it is explored
    for root in sorted(graph):
        if root in state:
            continue
        path, branches = [root], [iter(sorted(graph[root]))]
        state[root] = "open"
        while path:
            target = next(branches[-1], None)
            if target is None:
                state[path.pop()] = "done"
                branches.pop()
            elif state.get(target) == "open":
                return path[path.index(target):] + [target]
            elif target not in state:
                state[target] = "open"
                path.append(target)
                branches.append(iter(sorted(graph.get(target, {}))))
    return None


def _describe(graph, chain) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(chain, chain[1:])) + f" -> {chain[-1]}"


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE)


@pytest.mark.parametrize("floor, above", [(floor, above) for floor, aboves in FORBIDDEN.items() for above in aboves])
def test_lower_floors_never_reach_higher_ones(graph, floor, above):
    assert any(within(module, floor) for module in graph), f"no module found under {floor}"
    for module in sorted(graph):
        if within(module, floor):
            chain = chain_to(graph, module, above)
            assert chain is None, f"{floor} reaches {above}: {_describe(graph, chain)}"


def test_the_package_has_no_import_cycle(graph):
    assert sum(map(len, graph.values())) > 100, "the import graph of the package is nearly empty"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {_describe(graph, cycle)}"


def test_the_graph_sees_lazy_relative_and_from_package_imports(tmp_path):
    """The checks above on a made-up package: each kind of arrow is seen, and a cycle or a way up is reported."""
    top = tmp_path / "pkg"
    for folder in (top, top / "low", top / "high"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (top / "base.py").write_text("import os\n")
    (top / "low" / "a.py").write_text("from pkg import base\n\ndef f():\n    from ..high import b\n")
    (top / "high" / "b.py").write_text("from . import c\n")
    (top / "high" / "c.py").write_text("import pkg.low.a as a\nfrom pkg.base import thing\n")
    made_up = import_graph(top)
    assert made_up["pkg.low.a"] == {"pkg.base": 1, "pkg.high.b": 4}  # the import inside f counts
    assert made_up["pkg.high.b"] == {"pkg.high.c": 1}
    assert made_up["pkg.high.c"] == {"pkg.low.a": 1, "pkg.base": 2}
    assert chain_to(made_up, "pkg.low.a", "pkg.high") == ["pkg.low.a", "pkg.high.b"]
    assert chain_to(made_up, "pkg.base", "pkg.high") is None
    assert find_cycle(made_up) == ["pkg.high.b", "pkg.high.c", "pkg.low.a", "pkg.high.b"]
    (top / "low" / "a.py").write_text("from pkg import base\n")
    assert find_cycle(import_graph(top)) is None
