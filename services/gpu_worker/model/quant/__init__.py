"""Linear-layer methods by quantization: which one a checkpoint's linear gets (`linear_method`)."""

from __future__ import annotations

from headrace.common.models.quant import QuantSpec
from headrace.services.gpu_worker.model.quant.base import LinearMethod
from headrace.services.gpu_worker.model.quant.fp8 import Fp8Linear
from headrace.services.gpu_worker.model.quant.gguf_weights import GGUFLinear
from headrace.services.gpu_worker.model.quant.int_weights import IntWeightLinear
from headrace.services.gpu_worker.model.quant.unquantized import UnquantizedLinear


def linear_method(spec: QuantSpec | None, module_names: list[str]) -> LinearMethod:
    """The method for one of our linears, given the checkpoint modules merged into it (q, k, v). The parts
    of a merged linear must agree: a checkpoint that quantized q_proj but not k_proj is refused."""
    quantized = {spec is not None and spec.is_quantized(name) for name in module_names}
    if len(quantized) > 1:
        raise ValueError(f"the checkpoint quantizes only some of {module_names}, which headrace merges")
    if not quantized.pop():
        return UnquantizedLinear()
    if spec.kind == "gguf":
        return GGUFLinear(keeps_rows=module_names == ["lm_head"])  # the head refines its top logits from rows
    return IntWeightLinear(spec) if spec.kind == "int" else Fp8Linear(spec)
