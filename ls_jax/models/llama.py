"""Llama 2/3 (incl. Llama 3.1 rope scaling), Mistral and Qwen2 as a :class:`DecoderSpec`.

The three share one block: SwiGLU MLP, pre-norm RMSNorm, RoPE, grouped-query attention.
They differ in flags: Qwen2 has q/k/v biases (no output bias), Llama's ``attention_bias``
biases all four projections, Mistral slides a window over every layer, Qwen2 over the
layers its ``layer_types`` name.
"""

from ls_jax.models.layers import RopeConfig
from ls_jax.models.transformer import DecoderSpec


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama_spec(config) -> DecoderSpec:
    """DecoderSpec of a transformers ``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``."""
    model_type = config.model_type
    n = config.num_hidden_layers
    if model_type == "mistral":
        windows = (config.sliding_window,) * n
    elif model_type == "qwen2":
        types = config.layer_types or ["full_attention"] * n
        windows = tuple(config.sliding_window if t == "sliding_attention" else None for t in types)
    else:
        windows = (None,) * n
    head_dim = _head_dim(config)
    attention_bias = bool(getattr(config, "attention_bias", False))
    return DecoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        rope=RopeConfig.from_hf(config.rope_parameters, head_dim),
        sliding_windows=windows,
        query_scale=head_dim**-0.5,
        rms_norm_eps=config.rms_norm_eps,
        activation=config.hidden_act,
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        tie_word_embeddings=bool(config.tie_word_embeddings),
        pad_token_id=config.pad_token_id,
        initializer_range=config.initializer_range,
    )


def tiny_llama_config(vocab_size: int = 256, hidden_size: int = 64, num_hidden_layers: int = 2, **overrides):
    """A small random-init ``LlamaConfig`` for demos and tests (4 heads, 2 KV heads, MLP 2 x D).

    ``ls_jax.models.from_config(tiny_llama_config(vocab_size=tok.vocab_size))`` builds the model;
    any LlamaConfig field can be overridden.
    """
    from transformers import LlamaConfig  # deferred: importing transformers takes seconds

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)
