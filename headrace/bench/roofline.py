"""Rooflines measured on the device at hand, and the token rates they bound.

Two ceilings, measured in the same run as the benchmark they judge (never datasheet numbers):
- copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written;
- matmul rate: an n x n x n product in the model's dtype (8192 and bf16 on a GPU), on random data.
From them: a decode step must read every weight once plus the live KV of its batch (memory bound); a
token costs 2 x params FLOPs in the matmuls (compute bound).

    python -m headrace.bench.roofline [--device cuda] [--dtype bfloat16] [--output-json rates.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from headrace.kernels.timing import device_time_median
from headrace.common.models.arch import ModelArch


@dataclass(frozen=True)
class DeviceRates:
    device: str  # the device's name (GPU model, or "cpu (N threads)")
    copy_bytes_per_s: float  # bytes read + bytes written per second
    matmul_flops_per_s: float
    matmul_dtype: str
    matmul_size: int
    copy_bytes: int  # size of the copied buffer

    def to_dict(self) -> dict:
        return {**asdict(self), "copy_gb_per_s": self.copy_bytes_per_s / 1e9,
                "matmul_tflops": self.matmul_flops_per_s / 1e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def time_median(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn(): on a GPU its device time (kernels.timing: the host's launch cost is not
    counted, as inside the CUDA graphs that serving runs), host timers elsewhere; warm-up calls untimed."""
    if device.type == "cuda":
        return device_time_median(fn, device, reps, warmup)
    return wall_time_median(fn, device, reps, warmup)


def wall_time_median(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall-clock seconds of fn() to its end on the device: for code that waits on the host between
    its kernels (a loop that reads results back), whose device time cannot be isolated from its launches."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _device: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None,
                           reps: int | None = None) -> tuple[float, int]:
    """(bytes read + written per second, buffer bytes) of dst.copy_(src); 1 GiB on a GPU (far past L2)."""
    gpu = device.type == "cuda"
    nbytes = nbytes or (1 << 30 if gpu else 64 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_median(lambda: dst.copy_(src), device, reps or (20 if gpu else 5))
    del src, dst
    return 2 * nbytes / seconds, nbytes


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None,
                        reps: int | None = None) -> tuple[float, int]:
    """(FLOP/s, n) of an n x n x n product on random data (8192 on a GPU, 1024 on a CPU)."""
    gpu = device.type == "cuda"
    n = n or (8192 if gpu else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = time_median(lambda: torch.mm(a, b, out=out), device, reps or (20 if gpu else 3), warmup=3 if gpu else 1)
    return 2 * n**3 / seconds, n


def measure(device: torch.device, dtype: torch.dtype) -> DeviceRates:
    """Both ceilings on `device`; call it before the engine takes the GPU's memory for its KV cache."""
    copy, nbytes = measure_copy_bandwidth(device)
    flops, n = measure_matmul_rate(device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return DeviceRates(device_name(device), copy, flops, str(dtype).removeprefix("torch."), n, nbytes)


# ----------------------------------------------------------------------------- model-side counts


def measure_for_engine(config) -> DeviceRates:
    """Measure the ceilings of the device and dtype an engine config will run on, and print them. Call it
    before the engine starts: the measurement needs free device memory."""
    from headrace.common.config import resolve_device
    from headrace.services.gpu_worker.loader.model_loader import resolve_dtype

    device = torch.device(resolve_device(config.device))
    rates = measure(device, resolve_dtype(config.model.dtype, device))
    print(f"{rates.device}: copy {rates.copy_bytes_per_s / 1e9:,.0f} GB/s, "
          f"matmul {rates.matmul_flops_per_s / 1e12:,.1f} TFLOP/s ({rates.matmul_dtype})", flush=True)
    return rates


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def expected_experts_read(arch: ModelArch, batch: int) -> float:
    """Distinct experts per MoE layer that `batch` tokens route to, on average, if routing is uniform:
    E (1 - (1 - k/E)^batch). k for one token, all E for a large batch; 0 for a dense model."""
    if not arch.num_experts:
        return 0.0
    return arch.num_experts * (1 - (1 - arch.num_experts_per_tok / arch.num_experts) ** batch)


def step_weight_params(arch: ModelArch, batch: int = 1) -> int:
    """Parameters a forward step of `batch` tokens reads in full: all but the input-embedding table, of which
    a step reads only its tokens' rows (a tied table is still read in full, as the LM head), and of an MoE
    layer's experts only those its tokens route to (`expected_experts_read`). At batch 1 these are also the
    parameters of one token's matmuls (attention, router, top-k experts, shared expert): the compute roofline's."""
    params = arch.num_params(experts_read=expected_experts_read(arch, batch)) if arch.num_experts else arch.num_params()
    if not arch.tie_word_embeddings:
        params -= arch.vocab_size * arch.hidden_size
    return params


def step_weight_bytes(model: torch.nn.Module, batch: int = 1) -> int:
    """Bytes of weights a forward step of `batch` tokens reads in full, counted from the loaded model, so
    quantized layers count their packed weights, scales and zero points: every parameter but the
    input-embedding table (a step reads only its tokens' rows of it, unless it is tied to the LM head), with
    each MoE layer's expert stacks counted for the experts the batch reads (`expected_experts_read`)."""
    embed = model.embed_tokens.weight
    tied = getattr(model.lm_head, "weight", None) is embed
    arch = getattr(model, "arch", None)
    experts_read = expected_experts_read(arch, batch) / arch.num_experts if arch and arch.num_experts else 1.0
    total = 0.0
    for p in [*model.parameters(), *model.buffers()]:  # GGUF layers hold their packed weights as buffers
        if tied or p is not embed:
            total += p.numel() * p.element_size() * (experts_read if getattr(p, "expert_stack", False) else 1)
    return int(total)


def kv_bytes_per_token(arch: ModelArch, nbytes: int) -> int:
    """K and V of one token in every layer."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * nbytes


def decode_step_bytes(arch: ModelArch, nbytes: int, batch: int, mean_context: float,
                      weight_bytes: int | None = None) -> float:
    """Bytes one decode step must read: the weights once (`weight_bytes`, counted for this batch, where they
    are quantized), plus each sequence's live KV."""
    weights = step_weight_params(arch, batch) * nbytes if weight_bytes is None else weight_bytes
    return weights + batch * mean_context * kv_bytes_per_token(arch, nbytes)


def decode_roofline_tokens_per_s(rates: DeviceRates, arch: ModelArch, nbytes: int, batch: int,
                                 mean_context: float, weight_bytes: int | None = None) -> float:
    """Output tokens/s of a memory-bound decode of `batch` sequences at `mean_context` tokens each."""
    return batch * rates.copy_bytes_per_s / decode_step_bytes(arch, nbytes, batch, mean_context, weight_bytes)


def compute_roofline_tokens_per_s(rates: DeviceRates, arch: ModelArch) -> float:
    """Tokens/s (prompt or output) if every token cost only its 2 x params matmul FLOPs at the measured rate."""
    return rates.matmul_flops_per_s / (2 * step_weight_params(arch))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headrace.bench.roofline", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="matmul dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rates = measure(device, dtype)
    print(f"{rates.device}: copy {rates.copy_bytes_per_s / 1e9:,.0f} GB/s (read + write), "
          f"{rates.matmul_dtype} matmul {rates.matmul_flops_per_s / 1e12:,.1f} TFLOP/s (n={rates.matmul_size})")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rates.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
