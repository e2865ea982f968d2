"""Pipeline parallelism: which stage a worker rank is, the layers it holds, and the hidden states it passes on.

The world is pipeline_parallel_size x tensor_parallel_size ranks; global rank = stage * T + tp_rank. Every rank
of a stage holds the whole hidden state after each layer (row-parallel linears all-reduce), so tp-rank t of
stage s sends to tp-rank t of stage s + 1: T pairs of point-to-point transfers, no gather. Each transfer is
one [2, tokens, hidden] tensor (the layer output and the residual stream, which the next layer's fused
norm adds together); its size follows from the step plan every rank already has, so no header travels.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import torch

from headrace.common.config import ConfigError, EngineConfig
from headrace.common.models.arch import arch_from_hf_config
from headrace.common.models.source import load_hf_config
from headrace.common.pipeline_layout import stage_layer_ranges
from headrace.services.gpu_worker.parallel import TPGroup

# On CPU (gloo), a collective or transfer waiting longer than this raises instead of blocking forever. A peer
# that dies closes its sockets, which gloo sees at once; this bounds the rest (a peer that hangs, a lost host).
# It also bounds the rendezvous, so it leaves room for slow model loads. NCCL keeps torch's default.
GLOO_TIMEOUT = datetime.timedelta(seconds=300)


@dataclass(frozen=True)
class StageLayers:
    """The decoder layers [start, end) a stage holds of num_layers: the model builds only these (and the
    embedding on the first stage, the final norm and LM head on the last)."""

    start: int = 0
    end: int | None = None  # None: every layer (a single stage)

    def stop(self, num_layers: int) -> int:
        return num_layers if self.end is None else self.end

    @property
    def is_first(self) -> bool:
        return self.start == 0

    def is_last(self, num_layers: int) -> bool:
        return self.stop(num_layers) == num_layers


@dataclass
class PipelineStage:
    """This rank's place in the pipeline and its links to the neighbouring stages."""

    rank: int = 0  # the stage index
    size: int = 1
    layers: StageLayers = field(default_factory=StageLayers)
    prev_rank: int | None = None  # the global rank hidden states come from (None on the first stage)
    next_rank: int | None = None  # the global rank they go to (None on the last stage)
    _pending_send: Any = None  # the last isend, waited for before the next (its tensor must stay alive)
    _sent: torch.Tensor | None = None

    @property
    def is_first(self) -> bool:
        return self.prev_rank is None

    @property
    def is_last(self) -> bool:
        return self.next_rank is None

    def send(self, hidden_and_residual: torch.Tensor) -> None:
        """Hand [2, tokens, hidden] to the next stage without waiting for it to take them: this stage goes on
        with the next micro-batch. Only the previous transfer is waited for (gloo keeps one buffer per send)."""
        import torch.distributed as dist

        self.wait_sent()
        self._sent = hidden_and_residual.contiguous()
        self._pending_send = dist.isend(self._sent, self.next_rank)

    def wait_sent(self) -> None:
        if self._pending_send is not None:
            self._pending_send.wait()
            self._pending_send, self._sent = None, None

    def recv(self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The previous stage's [2, num_tokens, hidden] for the step every rank is running."""
        import torch.distributed as dist

        buf = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=device)
        dist.recv(buf, self.prev_rank)
        return buf


SINGLE_STAGE = PipelineStage()


def replica_dist_init_addr(addr: str | None, replica: int) -> str | None:
    """Each data-parallel replica's ranks meet on their own port: the given one plus the replica index."""
    if not addr or replica == 0:
        return addr
    host, port = addr.rsplit(":", 1)
    return f"{host}:{int(port) + replica}"


def init_distributed(config: EngineConfig, rank: int, device: torch.device,
                     replica: int = 0) -> tuple[TPGroup, PipelineStage]:
    """Join replica `replica`'s world (when it has more than one rank) and return this rank's TP group and
    stage."""
    par = config.parallel
    tp_size, pp_size = par.tensor_parallel_size, par.pipeline_parallel_size
    if par.world_size == 1:
        return TPGroup(0, 1), SINGLE_STAGE
    import torch.distributed as dist

    if not par.dist_init_addr:  # a fixed fallback port would let two servers on one host join each other's ranks
        raise ConfigError(f"{par.world_size} worker ranks need --dist-init-addr host:port for the ranks to meet "
                          "(`headrace serve` picks a free local port itself)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    addr = replica_dist_init_addr(par.dist_init_addr, replica)
    dist.init_process_group(backend, init_method=f"tcp://{addr}", rank=rank,
                            world_size=par.world_size, **({"timeout": GLOO_TIMEOUT} if backend == "gloo" else {}))
    stage_idx, tp_rank = divmod(rank, tp_size)
    group = None  # one stage: the world is the TP group, as before pipelines existed
    if pp_size > 1 and tp_size > 1:
        # Every rank creates every stage's group, in the same order (torch.distributed requires it).
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
        group = groups[stage_idx]
    tp = TPGroup(tp_rank, tp_size, group, stage_idx * tp_size)
    if pp_size == 1:
        return tp, SINGLE_STAGE
    num_layers = arch_from_hf_config(load_hf_config(config.require_resolved())).num_layers
    start, end = stage_layer_ranges(num_layers, pp_size, par.layer_partition_counts)[stage_idx]
    stage = PipelineStage(stage_idx, pp_size, StageLayers(start, end),
                          None if stage_idx == 0 else rank - tp_size,
                          None if stage_idx == pp_size - 1 else rank + tp_size)
    return tp, stage
