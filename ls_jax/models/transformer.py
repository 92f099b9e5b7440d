"""The decoder-only transformer every architecture here instantiates, and its causal-LM head.

An architecture (``llama.py``, ``gemma2.py``) is a :class:`DecoderSpec`: the differences
between Llama 2/3, Mistral, Qwen2 and Gemma 2 are flags on shared blocks (``layers.py``),
not separate code paths. Module attribute names mirror Hugging Face checkpoints:
``model.embed_tokens``, ``model.layers[i].self_attn.q_proj``, ``model.layers[i].mlp.gate_proj``,
``model.norm``, ``lm_head``.
"""

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ls_jax.logit_stats import dense_logits
from ls_jax.models.layers import (
    Attention,
    AttentionMask,
    GatedMLP,
    RMSNorm,
    RopeConfig,
    default_positions,
    rope_tables,
    token_mask,
)


@dataclass(frozen=True)
class DecoderSpec:
    """Architecture-neutral description of a decoder (hashable; static under jit).

    sliding_windows: one entry per layer, the window in tokens or None for full attention.
    norm_offset: 0 for ``w * x_hat`` norms, 1 for Gemma's ``(1 + w) * x_hat``.
    sandwich_norms: Gemma 2's extra norms after attention and after the MLP.
    embed_scale: multiply token embeddings by sqrt(hidden_size) (Gemma).
    query_scale: attention score scale (``head_dim ** -0.5``; Gemma 2: ``query_pre_attn_scalar ** -0.5``).
    attention: "auto", "explicit", "xla", "cudnn" or "splash"; see :func:`ls_jax.models.layers.attention_path`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    sliding_windows: tuple[int | None, ...]
    query_scale: float
    rms_norm_eps: float = 1e-6
    activation: str = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: bool = False
    attn_softcap: float | None = None
    final_logit_softcap: float | None = None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    attention: str = "auto"

    @property
    def num_layers(self) -> int:
        return len(self.sliding_windows)


class DecoderBlock(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    With ``sandwich_norms`` (Gemma 2) each branch output is normed too: ``post_attention_layernorm``
    after attention, ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the MLP.
    Without it (Llama), ``post_attention_layernorm`` is the norm before the MLP, as in HF.
    """

    def __init__(self, spec: DecoderSpec, sliding_window: int | None, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(spec.initializer_range)
        self.self_attn = Attention(
            spec.hidden_size,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            scale=spec.query_scale,
            qkv_bias=spec.qkv_bias,
            out_bias=spec.out_bias,
            softcap=spec.attn_softcap,
            sliding_window=sliding_window,
            implementation=spec.attention,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=init,
            rngs=rngs,
        )
        self.mlp = GatedMLP(
            spec.hidden_size,
            spec.intermediate_size,
            activation=spec.activation,
            use_bias=spec.mlp_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=init,
            rngs=rngs,
        )

        def norm():
            return RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, offset=spec.norm_offset, param_dtype=param_dtype)

        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich_norms = spec.sandwich_norms
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask, cache: tuple | None = None, index=0
    ) -> tuple:
        """x ``[B, T, D]``, rope tables ``[B, T, Dh]``, :class:`AttentionMask` ->
        ``(x [B, T, D], cache)``; ``cache``/``index``: this layer's ``(k, v)`` (see :class:`Attention`)."""
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, index)
        if self.sandwich_norms:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), cache
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def _run_block(block: DecoderBlock, x, cos, sin, mask):
    return block(x, cos, sin, mask)[0]


# What the backward pass of a block keeps (the rest is recomputed): "none" keeps everything
# (no remat); "full" only the block's input; "dots" also its matmul outputs without batch
# dimensions (the projections and MLP; not the attention scores, whose dots are batched).
REMAT = {
    "none": None,
    "full": nnx.remat(_run_block),
    "dots": nnx.remat(_run_block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far, for incremental decoding (a pytree).

    layers: per layer ``(k, v)``, each ``[B, S, K, Dh]`` in the compute dtype; mask: int32
    ``[B, S]``, 1 at slots holding a real token; index: int32 scalar, the slot the next call
    writes its first token to. S is fixed when the cache is made (:meth:`empty`), so shapes
    never change while decoding.
    """

    layers: tuple[tuple[jax.Array, jax.Array], ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, spec: "DecoderSpec", batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        """A cache of ``length`` slots for ``batch`` sequences, nothing written yet."""
        shape = (batch, length, spec.num_kv_heads, spec.head_dim)
        layers = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(spec.num_layers))
        return cls(layers, jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))


class Decoder(nnx.Module):
    """Token embedding, the blocks and the final norm: ids ``[B, T]`` -> hidden ``[B, T, D]``.

    ``remat`` ("none", "full" or "dots", see :data:`REMAT`; True means "full", False "none")
    recomputes each block's activations in the backward pass (nnx.remat), trading compute
    for memory in fine-tuning.
    """

    def __init__(
        self,
        spec: DecoderSpec,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        remat = {True: "full", False: "none"}.get(remat, remat)
        if remat not in REMAT:
            raise ValueError(f"remat must be one of {tuple(REMAT)} (or a bool), got {remat!r}")
        self.spec = spec
        self.dtype = dtype
        self.remat = remat
        self.embed_tokens = nnx.Embed(
            spec.vocab_size,
            spec.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(spec.initializer_range),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderBlock(spec, w, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for w in spec.sliding_windows]
        )
        self.norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, offset=spec.norm_offset, param_dtype=param_dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ):
        """input_ids int ``[B, T]``; attention_mask ``[B, T]`` (1 token, 0 padding) or None;
        positions int ``[B, T]`` or None (then :func:`default_positions`); segment_ids ``[B, T]``
        or None (packed sequences: attention stays inside a segment). Returns ``[B, T, D]`` in
        the compute dtype, final norm applied.

        Without a mask, segments or cache, attention is plain causal: the form cuDNN's fused
        kernel takes on a GPU and splash on a TPU (:func:`~ls_jax.models.layers.attention_path`). Right-padded rows
        may leave ``attention_mask`` out too: no real token attends to the padding after it, so
        only the (unused) outputs at padding change.

        With a :class:`KVCache` the tokens continue the cached ones: they are written at slots
        ``cache.index ..`` and attend to every real cached token; default positions continue
        from the number of real cached tokens. Returns ``(hidden, updated cache)`` then.
        """
        shape = input_ids.shape
        offset, key_mask = 0, attention_mask
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be used with a KV cache")
            new = jnp.ones(shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
            offset = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.mask, new, (0, offset))
            if positions is None:
                positions = cache.mask.sum(-1, keepdims=True) + default_positions(new, None, shape)
        elif positions is None:
            positions = default_positions(attention_mask, segment_ids, shape)
        x = self.embed_tokens(input_ids)
        if self.spec.embed_scale:
            x = x * jnp.asarray(self.spec.hidden_size**0.5, x.dtype)
        cos, sin = rope_tables(positions, self.spec.rope, x.dtype)
        if cache is None and segment_ids is None and attention_mask is None:
            mask = AttentionMask()  # plain causal: the form the fused kernels take
        else:
            mask = AttentionMask(dense=token_mask(key_mask, segment_ids, shape, offset), offset=offset)
        if cache is None:
            run = REMAT[self.remat] or _run_block
            for layer in self.layers:
                x = run(layer, x, cos, sin, mask)
            return self.norm(x)
        layers = []
        for layer, kv in zip(self.layers, cache.layers):
            x, kv = layer(x, cos, sin, mask, kv, offset)
            layers.append(kv)
        return self.norm(x), KVCache(tuple(layers), key_mask, offset + shape[1])


class CausalLM(nnx.Module):
    """Decoder plus language-model head; follows the protocol in ``ls_jax.models.protocol``.

    ``lm_head`` is an ``nnx.Param [V, D]`` in Hugging Face layout (no transpose before the fused
    loss), absent when the embeddings are tied.
    """

    def __init__(
        self,
        spec: DecoderSpec,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        self.model = Decoder(spec, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        if not spec.tie_word_embeddings:
            init = nnx.initializers.normal(spec.initializer_range)
            self.lm_head = nnx.Param(init(rngs.params(), (spec.vocab_size, spec.hidden_size), param_dtype))
        self.final_logit_softcap = spec.final_logit_softcap

    @property
    def spec(self) -> DecoderSpec:
        return self.model.spec

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None, cache=None):
        """Final hidden states ``[B, T, D]``, and the updated cache when given a
        :class:`KVCache` (see :meth:`Decoder.__call__`)."""
        return self.model(input_ids, attention_mask, positions, segment_ids, cache)

    def unembedding(self) -> jax.Array:
        """Output embedding ``W [V, D]`` (lm_head, or the tied token-embedding table)."""
        if self.spec.tie_word_embeddings:
            return self.model.embed_tokens.embedding[...]
        return self.lm_head[...]

    def project(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[..., V]`` of hidden states ``[..., D]``, final softcap applied."""
        w = self.unembedding()
        flat = dense_logits(
            hidden.reshape(-1, hidden.shape[-1]), w.astype(hidden.dtype), None, self.final_logit_softcap
        )
        return flat.reshape(*hidden.shape[:-1], w.shape[0])

    def logits(self, input_ids, attention_mask=None, positions=None, segment_ids=None) -> jax.Array:
        """float32 logits ``[B, T, V]`` with the final softcap applied (materialised: inference, tests)."""
        return self.project(self(input_ids, attention_mask, positions, segment_ids))
