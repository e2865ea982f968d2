"""Falcon (its three layouts) and Phi-3 with LongRoPE against transformers on the same weights.

Checkpoints are written by transformers itself (`save_pretrained`), so its own fused layouts are what we
load: Falcon's per-KV-group `query_key_value` (multi-query, grouped, interleaved per head) and Phi-3's
`qkv_proj` / `gate_up_proj`. Weights are redrawn with nonzero biases and norm parameters, so every tensor
matters. The Phi-3 config switches LongRoPE from short to long factors at 32 tokens: the 37-token prompt is
past it from the start, the 20-token one crosses it while generating (where transformers' `generate` drops
its cache and recomputes the whole sequence with the long factors, and so do we).
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from headrace.common.config import (CacheConfig, ConfigError, EngineConfig, ModelConfig, ParallelConfig,
                                    SpeculativeConfig)
from headrace.common.models.presets import PRESETS
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.configs import resolved
from tests.services.gpu_worker.plan_driver import PlanDriver
from tests.services.gpu_worker.test_embedded_vs_hf import assert_matches
from tests.services.gpu_worker.test_model_runner import run as run_overlapped
from tests.services.gpu_worker.test_models_vs_hf import hf_twin, ours_and_reference
from tests.services.gpu_worker.test_tensor_parallel import _port

FAMILIES = ["tiny-falcon", "tiny-falcon-new-arch", "tiny-falcon-sequential", "tiny-phi3-longrope"]
PROMPTS = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (37, 20)]
NEW_TOKENS = 16  # the 20-token prompt crosses Phi-3's switch at the 13th
# Under TP: the multi-query KV head replicated on both ranks, two KV groups split one per rank, Phi-3's fused
# parts sharded (the third Falcon layout differs only in the single-rank split tested above).
TP_FAMILIES = ["tiny-falcon", "tiny-falcon-new-arch", "tiny-phi3-longrope"]
TP_NEW_TOKENS = 6


def hf_config_of(preset: str):
    from transformers import AutoConfig

    data = dict(PRESETS[preset])
    return AutoConfig.for_model(data.pop("model_type"), **data)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """preset -> (folder of a transformers-saved checkpoint, that transformers model in float32)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for i, preset in enumerate(FAMILIES):
        torch.manual_seed(i)
        hf = AutoModelForCausalLM.from_config(hf_config_of(preset), dtype=torch.float32).eval()
        with torch.no_grad():
            for name, p in hf.named_parameters():
                norm_weight = name.endswith("weight") and ("norm" in name or ".ln_" in name)
                p.normal_(1.0 if norm_weight else 0.0, 0.05)
        folder = tmp_path_factory.mktemp(preset)
        hf.save_pretrained(folder)
        out[preset] = (str(folder), hf)
    return out


_RUNNERS: dict[str, ModelRunner] = {}


def runner_for(folder: str) -> ModelRunner:
    if folder not in _RUNNERS:
        cfg = EngineConfig(model=ModelConfig(model=folder, max_model_len=256), cache=CacheConfig(num_blocks=64),
                           device="cpu")
        _RUNNERS[folder] = ModelRunner(resolved(cfg), log=lambda *_: None)
    return _RUNNERS[folder]


_GREEDY: dict[tuple[str, int], tuple[list[int], list[float]]] = {}


def hf_greedy(checkpoints, preset: str, prompt_index: int, new_tokens: int = NEW_TOKENS
              ) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens for PROMPTS[prompt_index] and the top-2 logit gap at each step (computed
    once per preset, cut to `new_tokens`)."""
    key = (preset, prompt_index)
    if key not in _GREEDY:
        prompt = PROMPTS[prompt_index]
        out = checkpoints[preset][1].generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                              eos_token_id=None, pad_token_id=0, output_logits=True,
                                              return_dict_in_generate=True)
        gaps = [float(t[0].topk(2).values[0] - t[0].topk(2).values[1]) for t in out.logits]
        _GREEDY[key] = out.sequences[0, len(prompt):].tolist(), gaps
    tokens, gaps = _GREEDY[key]
    return tokens[:new_tokens], gaps[:new_tokens]


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("chunk", [1000, 5, 1])
def test_logits_match_transformers(checkpoints, preset, chunk):
    folder, hf = checkpoints[preset]
    ours, ref = ours_and_reference(runner_for(folder), hf, PROMPTS[0], chunk)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("chunk", [1000, 5, 1])
def test_greedy_matches_generate(checkpoints, preset, chunk):
    folder, _ = checkpoints[preset]
    outs = PlanDriver(runner_for(folder), chunk_size=chunk).generate(PROMPTS, SamplingParams(temperature=0.0),
                                                                       NEW_TOKENS)
    for i, ours in enumerate(outs):
        assert_matches(ours, hf_greedy(checkpoints, preset, i), f"{preset} prompt {i} in chunks of {chunk}")


def test_long_factors_are_what_makes_phi3_match(checkpoints):
    """Without the long table the 37-token prompt's logits are off: the test above can fail."""
    folder, hf = checkpoints["tiny-phi3-longrope"]
    runner = runner_for(folder)
    kept, runner.long_rope = runner.long_rope, None
    try:
        ours, ref = ours_and_reference(runner, hf, PROMPTS[0], 1000)
    finally:
        runner.long_rope = kept
    assert (ours - ref).abs().max() > 1e-3


def test_overlapped_steps_cross_the_long_rope_switch():
    """The step that recomputes a request for the long factors reads the token the pending step samples:
    launched ahead (overlapped) or one at a time, the tokens are the same. The 6-token prompt crosses
    the switch (32) at its 27th token, the 19-token one at its 14th."""
    cfg = EngineConfig(model=ModelConfig(model="random:tiny-phi3-longrope", seed=3, max_model_len=256),
                       cache=CacheConfig(num_blocks=64))
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    greedy = SamplingParams(temperature=0.0, max_tokens=64)
    assert run_overlapped(runner, greedy, overlap=True, num_new=30) == run_overlapped(runner, greedy, False, 30)


@pytest.mark.parametrize("preset", FAMILIES)
def test_random_presets_export_to_transformers(preset):
    """`random:` weights under each family's own names (the `--baseline hf` and GPU-check path)."""
    cfg = EngineConfig(model=ModelConfig(model=f"random:{preset}", seed=7, max_model_len=256),
                       cache=CacheConfig(num_blocks=64))
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    ours, ref = ours_and_reference(runner, hf_twin(runner), PROMPTS[0], 1000)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def _tp_rank(folders: list[str], rank: int, addr: str, queue) -> None:
    torch.set_num_threads(1)
    from headrace.services.gpu_worker.worker import init_tensor_parallel

    outs = []
    tp = None
    for folder in folders:
        config = EngineConfig(model=ModelConfig(model=folder, max_model_len=256), cache=CacheConfig(num_blocks=32),
                              parallel=ParallelConfig(tensor_parallel_size=2, dist_init_addr=addr), device="cpu")
        tp = tp or init_tensor_parallel(config, rank, torch.device("cpu"))
        runner = ModelRunner(resolved(config), tp=tp, device="cpu", log=lambda *_: None)
        outs.append(PlanDriver(runner).generate(PROMPTS, SamplingParams(temperature=0.0), TP_NEW_TOKENS))
    queue.put((rank, outs))


def test_tensor_parallel_2_matches_transformers(checkpoints):
    """TP=2 on CPU (gloo): Falcon's fused tensor split per rank (multi-query: the KV head replicated;
    grouped: one KV group each) and Phi-3's fused parts sharded, greedy equal to transformers."""
    folders = [checkpoints[p][0] for p in TP_FAMILIES]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    addr = f"127.0.0.1:{_port()}"
    procs = [ctx.Process(target=_tp_rank, args=(folders, r, addr, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    assert results[0] == results[1], "ranks disagree"
    for preset, outs in zip(TP_FAMILIES, results[0]):
        for i, ours in enumerate(outs):
            assert_matches(ours, hf_greedy(checkpoints, preset, i, TP_NEW_TOKENS), f"{preset} TP=2")


def test_prefix_caching_with_long_rope_past_its_switch_is_refused():
    cfg = EngineConfig(model=ModelConfig(model="random:tiny-phi3-longrope"),
                       cache=CacheConfig(enable_prefix_caching=True), device="cpu")
    with pytest.raises(ConfigError, match="--max-model-len 32"):
        resolved(cfg)
    short = cfg.replace(model=ModelConfig(model="random:tiny-phi3-longrope", max_model_len=32))
    assert resolved(short).resolved.max_model_len == 32


def test_speculation_with_long_rope_past_its_switch_is_refused_before_any_process_starts():
    cfg = EngineConfig(model=ModelConfig(model="random:tiny-phi3-longrope"), device="cpu",
                       speculative=SpeculativeConfig())
    with pytest.raises(ConfigError, match="--speculative-config is not supported with LongRoPE.*--max-model-len 32"):
        resolved(cfg)
    short = cfg.replace(model=ModelConfig(model="random:tiny-phi3-longrope", max_model_len=32))
    assert resolved(short).speculative is not None


def test_long_rope_rows_and_restarts():
    """Which table each token reads, and who is recomputed: a short prompt at its crossing decode (its
    newest token on the host or still on the device), never a long prompt, nor a request re-sent after a
    preemption with more tokens than the switch (its first chunk already used the long factors)."""
    from headrace.services.gpu_worker.batch_inputs import long_rope_restarts, prepare_batch
    from headrace.services.gpu_worker.model.rope import LongRopeRows
    from headrace.services.gpu_worker.request_state import RequestState

    rows = LongRopeRows(original_max=32, long_offset=1000)
    greedy = SamplingParams(temperature=0.0)

    def state(rid, num_prompt, num_tokens, computed):
        return RequestState(rid, list(range(num_tokens)), num_prompt, list(range(8)), computed, greedy, 0)

    reqs = {"crossing": state("crossing", 20, 33, 32), "in-flight": state("in-flight", 20, 32, 32),
            "long-prompt": state("long-prompt", 40, 41, 40), "re-sent": state("re-sent", 20, 40, 32),
            "short": state("short", 20, 25, 24)}
    scheduled = dict.fromkeys(reqs, 1)
    assert long_rope_restarts(reqs, scheduled, rows) == {"crossing", "in-flight"}
    del reqs["in-flight"], scheduled["in-flight"]
    batch = prepare_batch(reqs, scheduled, 16, torch.device("cpu"), long_rope=rows)
    assert batch.req_order == ["long-prompt", "re-sent", "short", "crossing"]  # decodes first
    assert batch.positions[:3].tolist() == [1040, 1032, 24]
    assert batch.positions[3:].tolist() == [1000 + p for p in range(33)]  # "crossing", recomputed whole
