"""The tensor-parallel group a worker belongs to, passed explicitly to every parallel layer.

Size 1 makes every collective a no-op, so the single-GPU path pays nothing for TP support.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    # Under pipeline parallelism, the stage's own process group and its first global rank (None, 0: the
    # whole world is the group, as with tensor parallelism alone).
    group: Any = None
    first_global_rank: int = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size == 1:
            return x
        import torch.distributed as dist

        dist.broadcast(x, self.first_global_rank + src, group=self.group)
        return x


SINGLE = TPGroup()
