"""Functions a reader can hold: none in the services runs past MAX_LINES (its def line to its last line).
A longer one reads as a few named steps instead."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def long_functions(source: str, where: str, limit: int = MAX_LINES) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{where}:{node.lineno} {node.name} is {length} lines")
    return found


def test_no_function_in_the_services_is_longer_than_the_limit():
    found = [f for path in sorted((ROOT / "services").rglob("*.py"))
             for f in long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not found, "\n".join(found)


def test_the_check_counts_from_def_to_the_last_line():
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    assert long_functions(f"def f():\n{body}", "m") == ["m:1 f is 61 lines"]
    assert long_functions(f"async def g():\n{body[:-len('    x59 = 59')-1]}", "m") == []
