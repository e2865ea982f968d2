"""Our top-level `kernels` package shares its import name with Hugging Face's `kernels` library, which
transformers probes for; transformers must never mistake ours for it."""

from __future__ import annotations

import subprocess
import sys


def test_transformers_does_not_take_our_kernels_package_for_hf_kernels():
    code = (
        "import importlib.util, kernels, os\n"
        "assert os.path.dirname(kernels.__file__).endswith('kernels')\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available(), 'transformers believes hf kernels is installed'\n"
        "import transformers.integrations.hub_kernels as hk\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1, vocab_size=64))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
