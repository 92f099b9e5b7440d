"""``impl="xla"``: logit statistics blocked over the vocabulary with lax loops.

A ``lax.fori_loop`` walks ``block_v``-row slices of the classifier; each step computes a
``[N, block_v]`` float32 logit tile, folds it into an online log-sum-exp (plus max, argmax
and the optional logit sum) and drops it. The backward pass (``jax.custom_vjp``)
recomputes each tile once and forms ``dhidden += dz @ W_blk`` and ``dweight[blk] = dz.T @ h``.
Extra memory is O(N x block_v), never O(N x V). Runs on CPU, GPU and TPU.

The last block is slid back to end at row V (so no copy of the weight is ever padded);
rows it shares with the previous block are masked, so every row counts exactly once.
"""

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from ls_jax.logit_stats import LogitStats, apply_softcap

DEFAULT_BLOCK_V = 4096


def _block(weight, bias, i, block_v):
    """Rows [start, start + block_v) of weight/bias for block i, and a [block_v] bool mask of
    the rows that belong to this block (False for rows already covered by block i - 1)."""
    v = weight.shape[0]
    start = jnp.minimum(i * block_v, v - block_v)
    w_blk = jax.lax.dynamic_slice_in_dim(weight, start, block_v, 0)
    b_blk = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, start, block_v, 0)
    own = start + jnp.arange(block_v) >= i * block_v
    return start, w_blk, b_blk, own


def _raw_logits(hidden, w_blk, b_blk):
    """float32 [N, block_v] = hidden [N, D] @ w_blk [block_v, D].T (+ b_blk)."""
    z = jnp.einsum("nd,vd->nv", hidden, w_blk, preferred_element_type=jnp.float32)
    return z if b_blk is None else z + b_blk.astype(jnp.float32)


def _forward(hidden, weight, bias, logit_softcap, need_sum, block_v):
    n, v = hidden.shape[0], weight.shape[0]

    def body(i, carry):
        m, s, total, best = carry
        start, w_blk, b_blk, own = _block(weight, bias, i, block_v)
        z = apply_softcap(_raw_logits(hidden, w_blk, b_blk), logit_softcap)
        z = jnp.where(own, z, -jnp.inf)
        blk_max = z.max(-1)
        new_m = jnp.maximum(m, blk_max)
        shift = jnp.where(jnp.isfinite(new_m), new_m, 0.0)  # a block of -inf logits: no NaN
        s = s * jnp.exp(m - shift) + jnp.exp(z - shift[:, None]).sum(-1)
        if need_sum:
            total = total + jnp.where(own, z, 0.0).sum(-1)
        blk_arg = start + jnp.argmax(z, -1).astype(jnp.int32)
        best = jnp.where(blk_max > m, blk_arg, best)
        return new_m, s, total, best

    init = (
        jnp.full((n,), -jnp.inf, jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((n,), jnp.int32),
    )
    m, s, total, best = jax.lax.fori_loop(0, -(-v // block_v), body, init)
    return LogitStats(m + jnp.log(s), total, m, best)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _stats(hidden, weight, bias, logit_softcap, need_sum, block_v):
    return _forward(hidden, weight, bias, logit_softcap, need_sum, block_v)


def _stats_fwd(hidden, weight, bias, logit_softcap, need_sum, block_v):
    stats = _forward(hidden, weight, bias, logit_softcap, need_sum, block_v)
    return stats, (hidden, weight, bias, stats.lse)


def logit_stats_vjp(hidden, weight, bias, lse, cotangents: LogitStats, *,
                    logit_softcap: Optional[float], need_sum: bool, block_v: int):
    """Pull the cotangents of LogitStats ``[N]`` back to (dhidden, dweight, dbias or None),
    given the forward's ``lse [N]``; recomputes each ``[N, block_v]`` logit tile once.
    Gradients come out in the dtypes of hidden, weight and bias."""
    g_lse = cotangents.lse.astype(jnp.float32)[:, None]
    g_sum = cotangents.logit_sum.astype(jnp.float32)[:, None] if need_sum else 0.0
    v = weight.shape[0]

    def body(i, carry):
        dh, dw, db = carry
        start, w_blk, b_blk, own = _block(weight, bias, i, block_v)
        z = apply_softcap(_raw_logits(hidden, w_blk, b_blk), logit_softcap)
        dz = g_lse * jnp.exp(z - lse[:, None]) + g_sum
        if logit_softcap is not None:
            dz = dz * (1.0 - jnp.square(z / logit_softcap))
        dz = jnp.where(own, dz, 0.0)
        dz_lo = dz.astype(hidden.dtype)
        dh = dh + jnp.einsum("nv,vd->nd", dz_lo, w_blk, preferred_element_type=jnp.float32)
        dw_blk = jnp.einsum("nv,nd->vd", dz_lo, hidden, preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(dw, start, block_v, 0)
        dw = jax.lax.dynamic_update_slice_in_dim(
            dw, jnp.where(own[:, None], dw_blk.astype(dw.dtype), old), start, 0
        )
        if db is not None:
            old_b = jax.lax.dynamic_slice_in_dim(db, start, block_v, 0)
            db = jax.lax.dynamic_update_slice_in_dim(db, jnp.where(own, dz.sum(0), old_b), start, 0)
        return dh, dw, db

    init = (
        jnp.zeros(hidden.shape, jnp.float32),
        jnp.zeros(weight.shape, weight.dtype),
        None if bias is None else jnp.zeros(bias.shape, jnp.float32),
    )
    dh, dw, db = jax.lax.fori_loop(0, -(-v // block_v), body, init)
    return dh.astype(hidden.dtype), dw, None if bias is None else db.astype(bias.dtype)


def _stats_bwd(logit_softcap, need_sum, block_v, residuals, cotangents):
    hidden, weight, bias, lse = residuals
    return logit_stats_vjp(hidden, weight, bias, lse, cotangents, logit_softcap=logit_softcap,
                           need_sum=need_sum, block_v=block_v)


_stats.defvjp(_stats_fwd, _stats_bwd)


def xla_logit_stats(
    hidden, weight, bias=None, *, logit_softcap: Optional[float] = None, need_sum: bool = False,
    block_v: Optional[int] = None,
) -> LogitStats:
    """:class:`LogitStats` of ``softcap(hidden [N, D] @ weight [V, D].T + bias [V])``.

    Blocked over the vocabulary in ``block_v`` rows (default 4096, capped at V); any float
    dtype in, float32 statistics out; differentiable in hidden, weight and bias.
    """
    block_v = min(int(DEFAULT_BLOCK_V if block_v is None else block_v), weight.shape[0])
    if block_v < 1:
        raise ValueError(f"block_v must be >= 1, got {block_v}")
    softcap = None if logit_softcap is None else float(logit_softcap)
    return _stats(hidden, weight, bias, softcap, bool(need_sum), block_v)
