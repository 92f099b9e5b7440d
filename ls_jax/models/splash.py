"""Splash attention: JAX's Pallas TPU flash-attention kernel, for the models' causal attention.

:func:`ls_jax.models.layers.attention_path` takes this path on a TPU for plain causal attention
(sliding windows and Gemma 2's attention-logit softcap included, both kernel features) when the
sequence length and the head dim are multiples of 128 (the kernel's lane width): no
``[B, heads, T, T]`` scores in memory, forward or backward. Off a TPU the same kernel runs in
Pallas interpret mode (slow; what the tests run on CPU). Under an ambient mesh
(``jax.set_mesh``, ``ls_jax.train.sharding.on_mesh``) the kernel runs under ``jax.shard_map``:
rows over the mesh's batch axes (``data``, ``fsdp``) and key/value heads over ``tensor``,
where those divide them (an axis that does not is left out: the kernel sees those rows or
heads whole).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from ls_jax.sharded import mesh_axes

LANES = 128  # the kernel's key block and TPU head dims come in multiples of this
BLOCKS = (512, 256, LANES)  # query / key block sizes, largest first


def fits(length: int, head_dim: int) -> bool:
    """Whether splash takes a length-``length`` sequence with ``head_dim`` features per head on a TPU."""
    return length % LANES == 0 and head_dim % LANES == 0


def on_tpu() -> bool:
    """Whether the default backend is a TPU."""
    return jax.default_backend() == "tpu"


def _kernel(heads: int, length: int, window: int | None, softcap: float | None):
    """The splash kernel for ``heads`` query heads of ``length`` tokens: causal, within ``window``."""
    block = next(b for b in BLOCKS if length % b == 0)
    shape = (length, length)
    mask = mask_lib.CausalMask(shape) if window is None else mask_lib.LocalMask(shape, (window - 1, 0), offset=0)
    sizes = kernel_lib.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([mask] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=softcap,
        interpret=not on_tpu(),
    )


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, softcap: float | None, window: int | None
) -> jax.Array:
    """Causal grouped-query attention by the splash kernel.

    Args:
      q: ``[B, T, H, Dh]``; query head ``h`` uses key/value head ``h // (H // K)``.
      k, v: ``[B, T, K, Dh]``, the dtype of ``q``.
      scale: score scale (applied to ``q`` before the kernel, which has none).
      softcap: attention-logit softcap (``softcap * tanh(s / softcap)`` of the scaled scores) or None.
      window: sliding window in tokens (keys less than ``window`` slots back) or None.
    Returns:
      ``[B, T, H, Dh]`` in the dtype of ``v``.
    Raises:
      ValueError: T is not a multiple of 128 (the kernel's key blocks).
    """
    b, t, heads, _ = q.shape
    if t % LANES:
        raise ValueError(f"splash attention needs a sequence length that is a multiple of {LANES}, got {t}")
    q = (q * jnp.asarray(scale, jnp.float32)).astype(q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # the kernel's [heads, T, Dh] per row

    def local(q, k, v):
        run = _kernel(q.shape[1], t, window, softcap)
        return jax.vmap(run)(q, k, v).astype(v.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    batch, tensor = ((), None) if mesh.empty else mesh_axes(mesh)
    rows, shards = (), 1
    for axis in batch:  # the batch axes whose product divides B
        if b % (shards * mesh.shape[axis]) == 0:
            rows, shards = (*rows, axis), shards * mesh.shape[axis]
    heads_axis = tensor if tensor and k.shape[1] % mesh.shape[tensor] == 0 else None
    if not rows and heads_axis is None:
        out = local(q, k, v)
    else:
        spec = P(rows or None, heads_axis)
        names = set(rows) | ({heads_axis} if heads_axis else set())
        out = jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, axis_names=names, check_vma=False)(q, k, v)
    return out.transpose(0, 2, 1, 3)
