"""Which module runs each service process. Both `headrace serve` (the launcher's children) and the
per-service commands compose runs (`headrace scheduler`, `headrace worker --index 0`, ...) start them here."""

from __future__ import annotations

import importlib
from typing import Any

# Each module has `main(config_dict, index)`: the resolved EngineConfig as a dict, and the process's index
# (tokenizer or api instance, worker rank; the scheduler ignores it).
SERVICE_ENTRIES = {
    "scheduler": "headrace.services.scheduler.service",
    "worker": "headrace.services.gpu_worker.worker",
    "tokenizer": "headrace.services.tokenizer.tokenizer_service",
    "api": "headrace.services.api.server",
}


def run_service(kind: str, config_dict: dict[str, Any], index: int) -> None:
    importlib.import_module(SERVICE_ENTRIES[kind]).main(config_dict, index)
