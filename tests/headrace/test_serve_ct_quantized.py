"""The embedded SmolLM2 quantized to FP8 (compressed-tensors FP8_DYNAMIC: fp8 weights per channel, activations
per token at run time) and to W4A16 (compressed-tensors pack-quantized, int4 groups of 64) by compressed-tensors
itself (tests/headrace/ct_checkpoints.py), served through `headrace serve`: its greedy tokens agree with a
float32 forward over the same dequantized weights (the offline engine on a dense copy of them; those weights
rounded to bf16 equal compressed-tensors' own decompression) on >= 98% of
8 prompts x HEADRACE_QUANT_TEST_TOKENS tokens (default 16: the CPU path dequantizes every layer per step, so
64 tokens take minutes per scheme; the acceptance run sets 64). Measured here (CPU, compressed-tensors 0.19.0):
100% for both schemes at 8 x 16 and at 8 x 64 tokens."""

from __future__ import annotations

import os

import httpx
import pytest
import torch

pytest.importorskip("compressed_tensors")

from headrace import LLM, SamplingParams  # noqa: E402
from headrace.services.tokenizer.detokenizer import TokenTexts  # noqa: E402
from headrace.common.config import EngineConfig, ModelConfig  # noqa: E402
from tests.configs import resolved  # noqa: E402
from tests.headrace.ct_checkpoints import build_ct_checkpoint, quantization_config, write_dense  # noqa: E402
from tests.headrace.server_process import running_server  # noqa: E402
from tests.prompts import CHAT_QUESTIONS, chat_prompt_ids  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # two checkpoints built, two servers, two oracles

NEW_TOKENS = int(os.environ.get("HEADRACE_QUANT_TEST_TOKENS", "16"))
MIN_AGREEMENT = 0.98
QUESTIONS = CHAT_QUESTIONS
# scheme -> (compressed-tensors preset, group size override, the format the worker's start-up line names)
SCHEMES = {"fp8": ("FP8_DYNAMIC", None, "(compressed-tensors fp8)"),
           "w4a16": ("W4A16", 64, "(compressed-tensors int4)")}


@pytest.fixture(scope="session")
def ct_checkpoint(tmp_path_factory, embedded_source):
    """scheme -> (the quantized checkpoint, the dense float32 folder of its dequantized weights), each built
    on first use."""
    root = tmp_path_factory.mktemp("ct-embedded")
    built: dict[str, tuple[str, str]] = {}

    def get(name: str) -> tuple[str, str]:
        if name not in built:
            preset, group, _ = SCHEMES[name]
            quant, dense = str(root / name), str(root / f"{name}-dense")
            reference = build_ct_checkpoint(embedded_source.weights_dir, quant, preset, group)
            write_dense(embedded_source.weights_dir, dense, dequantized_by_us(quant, embedded_source.tokenizer_dir, reference))
            built[name] = (quant, dense)
        return built[name]

    return get


def dequantized_by_us(folder: str, tokenizer_dir: str, reference: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """Our loader's float32 dequantization of every quantized weight, checked against compressed-tensors' own:
    equal once rounded to bf16, the dtype compressed-tensors multiplies in (ours multiplies in float32, which
    the served float32 model computes with, so the oracle uses ours)."""
    from headrace.services.gpu_worker.loader.model_loader import export_hf_state_dict, load_model

    cfg = resolved(EngineConfig(model=ModelConfig(model=folder, tokenizer=tokenizer_dir, dtype="float32")))
    cfg = cfg.require_resolved()
    ours = export_hf_state_dict(load_model(cfg, torch.device("cpu"), torch.float32, quant=cfg.quantization).model)
    for name, ref in reference.items():
        assert torch.equal(ours[name].to(ref.dtype), ref), name
    return {name: ours[name].float() for name in reference}


@pytest.fixture(scope="module")
def prompts(embedded_tokenizer) -> list[list[int]]:
    return chat_prompt_ids(embedded_tokenizer, QUESTIONS)


def served_token_texts(folder: str, tokenizer_dir: str, prompts: list[list[int]]) -> tuple[list[list[str]], str]:
    """Each prompt's greedy completion from `headrace serve` as per-token texts (its logprobs' tokens), and the
    server's log."""
    with running_server("--model", folder, "--tokenizer", tokenizer_dir, "--num-tokenizers", "1",
                        "--dtype", "float32") as srv:
        model = srv.get("/v1/models").json()["data"][0]["id"]
        # All 8 prompts in one request (one batch), with more time than ServerProcess.post allows.
        reply = httpx.post(srv.base_url + "/v1/completions", timeout=600,
                           json={"model": model, "prompt": prompts, "max_tokens": NEW_TOKENS, "temperature": 0,
                                 "ignore_eos": True, "logprobs": 0})
        assert reply.status_code == 200, reply.text
        choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
        return [c["logprobs"]["tokens"] for c in choices], srv.output


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_served_quantized_embedded_model_agrees_with_float32_dequantized(scheme, ct_checkpoint, prompts,
                                                                         embedded_source, embedded_tokenizer):
    quant, dense = ct_checkpoint(scheme)
    preset, group, logged = SCHEMES[scheme]
    assert quantization_config(quant)["quant_method"] == "compressed-tensors"
    served, log = served_token_texts(quant, embedded_source.tokenizer_dir, prompts)
    assert logged in log  # the worker's start-up line names the format it loaded
    oracle = LLM(model=dense, dtype="float32", log=lambda *_: None)
    outs = oracle.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    # Tokens are compared as the API names them (each id's text, as its logprobs carry it).
    texts = TokenTexts(embedded_tokenizer.backend_tokenizer)
    expected = [texts(list(o.outputs[0].token_ids)) for o in outs]
    # Tokens before each prompt's first divergence: after one, the two continue different texts.
    agree = 0
    for got, want in zip(served, expected):
        assert len(got) == len(want) == NEW_TOKENS
        agree += next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), NEW_TOKENS)
    agreement = agree / (len(prompts) * NEW_TOKENS)
    print(f"{scheme}: {agreement:.1%} of {len(prompts)} x {NEW_TOKENS} served greedy tokens agree with the "
          "float32 forward over the dequantized weights")
    assert agreement >= MIN_AGREEMENT
