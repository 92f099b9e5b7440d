"""Building blocks shared by every decoder here: RMSNorm, RoPE, masks, GQA attention, gated MLP.

Shapes: B batch, T tokens, D hidden, H query heads, K key/value heads (H = K * G), Dh head dim.
Parameters are ``nnx.Param`` (``nnx.Linear`` kernels are ``[in, out]``); attribute names follow
Hugging Face (``q_proj``, ``gate_proj``, ...), so checkpoint keys map one to one.
"""

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ls_jax.logit_stats import apply_softcap
from ls_jax.models import splash
from ls_jax.models.parallel import column_parallel

# Score given to masked attention entries: finite, so a fully masked row (a padding query)
# gets a uniform softmax instead of NaN.
_MASKED = -1e30

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
}


class RMSNorm(nnx.Module):
    """``x / rms(x) * (offset + weight)``, computed in float32, returned in ``x.dtype``.

    offset 0 is Llama's norm (weight initialised to 1); offset 1 is Gemma's ``(1 + w)`` norm
    (weight initialised to 0). weight: ``nnx.Param [D]``.
    """

    def __init__(self, dim: int, *, eps: float, offset: float = 0.0, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the first ``head_dim`` features, rotate-half layout (Hugging Face).

    rope_type: "default", "linear" (positions / factor) or "llama3" (Llama 3.1 frequency
    scaling with factor, low/high_freq_factor, original_max_position_embeddings).
    """

    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    SUPPORTED = ("default", "linear", "llama3")

    @classmethod
    def from_hf(cls, rope_parameters: dict | None, head_dim: int) -> "RopeConfig":
        """From a transformers ``config.rope_parameters`` dict (transformers >= 5 layout)."""
        p = dict(rope_parameters or {})
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in cls.SUPPORTED:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {cls.SUPPORTED}")
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        extra = {k: p[k] for k in keys if p.get(k) is not None and rope_type != "default"}
        return cls(head_dim=head_dim, theta=float(p.get("rope_theta", 10000.0)), rope_type=rope_type, **extra)

    def inv_freq(self) -> np.ndarray:
        """float32 inverse frequencies ``[head_dim // 2]`` (computed like transformers, in fp32)."""
        exponent = np.arange(0, self.head_dim, 2).astype(np.float32) / np.float32(self.head_dim)
        inv = (np.float32(1.0) / np.power(np.float32(self.theta), exponent)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = np.float32(2 * math.pi) / inv
            scaled = np.where(wavelen > low_wavelen, inv / np.float32(self.factor), inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv


def rope_tables(positions: jax.Array, rope: RopeConfig, dtype) -> tuple:
    """(cos, sin), each ``[B, T, Dh]`` in ``dtype``, for integer ``positions [B, T]``."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope.inv_freq())
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, heads, Dh]`` by the tables ``[B, T, Dh]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def default_positions(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """int32 positions ``[B, T]``: count of real tokens before each one in its own segment.

    Padding (``attention_mask == 0``) does not advance the position, so a left-padded row gets
    the positions of the unpadded sequence; each packed segment restarts at 0.
    """
    real = jnp.ones(shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    count = jnp.cumsum(real, axis=-1)
    if segment_ids is None:
        base = jnp.zeros(shape, jnp.int32)
    else:
        starts = jnp.concatenate([jnp.ones((shape[0], 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
        # real tokens before the segment start; non-decreasing along T, so a running max carries it
        base = jax.lax.cummax(jnp.where(starts, count - real, 0), axis=1)
    return jnp.maximum(count - base - 1, 0)


def token_mask(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape, offset=0) -> jax.Array:
    """bool ``[B, T(query), S(key)]``: causal, key is a real token, same packed segment.

    ``shape`` is the queries' ``(B, T)``; query ``i`` sits at slot ``offset + i`` (an int or a
    traced int32 scalar: a KV cache's write index) and key ``j`` at slot ``j``. ``attention_mask``
    ``[B, S]`` marks real keys (S = T without a cache). ``segment_ids`` needs ``S == T``.
    """
    b, t = shape
    s = t if attention_mask is None else attention_mask.shape[-1]
    query = offset + jnp.arange(t)
    mask = jnp.broadcast_to(query[None, :, None] >= jnp.arange(s)[None, None, :], (b, t, s))
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def sliding_window_mask(mask: jax.Array, window: int | None, offset=0) -> jax.Array:
    """``mask [B, T, S]`` restricted to keys less than ``window`` slots back (None: unchanged);
    query ``i`` sits at slot ``offset + i`` as in :func:`token_mask`."""
    if window is None:
        return mask
    query = offset + jnp.arange(mask.shape[1])
    return mask & ((query[:, None] - jnp.arange(mask.shape[-1])[None, :]) < window)


class AttentionMask(NamedTuple):
    """Which keys each query of a call may attend to (a pytree).

    dense: bool ``[B, T, S]`` from :func:`token_mask` (causal, real keys, same packed segment,
    queries at slots ``offset ..``; no sliding window yet), or None: plain causal attention
    over the call's own tokens (S = T), the form fused kernels take without a ``[T, S]`` mask.
    offset: query 0's slot, an int or int32 scalar (a KV cache's write index).
    """

    dense: jax.Array | None = None
    offset: object = 0

    def with_window(self, shape, window: int | None) -> jax.Array:
        """bool ``[B, T, S]`` of either form with the sliding ``window`` applied; ``shape`` is
        the queries' ``(B, T)``."""
        dense = token_mask(None, None, shape) if self.dense is None else self.dense
        return sliding_window_mask(dense, window, self.offset)


ATTENTION_IMPLEMENTATIONS = ("auto", "explicit", "xla", "cudnn", "splash")


def attention_path(
    implementation: str, mask: AttentionMask, softcap: float | None, dtype, head_dim: int, length: int
) -> str:
    """The one place choosing how a call computes attention: "explicit", "xla", "cudnn" or "splash".

    "explicit" is this module's einsum (float32 ``[B, heads, T, S]`` scores, materialised). "xla"
    and "cudnn" go through ``jax.nn.dot_product_attention``: "cudnn" is cuDNN's fused
    flash-attention kernel on a GPU (no ``[T, S]`` scores in memory), "xla" JAX's own
    implementation (still float32 ``[T, S]`` scores, per key/value head group). "splash" is
    JAX's Pallas TPU flash-attention kernel (:mod:`ls_jax.models.splash`; off a TPU it runs in
    interpret mode). Neither cuDNN nor ``dot_product_attention`` has an attention-logit softcap
    (Gemma 2): with one, "xla" and "cudnn" become "explicit"; splash has it.

    The fused kernels take only the causal form of the mask (``mask.dense`` None: causal and the
    sliding window are built into the kernel): a padding mask, a packed batch's block-diagonal
    mask or a KV cache's offset queries would reach cuDNN only as an additive ``[B, 1, T, S]``
    bias, quadratic in T again, and splash not at all. "auto" takes "splash" on a TPU where
    :func:`ls_jax.models.splash.fits` (T and Dh multiples of 128); else "explicit" with a
    softcap; else "cudnn" on a CUDA GPU (:func:`on_cuda`) for bf16/fp16 with a head dim <= 128
    that is a multiple of 8; else "xla". ``jax.nn.dot_product_attention(implementation=None)``
    does not do this choice itself: in JAX 0.10 it always means XLA.

    Args:
      implementation: "auto", "explicit", "xla", "cudnn" or "splash" (forced; "cudnn" raises
        where cuDNN cannot run the call, "splash" on a mask other than the causal form or a
        length that is not a multiple of 128).
      mask: the call's :class:`AttentionMask`. softcap: attention-logit softcap or None.
      dtype: the queries' dtype. head_dim: Dh. length: T, the call's query (and key) tokens.
    Returns:
      "explicit", "xla", "cudnn" or "splash".
    Raises:
      ValueError: an unknown ``implementation``, or "splash" forced on a mask it cannot take.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; supported: {ATTENTION_IMPLEMENTATIONS}")
    causal = mask.dense is None
    if implementation == "splash":
        if not causal:
            raise ValueError("splash attention takes plain causal attention: no padding mask, packed segments or cache")
        return "splash"
    if implementation == "auto" and causal and splash.on_tpu() and splash.fits(length, head_dim):
        return "splash"
    if softcap is not None or implementation == "explicit":
        return "explicit"
    if implementation != "auto":
        return implementation
    fits = causal and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0
    return "cudnn" if fits and on_cuda() else "xla"


def on_cuda() -> bool:
    """Whether the default backend is a CUDA GPU (ROCm GPUs have no cuDNN)."""
    backend = jax.extend.backend.get_backend()
    return backend.platform == "gpu" and "cuda" in backend.platform_version.lower()


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    *,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Grouped-query attention on the path :func:`attention_path` picks.

    Args:
      q: ``[B, T, H, Dh]``; query head ``h`` uses key/value head ``h // (H // K)``.
      k, v: ``[B, S, K, Dh]``, the dtype of ``q``.
      mask: :class:`AttentionMask` (``[B, T, S]`` dense, or causal with S = T).
      scale: score scale. softcap: attention-logit softcap (``softcap * tanh(s / softcap)``).
      window: sliding window in tokens (a query sees keys less than ``window`` slots back) or None.
      implementation: see :func:`attention_path`.
    Returns:
      ``[B, T, H, Dh]`` in the dtype of ``v``; scores and softmax in float32 on every path.
    """
    b, t, heads, dh = q.shape
    path = attention_path(implementation, mask, softcap, q.dtype, dh, t)
    if path == "splash":
        return splash.splash_attention(q, k, v, scale=scale, softcap=softcap, window=window)
    if path == "explicit":
        dense = mask.with_window((b, t), window)
        k_heads = k.shape[2]
        qg = q.reshape(b, t, k_heads, heads // k_heads, dh)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        scores = apply_softcap(scores, softcap)
        scores = jnp.where(dense[:, None, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, heads, dh)
    if mask.dense is not None:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask.with_window((b, t), window)[:, None], scale=scale, implementation=path
        )
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        implementation=path,
        local_window_size=None if window is None else (window - 1, 0),
    )


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional qkv/output bias, score softcap and window.

    Params: ``q_proj [D, H*Dh]``, ``k_proj``/``v_proj [D, K*Dh]``, ``o_proj [H*Dh, D]``.
    Scores ``scale * q.k`` (then ``softcap * tanh(s / softcap)``) and softmax in float32, on the
    path :func:`attention_path` picks from ``implementation``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float,
        qkv_bias: bool = False,
        out_bias: bool = False,
        softcap: float | None = None,
        sliding_window: int | None = None,
        implementation: str = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.q_proj = linear(hidden_size, num_heads * head_dim, use_bias=qkv_bias)
        self.k_proj = linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias)
        self.v_proj = linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias)
        self.o_proj = linear(num_heads * head_dim, hidden_size, use_bias=out_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.softcap = scale, softcap
        self.sliding_window, self.implementation = sliding_window, implementation

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask, cache: tuple | None = None, index=0
    ) -> tuple:
        """x ``[B, T, D]``, rope tables ``[B, T, Dh]``, :class:`AttentionMask` ->
        ``(out [B, T, D], cache)``.

        Without a cache (``None``, returned as is) the keys are this call's tokens (S = T). With
        ``cache = (k, v)``, each ``[B, S, K, Dh]``, this call's keys and values are written at
        slots ``index .. index + T - 1`` and the queries attend over all S slots (as ``mask``
        allows); the updated ``(k, v)`` is returned.
        """
        b, t, _ = x.shape
        q, k, v = column_parallel(x, self.q_proj, self.k_proj, self.v_proj)
        q = apply_rope(q.reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if cache is not None:
            k, v = (
                jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, index, 0, 0)) for c, new in zip(cache, (k, v))
            )
            cache = (k, v)
        out = attention(
            q,
            k,
            v,
            mask,
            scale=self.scale,
            softcap=self.softcap,
            window=self.sliding_window,
            implementation=self.implementation,
        )
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


class GatedMLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: SwiGLU (silu, Llama) or GeGLU (gelu, Gemma)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str = "silu",
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        linear = functools.partial(
            nnx.Linear, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs
        )
        self.gate_proj = linear(hidden_size, intermediate_size)
        self.up_proj = linear(hidden_size, intermediate_size)
        self.down_proj = linear(intermediate_size, hidden_size)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D] -> [..., D]``."""
        gate, up = column_parallel(x, self.gate_proj, self.up_proj)
        return self.down_proj(ACTIVATIONS[self.activation](gate) * up)
