"""What a quantized checkpoint holds, read once from config.json's `quantization_config` (or asked for with
`--quantization`), as one frozen `QuantSpec` shipped to the workers inside the resolved config.

Two kinds of quantized linear layers follow from it:
- "int": integer weights in groups with a scale (and a zero point when asymmetric) per group and output
  column, 16-bit activations (W4A16 / W8A16): GPTQ, AWQ "GEMM" and compressed-tensors `pack-quantized`.
- "fp8": float8 e4m3 weights with per-tensor, per-channel or block scales; activations quantized to fp8
  per token at run time (W8A8): HF `fp8`, compressed-tensors `float-quantized`, and online `--quantization
  fp8` of a 16-bit checkpoint.
- "gguf": a GGUF file's quantized linears kept as their integers (gguf_convert's kept-quantized folder):
  Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, repacked at load into the CPU int4 kernel's layout; the modules quantized
  are listed (`modules`), everything else in the file is dense.
Anything else is refused here, at start-up, with a line that names what was found and what is supported.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

# The names --quantization takes, as vLLM names them.
QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "compressed-tensors")
SUPPORTED = ("GPTQ 4/8-bit (sym/asym, desc_act), AWQ GEMM 4-bit, compressed-tensors pack-quantized W4A16/W8A16 "
             "and float-quantized FP8, HF fp8 (per-tensor or 128x128 blocks), online fp8")
INT_GROUP_SIZES = (32, 64, 128)  # besides per-channel (one group spanning the input)


class QuantizationError(ValueError):
    """A checkpoint's quantization that headrace cannot serve; the message names it and what is supported."""


@dataclass(frozen=True)
class QuantSpec:
    kind: str  # "int" or "fp8"
    checkpoint_format: str  # "gptq", "awq", "compressed-tensors", "fp8" (HF) or "online"
    bits: int = 8
    group_size: int | None = None  # None: one group per output channel (int) / not grouped (fp8)
    symmetric: bool = True
    desc_act: bool = False  # GPTQ act-order: input rows sorted by group at load
    gptq_zero_offset: int = 0  # GPTQ v1 checkpoints store zero points minus one
    weight_scale: str = "channel"  # fp8: "tensor", "channel" or "block"
    block_size: tuple[int, int] | None = None  # fp8 block scales: (output rows, input columns)
    activation_scale: str = "dynamic"  # fp8: "dynamic" (per token) or "static" (per tensor, from input_scale)
    ignore: tuple[str, ...] = ()  # checkpoint module names left unquantized ("re:" prefix: a regex)
    modules: tuple[str, ...] = ()  # gguf: the module names stored quantized (every other one is dense)

    def __post_init__(self) -> None:
        if self.kind not in ("int", "fp8", "gguf"):
            raise QuantizationError(f"quantization kind {self.kind!r}; supported: {SUPPORTED}")

    def is_quantized(self, module_name: str) -> bool:
        """Whether the checkpoint quantized this linear (`model.layers.0.self_attn.q_proj`)."""
        if self.kind == "gguf":
            return module_name in self.modules
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module_name):
                    return False
            elif module_name == pattern or module_name.endswith("." + pattern):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        block = data.get("block_size")
        return cls(**{**data, "block_size": None if block is None else tuple(block),
                      "ignore": tuple(data.get("ignore", ())), "modules": tuple(data.get("modules", ()))})


def quant_spec(hf_config: Any, requested: str | None) -> QuantSpec | None:
    """The QuantSpec of a checkpoint (config.json's `quantization_config`), or of `--quantization fp8` on an
    unquantized one; None for an unquantized model served as it is. Raises QuantizationError."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    if not qc:
        if requested is None:
            return None
        if requested == "fp8":
            return QuantSpec(kind="fp8", checkpoint_format="online", weight_scale="channel")
        raise QuantizationError(f"--quantization {requested} needs a checkpoint quantized with it; this one is "
                                "not quantized (only fp8 quantizes a 16-bit checkpoint at load)")
    method = str(qc.get("quant_method", "")).lower()
    if requested is not None and requested != method:
        raise QuantizationError(f"--quantization {requested} does not match the checkpoint's quant_method {method!r}")
    if method == "gguf" and requested is None:
        return QuantSpec(kind="gguf", checkpoint_format="gguf", bits=4, group_size=32,
                         modules=tuple(qc.get("modules") or ()))
    parsers = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors, "fp8": _hf_fp8}
    if method not in parsers:
        raise QuantizationError(f"quant_method {method!r} is not supported; supported: {SUPPORTED}")
    return parsers[method](qc)


def _int_layout(method: str, bits: int, group_size: int | None) -> None:
    if bits not in (4, 8):
        raise QuantizationError(f"{method} with {bits}-bit weights is not supported; supported: {SUPPORTED}")
    if group_size is not None and group_size not in INT_GROUP_SIZES:
        raise QuantizationError(f"{method} group size {group_size} is not supported (supported: "
                                f"{', '.join(map(str, INT_GROUP_SIZES))} or per-channel)")


def _group(value: Any) -> int | None:
    return None if value in (None, -1) else int(value)


def _gptq(qc: dict) -> QuantSpec:
    bits, group = int(qc.get("bits", 4)), _group(qc.get("group_size", 128))
    _int_layout("GPTQ", bits, group)
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise QuantizationError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    return QuantSpec(kind="int", checkpoint_format="gptq", bits=bits, group_size=group,
                     symmetric=bool(qc.get("sym", True)), desc_act=bool(qc.get("desc_act", False)),
                     gptq_zero_offset=1 if fmt == "gptq" else 0,
                     ignore=tuple(qc.get("modules_to_not_convert") or ()))


def _awq(qc: dict) -> QuantSpec:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = _group(qc.get("group_size", qc.get("q_group_size", 128)))
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizationError(f"AWQ version {version!r} is not supported (only the GEMM layout)")
    if bits != 4:
        raise QuantizationError(f"AWQ with {bits}-bit weights is not supported; supported: {SUPPORTED}")
    _int_layout("AWQ", bits, group)
    return QuantSpec(kind="int", checkpoint_format="awq", bits=4, group_size=group,
                     symmetric=not bool(qc.get("zero_point", True)),
                     ignore=tuple(qc.get("modules_to_not_convert") or ()))


def _hf_fp8(qc: dict) -> QuantSpec:
    scheme = str(qc.get("activation_scheme", "dynamic"))
    if scheme not in ("dynamic", "static"):
        raise QuantizationError(f"fp8 activation_scheme {scheme!r} is not supported (dynamic, static)")
    block = qc.get("weight_block_size")
    if block is not None and tuple(block) != (128, 128):
        raise QuantizationError(f"fp8 weight_block_size {block} is not supported (128x128)")
    return QuantSpec(kind="fp8", checkpoint_format="fp8", weight_scale="block" if block else "tensor",
                     block_size=(128, 128) if block else None, activation_scale=scheme,
                     ignore=tuple(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ()))


def _compressed_tensors(qc: dict) -> QuantSpec:
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise QuantizationError(f"compressed-tensors with {len(groups)} config groups is not supported (one)")
    (group,) = groups.values()
    targets = group.get("targets") or []
    if targets != ["Linear"]:
        raise QuantizationError(f"compressed-tensors targets {targets} are not supported (['Linear'])")
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    fmt = str(qc.get("format", ""))
    ignore = tuple(qc.get("ignore") or ())
    if fmt == "pack-quantized":
        return _ct_int(weights, acts, ignore)
    if fmt == "float-quantized":
        return _ct_fp8(weights, acts, ignore)
    raise QuantizationError(f"compressed-tensors format {fmt!r} is not supported (pack-quantized, float-quantized)")


def _ct_int(weights: dict, acts: Any, ignore: tuple[str, ...]) -> QuantSpec:
    if weights.get("type") != "int" or acts:
        raise QuantizationError("compressed-tensors pack-quantized is served for int weights with 16-bit "
                                f"activations only (weights {weights.get('type')!r}, activations {acts!r})")
    strategy, bits = weights.get("strategy"), int(weights.get("num_bits", 0))
    if strategy not in ("group", "channel"):
        raise QuantizationError(f"compressed-tensors weight strategy {strategy!r} is not supported (group, channel)")
    group = int(weights["group_size"]) if strategy == "group" else None
    if weights.get("actorder") not in (None, False, "static", "weight") and strategy == "group":
        raise QuantizationError(f"compressed-tensors actorder {weights.get('actorder')!r} is not supported")
    _int_layout("compressed-tensors", bits, group)
    return QuantSpec(kind="int", checkpoint_format="compressed-tensors", bits=bits, group_size=group,
                     symmetric=bool(weights.get("symmetric", True)), ignore=ignore)


def _ct_fp8(weights: dict, acts: Any, ignore: tuple[str, ...]) -> QuantSpec:
    if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8:
        raise QuantizationError(f"compressed-tensors float-quantized with {weights.get('num_bits')}-bit "
                                f"{weights.get('type')} weights is not supported (fp8)")
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise QuantizationError(f"compressed-tensors fp8 weight strategy {strategy!r} is not supported")
    block = tuple(weights.get("block_structure") or ()) or None
    if strategy == "block" and block != (128, 128):
        raise QuantizationError(f"compressed-tensors fp8 block structure {block} is not supported (128x128)")
    if acts and (acts.get("type") != "float" or int(acts.get("num_bits", 0)) != 8):
        raise QuantizationError(f"compressed-tensors fp8 weights with activations {acts} are not supported")
    act_scale = "dynamic" if not acts or acts.get("dynamic", False) else "static"
    # Dynamic activation scales per 128-column group (what FP8_BLOCK pairs with its weight blocks) are served
    # per token: a per-token scale covers every group of the row, so the values stay in range.
    if acts and act_scale == "dynamic" and acts.get("strategy") not in ("token", "group", None):
        raise QuantizationError(f"compressed-tensors dynamic activation strategy {acts.get('strategy')!r} is "
                                "not supported (token, group)")
    return QuantSpec(kind="fp8", checkpoint_format="compressed-tensors", weight_scale=strategy,
                     block_size=block if strategy == "block" else None, activation_scale=act_scale, ignore=ignore)
