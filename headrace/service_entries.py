"""Which module runs each service process. Both `headrace serve` (the launcher's children) and the
per-service commands compose runs (`headrace scheduler`, `headrace worker --index 0`, ...) start them here."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

# Each module has `main(config_dict, index)`: the resolved EngineConfig as a dict, and the process's index
# (tokenizer or api instance, worker rank; the scheduler ignores it).
SERVICE_ENTRIES = {
    "scheduler": "headrace.services.scheduler.service",
    "worker": "headrace.services.gpu_worker.worker",
    "tokenizer": "headrace.services.tokenizer.tokenizer_service",
    "api": "headrace.services.api.server",
}


# Processes that move text rather than multiply matrices keep to one thread of each pool, so on a CPU-only
# machine the worker's cores (--cpu-threads) are not shared with their idle spinning threads.
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_service(kind: str, config_dict: dict[str, Any], index: int) -> None:
    if kind != "worker":
        for name, value in _ONE_THREAD.items():
            os.environ.setdefault(name, value)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
    importlib.import_module(SERVICE_ENTRIES[kind]).main(config_dict, index)
