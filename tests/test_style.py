"""Two rules of docs/ARCHITECTURE.md that code review alone would let slip."""
import ast
import re
import subprocess

from conftest import REPO

MAX_FUNCTION_LINES = 60


def python_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    return sorted({f for f in listed if f and (REPO / f).is_file()})


def test_no_function_outside_tests_is_longer_than_60_lines():
    too_long = []
    for name in python_files():
        if name.startswith("tests/"):
            continue
        for node in ast.walk(ast.parse((REPO / name).read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    assert len(python_files()) > 30 and not too_long, too_long


def test_the_engine_names_no_model():
    pattern = re.compile(r"gpt2|gpt-2|simone|sim-one|llama", re.IGNORECASE)
    engine = sorted((REPO / "mvlm_engine").glob("*.py"))
    assert len(engine) > 10
    hits = [f"{path.name}:{number}: {line.strip()}" for path in engine
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


# --------------------------------------------------------------------------- no import circle

SCRIPT_FOLDERS = ("benchmarks", "SIM-ONE Training", "tests", "mvlm_training_dataset_complete")  # bare-name siblings
PACKAGE_ROOTS = {"SIM-ONE Training"}  # folders whose packages import by their own names (pyproject's package-dir)


def module_name(path: str) -> str:
    """The dotted name a project file imports as: `release/card.py` -> release.card,
    `SIM-ONE Training/prioritary_mvlm/config.py` -> prioritary_mvlm.config, `benchmarks/measure.py` -> measure."""
    parts = path[:-3].split("/")
    if parts[0] in PACKAGE_ROOTS or parts[0] in SCRIPT_FOLDERS:
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every module an import statement anywhere in the file names (in functions too: a circle that
    only a call closes is still a circle), with relative imports made absolute."""
    names = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    files = {f: module_name(f) for f in python_files()}
    modules = set(files.values())
    graph = {}
    for path, name in files.items():
        tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
        graph[name] = {n for n in imported_names(tree, name, path.endswith("__init__.py")) if n in modules} - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert {"model_registry", "release.package", "mvlm_engine.cli", "prioritary_mvlm.config", "measure"} <= set(graph)
    assert "mvlm_engine.packaging" in graph["mvlm_engine.cli"]  # the graph sees real edges
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle_closed_inside_a_function():
    a = ast.parse("from .b import x\n")
    b = ast.parse("def main():\n    from .a import y\n")
    graph = {"p.a": imported_names(a, "p.a", False) & {"p.b"}, "p.b": imported_names(b, "p.b", False) & {"p.a"}}
    assert circles(graph) == [["p.a", "p.b"]]
