"""The package layering a newcomer can rely on, checked on the source (every import, also those inside
functions and the module names code passes to importlib as strings):

    headrace.services.X   imports only headrace.common, headrace.kernels and headrace.services.X itself
    headrace.common       imports only headrace.common
    headrace.kernels      imports only headrace.kernels

The rest of `headrace` (CLI, launcher, offline API, benchmarks) sits on top and may import any of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists())


def allowed_roots(package: str) -> tuple[str, ...]:
    """Module-name prefixes `package` (e.g. "headrace.services.api") may import from headrace."""
    if package.startswith("headrace.services."):
        return ("headrace.common", "headrace.kernels", package)
    return (package,)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["headrace", *parts])


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module name) of every import in `source`, relative ones resolved, plus the module names given to
    importlib as string constants."""
    names: list[tuple[int, str]] = []
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append((node.lineno, target))
            if target == "headrace" or target.startswith("headrace."):  # `from x import y` may import module x.y
                names += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and _callee(node) in IMPORTING_CALLS and node.args:
            target = node.args[0]
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                names.append((node.lineno, target.value))
    return names


IMPORTING_CALLS = ("import_module", "find_spec")


def _callee(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    package = ".".join(module.split(".")[:3] if module.startswith("headrace.services.") else module.split(".")[:2])
    roots = allowed_roots(package)
    bad = []
    for line, name in imported_names(source, module, is_package):
        if (name == "headrace" or name.startswith("headrace.")) and not any(
                name == r or name.startswith(r + ".") for r in roots):
            bad.append(f"{module}:{line} imports {name}")
    return bad


def layered_files() -> list[Path]:
    return sorted(p for folder in ("services", "common", "kernels") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", layered_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_package_imports_only_what_its_layer_allows(path: Path):
    bad = violations(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
    assert not bad, "\n".join(bad)


def test_there_are_services_to_check():
    assert SERVICES == ["api", "gpu_worker", "scheduler", "tokenizer"]


@pytest.mark.parametrize("source", [
    "from headrace.services.gpu_worker.loader.source import EMBEDDED_NAME\n",
    "import headrace.services.scheduler.request\n",
    "def f():\n    from headrace.launcher import prepare_config\n",
    "from headrace import llm\n",
    "import importlib\nimportlib.import_module('headrace.services.tokenizer.loading')\n",
])
def test_the_check_catches_a_service_reaching_into_another(source):
    assert violations(source, "headrace.services.api.sampling")


def test_relative_imports_are_resolved_before_the_check():
    assert violations("from ..scheduler import request\n", "headrace.services.api.sampling")
    assert not violations("from . import errors\nfrom .errors import ApiError\n", "headrace.services.api.sampling")
    assert not violations("from headrace.common.config import EngineConfig\nfrom headrace.kernels import rmsnorm\n",
                          "headrace.services.gpu_worker.model_runner")
    assert violations("from headrace.services.api import app\n", "headrace.common.config")
