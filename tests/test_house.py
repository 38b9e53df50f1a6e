"""The shape of the package, checked from its files: no import circle, modules and functions of
a size a reader can hold, a README that stays a quickstart. CONTRIBUTING.md states these rules;
lint (ruff) runs in ``.ci/run`` before the tests."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "byol_flax"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Declarative schemas: one assignment per config key with its comment, read as a table.
SCHEMAS = {("byol_flax/config.py", "base_config"),
           ("byol_flax/evaluation/config.py", "eval_base_config")}
MAX_README_LINES = 300


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (functions included: an import
    moved into a function to dodge a circle is still the circle)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    # "from byol_flax.x import y" also runs byol_flax/__init__ and byol_flax/x/__init__; those
    # are parents, not edges of a circle between concepts.
    return {module for module in found if module in modules and module != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            component.append(node)
            if len(component) > 1:
                out.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return out


def test_no_import_circle_between_modules_of_the_package():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    graph = {_module_name(path): _imports(path, modules) for path in paths}
    # A package's __init__ re-exporting its modules is the package's interface, not a circle:
    # only edges from a module to its own parent package are dropped.
    for name, edges in graph.items():
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    assert _cycles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_readable(path):
    relative = str(path.relative_to(ROOT))
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{relative}: split it at its seams"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            and (relative, node.name) not in SCHEMAS]
    assert long == [], f"{relative}: functions over {MAX_FUNCTION_LINES} lines"


def test_the_readme_is_a_quickstart_with_tables():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, "move reference material to docs/"


def _paths_in_cell(cell: str) -> set[str]:
    """Paths a README table cell names: ``dir/{a,b}.py`` expands, and a bare ``b.py`` after
    ``dir/a.py`` in the same cell is ``dir/b.py``."""
    named, directory = set(), ""
    for code in re.findall(r"`([^`]+)`", cell):
        match = re.fullmatch(r"([\w/]*/)\{([\w,]+)\}\.py", code)
        if match:
            named |= {f"{match.group(1)}{name}.py" for name in match.group(2).split(",")}
            directory = match.group(1)
        elif code.startswith("byol_flax/"):
            named.add(code)
            directory = code.rpartition("/")[0] + "/"
        elif re.fullmatch(r"\w+\.py", code) and directory:
            named.add(directory + code)
    return named


def test_the_readme_table_names_every_module():
    """"What is here" is where a newcomer looks for a concept: every module of the package is in
    it (by its path, or inside a folder the table names as a whole)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What is here"):]
    table = table[:table.index("\n## ")]
    named = set()
    for row in (line for line in table.splitlines() if line.startswith("|")):
        named |= _paths_in_cell(row.split("|")[-2])
    folders = {path for path in named if path.endswith("/")}
    missing = [str(path.relative_to(ROOT)) for path in sorted(PACKAGE.rglob("*.py"))
               if path.name != "__init__.py"
               and str(path.relative_to(ROOT)) not in named
               and not any(str(path.relative_to(ROOT)).startswith(f) for f in folders)]
    assert missing == [], "add them to the README's 'What is here' table"
