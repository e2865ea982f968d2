#!/usr/bin/env python3
"""Make tiny quantized checkpoints, with the real quantization tools, as loader test fixtures.

None of these tools is a headrace dependency: the fixtures are committed files. Each tool lives
in its own venv (their transformers pins differ), torch is the CPU wheel in all of them:

    python3 -m venv /work/qvenv && /work/qvenv/bin/pip install torch==2.13.0
    /work/qvenv/bin/pip install llmcompressor==0.14.0.1           # compressed-tensors 0.19.0
    python3 -m venv /work/qvenv-gptq && /work/qvenv-gptq/bin/pip install torch==2.13.0
    /work/qvenv-gptq/bin/pip install -c <(echo torch==2.13.0) gptqmodel==7.6.0   # 7.7 needs torch>=2.14.1
    python3 -m venv /work/qvenv-awq && /work/qvenv-awq/bin/pip install torch==2.13.0
    /work/qvenv-awq/bin/pip install -c <(echo torch==2.13.0) autoawq==0.2.9

    /work/qvenv/bin/python scripts/make_quant_fixtures.py --out tests/fixtures/quant

The run in /work/qvenv builds the tiny dense model (in a scratch folder) and the ct-* folders,
then runs this same file under --gptq-python / --awq-python (`--tool gptq|awq`) for the gptq-* /
awq-* folders; a tool whose python is missing is skipped and listed under "skipped" in
fixtures.json. Every tool runs with a scratch folder as its working directory (GPTQModel writes
logs/ there), removed at the end. The output is deterministic: a rerun gives identical bytes.

What it writes under --out (the default set, DEFAULT_FOLDERS; --extras adds EXTRA_FOLDERS:
dense/ with the bf16 source model, ct-gptq-w4a16-g32 and the other GPTQ variants):
  ct-*/             llm-compressor `oneshot` + `save_compressed=True` (compressed-tensors)
  gptq-*/           GPTQModel, GPTQ v1 checkpoint format (qweight, qzeros, scales, g_idx)
  awq-gemm-*/       AutoAWQ, GEMM version (qweight, qzeros, scales)
  */oracle.st       (safetensors, named so that a loader reading *.safetensors skips it)
                    for every quantized Linear, keyed by its base weight name
                    (`model.layers.0.self_attn.q_proj.weight`), in nn.Linear layout [out, in]:
                    the dense weight the tool's own dequantization gives, in the dtype that
                    dequantization computes in, so it is stored exactly: bfloat16 for ct-*
                    ((q - zp) * scale in the bf16 scale dtype), float16 for gptq-* / awq-*
                    (the libraries' fp16 runtime dequantization). fixtures.json has each
                    folder's "oracle_dtype" and "oracle" (how it was produced, and checked).
  fixtures.json     folders, schemes, formats, oracle dtypes, tool versions, skipped tools.
Each folder keeps only config.json, model.safetensors, oracle.st (and recipe.yaml /
quantize_config.json where the tool writes one); no tokenizer files.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from importlib import metadata

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SEED = 1234
INIT_STD = 0.05
CALIB_SAMPLES, CALIB_SEQLEN = 8, 32

TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=256,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)

KEEP_FILES = {"config.json", "model.safetensors", "recipe.yaml", "quantize_config.json",
              "oracle.st"}

# What a plain run makes; --extras also makes EXTRA_FOLDERS (kept out of the committed set for size).
DEFAULT_FOLDERS = [
    "ct-w4a16-g32", "ct-w4a16-asym-g64", "ct-w4a16-channel", "ct-w8a16-g32", "ct-fp8-dynamic", "ct-fp8-block",
    "gptq-w4-g32-sym", "gptq-w4-g32-asym-descact", "gptq-w8-g32-sym",
    "awq-gemm-w4-g32",
]
EXTRA_FOLDERS = [
    "dense", "ct-gptq-w4a16-g32",
    "gptq-w4-g32-sym-descact", "gptq-w4-g32-asym", "gptq-w8-g32-sym-descact", "gptq-w8-g32-asym",
    "gptq-w8-g32-asym-descact",
]

# (folder, bits, sym, desc_act), all group 32
GPTQ_VARIANTS = [
    ("gptq-w4-g32-sym", 4, True, False),
    ("gptq-w4-g32-sym-descact", 4, True, True),
    ("gptq-w4-g32-asym", 4, False, False),
    ("gptq-w4-g32-asym-descact", 4, False, True),
    ("gptq-w8-g32-sym", 8, True, False),
    ("gptq-w8-g32-sym-descact", 8, True, True),
    ("gptq-w8-g32-asym", 8, False, False),
    ("gptq-w8-g32-asym-descact", 8, False, True),
]


def versions(*pkgs) -> dict:
    out = {}
    for pkg in ("torch", "transformers", "safetensors", *pkgs):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def prune_folder(folder: str) -> None:
    """Drop what the loaders do not need (generation_config.json, tokenizer files, logs)."""
    for name in os.listdir(folder):
        if name not in KEEP_FILES:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def calibration_ids() -> torch.Tensor:
    """8 random token sequences of 32 ids (ids 0..2 are unk/bos/eos of the tiny tokenizer)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(3, TINY_LLAMA["vocab_size"], (CALIB_SAMPLES, CALIB_SEQLEN), generator=gen)


def tiny_tokenizer():
    """In-memory word-level tokenizer over the 256 ids ("t0".."t255"). The tools insist on
    one even for pre-tokenized calibration data; it is never written into a fixture."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(TINY_LLAMA["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                   eos_token="t2", pad_token="t0")


def staged_dense(dense_dir: str) -> str:
    """A temp copy of dense/ with the tiny tokenizer beside it, for tools that load a path."""
    tmp = tempfile.mkdtemp(prefix="qfix-src-")
    for name in os.listdir(dense_dir):
        shutil.copy(os.path.join(dense_dir, name), tmp)
    tiny_tokenizer().save_pretrained(tmp)
    return tmp


ORACLE_LAYERS: set[int] | None = None  # None: every layer (set by --oracle-layers)
EXCLUDE: list[str] = []  # fnmatch patterns of folder names not to make (set by --exclude)
EXTRAS = False  # also make EXTRA_FOLDERS (set by --extras)


def excluded(name: str) -> bool:
    """True for a folder not to make: outside the selected set, or matched by --exclude."""
    selected = name in DEFAULT_FOLDERS or (EXTRAS and name in EXTRA_FOLDERS)
    return not selected or any(fnmatch.fnmatch(name, pat) for pat in EXCLUDE)


def _in_oracle(key: str) -> bool:
    m = re.search(r"\.layers\.(\d+)\.", key)
    return ORACLE_LAYERS is None or m is None or int(m.group(1)) in ORACLE_LAYERS


def save_oracle(folder: str, weights: dict[str, torch.Tensor], dtype: torch.dtype, note: str) -> None:
    """Write the oracle; every tensor must already be in `dtype` (no conversion here)."""
    out = {}
    for k, v in sorted(weights.items()):
        if not _in_oracle(k):
            continue
        if v.dtype != dtype:
            raise RuntimeError(f"{folder}: oracle {k} is {v.dtype}, expected {dtype}")
        out[k] = v.detach().contiguous()
    save_file(out, os.path.join(folder, "oracle.st"), metadata={"source": note})


def quant_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("quantization_config", {})


# =========================================================================== dense model


def build_dense(folder: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**TINY_LLAMA)
    config.rope_parameters = {"rope_type": "default", "rope_theta": TINY_LLAMA["rope_theta"]}
    model = LlamaForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                # around 1, but not all ones, so norm-weight loading mistakes show
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    prune_folder(folder)
    return folder


# =========================================================================== llm-compressor


def _w(num_bits, strategy, symmetric=True, group_size=None):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=num_bits, type="int", strategy=strategy,
                            symmetric=symmetric, group_size=group_size, dynamic=False)


def ct_jobs() -> list[tuple]:
    """(folder, description, modifier factory, needs calibration data)."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    def custom(weights):
        return lambda: QuantizationModifier(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
            ignore=["lm_head"])

    def preset(name):
        def make():
            if name not in PRESET_SCHEMES:
                raise KeyError(f"preset {name} is not in this compressed-tensors")
            return QuantizationModifier(targets="Linear", scheme=name, ignore=["lm_head"])
        return make

    def gptq():
        return GPTQModifier(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=_w(4, "group", True, 32))},
            ignore=["lm_head"], actorder="static", block_size=128, dampening_frac=0.01)

    return [
        ("ct-w4a16-g32", "int4 symmetric, group 32 (W4A16 with group_size 32)",
         custom(_w(4, "group", True, 32)), False),
        ("ct-w4a16-asym-g64", "int4 asymmetric, group 64 (W4A16_ASYM with group_size 64)",
         custom(_w(4, "group", False, 64)), False),
        ("ct-w4a16-channel", "int4 symmetric, per output channel",
         custom(_w(4, "channel", True)), False),
        ("ct-w8a16-g32", "int8 symmetric, group 32 (W8A16 with group_size 32)",
         custom(_w(8, "group", True, 32)), False),
        ("ct-fp8-dynamic", "preset FP8_DYNAMIC: fp8 e4m3 weights per channel, dynamic per-token fp8 acts",
         preset("FP8_DYNAMIC"), False),
        ("ct-fp8-block", "preset FP8_BLOCK: fp8 e4m3 weights in 128x128 blocks, dynamic per-group(128) fp8 acts",
         preset("FP8_BLOCK"), False),
        ("ct-gptq-w4a16-g32", "GPTQModifier int4 symmetric group 32, actorder static, "
         f"{CALIB_SAMPLES} random {CALIB_SEQLEN}-token calibration sequences",
         gptq, True),
    ]


def ct_quantize(dense_dir: str, folder: str, modifier, calibrate: bool) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)
    kwargs = {}
    if calibrate:
        ids = calibration_ids()
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        kwargs = dict(dataset=ds, num_calibration_samples=CALIB_SAMPLES, max_seq_length=CALIB_SEQLEN,
                      shuffle_calibration_samples=False, tokenizer=tiny_tokenizer())
    model = oneshot(model=model, recipe=modifier, tie_word_embeddings=False, **kwargs)
    model.save_pretrained(folder, save_compressed=True)
    prune_folder(folder)


def ct_oracle_transformers(folder: str) -> dict[str, torch.Tensor]:
    """transformers' compressed-tensors integration with dequantize=True (the successor of
    run_compressed=False): CompressedTensorsHfQuantizer -> ModelCompressor.decompress_model."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))
    return {f"{name}.weight": m.weight.detach().to(torch.float32).clone()
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None}


def ct_oracle_compressor(folder: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' compressor class for the format, applied straight to the file's tensors."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qcfg = QuantizationConfig.model_validate(quant_config(folder))
    (scheme,) = qcfg.config_groups.values()  # one group, targets Linear, lm_head ignored
    compressor = BaseCompressor.get_value_from_registry(scheme.format or qcfg.format)
    per_module = defaultdict(dict)
    for key, t in load_file(os.path.join(folder, "model.safetensors")).items():
        mod, _, local = key.rpartition(".")
        per_module[mod][local] = t
    return {f"{mod}.weight": compressor.decompress(sd, scheme)["weight"].to(torch.float32)
            for mod, sd in sorted(per_module.items())
            if any(k in sd for k in ("weight_packed", "weight_scale"))}


def ct_oracle(folder: str) -> dict:
    a, b = ct_oracle_transformers(folder), ct_oracle_compressor(folder)
    if sorted(a) != sorted(b) or not all(torch.equal(a[k], b[k]) for k in a):
        raise RuntimeError(f"the two compressed-tensors decompression paths disagree in {folder}")
    # The library computes (q - zp) * scale (fp8: q * scale) in the bf16 scale dtype, so bf16 holds it exactly:
    # float32 -> bf16 -> float32 -> bf16 must round-trip bit for bit.
    oracle = {}
    for k, v in a.items():
        bf = v.to(torch.bfloat16)
        back = bf.to(torch.float32)
        if not torch.equal(back, v) or not torch.equal(back.to(torch.bfloat16).view(torch.int16),
                                                       bf.view(torch.int16)):
            raise RuntimeError(f"{folder}: {k} is not exact in bfloat16")
        oracle[k] = bf
    save_oracle(folder, oracle, torch.bfloat16,
                "compressed-tensors decompression (transformers CompressedTensorsConfig(dequantize=True)"
                " == BaseCompressor.decompress on the file's tensors), exact in bfloat16")
    product = "fp8 q * scale" if quant_config(folder).get("format") == "float-quantized" else "(q - zp) * scale"
    return {
        "oracle_dtype": "bfloat16",
        "oracle": f"compressed-tensors {product} in bf16: transformers CompressedTensorsConfig(dequantize=True)"
                  " == BaseCompressor.decompress, exact in bf16 (checked)",
    }


def run_ct(out: str, dense_dir: str) -> tuple[list, list]:
    made, skipped = [], []
    tool_versions = versions("compressed-tensors", "llmcompressor")
    for name, desc, factory, calibrate in ct_jobs():
        if excluded(name):
            continue
        folder = os.path.join(out, name)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"=== {name}: {desc}", flush=True)
        try:
            ct_quantize(dense_dir, folder, factory(), calibrate)
            info = ct_oracle(folder)
        except Exception as e:  # one scheme failing must not hide the rest
            skipped.append({"folder": name, "tool": "llmcompressor", "error": first_line(e)})
            print(f"!!! {name}: {first_line(e)}", file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        q = quant_config(folder)
        made.append({"folder": name, "tool": "llmcompressor", "scheme": desc, "format": q.get("format"),
                     **info, "versions": tool_versions})
    if not excluded("ct-gptq-w4a16-g32"):
        skipped.append({"folder": "ct-gptq-w4a16-g32-actorder-group", "tool": "llmcompressor",
                        "error": "not made: GPTQModifier(actorder='group') raises 'Invalid activation ordering "
                                 "group. Only 'weight' and 'static' are supported for GPTQ.' (no weight_g_idx in "
                                 "CT any more)"})
    return made, skipped


# =========================================================================== GPTQModel


def run_gptq(out: str, dense_dir: str) -> tuple[list, list]:
    # GPTQModel sizes a 2-worker loader pool under the CPU pool, which defaults to cores/2:
    # on a 2-core machine that is 1 and it refuses to start.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig

    src = staged_dense(dense_dir)
    calib = [{"input_ids": r.tolist(), "attention_mask": [1] * CALIB_SEQLEN} for r in calibration_ids()]
    made, skipped = [], []
    tool_versions = versions("gptqmodel")
    for name, bits, sym, desc_act in GPTQ_VARIANTS:
        if excluded(name):
            continue
        folder = os.path.join(out, name)
        shutil.rmtree(folder, ignore_errors=True)
        desc = f"GPTQ int{bits} {'symmetric' if sym else 'asymmetric'} group 32 desc_act={desc_act}"
        print(f"=== {name}: {desc}", flush=True)
        try:
            torch.manual_seed(SEED)
            qc = QuantizeConfig(bits=bits, group_size=32, sym=sym, desc_act=desc_act, offload_to_disk=False)
            model = GPTQModel.load(src, qc)
            model.quantize(calib, batch_size=1)
            model.save(folder)
            del model
            info = gptq_oracle(folder)  # before pruning: loading it back wants the tokenizer files
            prune_folder(folder)
        except Exception as e:
            skipped.append({"folder": name, "tool": "gptqmodel", "error": first_line(e)})
            print(f"!!! {name}: {first_line(e)}", file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        made.append({"folder": name, "tool": "gptqmodel", "scheme": desc,
                     "format": quant_config(folder).get("checkpoint_format"), **info, "versions": tool_versions})
    shutil.rmtree(src, ignore_errors=True)
    return made, skipped


def gptq_oracle(folder: str) -> dict:
    """GPTQModel's own safetensors-level dequantizer (utils.model_dequant.convert_gptq_file) in
    float32, cross-checked against its runtime TorchLinear.dequantize_weight at fp16."""
    from pathlib import Path

    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.utils.model_dequant import convert_gptq_file

    qcfg = quant_config(folder)
    dense = convert_gptq_file(Path(folder, "model.safetensors"), torch.float32, qcfg, "cpu")
    oracle = {k: v for k, v in dense.items() if f"{k[:-len('.weight')]}.qweight" in _keys(folder)}
    model = GPTQModel.load(folder, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    runtime = {}
    for name, m in model.model.named_modules():
        if hasattr(m, "qweight") and hasattr(m, "dequantize_weight"):
            rt = m.dequantize_weight().T.contiguous()
            key = f"{name}.weight"
            if rt.dtype != torch.float16 or not torch.equal(rt.view(torch.int16),
                                                            oracle[key].half().view(torch.int16)):
                raise RuntimeError(f"{name}: TorchLinear fp16 dequant != fp16(convert_gptq_file float32)")
            runtime[key] = rt
    if sorted(runtime) != sorted(oracle):
        raise RuntimeError(f"runtime modules {sorted(runtime)} != checkpoint modules {sorted(oracle)}")
    del model
    save_oracle(folder, runtime, torch.float16,
                "GPTQModel TorchLinear.dequantize_weight() at fp16 "
                "== gptqmodel.utils.model_dequant.convert_gptq_file(float32).half()")
    return {
        "oracle_dtype": "float16",
        "oracle": "GPTQModel TorchLinear.dequantize_weight() at fp16, == convert_gptq_file(float32).half() (checked)",
    }


def _keys(folder: str) -> set[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return set(f.keys())


# =========================================================================== AutoAWQ


def run_awq(out: str, dense_dir: str) -> tuple[list, list]:
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    made, skipped = [], []
    name = "awq-gemm-w4-g32"
    if excluded(name):
        return made, skipped
    src = staged_dense(dense_dir)
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    desc = "AWQ int4 asymmetric (zero_point=True) group 32, GEMM version"
    print(f"=== {name}: {desc}", flush=True)
    try:
        torch.manual_seed(SEED)
        model = AutoAWQForCausalLM.from_pretrained(src)
        model.quantize(AutoTokenizer.from_pretrained(src),
                       quant_config={"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
                       calib_data=[r.tolist() for r in calibration_ids()],
                       max_calib_samples=CALIB_SAMPLES, max_calib_seq_len=CALIB_SEQLEN,
                       n_parallel_calib_samples=1)
        model.save_quantized(folder)
        prune_folder(folder)
        info = awq_oracle(folder)
        made.append({"folder": name, "tool": "autoawq", "scheme": desc, "format": "awq gemm",
                     **info, "versions": versions("autoawq")})
    except Exception as e:
        skipped.append({"folder": name, "tool": "autoawq", "error": first_line(e)})
        print(f"!!! {name}: {first_line(e)}", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    skipped.append({"folder": "awq-gemm-w4-g32-sym", "tool": "autoawq",
                    "error": "not made: AutoAWQ GEMM requires zero_point=True "
                             "(WQLinear_GEMM.from_linear asserts zeros is not None)"})
    shutil.rmtree(src, ignore_errors=True)
    return made, skipped


def awq_oracle(folder: str) -> dict:
    """AutoAWQ's awq.utils.packing_utils.dequantize_gemm, given float32 scales (exact), and
    checked against the same function on the fp16 scales as stored (fp16 arithmetic)."""
    from awq.utils.packing_utils import dequantize_gemm

    qcfg = quant_config(folder)
    bits, group = qcfg["bits"], qcfg["group_size"]
    sd = load_file(os.path.join(folder, "model.safetensors"))
    oracle = {}
    for key in sorted(sd):
        if not key.endswith(".qweight"):
            continue
        p = key[:-len(".qweight")]
        qw, qz, sc = sd[f"{p}.qweight"], sd[f"{p}.qzeros"], sd[f"{p}.scales"]
        exact = dequantize_gemm(qw, qz, sc.float(), bits, group).T
        fp16 = dequantize_gemm(qw, qz, sc, bits, group).T.contiguous()
        if fp16.dtype != torch.float16 or not torch.equal(fp16.view(torch.int16),
                                                          exact.half().view(torch.int16)):
            raise RuntimeError(f"{p}: dequantize_gemm(fp16 scales) != fp16(dequantize_gemm(f32 scales))")
        oracle[f"{p}.weight"] = fp16
    save_oracle(folder, oracle, torch.float16,
                "awq.utils.packing_utils.dequantize_gemm on the stored fp16 scales "
                "== dequantize_gemm(float32 scales).half()")
    return {
        "oracle_dtype": "float16",
        "oracle": "AutoAWQ dequantize_gemm(qweight, qzeros, fp16 scales).T, == the float32-scales result .half() (checked)",
    }


# =========================================================================== driver

TOOLS = {"gptq": run_gptq, "awq": run_awq}
SCRIPT = os.path.abspath(__file__)


def run_sub(tool: str, python: str, out: str, dense_dir: str, oracle_layers: str) -> tuple[list, list]:
    """Run this file under another venv's python for one tool, collect its report."""
    if not python or not os.path.exists(python):
        return [], [{"folder": f"{tool}-*", "tool": tool, "error": f"no python for it at {python!r}"}]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = f.name
    try:
        proc = subprocess.run([python, SCRIPT, "--tool", tool, "--out", out, "--dense", dense_dir,
                               "--report", report, "--oracle-layers", oracle_layers,
                               *(["--extras"] if EXTRAS else []), "--exclude", *EXCLUDE])
        if proc.returncode != 0:
            return [], [{"folder": f"{tool}-*", "tool": tool, "error": f"sub-run exited {proc.returncode}"}]
        with open(report) as f:
            r = json.load(f)
        return r["made"], r["skipped"]
    finally:
        os.remove(report)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tool", choices=["all", "ct", "gptq", "awq"], default="all",
                    help="'all' (default) builds the dense model and ct-* here and the others in their venvs")
    ap.add_argument("--gptq-python", default="/work/qvenv-gptq/bin/python")
    ap.add_argument("--awq-python", default="/work/qvenv-awq/bin/python")
    ap.add_argument("--oracle-layers", default="all",
                    help="'all' (default), or comma-separated layer indices whose Linears get an oracle")
    ap.add_argument("--extras", action="store_true",
                    help="also make " + ", ".join(EXTRA_FOLDERS) + " (not in the committed set)")
    ap.add_argument("--exclude", nargs="*", default=[], metavar="PATTERN",
                    help="folder names (fnmatch patterns) not to make, e.g. 'gptq-w8-*'")
    ap.add_argument("--dense", help=argparse.SUPPRESS)  # sub-runs: the dense model the main run built
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global ORACLE_LAYERS, EXCLUDE, EXTRAS
    if args.oracle_layers != "all":
        ORACLE_LAYERS = {int(x) for x in args.oracle_layers.split(",")}
    EXCLUDE = list(args.exclude)
    EXTRAS = args.extras
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    if args.tool in TOOLS:  # sub-run in that tool's venv, already in the main run's scratch cwd
        made, skipped = TOOLS[args.tool](out, os.path.abspath(args.dense))
        if args.report:
            with open(args.report, "w") as f:
                json.dump({"made": made, "skipped": skipped}, f)
        return 0

    for name in os.listdir(out):  # a fresh set: no folder left over from an earlier run
        if name.startswith(("dense", "ct-", "gptq-", "awq-")) and os.path.isdir(os.path.join(out, name)):
            shutil.rmtree(os.path.join(out, name))
    # The tools leave things in their working directory (GPTQModel: logs/): run them all in a
    # scratch folder, removed at the end, so nothing lands in --out or the caller's directory.
    scratch = tempfile.mkdtemp(prefix="qfix-cwd-")
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        dense_dir = build_dense(os.path.join(scratch, "dense"))
        dense_entry = {"folder": "dense", "tool": "transformers", "scheme": "dense bf16 (unquantized source)",
                       "versions": versions()}
        made, skipped = [], []
        if not excluded("dense"):
            shutil.copytree(dense_dir, os.path.join(out, "dense"))
            made.append(dense_entry)
        m, s = run_ct(out, dense_dir)
        made += m
        skipped += s
        if args.tool == "all":
            for tool, python in (("gptq", args.gptq_python), ("awq", args.awq_python)):
                m, s = run_sub(tool, python, out, dense_dir, args.oracle_layers)
                made += m
                skipped += s
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)

    write_manifest(out, made, skipped, args.oracle_layers, dense_entry["versions"])
    print(json.dumps({"made": [e["folder"] for e in made], "skipped": skipped}, indent=1))
    return 0


def write_manifest(out: str, made: list, skipped: list, oracle_layers: str, dense_versions: dict) -> None:
    manifest = {
        "generator": "scripts/make_quant_fixtures.py",
        "seed": SEED,
        "init_std": INIT_STD,
        "calibration": f"{CALIB_SAMPLES} sequences of {CALIB_SEQLEN} random ids in [3, 256), seed {SEED + 1}",
        "model": {"architecture": "LlamaForCausalLM", "dtype": "bfloat16", **TINY_LLAMA},
        "dense_source": "rebuilt by the script from the seed (not shipped; --extras writes it as dense/), "
                        f"transformers {dense_versions.get('transformers')}, torch {dense_versions.get('torch')}",
        "oracle_layout": "oracle.st: nn.Linear layout [out_features, in_features], one tensor per "
                         "quantized Linear, keyed '<module>.weight', in each fixture's oracle_dtype",
        "oracle_layers": oracle_layers,
        "fixtures": made,
        "skipped": skipped,
    }
    with open(os.path.join(out, "fixtures.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    raise SystemExit(main())
