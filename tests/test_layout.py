"""The house rules that keep the package readable: no import cycles, no module over 500 lines,
one subpackage per pass family with its tests beside, and the architecture guide that names
them all. These fail on a change that breaks the layout, not on behaviour."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from onnxcompress.passes import PASSES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onnxcompress"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules imported anywhere in the file (TYPE_CHECKING and local imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return found & known


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {name: _imports(path, name, set(modules)) - {name} for name, path in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_500_lines():
    long = {
        name: count
        for name, path in _modules().items()
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_pass_lives_in_its_family_package_with_tests_beside():
    for name, cls in PASSES.items():
        parts = cls.__module__.split(".")
        assert parts[:2] == ["onnxcompress", "passes"] and len(parts) == 4, cls.__module__
        family = parts[2]
        assert (ROOT / "tests" / "passes" / family).is_dir(), f"{name}: no tests/passes/{family}"


def test_architecture_guide_names_every_pass_and_family():
    guide = (ROOT / "ARCHITECTURE.md").read_text()
    for name, cls in PASSES.items():
        family = cls.__module__.split(".")[2]
        assert f"`{name}`" in guide, f"ARCHITECTURE.md does not mention the pass {name}"
        assert f"passes/{family}/" in guide, f"ARCHITECTURE.md does not mention passes/{family}/"


def test_python_m_runs_the_command_line(tmp_path):
    """Both module entry points work like the console script, compress included (it once
    ended in a NameError when run as ``python -m onnxcompress.cli``)."""
    model = ROOT / "fixtures" / "mnist_mlp.onnx"
    for module in ("onnxcompress", "onnxcompress.cli"):
        out = tmp_path / f"{module}.onnx"
        args = ["compress", str(model), "-o", str(out), "-p", "lowrank:rank=8", "--dim", "N=1"]
        done = subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert "pass lowrank" in done.stdout and out.exists()
