"""Decode-only steps on a CPU as TorchInductor graphs (`--compile-decode`): the CPU's counterpart of the
CUDA decode graphs.

Why: at decode sizes a CPU step is ~1,700 small operators (norms, RoPE, casts, residual adds, SiLU) around
~120 products, and in eager mode each operator costs a few microseconds of host time: at one row that was
about half of a step of the embedded model. Inductor fuses the elementwise work into a few C++ loops per
layer and the step runs as one call.

What the graph does not trace:
- past one row, the attention over the paged cache, the opaque operator `headrace::decode_attention`: the
  torch backend's own gather and SDPA, run eagerly (at 16 rows Inductor's code for the block gather took
  ~175 us a layer, more than index_select; at one row the traced form is the faster one);
- the products on oneDNN-prepacked weights (`headrace::onednn_linear`, model/quant/onednn_packed.py).
The graph writes nothing: each layer attends over the past gathered from the cache plus its new K/V, and
returns its new K/V; one index_copy_ stores every layer's after the graph. (A cache write inside the graph
made Inductor copy the whole cache per layer: the caches are views of one tensor.)

Graphs, each dynamic in the context length: one row (a GGUF's int4 products), and 2 rows or more,
dynamic in rows too (a GGUF model compiles two of these: below DENSE_FROM_ROWS the int4 products, from it
the dense ones). Steps with one block of context or less, prefill and mixed steps, and models this does not
cover (sliding windows, MoE, an fp8 cache, pipeline or tensor parallelism, LongRoPE) run eagerly. Every
graph is compiled at start-up, so no request waits on a compile; Inductor caches them on disk, so the next
start with the same model compiles much less. After its warm-up a graph is called without dynamo
(_CompiledGraph). Results differ from eager in the last bits (Inductor rounds bf16 intermediates once per
fused loop), as a different batch size's would.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from headrace.common.config import cache_dir
from headrace.services.gpu_worker.attention.torch_backend import (
    KVGather,
    apply_rope_qk,
    attend,
    gather_kv,
    rope_factors,
)
from headrace.services.gpu_worker.graph_runner import ForwardInputs, GraphRunner
from headrace.services.gpu_worker.model.llama import ForwardContext, LlamaForCausalLM
from headrace.services.gpu_worker.model.moe import MoEBlock
from headrace.services.gpu_worker.model.quant.gguf_weights import DENSE_FROM_ROWS, GGUFLinear

logger = logging.getLogger(__name__)
_LIB = torch.library.Library("headrace", "FRAGMENT")
_LIB.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor blocks, "
            "Tensor visible, Tensor last, float scale, float softcap) -> Tensor")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, blocks: torch.Tensor, visible: torch.Tensor, last: torch.Tensor,
                     scale: float, softcap: float) -> torch.Tensor:
    """Attention of decode rows q [R, H, D] over their past in the cache and their new k/v [R, Hkv, D]:
    `blocks` [R * nb] their block tables' first nb entries, `visible` [R, L] which of the first L keys each
    row sees, `last` [R] the column of its new token (its length - 1). [R, H, D]."""
    rows, num_keys = visible.shape
    kd, vd = gather_kv((k_cache, v_cache), KVGather(blocks, rows, num_keys, None))
    row = torch.arange(rows, device=q.device)
    kd[row, last] = k.to(kd.dtype)  # the gathered copies, not the cache
    vd[row, last] = v.to(vd.dtype)
    mask = None if rows == 1 else visible[:, None, :]  # one row sees all its keys
    return attend(q[:, None], kd, vd, mask, scale, softcap or None)[:, 0]


def _decode_attention_shape(q, k, v, k_cache, v_cache, blocks, visible, last, scale, softcap):
    return torch.empty_like(q)


_LIB.impl("decode_attention", decode_attention, "CPU")
torch.library.register_fake("headrace::decode_attention", _decode_attention_shape, lib=_LIB)


class _GraphAttention:
    """The attention backend while tracing: RoPE in the graph, attention through the opaque operator, the
    new K/V collected instead of written. Also the forward context's metadata (layers read its
    slot_mapping, which it does not use)."""

    name = "compiled-decode"
    slot_mapping = None

    def __init__(self, blocks: torch.Tensor, visible: torch.Tensor, last: torch.Tensor) -> None:
        self.blocks, self.visible, self.last = blocks, visible, last
        self.new_kv: list[torch.Tensor] = []

    def prepare(self, meta: Any) -> None:
        pass

    def write_cache(self, q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping, kv_scale=(1.0, 1.0)):
        q, k = apply_rope_qk(q, k, rope_factors(cos_sin_cache.index_select(0, positions)))
        self.new_kv.append(torch.stack((k, v)))
        return q, k

    def attend(self, q, k, v, kv_cache, meta, scale: float, window=None, softcap=None, kv_scale=(1.0, 1.0)):
        if q.shape[0] == 1:  # one row: traced, Inductor fuses the gather with the casts (1-2 ms a step faster)
            past = gather_kv(kv_cache, KVGather(self.blocks, 1, self.visible.shape[1] - 1, None))
            kd, vd = (torch.cat([old, new[:, None]], 1) for old, new in zip(past, (k, v)))
            return one_row_attention(q, kd[0], vd[0], scale, softcap)
        return torch.ops.headrace.decode_attention(q, k, v, kv_cache[0], kv_cache[1], self.blocks, self.visible,
                                                   self.last, scale, softcap or 0.0)


def one_row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      softcap: float | None) -> torch.Tensor:
    """One query row q [1, H, D] over all of k/v [L, Hkv, D] (GQA by grouping), in float32 as `attend`,
    written as products and sums over broadcast operands: Inductor compiles them into reduction loops fused
    with the gather's casts. Same-process A/B on the embedded model's one-row graph: 4.5 ms a step against
    5.1 ms with SDPA at 100 keys, 4.9 against 5.2 at 400 (SDPA's CPU kernel has a fixed cost per call, and
    needs its float32 K/V materialised)."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    qf = q.float().reshape(1, kv_heads, heads // kv_heads, dim)  # [1, Hkv, G, D]
    scores = (qf * k.float()[:, :, None, :]).sum(-1) * scale  # [L, Hkv, G]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    out = (scores.softmax(0)[..., None] * v.float()[:, :, None, :]).sum(0)  # [Hkv, G, D]
    return out.reshape(1, heads, dim).to(q.dtype)


def _step(model: LlamaForCausalLM, cos_sin_cache: torch.Tensor, storage: torch.Tensor, input_ids: torch.Tensor,
          positions: torch.Tensor, blocks: torch.Tensor, visible: torch.Tensor, last: torch.Tensor):
    """What the graph computes: the final hidden states [R, hidden] and every layer's new K/V
    [layers, 2, R, kv_heads, head_dim]."""
    attention = _GraphAttention(blocks, visible, last)
    caches = [(storage[i, 0], storage[i, 1]) for i in range(storage.shape[0])]
    hidden = model(input_ids, positions, ForwardContext(attention, caches, attention, cos_sin_cache))
    return hidden, torch.stack(attention.new_kv)


# The one-row graph's call sequence (~5,000 statements: buffers, views, size checks, ~120 kernel calls) as
# C++ instead of Python: 0.7-1.8 ms less per step of the embedded model (~7 ms), paired runs here. Its
# entry is compiled apart from the kernels at -O1 (cpp_wrapper_build_separate), 55 s on 2 cores instead of
# 110 s when not cached. Graphs of more rows keep the Python wrapper: a smaller share of their step, and
# ~30 s more compile each.
CPP_WRAPPER = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}
_INSTANCES = itertools.count()  # _CompiledGraph's code names
_STATIC_INPUTS = ("model", "cos_sin_cache", "storage")  # _step's arguments that are the same on every call
_LOCAL_NAME = re.compile(r"^L\['(\w+)'\]")


class _CompiledGraph:
    """_step compiled for one class of steps, and after its warm-up called the way Inductor compiled it.

    A call through dynamo first checks the graph's guards: with the model's ~300 tensors as graph inputs that
    took ~1 ms of a ~9 ms one-row step. The runner already knows a step matches the graph (its row class, the
    inputs' dtypes, more than one block of context) and the model's tensors never change, so after the warm-up
    the graph is called directly: its inputs come from the expressions dynamo recorded for them (those of the
    model, the RoPE table and the cache read once), in its order. Each copy of _step's code (types.FunctionType
    over code.replace) keeps its own dynamo cache."""

    def __init__(self, name: str, cpp_wrapper: bool = False) -> None:
        self._traced: list[tuple[list[str], Callable]] = []  # (input expressions, compiled graph) per compile
        self.cpp_wrapper = cpp_wrapper  # asked for (CPP_WRAPPER); wrapper: what the last compile got
        self.wrapper: str | None = None
        # A name of its own per instance too: dynamo keeps what it learnt of a frame's shapes (which dims
        # vary) by file, line and name, so a second model's graph in one process (tests) would start from
        # the first one's dims and compile twice.
        name = f"{name}_{next(_INSTANCES)}"
        code = _step.__code__.replace(co_name=name)
        fn = types.FunctionType(code, _step.__globals__, name)
        self._dynamo = torch.compile(fn, fullgraph=True, backend=self._compile)
        self._direct: tuple[list[Any], list[int], Callable[[dict], tuple], Callable] | None = None

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        names = [node.meta["grapharg"].source.name for node in gm.graph.find_nodes(op="placeholder")]
        compiled = None
        if self.cpp_wrapper:
            try:
                compiled = compile_fx(gm, example_inputs, config_patches=CPP_WRAPPER)
            except torch._dynamo.exc.RestartAnalysis:  # dynamo's own control flow (it traces again): not a failure
                raise
            except Exception as e:  # noqa: BLE001 - the Python wrapper runs the same kernels, a bit slower
                logger.warning("--compile-decode: C++ wrapper failed (%s: %s); compiling with the Python one",
                               type(e).__name__, e)
        self.wrapper = "C++" if compiled is not None else "Python"
        if compiled is None:
            compiled = compile_fx(gm, example_inputs)
        self._traced.append((names, compiled))
        return compiled

    def __call__(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._direct is None:
            return self._dynamo(**inputs)
        template, slots, read, compiled = self._direct
        args = list(template)
        for slot, value in zip(slots, read(inputs)):
            args[slot] = value
        hidden, new_kv = compiled(*args)
        return hidden, new_kv

    @property
    def is_direct(self) -> bool:
        return self._direct is not None

    def go_direct(self, **inputs: Any) -> bool:
        """After the warm-up call with these inputs: call the graph directly from now on, if it was compiled
        once and gives the same outputs that way. Returns whether it does."""
        if len(self._traced) != 1:
            return False
        names, compiled = self._traced[0]
        roots = [_LOCAL_NAME.match(name) for name in names]
        if not all(roots):
            return False
        # Dynamo's own source expressions ("L['model']._modules[...]", "L['blocks'].size()[0]"), evaluated on
        # the call's arguments as its guards are.
        template = [eval(name, {}, {"L": inputs}) if root[1] in _STATIC_INPUTS else None  # noqa: S307
                    for name, root in zip(names, roots)]
        slots = [i for i, root in enumerate(roots) if root[1] not in _STATIC_INPUTS]
        read = eval("lambda L: (" + "".join(names[i] + ", " for i in slots) + ")")  # noqa: S307
        expected = self._dynamo(**inputs)
        self._direct = (template, slots, read, compiled)
        if not all(torch.equal(a, b) for a, b in zip(self(**inputs), expected)):
            self._direct = None
        return self._direct is not None


def unsupported_reason(model: LlamaForCausalLM, kv_caches: list, long_rope: Any, stage_size: int, tp_size: int,
                       device: torch.device) -> str | None:
    """Why this worker's decode steps cannot run compiled, or None when they can."""
    if device.type != "cpu":
        return f"device {device.type} (CUDA graphs serve there)"
    if stage_size > 1 or tp_size > 1:
        return "pipeline or tensor parallelism"
    if long_rope is not None:
        return "LongRoPE"
    if any(layer.self_attn.window for layer in model.layers):
        return "sliding-window layers"
    if any(isinstance(layer.mlp, MoEBlock) for layer in model.layers):
        return "mixture-of-experts layers"
    k_cache = kv_caches[0][0]
    if not k_cache.dtype.is_floating_point or k_cache.element_size() == 1:
        return f"a {k_cache.dtype} KV cache"
    if k_cache._base is None or k_cache._base.dim() != 6:
        return "KV caches that are not views of one tensor"
    return None


class CompiledDecode(GraphRunner):
    """Runs decode-only steps through the compiled graphs."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list, cos_sin_cache: torch.Tensor, block_size: int,
                 max_num_seqs: int) -> None:
        self.model, self.cos_sin_cache, self.block_size = model, cos_sin_cache, block_size
        self.storage = kv_caches[0][0]._base  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        # The row counts warmed up, one per class of steps: 1 row, fewer than DENSE_FROM_ROWS, more. Where the
        # model's products do not branch on rows (not a GGUF), the last two share their graph.
        self.sizes = [rows for rows in (1, 2, DENSE_FROM_ROWS) if rows <= max_num_seqs]
        self.num_replays = 0
        few = _CompiledGraph("_step_few_rows")
        branches = any(type(getattr(m, "quant_method", None)) is GGUFLinear for m in model.modules())
        many = _CompiledGraph("_step_many_rows") if branches else few
        self._graphs = [_CompiledGraph("_step_one_row", cpp_wrapper=True), few, many]

    @property
    def num_direct(self) -> int:
        """Graphs called without dynamo (_CompiledGraph.go_direct)."""
        return sum(graph.is_direct for graph in set(self._graphs))

    def graph_for(self, rows: int) -> _CompiledGraph:
        """The graph of steps of this many rows: its class's."""
        return self._graphs[0 if rows == 1 else 1 if rows < DENSE_FROM_ROWS else 2]

    def accepts(self, batch: ForwardInputs) -> bool:
        attn = batch.attn
        rows = attn.num_decodes
        if not rows == attn.num_seqs == batch.input_ids.shape[0]:
            return False
        # Past one block of context: dynamic sizes start at 2 (a size of 1 would be compiled as a constant).
        return max(attn.host_seq_lens()) > self.block_size

    def run(self, batch: ForwardInputs) -> torch.Tensor:
        attn = batch.attn
        hidden = self._run(batch.input_ids, batch.positions, attn.block_tables, attn.host_seq_lens(),
                           attn.slot_mapping)
        self.num_replays += 1
        return hidden

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor, lens: list[int],
             slot_mapping: torch.Tensor | None, warming_up: bool = False) -> torch.Tensor:
        rows, max_len = len(lens), max(lens)
        blocks = block_tables[:rows, : -(-max_len // self.block_size)].reshape(-1).long()
        n = torch.tensor(lens, device=input_ids.device)
        visible = torch.arange(max_len, device=input_ids.device)[None, :] < n[:, None]
        last = n - 1
        graph = self.graph_for(rows)
        if not graph.is_direct:  # for dynamo: the context length (and, past one row, the rows) are dynamic
            torch._dynamo.mark_dynamic(blocks, 0)
            torch._dynamo.mark_dynamic(visible, 1)
            if rows > 1:
                for t in (input_ids, positions, visible, last):
                    torch._dynamo.mark_dynamic(t, 0)
        inputs = dict(model=self.model, cos_sin_cache=self.cos_sin_cache, storage=self.storage, input_ids=input_ids,
                      positions=positions, blocks=blocks, visible=visible, last=last)
        hidden, new_kv = graph(**inputs)
        if warming_up:
            graph.go_direct(**inputs)
        if slot_mapping is not None:
            flat = self.storage.view(self.storage.shape[0], 2, -1, *self.storage.shape[4:])
            flat.index_copy_(2, slot_mapping, new_kv.to(flat.dtype))
        return hidden

    @torch.no_grad()  # as steps run (the grad mode is part of what a graph is compiled for)
    def warm_up(self, log: Callable[[str], None] | None = None) -> None:
        """Compile every class's graph on made-up rows (block 0, two blocks of context, nothing written)."""
        device = self.storage.device
        for rows in self.sizes:
            t0 = time.perf_counter()
            lens = [self.block_size + 2] * rows
            tables = torch.zeros(rows, 2, dtype=torch.int32, device=device)
            ids = torch.zeros(rows, dtype=torch.long, device=device)
            positions = torch.full((rows,), self.block_size + 1, dtype=torch.long, device=device)
            self._run(ids, positions, tables, lens, None, warming_up=True)
            if log is not None:
                graph = self.graph_for(rows)
                log(f"--compile-decode: graph for {'1 row' if rows == 1 else f'{rows}+ rows'} compiled in "
                    f"{time.perf_counter() - t0:.1f} s ({graph.wrapper} wrapper)")


def maybe_compile_decode(enabled: bool, model: LlamaForCausalLM, kv_caches: list, cos_sin_cache: torch.Tensor,
                         block_size: int, max_num_seqs: int, long_rope: Any, stage_size: int, tp_size: int,
                         device: torch.device, log: Callable[[str], None]) -> CompiledDecode | None:
    """The compiled decode runner, warmed up, when asked for and possible; else None (said in the log). A
    graph that fails to compile leaves the steps eager: a slower worker, not a dead one."""
    if not enabled:
        return None
    reason = unsupported_reason(model, kv_caches, long_rope, stage_size, tp_size, device)
    if reason is not None:
        log(f"--compile-decode: off for {reason}; decode steps run eagerly")
        return None
    # Inductor's cache beside the converted models (its default is under /tmp, gone after a reboot), unless
    # the user placed it.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir(), "inductor"))
    try:
        runner = CompiledDecode(model, kv_caches, cos_sin_cache, block_size, max_num_seqs)
        runner.warm_up(log)
    except Exception as e:  # noqa: BLE001 - any compiler failure: keep serving, eagerly
        log(f"--compile-decode: compiling failed ({type(e).__name__}: {e}); decode steps run eagerly")
        return None
    return runner
