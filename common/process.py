"""Small helpers every service process runs at start-up."""

from __future__ import annotations

import asyncio
import gc
from typing import Any, Callable


def freeze_startup_heap() -> None:
    """Move everything allocated at start-up (imported modules, the tokenizer, the model's Python objects)
    out of the garbage collector's reach. Full collections otherwise rescan that large, immortal heap and
    were measured to halve the tokenizer's detokenization rate at thousands of live requests
    (headrace/bench/pipeline_bench.py)."""
    gc.collect()
    gc.freeze()


def event_loop_factory() -> Callable[[], Any]:
    """uvloop's event loop where it is installed (lower per-message latency), else asyncio's own; for
    `asyncio.Runner(loop_factory=...)`."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop
