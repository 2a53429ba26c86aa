"""The package's shape: layers that import one way, no import cycles, a short top level, and an
engine that never imports the built-in plugins."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedlt

ROOT = Path(fedlt.__file__).parent

#: fedlt's folders from the bottom layer up: a folder may import its own modules and those of
#: the folders before it, never those after it. Top-level modules (``errors``, ``version``) sit
#: below everything; ``api``, ``cli`` and ``testing`` above everything.
LAYERS = (
    "base",
    "metrics",
    "data",
    "models",
    "scenario",
    "system",
    "hooks",
    "training",
    "prepare",
    "server",
    "evaluation",
    "store",
    "engines",
    "driver",
    "flower",
    "analysis",
)
BOTTOM = ("errors", "version")
TOP = ("api", "cli", "testing")


def _runtime_imports(path: Path) -> list[tuple[str, int]]:
    """fedlt modules a file imports at run time (function-level included, TYPE_CHECKING not)."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, node.lineno) for n in names if n.startswith("fedlt.")]
    return found


def _unit(module: str) -> str:
    """The folder (or top-level module) a dotted module name belongs to."""
    return module.split(".")[1]


def _rank(unit: str) -> int:
    if unit in BOTTOM:
        return -1
    if unit in TOP:
        return len(LAYERS)
    return LAYERS.index(unit)


def test_the_top_level_is_short_and_every_folder_has_a_layer() -> None:
    modules = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
    folders = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert len(modules) < 12, modules
    assert set(modules) == set(BOTTOM) | set(TOP), modules
    assert set(folders) == set(LAYERS), folders


def test_layers_import_downwards() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        here = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if here == "__init__":
            continue  # the package root names public objects lazily (PEP 562)
        for module, line in _runtime_imports(path):
            there = _unit(module)
            if there != here and _rank(there) > _rank(here):
                wrong.append(f"{rel}:{line} ({here}) imports {module} ({there}), a layer above it")
    assert not wrong, "\n".join(wrong)


def _imports(path: Path) -> set[str]:
    """fedlt modules a file imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            while name and name.startswith("fedlt"):
                if (ROOT.parent / (name.replace(".", "/") + ".py")).exists() or (
                    ROOT.parent / name.replace(".", "/") / "__init__.py"
                ).exists():
                    found.add(name)
                    break
                name = name.rpartition(".")[0]
    return found


def test_no_import_cycles_in_fedlt() -> None:
    modules = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = _imports(path) - {name}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(modules.get(m, ())):
            if n == "fedlt":  # the package root re-exports lazily (PEP 562) and imports nothing
                continue
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n) :], n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(n) is None:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if state.get(m) is None:
            visit(m)


def test_engine_never_imports_plugins() -> None:
    code = (
        "import sys, fedlt, fedlt.driver.runner, fedlt.cli, fedlt.hooks.dispatch, "
        "fedlt.evaluation.evaluator;"
        "assert not any(m == 'fedlt_plugins' or m.startswith('fedlt_plugins.') for m in sys.modules), "
        "[m for m in sys.modules if 'plugins' in m]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        assert "fedlt_plugins" not in text and "from plugins" not in text, path


def test_built_in_plugins_use_only_the_public_api() -> None:
    # The built-in plugins are written as a third party would write them: `fedlt` and
    # `fedlt.testing` are the public API; everything under them may move.
    plugins = ROOT.parent / "plugins"
    wrong = []
    for path in sorted(plugins.glob("*.py")):
        for module, line in _runtime_imports(path):
            if not module.startswith("fedlt.testing"):  # `from fedlt import X` is not listed: public
                wrong.append(f"plugins/{path.name}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)
