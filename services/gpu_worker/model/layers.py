"""Building blocks of the decoder: norms, tensor-parallel linears and embeddings with their weight loaders.

Weight loaders accept either a torch tensor or a safetensors slice (anything with a shape and
`__getitem__`), and read only the rows/columns this rank owns, so a TP rank never materialises the full
checkpoint tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headrace.common.models.arch import check_tp_heads
from headrace.services.gpu_worker.model.quant.base import LinearMethod
from headrace.services.gpu_worker.model.quant.params import LinearShape
from headrace.services.gpu_worker.model.quant.unquantized import UnquantizedLinear
from headrace.services.gpu_worker.parallel import TPGroup


def _copy_into(dst: torch.Tensor, src: Any) -> None:
    src = src if isinstance(src, torch.Tensor) else torch.as_tensor(src)
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"weight shape {tuple(src.shape)} does not match parameter shape {tuple(dst.shape)}")
    dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


def default_weight_loader(param: nn.Parameter, loaded: Any, shard: Any = None) -> None:
    _copy_into(param.data, loaded if isinstance(loaded, torch.Tensor) else loaded[:])


class RMSNorm(nn.Module):
    """`offset`: Gemma's form, which scales by (1 + w) in float32 and rounds once (checkpoints store w - 1)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device, offset: bool = False):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        # _forward_reduced's addcmul addend, made once (a plain attribute: not saved or loaded). Made here
        # rather than on first use, so a compiled graph reads it rather than sets it.
        self._eps_t = torch.tensor(eps, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if x.is_cuda and _triton_kernels() is not None:
            return self._forward_triton(x, residual)
        if x.dtype != torch.float32 and not self.offset and not x.is_cuda:
            return self._forward_reduced(x, residual)
        if residual is not None:
            x = x + residual
            residual = x
        # Same operation order as transformers' LlamaRMSNorm (Gemma's RMSNorm with offset), so float32
        # results match bit for bit.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            out = (xf * (1.0 + self.weight.float())).to(x.dtype)
        else:
            out = self.weight * xf.to(x.dtype)
        return out if residual is None else (out, residual)

    def _forward_reduced(self, x: torch.Tensor, residual: torch.Tensor | None):
        """bf16/fp16 on a CPU (the GGUF kept-quantized path), in six operators where the float32 form takes
        eight (a batch-1 decode step is mostly small operators): the norm from vector_norm accumulated in
        float32, scale times weight in float32 and one rounding at the end, as the Triton kernel rounds."""
        if residual is not None:
            x = x + residual
            residual = x
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        inv_rms = torch.addcmul(self._eps_t, n, n, value=1.0 / x.shape[-1]).rsqrt_()
        out = (x * (inv_rms * self.weight)).to(x.dtype)
        return out if residual is None else (out, residual)

    def _kernel_weight(self) -> torch.Tensor:
        """What the kernel multiplies by: w, or (1 + w) in float32 (the kernel loads any float dtype)."""
        return 1.0 + self.weight.float() if self.offset else self.weight

    def _forward_triton(self, x: torch.Tensor, residual: torch.Tensor | None):
        """One fused kernel (add + norm) in fp32 with a single rounding at the store: bf16 results differ
        from the torch path (which rounds twice) in the last bit at most."""
        rmsnorm = _triton_kernels()[0]
        x2 = x.reshape(-1, x.shape[-1])  # QK-norm sees [T, heads, head_dim]
        if residual is None:
            return rmsnorm.rms_norm(x2, self._kernel_weight(), self.eps).view(x.shape)
        out, new_residual = rmsnorm.fused_add_rms_norm(x2, residual.reshape(x2.shape), self._kernel_weight(),
                                                       self.eps)
        return out.view(x.shape), new_residual.view(x.shape)


class LayerNorm(nn.Module):
    """LayerNorm with a bias (Falcon), with RMSNorm's calling convention: an optional residual is added
    first and returned as the new residual."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        # F.layer_norm is what transformers' nn.LayerNorm runs, so float32 results match bit for bit.
        out = F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return out if residual is None else (out, residual)


# Activations of ungated MLPs, by the name ModelArch.mlp_activation holds.
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: silu(x[..., :I]) * x[..., I:]; one Triton kernel on CUDA, exact torch math elsewhere."""
    if x.is_cuda and x.dim() == 2 and _triton_kernels() is not None:
        return _triton_kernels()[1].silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU gate (Gemma): gelu_tanh(x[..., :I]) * x[..., I:], as transformers' gelu_pytorch_tanh."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


@functools.cache
def _triton_kernels():
    """(kernels.rmsnorm, kernels.activation), or None where Triton is missing. Imported on first CUDA use
    only: CPU processes never load Triton."""
    try:
        from headrace.kernels import activation, rmsnorm
    except ImportError:
        return None
    return rmsnorm, activation


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's output rows split across ranks; several logical outputs may be merged
    (gate|up, or q|k|v), each sharded on its own so every rank holds its part of each. The tensors that
    hold W (dense, integer groups, fp8) belong to `quant_method`."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device, quant_method: LinearMethod | None = None):
        super().__init__()
        self.tp = tp
        self.params_dtype = dtype
        self.shape = LinearShape(in_features, 0, in_features, tuple(self._plan_shards(shard_sizes)))
        self.quant_method = quant_method or UnquantizedLinear()
        self.quant_method.create_weights(self, self.shape, dtype, device)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.shape.out_local, dtype=dtype, device=device),
                                     requires_grad=False)
            self.bias.weight_loader = self.bias_loader

    @property
    def shards(self) -> tuple[tuple[int, int], ...]:
        return self.shape.shards

    def _plan_shards(self, shard_sizes: list[int]) -> list[tuple[int, int]]:
        plan = []
        for size in shard_sizes:
            if size % self.tp.size:
                raise ValueError(f"output size {size} is not divisible by tensor-parallel size {self.tp.size}")
            rows = size // self.tp.size
            plan.append((rows, self.tp.rank * rows))
        return plan

    def bias_loader(self, param: nn.Parameter, loaded: Any, shard: int | None = None) -> None:
        shard = shard or 0  # an unmerged linear's bias comes without a part index
        rows, src_start = self.shards[shard]
        _copy_into(param.data.narrow(0, self.shape.out_offset(shard), rows), loaded[src_start : src_start + rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q|k|v merged. Query heads split across ranks; KV heads split too, or replicated when there are
    fewer KV heads than ranks (each rank then holds the one KV head its query heads use)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device, quant_method: LinearMethod | None = None):
        check_tp_heads(num_heads, num_kv_heads, tp.size)
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, tp, dtype, device, quant_method)

    def _plan_shards(self, shard_sizes: list[int]) -> list[tuple[int, int]]:
        tp, d = self.tp, self.head_dim
        q_heads = self.num_heads // tp.size
        if self.num_kv_heads >= tp.size:
            kv_heads, kv_first = self.num_kv_heads // tp.size, tp.rank * (self.num_kv_heads // tp.size)
        else:
            kv_heads, kv_first = 1, tp.rank // (tp.size // self.num_kv_heads)
        return [(q_heads * d, tp.rank * q_heads * d), (kv_heads * d, kv_first * d), (kv_heads * d, kv_first * d)]

    @property
    def local_heads(self) -> tuple[int, int]:
        return self.shards[0][0] // self.head_dim, self.shards[1][0] // self.head_dim


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks; partial sums are all-reduced, bias added once.
    With reduce_results=False the caller gets this rank's partial sum and reduces it together with others
    (an MoE block adds its shared expert's partial to the experts' and all-reduces once)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device, quant_method: LinearMethod | None = None,
                 reduce_results: bool = True):
        super().__init__()
        if bias and not reduce_results:
            raise ValueError("a partial sum cannot carry the bias: every rank would add it")
        self.reduce_results = reduce_results
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} is not divisible by tensor-parallel size {tp.size}")
        self.tp = tp
        self.params_dtype = dtype
        in_local = in_features // tp.size
        self.shape = LinearShape(in_features, tp.rank * in_local, in_local, ((out_features, 0),))
        self.quant_method = quant_method or UnquantizedLinear()
        self.quant_method.create_weights(self, self.shape, dtype, device)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, None)
        y = self.tp.all_reduce(y) if self.reduce_results else y
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks; each rank looks up its own range and the results are summed."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)  # vocab padded up to a multiple of the TP size
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden, dtype=dtype, device=device), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard: Any = None) -> None:
        end = min(self.start + self.rows, self.vocab_size)
        param.data[end - self.start :].zero_()
        _copy_into(param.data[: end - self.start], loaded[self.start : end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocab range, gathered to full vocab (float32, padding columns dropped)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight).float()
        return self.tp.all_gather_last_dim(logits)[:, : self.vocab_size]


class QuantizedLMHead(ColumnParallelLinear):
    """An LM head whose weight is quantized (GGUF keeps the output projection quantized too): a column-parallel
    linear over the vocab with ParallelLMHead's compute_logits."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 quant_method: LinearMethod):
        self.vocab_size = vocab_size
        super().__init__(hidden, [vocab_size], False, tp, dtype, device, quant_method)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self(hidden).float()
        refine = getattr(self.quant_method, "refine_near_max", None)  # outputs in fewer bits than float32
        if refine is not None:  # near each row's (this rank's) max: a global top logit is among them
            logits = refine(self, hidden, logits)
        return self.tp.all_gather_last_dim(logits)[:, : self.vocab_size]


def store_k_major(modules: Iterable[nn.Module]) -> int:
    """Lay each module's weight out K-major: the same [out, in] tensor, stored as its transpose made
    contiguous, so F.linear hands the BLAS a plain row-major [in, out] matrix (which CPU BLAS streams faster
    at one row, see LlamaForCausalLM.use_cpu_weight_layout). Values are unchanged. A weight shared by several
    modules (a tied LM head) is relaid once. Returns the number of weights relaid."""
    seen: set[int] = set()
    for m in modules:
        if id(m.weight) not in seen:
            seen.add(id(m.weight))
            m.weight.data = m.weight.data.t().contiguous().t()
    return len(seen)
