"""--kv-cache-dtype fp8 in the worker: twice the blocks of a 16-bit cache in the same bytes, checkpoint scales
land on their layers, and the embedded model's greedy tokens and logits with an fp8 cache stay close to the
same float32 model with a float32 cache (the torch backend: the CPU path and the oracle)."""

from __future__ import annotations

import pytest
import torch

from headrace.common.config import CacheConfig, ConfigError, EngineConfig, ModelConfig
from headrace.common.sampling_params import SamplingParams
from headrace.kernels.kv_fp8 import FP8_KV_DTYPE
from headrace.services.gpu_worker.kv_cache import KVCacheLayout, kv_cache_dtype
from headrace.services.gpu_worker.kv_sizing import configured_num_blocks
from headrace.services.gpu_worker.model.kv_scales import kv_scale_checkpoint_name
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved
from tests.services.gpu_worker.plan_driver import PlanDriver, capture_logits
from tests.prompts import CHAT_QUESTIONS, chat_prompt_ids

NEW_TOKENS = 16
# e4m3 keeps 3 mantissa bits: every cached K and V element is off by up to 1/16 of itself, in all 30 layers
# of a small model, so logits move by a few units and a near tie can flip. Measured here in lockstep (both
# runners fed the same tokens, 3 prompts x 16 tokens): 97.9% of greedy tokens agree, the largest logit
# difference of any step is 3.15 (1.9 on two other prompts). The bounds leave room for e4m3's rounding.
MIN_AGREEMENT = 0.90
LOGIT_ATOL = 5.0
QUESTIONS = [CHAT_QUESTIONS[i] for i in (0, 2, 5)]


def test_kv_cache_dtype_names() -> None:
    assert kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_dtype("fp8", torch.bfloat16) == kv_cache_dtype("fp8_e4m3", torch.float32) == FP8_KV_DTYPE
    with pytest.raises(ConfigError, match="--kv-cache-dtype"):
        CacheConfig(kv_cache_dtype="fp8_e5m2")


def test_fp8_cache_holds_twice_the_blocks_of_bf16() -> None:
    cache = CacheConfig(kv_cache_memory=64 << 20)
    blocks = {dt: configured_num_blocks(cache, KVCacheLayout(30, 16, 3, 64, dt), torch.device("cpu"))
              for dt in (torch.float32, torch.bfloat16, FP8_KV_DTYPE)}
    assert blocks[FP8_KV_DTYPE] == 2 * blocks[torch.bfloat16] == 4 * blocks[torch.float32]
    layout = KVCacheLayout(2, 16, 3, 64, FP8_KV_DTYPE)
    k, v = layout.allocate(5, torch.device("cpu"))[1]
    assert k.dtype == FP8_KV_DTYPE and k.shape == (5, 16, 3, 64)
    assert k.untyped_storage().nbytes() == layout.bytes_per_block * 5 == 2 * 2 * 5 * 16 * 3 * 64  # 1 byte each


@pytest.mark.parametrize("name,expected", [
    ("layers.3.self_attn.k_scale", (3, "k")),
    ("layers.3.self_attn.v_scale", (3, "v")),
    ("layers.0.self_attn.kv_scale", (0, "kv")),
    ("layers.12.self_attn.k_proj.output_scale", (12, "k")),
    ("layers.12.self_attn.v_proj.output_scale", (12, "v")),
    ("layers.1.self_attn.q_scale", (-1, "")),
    ("layers.1.self_attn.k_proj.weight_scale", None),
    ("layers.1.self_attn.k_proj.input_scale", None),
])
def test_checkpoint_scale_names(name: str, expected) -> None:
    assert kv_scale_checkpoint_name(name) == expected


def _runner(kv: str, model: str = "", num_blocks: int = 256) -> ModelRunner:
    cfg = EngineConfig(model=ModelConfig(model=model, max_model_len=1024, dtype="float32"),
                       cache=CacheConfig(num_blocks=num_blocks, kv_cache_dtype=kv), attention_backend="torch")
    return ModelRunner(resolved(cfg), log=lambda *_: None)


def test_checkpoint_scales_reach_their_layers() -> None:
    runner = _runner("fp8", "random:tiny-llama", 64)
    assert runner.kv_caches[0][0].dtype == FP8_KV_DTYPE
    model = runner.model
    model.load_weights([("model.layers.0.self_attn.k_scale", torch.tensor(0.25)),
                        ("model.layers.0.self_attn.v_scale", torch.tensor([0.5])),
                        ("model.layers.1.self_attn.kv_scale", torch.tensor(2.0)),
                        ("model.layers.1.self_attn.q_scale", torch.tensor(9.0))])
    assert model.layers[0].self_attn.kv_scale == (0.25, 0.5)
    assert model.layers[1].self_attn.kv_scale == (2.0, 2.0)
    with pytest.raises(ValueError, match="positive"):
        model.load_weights([("model.layers.0.self_attn.k_scale", torch.tensor(0.0))])


@pytest.fixture(scope="module")
def prompts(embedded_tokenizer) -> list[list[int]]:
    return chat_prompt_ids(embedded_tokenizer, QUESTIONS)


class Lockstep:
    """Every plan runs on the float32-cache runner and on the fp8-cache runner; the fp8 runner then continues
    from the reference's token, so each step compares the two caches on the same inputs (one divergence
    would otherwise make every later position a comparison of different texts)."""

    def __init__(self, ref: ModelRunner, fp8: ModelRunner):
        self.ref, self.fp8, self.block_size = ref, fp8, ref.block_size
        self.ref_logits, self.fp8_logits = capture_logits(ref), capture_logits(fp8)
        self.steps = self.agree = 0
        self.worst_logit_diff = 0.0

    def execute(self, plan):
        want, got = self.ref.execute(plan), self.fp8.execute(plan)
        if want.req_ids:
            diff = float((self.fp8_logits[-1] - self.ref_logits[-1]).abs().max())
            self.worst_logit_diff = max(self.worst_logit_diff, diff)
            for rid, a, b in zip(want.req_ids, got.sampled_token_ids, want.sampled_token_ids):
                self.steps += 1
                self.agree += a == b
                self.fp8.requests[rid].token_ids[-1] = b
        return want


def test_embedded_greedy_with_fp8_cache_agrees_with_float32_cache(prompts) -> None:
    lockstep = Lockstep(_runner("auto"), _runner("fp8"))
    PlanDriver(lockstep).generate(prompts, SamplingParams(temperature=0.0), NEW_TOKENS)
    agreement = lockstep.agree / lockstep.steps
    print(f"fp8 KV vs float32 KV: {agreement:.1%} of {lockstep.steps} greedy tokens agree; "
          f"max |logit difference| {lockstep.worst_logit_diff:.3f}")
    assert lockstep.steps == len(prompts) * NEW_TOKENS
    assert agreement >= MIN_AGREEMENT
    assert 0.0 < lockstep.worst_logit_diff < LOGIT_ATOL
