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


# The package's layers, lowest first: a module imports only from its own layer or below. The
# pipeline reads upwards: storage and runtime, the paper's math and the models, data, the
# config schema, the step and checkpoints, weights coming in (exports, checkpoints' encoders,
# the official release), export, evaluation, the loop, the commands (the cloud's among them:
# its pre-flight compiles the step and the protocols' steps), and the experiment configs on
# top (they name everything; nothing below names them).
LAYERS = (("errors",), ("storage",), ("runtime",),
          ("losses", "schedules", "sharding", "optim", "models"), ("collapse", "data"),
          ("config",), ("train_state", "train_step", "checkpointing"), ("weights",),
          ("export",),
          ("evaluation", "init_from"), ("train_logging",), ("train",),
          ("main", "studies", "cloud"), ("configs",))
# Imports against the layers, each with its reason (at most one).
UPWARD = {("byol_flax.studies.demo", "byol_flax.configs.digits_cpu"):
          "the demo's default config is the one it trains (README command 1)"}


def _unit(module: str) -> str:
    """The layer unit of a module: the top-level module or package below byol_flax."""
    return module.split(".")[1] if "." in module else module


def _layer_of() -> dict[str, int]:
    return {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _upward_imports() -> set[tuple[str, str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    layer = _layer_of()
    found = set()
    for path in paths:
        targets = _imports(path, modules)
        # "from byol_flax.configs import digits_cpu" names one edge, to the module.
        targets = {t for t in targets if not any(o.startswith(t + ".") for o in targets)}
        found |= {(_module_name(path), target) for target in targets
                  if target != "byol_flax" and _module_name(path) != "byol_flax"
                  and layer[_unit(target)] > layer[_unit(_module_name(path))]}
    return found


def test_every_unit_of_the_package_has_a_layer():
    units = {_unit(_module_name(path)) for path in PACKAGE.rglob("*.py")} - {"byol_flax"}
    assert units == set(_layer_of()), "place the new module in LAYERS (tests/test_house.py)"


def test_no_module_imports_from_a_layer_above_its_own():
    assert _upward_imports() == set(UPWARD), (
        "an import against the layers (LAYERS): move the code down, or name it in UPWARD with "
        "the reason")
    assert len(UPWARD) <= 1


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


# The test tiers (README, .ci/run): the everyday command leaves out the second tier's markers.
SECOND_TIER_MARKERS = ("slow", "scenario")


def _readme_test_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [command.strip() for command in
            re.findall(r"\.venv/bin/python -m pytest [^\n#`]*", readme)]


def _marker_expression(command: str) -> str:
    match = re.search(r'-m "([^"]+)"', command)
    assert match, f"{command!r} names no marker expression"
    return match.group(1)


def test_the_everyday_tier_leaves_out_every_second_tier_test_and_ci_runs_both():
    """The README's test command (the everyday tier) selects no test marked ``slow`` or
    ``scenario``; its second command selects exactly those; .ci/run runs both, in that order."""
    from _pytest.mark.expression import Expression  # noqa: PLC0415 - pytest's own -m parser

    everyday, second = _readme_test_commands()[:2]
    for markers in ({"slow"}, {"scenario"}, {"slow", "scenario"}):
        assert not Expression.compile(_marker_expression(everyday)).evaluate(
            lambda name, m=markers: name in m), (everyday, markers)
        assert Expression.compile(_marker_expression(second)).evaluate(
            lambda name, m=markers: name in m), (second, markers)
    assert Expression.compile(_marker_expression(everyday)).evaluate(lambda name: False)
    assert not Expression.compile(_marker_expression(second)).evaluate(lambda name: False)
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index(everyday) < ci.index(second), "run the everyday tier first, then the second"


def test_second_tier_markers_are_declared():
    declared = (ROOT / "pyproject.toml").read_text()
    for marker in SECOND_TIER_MARKERS:
        assert f'"{marker}: ' in declared
