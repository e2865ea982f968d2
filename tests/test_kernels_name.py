"""One import root: every module of ours is `headrace.*`, so none shadows a distribution on the index.

transformers imports Hugging Face's `kernels` distribution; our `kernels/` folder is `headrace.kernels`.
These tests run fresh interpreters, from the repository root (where `python -m pytest` and `python -m`
put the checkout first on sys.path) and from outside it with headrace installed from a wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The folders the design card fixes, each reached as a subpackage of the one import root.
CARD_FOLDERS = ("common", "kernels", "services")


def _run(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env)


def test_from_the_repository_root_kernels_is_hugging_faces_and_transformers_models_import():
    code = (
        "import kernels, os\n"
        f"assert not os.path.abspath(kernels.__file__ or '').startswith({str(ROOT / 'kernels')!r}), kernels\n"
        "from kernels import CUDAProperties\n"  # what transformers' hub_kernels imports
        "import transformers.models.llama.modeling_llama\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1, vocab_size=64))\n"
        "import headrace.kernels.paged_decode_attention as ours\n"
        f"assert ours.__file__.startswith({str(ROOT)!r}), ours.__file__\n"
        "print('ok')\n"
    )
    out = _run(code, ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_the_card_folders_are_subpackages_of_headrace_not_top_level_packages():
    for name in CARD_FOLDERS:
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py would make `{name}` importable"
        link = ROOT / "headrace" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), f"headrace/{name} -> ../{name}"


def test_a_wheel_installed_outside_the_checkout_runs(tmp_path: Path):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("headrace-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("headrace/common/messages.py", "headrace/kernels/paged_decode_attention.py",
                   "headrace/services/gpu_worker/model_runner.py", "headrace/services/api/app.py"):
        assert module in names, f"{module} is missing from the wheel"
    assert not any(n.split("/")[0] in CARD_FOLDERS for n in names), "a card folder became a top-level package"
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = (
        "import headrace, os\n"
        f"assert headrace.__file__.startswith({str(site)!r}), headrace.__file__\n"
        "import kernels; from kernels import CUDAProperties\n"
        "import transformers.models.llama.modeling_llama\n"
        "from headrace import LLM, SamplingParams\n"
        "llm = LLM('random:tiny-llama', device='cpu', max_model_len=64)\n"
        "out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)\n"
        "assert len(out[0].outputs[0].token_ids) == 4, out\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = _run(code, outside, env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
