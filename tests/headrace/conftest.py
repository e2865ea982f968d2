"""Servers that several end-to-end modules here share: each start costs seconds of a small CI machine's two
cores, so modules that need the same flags use one."""

from __future__ import annotations

import pytest

from tests.headrace.server_process import running_server


@pytest.fixture(scope="package")
def constrained_server():
    """The embedded model with structured outputs and auto tool choice (hermes): test_structured_e2e.py and
    test_tools_e2e.py. One torch thread: on a small shared CI machine a second one mostly waits for the first.
    float32: requests run concurrently are compared with their runs alone, which only the float path's results
    do not depend on (docs/cpu.md)."""
    with running_server("--num-tokenizers", "2", "--max-model-len", "2048", "--max-num-seqs", "64", "--dtype", "float32",
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                        env={"OMP_NUM_THREADS": "1"}) as srv:
        yield srv
