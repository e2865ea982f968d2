"""GGUF files of the new families (Gemma 2/3, Phi-3, Falcon, Qwen2-MoE, Qwen3-MoE), written tiny and random
as llama.cpp writes them: our converted folder holds exactly the weights transformers' own GGUF loader reads,
and our logits (prefilled in chunks of 5) and greedy tokens (prefilled whole and one token a step) equal that
model's on the CPU, with prompts longer than Gemma's window. Quantized files keep their linears quantized only
where the worker's quantized path takes them; what transformers cannot read is refused by name."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.common.models.gguf_convert import GGUFConversionError, convert_gguf
from headrace.common.models.gguf_families import SUPPORTED_GGUF_ARCHITECTURES
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.model_runner import ModelRunner
from tests.common.models.gguf_fixtures import VOCAB, write_tiny_gguf
from tests.configs import resolved
from tests.services.gpu_worker.plan_driver import PlanDriver
from tests.services.gpu_worker.test_embedded_vs_hf import assert_matches
from tests.services.gpu_worker.test_models_vs_hf import ours_and_reference

FAMILIES = ["gemma2", "gemma3", "phi3", "falcon", "qwen2moe", "qwen3moe"]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each family's GGUF file, its cache folder beside it (HEADRACE_CACHE for the engine's own conversion)."""
    root = tmp_path_factory.mktemp("gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADRACE_CACHE", str(root / "cache"))
        yield {arch: write_tiny_gguf(str(root / f"{arch}.gguf"), arch, seed=n) for n, arch in enumerate(FAMILIES)}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, files):
    """(arch, our runner on the GGUF, transformers' model from the same GGUF through its own loader)."""
    from transformers import AutoModelForCausalLM

    path = files[request.param]
    cfg = EngineConfig(model=ModelConfig(model=path, dtype="float32", max_model_len=256), cache=CacheConfig(num_blocks=64),
                       device="cpu")
    runner = ModelRunner(resolved(cfg), log=lambda *_: None)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    return request.param, runner, hf.eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, VOCAB, (19,), generator=torch.Generator().manual_seed(3)).tolist()


def test_converted_weights_equal_transformers_gguf_loader(family):
    arch, runner, hf = family
    ref = hf.state_dict()
    with safe_open(os.path.join(runner.config.resolved.weights_dir, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name in names:  # Gemma's norms exercise the 1 + w offset, MoE the stacked experts, Falcon its names
            torch.testing.assert_close(f.get_tensor(name), ref[name].float(), atol=0, rtol=0, msg=name)
    tied = {"lm_head.weight"} if hf.config.tie_word_embeddings else set()
    assert names == set(ref) - tied, arch


def test_config_matches_transformers(family):
    arch, runner, hf = family
    ours = runner.arch
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == \
        (hf.config.num_hidden_layers, hf.config.num_attention_heads, runner.arch.num_kv_heads,
         getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads)
    if arch.startswith("gemma"):  # windowed layers where transformers puts them, the window from the file
        assert ours.window_layers == tuple(t == "sliding_attention" for t in hf.config.layer_types)
        assert ours.sliding_window == hf.config.sliding_window == 4
    if arch.endswith("moe"):
        assert (ours.num_experts, ours.num_experts_per_tok, ours.norm_topk_prob) == \
            (4, 2, bool(hf.config.norm_topk_prob))


# The families' model code is checked at chunk sizes 1000, 5 and 1 on HF folders (tests/services/gpu_worker);
# here the conversion is what is new, so fewer sizes keep the file fast.
@pytest.mark.parametrize("chunk", [5])
def test_logits_match_transformers(family, prompt, chunk):
    _, runner, hf = family
    ours, ref = ours_and_reference(runner, hf, prompt, chunk)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1000, 1])
def test_greedy_tokens_equal_generate(family, prompt, chunk):
    _, runner, hf = family
    ids = torch.tensor([prompt])  # the mask says every token is real (the prompt may hold the pad id)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                      eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    gaps = [float(step[0].topk(2).values[0] - step[0].topk(2).values[1]) for step in out.logits]
    (ours,) = PlanDriver(runner, chunk_size=chunk).generate([prompt], SamplingParams(temperature=0.0), NEW_TOKENS)
    assert_matches(ours, (out.sequences[0, len(prompt):].tolist(), gaps), f"chunks of {chunk}")


def test_kept_quantized_only_where_the_quantized_path_takes_it(files, tmp_path):
    """Gemma's separate projections stay Q8_0 integers (codes * scales + mins equal the dequantized weight);
    Phi-3's and Falcon's fused projections and the MoE families are stored dequantized, with no
    quantization_config, so `--dtype bfloat16` serves them in float instead of refusing them."""
    import json

    gemma = convert_gguf(files["gemma3"], str(tmp_path), log=lambda *_: None, keep_quantized=True)
    dense = convert_gguf(files["gemma3"], str(tmp_path), log=lambda *_: None)
    modules = json.load(open(os.path.join(gemma, "config.json")))["quantization_config"]["modules"]
    assert "model.layers.0.self_attn.q_proj" in modules and "model.layers.0.mlp.down_proj" in modules
    with safe_open(os.path.join(gemma, "model.safetensors"), "pt") as f, \
            safe_open(os.path.join(dense, "model.safetensors"), "pt") as d:
        q = "model.layers.0.mlp.gate_proj"
        w = f.get_tensor(q + ".codes").float() * f.get_tensor(q + ".scales").repeat_interleave(16, 1) \
            + f.get_tensor(q + ".mins").repeat_interleave(16, 1)
        assert torch.equal(w, d.get_tensor(q + ".weight"))
        norm = "model.layers.0.post_feedforward_layernorm.weight"
        assert torch.equal(f.get_tensor(norm), d.get_tensor(norm))  # the 1 + w offset undone in both
    # A Q4_K_M file's fallbacks: q in Q5_0 (not kept) beside Q8_0 k and v; the merged q|k|v goes dense whole.
    mixed = write_tiny_gguf(str(tmp_path / "mixed.gguf"), "gemma3", tensor_quant={"attn_q.weight": "Q5_0"})
    mixed = convert_gguf(mixed, str(tmp_path), log=lambda *_: None, keep_quantized=True)
    modules = json.load(open(os.path.join(mixed, "config.json")))["quantization_config"]["modules"]
    assert not any("self_attn.v_proj" in m for m in modules) and "model.layers.0.mlp.up_proj" in modules
    for arch in ("phi3", "falcon", "qwen2moe"):
        folder = convert_gguf(files[arch], str(tmp_path), log=lambda *_: None, keep_quantized=True)
        assert "quantization_config" not in json.load(open(os.path.join(folder, "config.json"))), arch


@pytest.mark.parametrize("arch, overrides, extra, message", [
    ("falcon", {"attention.head_count_kv": 2}, {}, "GGUF falcon with grouped key/value heads"),
    ("phi3", {}, {"rope_factors_long.weight": (8,), "rope_factors_short.weight": (8,)},
     "GGUF phi3 with LongRoPE factors"),
    ("gemma2", {"rope.scaling.type": "yarn"}, {}, r"gemma2.rope.scaling.type 'yarn'"),
])
def test_what_transformers_cannot_read_is_refused_by_name(tmp_path, arch, overrides, extra, message):
    path = write_tiny_gguf(str(tmp_path / f"{arch}.gguf"), arch, meta_overrides=overrides, extra_tensors=extra)
    with pytest.raises(GGUFConversionError, match=message):
        convert_gguf(path, str(tmp_path / "cache"), log=lambda *_: None)


def test_mixtral_in_a_llama_file_is_refused(tmp_path):
    from gguf import GGUFWriter

    path = str(tmp_path / "mixtral.gguf")
    writer = GGUFWriter(path, "llama")
    for key in ("block_count", "embedding_length", "attention.head_count", "context_length", "expert_count"):
        writer.add_uint32(f"llama.{key}", 8)
    _finish(writer, path)
    with pytest.raises(GGUFConversionError, match=r"llama.expert_count: Mixtral"):
        convert_gguf(path, str(tmp_path / "cache"), log=lambda *_: None)


def test_a_missing_metadata_key_is_named(tmp_path):
    path = write_tiny_gguf(str(tmp_path / "x.gguf"), "qwen3moe", meta_overrides={"expert_feed_forward_length": None})
    with pytest.raises(GGUFConversionError, match="lacks the metadata key qwen3moe.expert_feed_forward_length"):
        convert_gguf(path, str(tmp_path / "cache"), log=lambda *_: None)


def test_start_up_on_an_unsupported_gguf_architecture_names_it_and_lists_the_supported(tmp_path, capsys):
    from gguf import GGUFWriter

    from headrace.cli import main

    path = str(tmp_path / "mamba.gguf")
    _finish(GGUFWriter(path, "mamba"), path)
    assert main(["serve", "--model", path, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "headrace: error: GGUF architecture 'mamba' (general.architecture) is not supported" in err
    assert all(a in err for a in SUPPORTED_GGUF_ARCHITECTURES) and "Traceback" not in err


def test_start_up_on_a_model_type_transformers_does_not_know(tmp_path, capsys):
    """The HF folder's config.json is checked before transformers reads it (which would stop with its own
    words about upgrading transformers)."""
    from headrace.cli import main

    (tmp_path / "config.json").write_text('{"model_type": "brandnew", "architectures": ["BrandNewForCausalLM"]}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["serve", "--model", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "model architecture BrandNewForCausalLM (model_type 'brandnew') is not supported" in err
    assert "Gemma3ForCausalLM" in err and "Traceback" not in err


def _finish(writer, path: str) -> None:
    """An otherwise empty file with a tokenizer (conversion reads the metadata before any tensor)."""
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch, kind", [("gemma2", "gguf"), ("phi3", None), ("qwen3moe", None)])
def test_dtype_bfloat16_on_cpu_serves_each_family(files, arch, kind):
    """`--dtype bfloat16` on a CPU asks for the kept-quantized folder: Gemma runs the quantized linears, Phi-3 and
    the MoE families start on their dequantized weights instead of being refused as quantized checkpoints."""
    from headrace.llm import LLM

    llm = LLM(files[arch], device="cpu", dtype="bfloat16", max_model_len=64, log=lambda *_: None)
    quant = llm.config.require_resolved().quantization
    assert (quant.kind if quant else None) == kind
    out = llm.generate([[5, 6, 7, 8, 9, 10]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3


@pytest.mark.parametrize("arch, dtype", [("gemma2", "bfloat16"), ("phi3", "auto"), ("qwen3moe", "auto")])
def test_dtype_auto_on_cpu_keeps_quantized_the_families_that_can_be(files, arch, dtype):
    """`--dtype auto` on a CPU serves a GGUF kept quantized (bfloat16) where its linears can stay quantized;
    Phi-3's fused projections and MoE experts cannot, so those files keep the float32 path."""
    from headrace.common.models.resolve import resolve_engine_config

    cfg = resolve_engine_config(EngineConfig(model=ModelConfig(model=files[arch]), device="cpu"), log=lambda *_: None)
    assert cfg.model.dtype == dtype
    quant = cfg.require_resolved().quantization
    assert (quant.kind if quant else None) == ("gguf" if dtype == "bfloat16" else None)


@pytest.mark.parametrize("arch, layers_of_27b", [("gemma2", 46), ("gemma3", 62)])
def test_gemma_config_facts_llama_cpp_runs_with(tmp_path, arch, layers_of_27b):
    """What the metadata does not say is what llama.cpp runs with: softmax scale 1/sqrt(head_dim), but
    1/sqrt(hidden/heads) at the 27B models' layer count; Gemma 3's 5:1 window pattern and local RoPE base
    1e4; its linear RoPE scaling (4B and up) kept for the global layers."""
    from gguf import GGUFReader

    from headrace.common.models.arch import arch_from_hf_config
    from headrace.common.models.gguf_families import hf_config_from_gguf
    from transformers import AutoConfig

    def config(**meta):
        path = write_tiny_gguf(str(tmp_path / f"{len(meta)}.gguf"), arch, meta_overrides=meta, quant="F32")
        return hf_config_from_gguf(GGUFReader(path))

    assert config()["query_pre_attn_scalar"] == 256  # head_dim
    big = config(block_count=layers_of_27b, **({"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}
                                                if arch == "gemma3" else {}))
    assert big["query_pre_attn_scalar"] == 64 // 2  # hidden / heads
    if arch == "gemma3":
        assert big["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
        assert big["rope_scaling"] == {"rope_type": "linear", "factor": 8.0} and big["rope_local_base_freq"] == 1e4
        hf = AutoConfig.for_model(big.pop("model_type"), **big)
        assert arch_from_hf_config(hf).local_rope
