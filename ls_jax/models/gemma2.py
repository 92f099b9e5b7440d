"""Gemma 2 as a :class:`DecoderSpec` on the shared blocks.

What sets it apart from Llama, each a flag: GeGLU MLP (tanh-approximated gelu), ``(1 + w)``
RMSNorm, norms before *and* after attention and MLP, token embeddings scaled by sqrt(D),
attention-score and final-logit softcapping, sliding-window attention on alternate layers
(``layer_types``), score scale ``query_pre_attn_scalar ** -0.5`` and tied embeddings.
"""

from ls_jax.models.layers import RopeConfig
from ls_jax.models.transformer import DecoderSpec


def gemma2_spec(config) -> DecoderSpec:
    """DecoderSpec of a transformers ``Gemma2Config``."""
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("Gemma 2 with use_bidirectional_attention=True is not supported (causal only)")
    head_dim = config.head_dim
    types = config.layer_types
    return DecoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        rope=RopeConfig.from_hf(config.rope_parameters, head_dim),
        sliding_windows=tuple(config.sliding_window if t == "sliding_attention" else None for t in types),
        query_scale=config.query_pre_attn_scalar**-0.5,
        rms_norm_eps=config.rms_norm_eps,
        activation=config.hidden_activation,
        qkv_bias=bool(config.attention_bias),
        out_bias=bool(config.attention_bias),
        norm_offset=1.0,
        sandwich_norms=True,
        embed_scale=True,
        attn_softcap=config.attn_logit_softcapping,
        final_logit_softcap=config.final_logit_softcapping,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        pad_token_id=config.pad_token_id,
        initializer_range=config.initializer_range,
    )
