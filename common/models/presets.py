"""Configs of real model shapes for random-weight models (`--model random:<name>`), used by benchmarks and tests.

The numbers are the published config.json values of each model family.
"""

from __future__ import annotations

from typing import Any

_LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
}

_MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": None,
    "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}

_QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "attention_bias": False,
}

_GEMMA3_12B: dict[str, Any] = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
    "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 262208,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 1024, "sliding_window_pattern": 6,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "max_position_embeddings": 131072, "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106],
}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": _LLAMA3_8B,
    "llama-3.1-8b": {
        **_LLAMA3_8B, "max_position_embeddings": 131072, "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    # Llama-3-70B (141 GB in bf16) and cut-down versions of its layer shape: 40 layers (73 GB) does not
    # fit one 80 GB H100 with any KV cache, 8 layers (18 GB) is a quick wide-layer check.
    "llama-3-70b": {
        **_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8,
    },
    "llama-3-70b-40l": {
        **_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 40,
        "num_attention_heads": 64, "num_key_value_heads": 8,
    },
    "llama-3-70b-8l": {
        **_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 8,
        "num_attention_heads": 64, "num_key_value_heads": 8,
    },
    # Llama-3.2-1B: the Llama-3 vocabulary at 1B, the usual draft model for the 8B (--speculative-config).
    "llama-3.2-1b": {
        **_LLAMA3_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "attention_bias": False,
    },
    # Falcon-7B: the original decoder (multi-query attention, attention and MLP in parallel off one LayerNorm).
    "falcon-7b": {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71, "vocab_size": 65024,
        "multi_query": True, "parallel_attn": True, "new_decoder_architecture": False, "alibi": False, "bias": False,
        "layer_norm_epsilon": 1e-5, "max_position_embeddings": 2048, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "bos_token_id": 11, "eos_token_id": 11,
    },
    # Falcon-40B: the new decoder architecture (8 KV groups, a LayerNorm each for attention and MLP); 84 GB in bf16.
    "falcon-40b": {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "hidden_size": 8192, "num_hidden_layers": 60, "num_attention_heads": 128, "num_kv_heads": 8,
        "vocab_size": 65024, "new_decoder_architecture": True, "parallel_attn": True, "alibi": False, "bias": False,
        "layer_norm_epsilon": 1e-5, "max_position_embeddings": 2048, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "bos_token_id": 11, "eos_token_id": 11,
    },
    # Phi-3-mini-4k-instruct (fused qkv_proj / gate_up_proj checkpoints; a 2,047-token window in every layer).
    "phi-3-mini": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32064, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "sliding_window": 2047,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
    },
    # Phi-3-mini's layers with LongRoPE switching at 256 tokens, so a GPU check's 512-token prompt runs on the
    # long factors through the Triton kernels. (Phi-3-mini-128k switches at 4,096; its published factor lists
    # are not reproduced here: smooth ramps of the same range stand in.)
    "phi-3-mini-longrope": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32064, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 8192, "original_max_position_embeddings": 256, "sliding_window": None,
        "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(48)],
                         "long_factor": [1.08 ** i for i in range(48)]},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
    },
    # Mixture of experts. Mixtral-8x7B: 46.7B parameters (94 GB in bf16, one H200), 12.9B read per token.
    "mixtral-8x7b": _MIXTRAL_8X7B,
    # Qwen3-30B-A3B: 30.5B parameters, 3.3B read per token (8 of 128 experts).
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    # Cut-down versions for GPU correctness checks against transformers in float32 (the full models do not fit
    # one GPU beside their fp32 twin): 4 and 12 real-shaped layers.
    "mixtral-8x7b-4l": {**_MIXTRAL_8X7B, "num_hidden_layers": 4},
    "qwen3-30b-a3b-12l": {**_QWEN3_30B_A3B, "num_hidden_layers": 12},
    "gemma-2-9b": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
        "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "max_position_embeddings": 8192,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "bos_token_id": 2,
        "eos_token_id": [1, 107],
    },
    "gemma-3-12b": _GEMMA3_12B,
    # The same model with every layer global: the baseline of the sliding-window benchmark (the bytes the
    # windowed layers do not read are the difference). Not a model anyone trained.
    "gemma-3-12b-no-window": {**_GEMMA3_12B, "sliding_window": None},
    # Tiny configs for tests: every family's code path at a size a CPU runs in milliseconds.
    "tiny-llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "tiny-mistral": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "max_position_embeddings": 1024, "sliding_window": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    },
    # Mistral v0.1's shape: every layer attends within a window (4,096 there, 256 here).
    "tiny-mistral-v0.1": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "sliding_window": 256, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    },
    # Windows shorter than the tests' prompts and not a multiple of the block size (16), so prefill chunks
    # and decode steps cross the window's edge inside a block.
    "tiny-mistral-sw": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "sliding_window": 11, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    },
    # Gemma 2: window / global alternating, both soft-caps small enough to bend these weights' logits.
    "tiny-gemma2": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "query_pre_attn_scalar": 24, "sliding_window": 13, "attn_logit_softcapping": 0.5,
        "final_logit_softcapping": 1.0, "max_position_embeddings": 1024, "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
    },
    # Gemma 3: two windowed layers per global one, local and (linearly scaled) global RoPE bases, QK-norm.
    "tiny-gemma3": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 24, "sliding_window": 10,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "max_position_embeddings": 1024, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1,
    },
    "tiny-qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "use_sliding_window": False,
    },
    "tiny-qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 1024, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
    },
    "tiny-llama3-scaled": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256},
    },
    # Falcon's three layouts: the original (multi-query, parallel, one LayerNorm; with biases here to cover
    # them), the new decoder architecture (grouped KV, two LayerNorms) and the sequential one (a KV head per
    # query head, q/k/v interleaved head by head in the fused checkpoint tensor).
    "tiny-falcon": {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512,
        "multi_query": True, "parallel_attn": True, "new_decoder_architecture": False, "alibi": False, "bias": True,
        "layer_norm_epsilon": 1e-5, "max_position_embeddings": 1024, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
    "tiny-falcon-new-arch": {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8, "num_kv_heads": 2, "vocab_size": 512,
        "new_decoder_architecture": True, "parallel_attn": True, "alibi": False, "bias": False,
        "ffn_hidden_size": 96, "layer_norm_epsilon": 1e-5, "max_position_embeddings": 1024, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "tiny-falcon-sequential": {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512,
        "multi_query": False, "parallel_attn": False, "new_decoder_architecture": False, "alibi": False,
        "bias": False, "layer_norm_epsilon": 1e-5, "max_position_embeddings": 1024, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
    # Phi-3 with LongRoPE switching at 32 tokens (4,096 in Phi-3-mini-128k), so short prompts cross it.
    "tiny-phi3-longrope": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "original_max_position_embeddings": 32, "sliding_window": None,
        "rope_scaling": {"rope_type": "longrope",
                         "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0],
                         "long_factor": [1.0, 1.3, 2.1, 3.5, 6.0, 9.5, 14.0, 20.0]},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    },
    # Tiny mixture-of-experts configs: Mixtral (renormalised top-2 of 4), Qwen2-MoE with its shared expert,
    # QKV bias, no renormalisation and one dense layer (mlp_only_layers), Qwen3-MoE with QK-norm.
    "tiny-mixtral": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "max_position_embeddings": 1024, "sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "tiny-qwen2-moe": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 1024, "num_experts": 8, "num_experts_per_tok": 3, "norm_topk_prob": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [1], "use_sliding_window": False,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "tiny-qwen3-moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 1024, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
    },
}
