"""The interface of the CUDA-graph runners, and what both kinds share: when graphs are off, and capturing one.

A graph runner replays a captured forward for the steps it accepts; the model runner tries its graph runners
in order and runs a step none of them accepts eagerly. `cuda_graphs.DecodeGraphs` takes decode-only steps
whole, `piecewise_graphs.PiecewiseGraphs` takes other steps up to a token count, with attention eager.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from headrace.common.config import EngineConfig
from headrace.services.gpu_worker.attention.base import AttentionBackend, AttentionMetadata


class ForwardInputs(Protocol):
    """What a forward reads from a prepared step (batch_inputs.PreparedBatch has these and more)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata


class GraphRunner(ABC):
    sizes: list[int]  # the captured sizes, ascending (sequences or tokens, by kind)
    num_replays: int  # steps run from graphs so far

    @abstractmethod
    def accepts(self, batch: ForwardInputs) -> bool:
        """Whether this runner can run the step."""

    @abstractmethod
    def run(self, batch: ForwardInputs) -> torch.Tensor:
        """The model's hidden states for the step's tokens, [T, hidden]: a view of a static buffer, valid
        until the next run."""


def disabled_reason(config: EngineConfig, device: torch.device, backend: AttentionBackend,
                    tp_size: int) -> str | None:
    """Why CUDA graphs are off for this worker, or None when they are on."""
    if config.enforce_eager:
        return "--enforce-eager"
    if device.type != "cuda":
        return f"device {device.type}"
    if not backend.supports_cuda_graphs:
        return f"the {backend.name} attention backend syncs with the host"
    return None


def capture_graph(fn, pool, tp_size: int, device: torch.device) -> torch.cuda.CUDAGraph:
    """fn() run once eagerly (Triton compiles, cuBLAS picks its kernels), then captured into `pool`."""
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    # With NCCL in the graph, "thread_local" lets the process group's watchdog thread keep polling its
    # events while this thread captures (the default mode would fail the capture on its calls).
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local" if tp_size > 1 else "global"):
        fn()
    return graph
