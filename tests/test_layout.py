"""The package's layout rules, read from the source with ``ast`` (nothing is imported).

* A leading-underscore name is private to the module that defines it: no other module
  imports it (``from .a import _helper``) or reads it as an attribute of an imported module
  (``a._helper``). A private *module* (``nllloss._generic``) may be imported: its path
  says the package keeps it to itself, and its public names are its interface.
* The imports a module makes when it is loaded (not those inside its functions, which
  load a framework's route only when its arrays arrive, nor those for type checkers only)
  form no cycle: every module can be read after the ones it uses.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "nllloss"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _resolved(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module an ``import from`` statement in ``module`` names."""
    if not node.level:
        return node.module or ""
    package = module if module in PACKAGES else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _loaded(tree: ast.AST):
    """The statements run when a module is loaded: not those in functions, nor those under
    ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _loaded_with(child))
            continue
        yield node
        yield from _loaded(node)


def _loaded_with(node: ast.AST):
    yield node
    yield from _loaded(node)


def _imports(module: str, tree: ast.Module, loaded_only: bool = False):
    """(statement, imported module, imported name or None) for every import of ours (when
    ``loaded_only``, those run when the module is loaded)."""
    for node in _loaded(tree) if loaded_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nllloss":
                    yield node, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            source = _resolved(module, node)
            if source.split(".")[0] == "nllloss":
                for alias in node.names:
                    yield node, source, alias.name


def _is_module(name: str) -> bool:
    return name in MODULES


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _private_crossings(module: str, tree: ast.Module) -> list[str]:
    found = []
    module_aliases = {}  # local name -> the module of ours it is bound to
    for node, source, name in _imports(module, tree):
        if name is None:  # import nllloss.x.y [as z]
            alias = next(a for a in node.names if a.name == source)
            local = alias.asname or source.split(".")[0]
            module_aliases[local] = source if alias.asname else "nllloss"
        elif _is_module(f"{source}.{name}"):
            alias = next(a for a in node.names if a.name == name)
            module_aliases[alias.asname or name] = f"{source}.{name}"
        elif name.startswith("_") and not name.startswith("__") and source != module:
            found.append(f"line {node.lineno}: from {source} import {name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
        ):
            owner = module_aliases[node.value.id]
            if owner != module and not _is_module(f"{owner}.{node.attr}"):
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr} ({owner})")
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_a_module(module):
    assert _private_crossings(module, TREES[module]) == []


def _dependencies(module: str, tree: ast.Module) -> set[str]:
    """The modules of ours that ``module`` imports when it is loaded (``from package import
    name`` depends on the submodule when the name is one, else on the package)."""
    found = set()
    for _, source, name in _imports(module, tree, loaded_only=True):
        if name is not None and _is_module(f"{source}.{name}"):
            found.add(f"{source}.{name}")
        else:
            found.add(source)
    found.discard(module)
    return {dependency for dependency in found if dependency in MODULES}


def _cycle(trees: dict[str, ast.Module]) -> list[str] | None:
    graph = {module: _dependencies(module, tree) for module, tree in trees.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module):
        state[module] = 1
        path.append(module)
        for dependency in sorted(graph[module] & graph.keys()):
            if state.get(dependency) == 1:
                return [*path[path.index(dependency) :], dependency]
            if dependency not in state and (cycle := visit(dependency)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = _cycle(TREES)
    assert cycle is None, " -> ".join(cycle)


def test_the_benchmark_harness_is_not_installed():
    assert not [name for name in MODULES if "bench" in name]


def test_the_rules_see_a_crossing_and_a_cycle():
    """The two checks find what they are written to find (they could pass vacuously)."""
    tree = ast.parse("from ._generic import _helper\nfrom . import _generic\n_generic._x\n")
    assert len(_private_crossings("nllloss._loss", tree)) == 2
    assert _private_crossings("nllloss._loss", ast.parse("from . import _generic\n")) == []
    loaded = {
        "nllloss._loss": ast.parse("from . import _generic\n"),
        "nllloss._generic": ast.parse("def f():\n    from ._loss import nll_loss\n"),
    }
    assert _cycle(loaded) is None  # an import inside a function runs after both loaded
    loaded["nllloss._generic"] = ast.parse("if True:\n    from ._loss import nll_loss\n")
    assert _cycle(loaded) == ["nllloss._generic", "nllloss._loss", "nllloss._generic"]
