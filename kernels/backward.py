"""Backward kernels: ``dz = (g_lse * softmax(z) + g_sum) * softcap'(raw)`` pulled back through
``hidden @ weight.T``, recomputing the logit tiles instead of storing them.

``Plan.backward == "two_kernel"`` (default): two kernels, no atomics, deterministic; each
program accumulates (fp32) only into the output block it owns, so no two programs ever write
the same memory; the logits are recomputed twice (8 N D V backward FLOPs):

* ``dh`` kernel, grid over token blocks: loop over vocabulary blocks; recompute the
  ``[bn, bv]`` logit tile (loop over D), form dz, and add ``dz @ W[blk]`` into the program's
  own ``[bn, d_pad]`` fp32 row slab of dh, one ``bd`` chunk at a time.
* ``dW`` kernel, grid over vocabulary blocks: loop over token blocks; recompute the tile, add
  ``dz.T @ h[blk]`` into the program's ``[dw_bv, d_pad]`` slab of dW; dbias (``dz.sum(0)``)
  accumulates in registers. Its tile is ``Plan.for_dw()`` (few vocabulary rows, many tokens).

The slab is the fp32 accumulator because ``[bn, D]`` does not fit in registers for
D in the thousands and the Triton lowering has no scratch memory. Each kernel reads and
writes its slab once per streamed block: ``8 * N * D * V / bv`` bytes for dh and
``8 * N * D * V / dw_bn`` for dW, which is why the streamed block is the large one. A barrier after each update
orders the slab's writes before the next iteration's reads by other threads of the program.

``Plan.backward == "atomic"``: one kernel, grid over (token block, vocabulary block); each
program recomputes its tile once and atomically adds ``dz @ W[blk]`` into dh and
``dz.T @ h[blk]`` into dW (and ``dz.sum(0)`` into dbias), fp32, zero-initialised
(6 N D V FLOPs; the order of the fp32 additions, hence the last bits, is not deterministic).

Gradient filtering (``Plan.filter_eps``): a tile whose softmax is below eps everywhere is
skipped (its dz is at most eps * |g_lse|). Only valid without the logit-sum cotangent
(``need_sum=False``), which adds a dense term to every element; the wrapper enforces that.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .tiles import Plan, dot_precision, logit_tile


def _dz_tile(h_ref, w_ref, b_ref, lse, g_lse, g_sum, h_row, w_row, w_col0, p: Plan):
    """float32 dz ``[bn, bv]`` (zero on padded columns), and whether the tile counts: a traced
    bool when filtering (some softmax value >= eps), else None."""
    z, valid = logit_tile(h_ref, w_ref, b_ref, h_row, w_row, w_col0, p)
    prob = jnp.where(valid, jnp.exp(z - lse[:, None]), 0.0)
    dz = g_lse[:, None] * prob
    if p.need_sum:
        dz = dz + jnp.where(valid, g_sum[:, None], 0.0)
    if p.softcap is not None:
        dz = dz * (1.0 - jnp.square(z / p.softcap))
    keep = None if p.filter_eps is None else prob.max(axis=1).max(axis=0) >= p.filter_eps
    return dz, keep


def _over_chunks(out_ref, new_chunk, p: Plan):
    """``out_ref[:, cols] = new_chunk(cols)`` for every ``bd`` chunk of D, then (on the GPU)
    a barrier, so that the next reads of the slab by other threads see these writes."""

    def chunk(k, _):
        cols = pl.ds(pl.multiple_of(k * p.bd, p.bd), p.bd)
        out_ref[:, cols] = new_chunk(cols)

    jax.lax.fori_loop(0, p.d_pad // p.bd, chunk, None)
    if not p.interpret:
        plgpu.debug_barrier()


def _zero(out_ref, p: Plan):
    _over_chunks(out_ref, lambda cols: jnp.zeros((out_ref.shape[0], p.bd), out_ref.dtype), p)


def _add_chunks(out_ref, product, keep, p: Plan):
    """``out_ref[:, cols] += product(cols)`` over D, only if ``keep`` (a traced bool; None: always)."""
    add = lambda: _over_chunks(out_ref, lambda cols: out_ref[:, cols] + product(cols), p)
    if keep is None:
        add()
    else:
        pl.when(keep)(add)


def _dh_kernel(p: Plan, has_bias, h_ref, w_ref, *refs):
    b_ref = refs[0] if has_bias else None
    lse_ref, g_lse_ref = refs[has_bias], refs[has_bias + 1]
    g_sum = refs[has_bias + 2][...] if p.need_sum else None
    dh_ref = refs[-1]
    lse, g_lse = lse_ref[...], g_lse_ref[...]
    prec = dot_precision(w_ref.dtype)
    _zero(dh_ref, p)

    def step(j, _):
        w_row = j * p.bv
        dz, keep = _dz_tile(h_ref, w_ref, b_ref, lse, g_lse, g_sum, 0, w_row, w_row, p)
        dz = dz.astype(w_ref.dtype)
        _add_chunks(dh_ref, lambda cols: jnp.dot(
            dz, w_ref[pl.ds(w_row, p.bv), cols], precision=prec,
            preferred_element_type=jnp.float32), keep, p)

    jax.lax.fori_loop(0, p.v_pad // p.bv, step, None)


def _dw_kernel(p: Plan, has_bias, h_ref, w_ref, *refs):
    b_ref = refs[0] if has_bias else None
    lse_ref, g_lse_ref = refs[has_bias], refs[has_bias + 1]
    g_sum_ref = refs[has_bias + 2] if p.need_sum else None
    dw_ref = refs[-2] if has_bias else refs[-1]
    prec = dot_precision(h_ref.dtype)
    w_col0 = pl.program_id(0) * p.bv
    _zero(dw_ref, p)

    def step(i, db):
        rows = pl.ds(pl.multiple_of(i * p.bn, p.bn), p.bn)
        g_sum = g_sum_ref[rows] if p.need_sum else None
        dz, keep = _dz_tile(h_ref, w_ref, b_ref, lse_ref[rows], g_lse_ref[rows], g_sum,
                            i * p.bn, 0, w_col0, p)
        dz_lo = dz.astype(h_ref.dtype)
        _add_chunks(dw_ref, lambda cols: jax.lax.dot_general(
            dz_lo, h_ref[rows, cols], (((0,), (0,)), ((), ())), precision=prec,
            preferred_element_type=jnp.float32), keep, p)
        return db + dz.sum(axis=0) if has_bias else db

    db = jax.lax.fori_loop(0, p.n_pad // p.bn, step, jnp.zeros((p.bv,), jnp.float32))
    if has_bias:
        refs[-1][...] = db


def _atomic_kernel(p: Plan, has_bias, h_ref, w_ref, *refs):
    b_ref = refs[0] if has_bias else None
    lse_ref, g_lse_ref = refs[has_bias], refs[has_bias + 1]
    g_sum = refs[has_bias + 2][...] if p.need_sum else None
    dh_ref, dw_ref = refs[-2 - has_bias], refs[-1 - has_bias]  # aliased outputs, whole arrays
    prec = dot_precision(h_ref.dtype)
    i, j = pl.program_id(0), pl.program_id(1)
    dz, keep = _dz_tile(h_ref, w_ref, b_ref, lse_ref[...], g_lse_ref[...], g_sum, 0, 0, j * p.bv, p)
    dz_lo = dz.astype(h_ref.dtype)
    rows, vrows = pl.ds(i * p.bn, p.bn), pl.ds(j * p.bv, p.bv)

    def chunk(k, _):
        cols = pl.ds(pl.multiple_of(k * p.bd, p.bd), p.bd)
        plgpu.atomic_add(dh_ref, (rows, cols), jnp.dot(
            dz_lo, w_ref[:, cols], precision=prec, preferred_element_type=jnp.float32))
        plgpu.atomic_add(dw_ref, (vrows, cols), jax.lax.dot_general(
            dz_lo, h_ref[:, cols], (((0,), (0,)), ((), ())), precision=prec,
            preferred_element_type=jnp.float32))

    add = lambda: jax.lax.fori_loop(0, p.d_pad // p.bd, chunk, None)
    if keep is None:
        add()
    else:
        pl.when(keep)(add)
    if has_bias:
        plgpu.atomic_add(refs[-1], (vrows,), dz.sum(axis=0))


def _backward_atomic(h, w, b, vecs, p: Plan):
    has_bias = b is not None
    bias_args = [b] if has_bias else []
    zeros = [jnp.zeros((p.n_pad, p.d_pad), jnp.float32), jnp.zeros((p.v_pad, p.d_pad), jnp.float32)]
    zeros += [jnp.zeros((p.v_pad,), jnp.float32)] * has_bias
    by_token = lambda shape: pl.BlockSpec(shape, lambda i, j: (i,) + (0,) * (len(shape) - 1))
    by_vocab = lambda shape: pl.BlockSpec(shape, lambda i, j: (j,) + (0,) * (len(shape) - 1))
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, j: (0,) * x.ndim)
    n_in = 2 + has_bias + len(vecs)
    out = pl.pallas_call(
        lambda *refs: _atomic_kernel(p, has_bias, *refs[:n_in], *refs[n_in + len(zeros):]),
        out_shape=tuple(jax.ShapeDtypeStruct(z.shape, z.dtype) for z in zeros),
        grid=(p.n_pad // p.bn, p.v_pad // p.bv),
        in_specs=[by_token((p.bn, p.d_pad)), by_vocab((p.bv, p.d_pad))]
        + [by_vocab((p.bv,))] * has_bias + [by_token((p.bn,))] * len(vecs)
        + [whole(z) for z in zeros],
        out_specs=tuple(whole(z) for z in zeros),
        input_output_aliases={n_in + k: k for k in range(len(zeros))},
        compiler_params=p._replace(num_stages=2).compiler_params,  # 3 stages overflow 227 KB
        interpret=p.interpret,
        name="logit_stats_bwd_atomic",
    )(h, w, *bias_args, *vecs, *zeros)
    return out[0], out[1], out[2] if has_bias else None


def backward(h, w, b, lse, g_lse, g_sum, p: Plan):
    """fp32 ``(dh [n_pad, d_pad], dW [v_pad, d_pad], db [v_pad] or None)`` for padded inputs:
    hidden, weight, bias as in ``forward_partials``; lse, g_lse, g_sum (None unless need_sum)
    float32 ``[n_pad]`` (zero cotangents on padded rows); by ``p.backward``'s kernels."""
    vecs = [lse, g_lse] + ([g_sum] if p.need_sum else [])
    if p.backward == "atomic":
        return _backward_atomic(h, w, b, vecs, p)
    has_bias = b is not None
    bias_args = [b] if has_bias else []

    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    blocked = lambda shape: pl.BlockSpec(shape, lambda i: (i,) + (0,) * (len(shape) - 1))
    dh = pl.pallas_call(
        lambda *refs: _dh_kernel(p, has_bias, *refs),
        out_shape=jax.ShapeDtypeStruct((p.n_pad, p.d_pad), jnp.float32),
        grid=(p.n_pad // p.bn,),
        in_specs=[blocked((p.bn, p.d_pad)), whole((p.v_pad, p.d_pad))]
        + [whole((p.v_pad,))] * has_bias + [blocked((p.bn,))] * len(vecs),
        out_specs=blocked((p.bn, p.d_pad)),
        compiler_params=p.compiler_params,
        interpret=p.interpret,
        name="logit_stats_bwd_dh",
    )(h, w, *bias_args, *vecs)

    q = p.for_dw()
    dw_out = [jax.ShapeDtypeStruct((q.v_pad, q.d_pad), jnp.float32)]
    dw_specs = [blocked((q.bv, q.d_pad))]
    if has_bias:
        dw_out.append(jax.ShapeDtypeStruct((q.v_pad,), jnp.float32))
        dw_specs.append(blocked((q.bv,)))
    dw = pl.pallas_call(
        lambda *refs: _dw_kernel(q, has_bias, *refs),
        out_shape=tuple(dw_out),
        grid=(q.v_pad // q.bv,),
        in_specs=[whole((q.n_pad, q.d_pad)), blocked((q.bv, q.d_pad))]
        + [blocked((q.bv,))] * has_bias + [whole((q.n_pad,))] * len(vecs),
        out_specs=tuple(dw_specs),
        compiler_params=q.compiler_params,
        interpret=q.interpret,
        name="logit_stats_bwd_dw",
    )(h, w, *bias_args, *vecs)
    return dh, dw[0], dw[1] if has_bias else None
