"""``impl="xla"``: the loss blocked over tokens and the vocabulary with lax loops; CPU, GPU, TPU.

Two paths:

* **One-pass** (:func:`one_pass_loss`, used for a scalar loss - reduction "mean" or "sum" -
  differentiated in reverse mode, the training case): per chunk of ``block_n`` tokens, the
  float32 ``[block_n, V]`` logit tile, its lse, ``dz`` (softmax minus the target and smoothing
  terms, times the softcap factor, all in float32, rounded once to the products' operand dtype),
  ``dh_chunk = dz @ W`` and ``dW += dz.T @ h_chunk`` (float32 accumulator), in the forward
  sweep: 6NDV matmul work, no recompute, deterministic. The backward only scales the stored
  gradients by the cotangent. Extra memory: a few tiles (block_n is set by a byte budget,
  ``logit_stats.tile_budget``, so it does not grow with N) plus the float32 dW accumulator
  ``[V, D]``; the gradients are held from forward to backward in the dtypes of hidden / weight /
  bias (exact for a cotangent of 1). A frozen weight or bias (not differentiated, or under
  ``stop_gradient``) gets no dW / dbias work at all.
* **Two-pass** (:data:`logit_stats`, for per-token losses, and for second-order derivatives):
  the forward walks ``[block_n, block_v]`` tiles with an online log-sum-exp; the backward
  (ls_jax/logit_stats.py's VJP) recomputes each tile once (8NDV). Extra memory: a few tiles
  (``block_n x block_v`` float32, 8 MiB by default) plus float32 ``dW`` in the backward.

Every matrix product takes its operands as ``logit_stats.gemm_operands`` says (``BlockSizes.precision``:
the inputs' dtype on GPU and TPU, bf16 tensor cores / MXU; float32 on CPU or when asked), with
float32 accumulation.

The last block of each axis is slid back to end at the axis' end (nothing is padded or
copied); rows it shares with the previous block are masked, so every row counts once.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from ls_jax.logit_stats import (
    Backend,
    BlockSizes,
    LogitStats,
    apply_softcap,
    dz_tile,
    gemm_operands,
    head_back,
    head_logits,
    head_outer,
    live_rows,
    online_fold,
    online_init,
    online_result,
    tile_budget,
    two_pass,
    vocab_axis,
    weighted_sum,
)

BLOCK_N, BLOCK_V = 1024, 2048  # two-pass tile


def _slide(i, block, size):
    """Start of block i of an axis of ``size`` (the last one slid back to end at ``size``) and a
    ``[block]`` bool mask of the rows that belong to block i (not already to block i - 1)."""
    start = jnp.minimum(i * block, size - block)
    return start, start + jnp.arange(block) >= i * block


def _rows(x, start, size, axis=0):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _raw_tile(h, weight, bias, start, bv, layout, gemm):
    """float32 ``h [bn, D] @ W[start:start + bv].T + bias[start:start + bv]``; ``gemm``: the
    products' (operand dtype, precision)."""
    cdt, prec = gemm
    z = head_logits(h.astype(cdt), _rows(weight, start, bv, vocab_axis(layout)).astype(cdt), layout, prec)
    return z if bias is None else z + _rows(bias, start, bv).astype(jnp.float32)


def _two_pass_blocks(blocks: BlockSizes, n, v):
    return min(blocks.block_n or BLOCK_N, n), min(blocks.block_v or BLOCK_V, v)


def forward(hidden, weight, bias, first, *, softcap, need_sum, blocks: BlockSizes, layout="vd"):
    """(lse, logit_sum, max_logit, prediction, lse_excl) ``[N]`` of ``softcap(hidden @ weight.T +
    bias)``; lse_excl leaves out class ``first [N]`` (see ``logit_stats.Backend``)."""
    n, v = hidden.shape[0], weight.shape[vocab_axis(layout)]
    out = (jnp.zeros((n,), jnp.float32),) * 3 + (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32))
    if n == 0:
        return out
    bn, bv = _two_pass_blocks(blocks, n, v)
    gemm = gemm_operands(blocks, jnp.promote_types(hidden.dtype, weight.dtype))

    def token_block(i, out):
        start_n, _ = _slide(i, bn, n)
        h, f = _rows(hidden, start_n, bn), _rows(first, start_n, bn)

        def vocab_block(j, state):
            start, own = _slide(j, bv, v)
            z = jnp.where(own, apply_softcap(_raw_tile(h, weight, bias, start, bv, layout, gemm), softcap), -jnp.inf)
            return online_fold(state, z, own, start, f, need_sum)

        new = online_result(jax.lax.fori_loop(0, -(-v // bv), vocab_block, online_init(bn)))
        return tuple(jax.lax.dynamic_update_slice_in_dim(o, x, start_n, 0) for o, x in zip(out, new))

    return jax.lax.fori_loop(0, -(-n // bn), token_block, out)


def backward(hidden, weight, bias, lse, comp, g_lse, g_sum, ids, coef, *, softcap, blocks: BlockSizes, layout="vd"):
    """float32 (dhidden, dweight, dbias or None) for dz as in ``logit_stats.dz_tile``, each tile
    recomputed once; dz is rounded once to the products' operand dtype (``gemm_operands``)."""
    n, ax = hidden.shape[0], vocab_axis(layout)
    v = weight.shape[ax]
    dh = jnp.zeros(hidden.shape, jnp.float32)
    dw = jnp.zeros(weight.shape, jnp.float32)
    db = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    if n == 0:
        return dh, dw, db
    bn, bv = _two_pass_blocks(blocks, n, v)
    gemm = cdt, prec = gemm_operands(blocks, jnp.promote_types(hidden.dtype, weight.dtype))

    def token_block(i, carry):
        dh, dw, db = carry
        start_n, own_n = _slide(i, bn, n)
        h, l, cm, gl, ii, cc = (_rows(x, start_n, bn) for x in (hidden, lse, comp, g_lse, ids, coef))
        gs = None if g_sum is None else _rows(g_sum, start_n, bn)

        def vocab_block(j, carry):
            dh_blk, dw, db = carry
            start, own = _slide(j, bv, v)
            z = apply_softcap(_raw_tile(h, weight, bias, start, bv, layout, gemm), softcap)
            dz = dz_tile(z, start + jnp.arange(bv), l, cm, gl, gs, tuple(ii.T), tuple(cc.T), softcap)[0]
            dz = jnp.where(own[None, :] & own_n[:, None], dz, 0.0)
            dz_op = dz.astype(cdt)
            dh_blk = dh_blk + head_back(dz_op, _rows(weight, start, bv, ax).astype(cdt), layout, prec)
            dw = jax.lax.dynamic_update_slice_in_dim(
                dw, _rows(dw, start, bv, ax) + head_outer(dz_op, h.astype(cdt), layout, prec), start, ax
            )
            if db is not None:
                db = jax.lax.dynamic_update_slice_in_dim(db, _rows(db, start, bv) + dz.sum(0), start, 0)
            return dh_blk, dw, db

        dh_blk, dw, db = jax.lax.fori_loop(0, -(-v // bv), vocab_block, (jnp.zeros(h.shape, jnp.float32), dw, db))
        dh_blk = jnp.where(own_n[:, None], dh_blk, _rows(dh, start_n, bn))
        return jax.lax.dynamic_update_slice_in_dim(dh, dh_blk, start_n, 0), dw, db

    return jax.lax.fori_loop(0, -(-n // bn), token_block, (dh, dw, db))


logit_stats = two_pass(Backend(forward, backward))


def _one_pass_block_n(blocks: BlockSizes, n, v):
    """Tokens per one-pass chunk: ``blocks.block_n``, else N split into the fewest equal chunks
    (rounded up to a multiple of 8) whose float32 ``[chunk, V]`` tile fits the tile budget."""
    if blocks.block_n:
        return min(blocks.block_n, n)
    chunks = -(-n // max(8, tile_budget(blocks) // (4 * v)))
    per_chunk = -(-n // chunks)
    return min(n, -(-per_chunk // 8) * 8)


def _stats_and_loss(loss_of, hidden, weight, bias, ids, tw, rows, softcap, need_sum, blocks, layout):
    """Forward only: two-pass statistics and the scalar loss (no gradient work)."""
    stats = logit_stats(hidden, weight, bias, ids, tw, softcap=softcap, need_sum=need_sum, blocks=blocks, layout=layout)
    return loss_of(stats, rows).sum(), stats


@partial(jax.custom_vjp, nondiff_argnums=(0, 7, 8, 9, 10))
def _one_pass(loss_of, hidden, weight, bias, ids, tw, rows, softcap, need_sum, blocks, layout):
    return _stats_and_loss(loss_of, hidden, weight, bias, ids, tw, rows, softcap, need_sum, blocks, layout)


def _one_pass_fwd(loss_of, hidden, weight, bias, ids, tw, rows, softcap, need_sum, blocks, layout):
    """The loss, its statistics and all gradients in one sweep over token chunks."""
    want_w, want_b = weight.perturbed, bias is not None and bias.perturbed
    hidden, weight, bias = hidden.value, weight.value, None if bias is None else bias.value
    ids, tw, rows = ids.value, tw.value, jax.tree.map(lambda x: x.value, rows)
    n, v = hidden.shape[0], weight.shape[vocab_axis(layout)]
    stats = LogitStats(*(jnp.zeros((n,), jnp.float32),) * 4, jnp.zeros((n,), jnp.int32))
    grads = (
        jnp.zeros(hidden.shape, hidden.dtype),
        jnp.zeros(weight.shape, jnp.float32) if want_w else None,
        jnp.zeros((v,), jnp.float32) if want_b else None,
        jnp.zeros(tw.shape, jnp.float32),
        jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32) if _is_float(x) else None, rows),
    )
    bn = _one_pass_block_n(blocks, n, v)
    cdt, prec = gemm_operands(blocks, jnp.promote_types(hidden.dtype, weight.dtype))
    w_op = weight.astype(cdt)  # no copy unless "float32" operands for a 16-bit head

    def chunk(i, carry):
        loss, stats, (dh, dw, db, dtw, drows) = carry
        start, own = _slide(i, bn, n)
        h, ii, ww = (_rows(x, start, bn) for x in (hidden, ids, tw))
        r = jax.tree.map(lambda x: _rows(x, start, bn), rows)
        h = h.astype(cdt)
        raw = head_logits(h, w_op, layout, prec)
        z = apply_softcap(raw if bias is None else raw + bias.astype(jnp.float32), softcap)
        lse = jax.nn.logsumexp(z, axis=-1)
        z_t = jnp.take_along_axis(z, ii, axis=-1)
        s = LogitStats(
            lse,
            z.sum(-1) if need_sum else jnp.zeros_like(lse),
            weighted_sum(ww, z_t),
            z.max(-1),
            jnp.argmax(z, -1).astype(jnp.int32),
        )
        per_token, vjp = jax.vjp(
            lambda l, t, u, r: loss_of(s._replace(lse=l, logit_sum=t, target=u), r), s.lse, s.logit_sum, s.target, r
        )
        g_lse, g_sum, g_t, g_r = vjp(own.astype(jnp.float32))
        g_sum = g_sum if need_sum else None
        coef = g_t[:, None] * ww
        cols = jnp.arange(v)
        comp = jnp.exp(z - lse[:, None]).sum(-1, where=cols[None, :] != ii[:, :1])
        h_live, lse_live, comp, live = live_rows(h, lse, comp, g_lse, g_sum, coef)
        dz = dz_tile(z, cols, lse_live, comp, g_lse, g_sum, tuple(ii.T), tuple(coef.T), softcap)[0]
        dz = jnp.where(live[:, None], dz, 0.0)
        dz_op = dz.astype(cdt)
        dh_c = head_back(dz_op, w_op, layout, prec).astype(dh.dtype)
        dh = jax.lax.dynamic_update_slice_in_dim(dh, jnp.where(own[:, None], dh_c, _rows(dh, start, bn)), start, 0)
        if want_w:
            dw = dw + head_outer(dz_op, h_live, layout, prec)
        if want_b:
            db = db + dz.sum(0)
        d_tw = g_t[:, None] * jnp.where((ww == 0) & jnp.isinf(z_t), 0.0, z_t)
        put = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
            acc, jnp.where(own.reshape(own.shape + (1,) * (x.ndim - 1)), x, _rows(acc, start, bn)), start, 0
        )
        dtw = put(dtw, d_tw)
        drows = jax.tree.map(
            lambda acc, x: None if acc is None else put(acc, x), drows, g_r, is_leaf=lambda x: x is None
        )
        stats = LogitStats(*(put(o, x) for o, x in zip(stats, s)))
        return loss + jnp.where(own, per_token, 0.0).sum(), stats, (dh, dw, db, dtw, drows)

    loss, stats, (dh, dw, db, dtw, drows) = jax.lax.fori_loop(
        0, -(-n // bn) if n else 0, chunk, (jnp.zeros((), jnp.float32), stats, grads)
    )
    grads = (
        dh,
        None if dw is None else dw.astype(weight.dtype),
        None if db is None else db.astype(bias.dtype),
        dtw.astype(tw.dtype),
        drows,
    )
    return (loss, stats), grads


def _is_float(x):
    return jnp.issubdtype(x.dtype, jnp.floating)


def _one_pass_bwd(loss_of, softcap, need_sum, blocks, layout, grads, ct):
    g = ct[0]
    scale = lambda x: None if x is None else (g * x).astype(x.dtype)
    dh, dw, db, dtw, drows = grads
    return scale(dh), scale(dw), scale(db), None, scale(dtw), jax.tree.map(scale, drows, is_leaf=lambda x: x is None)


_one_pass.defvjp(_one_pass_fwd, _one_pass_bwd, symbolic_zeros=True)


@partial(jax.custom_jvp, nondiff_argnums=(0, 7, 8, 9, 10))
def _scalar_loss(loss_of, hidden, weight, bias, ids, tw, rows, softcap, need_sum, blocks, layout):
    return _one_pass(loss_of, hidden, weight, bias, ids, tw, rows, softcap, need_sum, blocks, layout)


@_scalar_loss.defjvp
def _scalar_loss_jvp(loss_of, softcap, need_sum, blocks, layout, primals, tangents):
    """Forward mode of a scalar: ``<gradient, tangent>``, the gradient from the one-pass sweep.
    (Reverse mode transposes this linear map, so it also gets the one-pass gradients.)"""
    hidden, weight, bias, ids, tw, rows = primals
    f = lambda h, w, b, t, r: _one_pass(loss_of, h, w, b, ids, t, r, softcap, need_sum, blocks, layout)
    (loss, stats), vjp = jax.vjp(f, hidden, weight, bias, tw, rows)
    grads = vjp((jnp.ones((), loss.dtype), jax.tree.map(jnp.zeros_like, stats)))
    t_h, t_w, t_b, _, t_tw, t_rows = tangents
    dot = lambda g, t: (
        0.0
        if g is None or t is None or g.dtype == jax.dtypes.float0 or t.dtype == jax.dtypes.float0
        else jnp.vdot(g.astype(jnp.float32), t.astype(jnp.float32))
    )
    pairs = list(zip(grads[:4], (t_h, t_w, t_b, t_tw))) + list(zip(grads[4], t_rows))
    t_loss = sum(dot(g, t) for g, t in pairs)
    zero_stats = jax.tree.map(
        lambda x: jnp.zeros(x.shape, jax.dtypes.float0) if x.dtype == jnp.int32 else jnp.zeros_like(x), stats
    )
    return (loss, stats), (jnp.asarray(t_loss, loss.dtype), zero_stats)


def one_pass_loss(
    loss_of: Callable, hidden, weight, bias, ids, tw, rows, *, softcap, need_sum, blocks: BlockSizes, layout: str = "vd"
):
    """Scalar ``sum_n loss_of(stats, rows)[n]`` and its :class:`LogitStats` ``[N]`` (no gradient),
    with the gradients made in the forward sweep when differentiated (reverse or forward mode;
    twice, e.g. jax.hessian, through the sweep's own autodiff).

    loss_of(stats: LogitStats of a chunk, rows: the chunk's slice of ``rows``) -> float32
    per-token losses ``[chunk]``, already masked and scaled by the reduction; rows: a pytree of
    ``[N]``-leading arrays. hidden ``[N, D]``, weight ``[V, D]`` or ``[D, V]`` (``layout`` "vd" /
    "dv"; its gradient in the same layout, no transposed copy), bias ``[V]`` or None,
    ids ``[N, K]`` int32, tw ``[N, K]`` float32 target weights.
    """
    return _scalar_loss(loss_of, hidden, weight, bias, ids, tw, rows, softcap, need_sum, blocks, layout)
