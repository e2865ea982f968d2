"""Configs as the launcher hands them to a process: resolved once (model facts, device defaults)."""

from __future__ import annotations

from headrace.common.config import EngineConfig
from headrace.common.models.resolve import resolve_engine_config


def resolved(config: EngineConfig) -> EngineConfig:
    return resolve_engine_config(config, log=lambda *_: None)
