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
