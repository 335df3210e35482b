"""The Transformer++ twin: a ``LlamaForCausalLM`` of the same shape as an EBT.

Every comparison in the project (quality, cost, thinking curves) is made against this twin so that
vocabulary, width, depth, heads, FFN width and context are equal; only the prediction mechanism
differs.
"""

from __future__ import annotations

from transformers import LlamaConfig

from .configuration_ebt import EBTConfig


def llama_twin_config(config: EBTConfig, **overrides) -> LlamaConfig:
    """A ``LlamaConfig`` matching ``config``'s backbone (RMSNorm, RoPE, SwiGLU, no biases)."""
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)
