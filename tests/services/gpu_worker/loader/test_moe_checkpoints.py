"""MoE checkpoints load into our stacked experts: the per-expert tensors every published checkpoint holds
(and transformers' save_pretrained writes: Mixtral's block_sparse_moe.experts.N.w1/w2/w3, Qwen's
mlp.experts.N.gate_proj/up_proj/down_proj), transformers 5's stacked tensors, and a tensor-parallel rank's
slice of each expert's intermediate dimension."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from headrace.common.models.presets import PRESETS
from headrace.common.models.source import ModelSource
from headrace.services.gpu_worker.loader.model_loader import export_hf_state_dict, load_model
from headrace.services.gpu_worker.parallel import TPGroup


def hf_model(preset: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(PRESETS[preset])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data)).eval()


def load(folder, tp: TPGroup = TPGroup()):
    return load_model(ModelSource("hf", "t", str(folder), str(folder)), torch.device("cpu"), torch.float32, tp).model


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe"])
@pytest.mark.parametrize("stacked", [False, True], ids=["per-expert", "stacked"])
def test_checkpoint_loads_exactly(tmp_path, preset, stacked):
    hf = hf_model(preset)
    hf.save_pretrained(tmp_path)
    if stacked:  # transformers 5's in-memory names: one [E, 2I, H] and one [E, H, I] tensor per layer
        (tmp_path / "model.safetensors").unlink()
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    names = {k for k, _ in hf.state_dict().items()}
    assert any("experts.gate_up_proj" in k for k in names)
    ours = export_hf_state_dict(load(tmp_path))
    want = hf.state_dict()
    assert set(ours) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


def test_tensor_parallel_rank_holds_its_slice_of_every_expert(tmp_path):
    hf = hf_model("tiny-qwen2-moe")
    hf.save_pretrained(tmp_path)
    full = hf.model.layers[0].mlp.experts
    inter = full.down_proj.shape[2]
    for rank in range(2):
        experts = load(tmp_path, TPGroup(rank, 2)).layers[0].mlp.experts
        rows = slice(rank * inter // 2, (rank + 1) * inter // 2)
        up_rows = slice(inter + rows.start, inter + rows.stop)
        torch.testing.assert_close(experts.gate_up_proj, torch.cat([full.gate_up_proj[:, rows],
                                                                    full.gate_up_proj[:, up_rows]], dim=1))
        torch.testing.assert_close(experts.down_proj, full.down_proj[:, :, rows])
