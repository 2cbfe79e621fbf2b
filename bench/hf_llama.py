"""HF transformers' Llama of a jkv ``LlamaConfig``: the peer model of the engine and decode benchmarks."""

from __future__ import annotations

from jkv.models import llama


def hf_config(config: llama.LlamaConfig):
    """A ``transformers.LlamaConfig`` of the same shape, norm epsilon, rotary embedding and tying."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_llama3 is not None:
        factor, low, high, original = config.rope_llama3
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": factor}
        rope |= {"low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": original}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=config.max_position,
    )
