"""Backward kernels: ``dz = (g_lse * softmax(z) + g_sum + the target term) * softcap'(raw)`` pulled back through
``hidden @ weight.T``, recomputing the logit tiles instead of storing them.

``Plan.backward == "two_kernel"`` (default): two kernels, no atomics, deterministic; each
program accumulates (fp32) only into the output block it owns, so no two programs ever write
the same memory; the logits are recomputed twice (8 N D V backward FLOPs):

* ``dh`` kernel, grid over token blocks: loop over vocabulary blocks; recompute the
  ``[bn, bv]`` logit tile (loop over D), form dz, and add ``dz @ W[blk]`` into the program's
  own ``[bn, d_pad]`` fp32 row slab of dh, one ``bd`` chunk at a time.
* ``dW`` kernel, grid over vocabulary blocks: loop over token blocks; recompute the tile, add
  ``dz.T @ h[blk]`` into the program's ``[block_v_dw, d_pad]`` slab of dW (``[d_pad, block_v_dw]`` for a
  ``[D, V]`` head: dW is written in the head's layout); dbias (``dz.sum(0)``) accumulates in
  registers. Its tile is ``Plan.for_dw()`` (few vocabulary rows, many tokens).

Every product with the head reads its block in the head's layout (``Plan.layout``) through the
dimension numbers of ``logit_stats.head_logits`` / ``head_back`` / ``head_outer``.

The slab is the fp32 accumulator because ``[bn, D]`` does not fit in registers for
D in the thousands and the Triton lowering has no scratch memory. Each kernel reads and
writes its slab once per streamed block: ``8 * N * D * V / bv`` bytes for dh and
``8 * N * D * V / block_n_dw`` for dW, which is why the streamed block is the large one. A barrier after each update
orders the slab's writes before the next iteration's reads by other threads of the program.

``Plan.backward == "atomic"``: one kernel, grid over (token block, vocabulary block); each
program recomputes its tile once and atomically adds ``dz @ W[blk]`` into dh and
``dz.T @ h[blk]`` into dW (and ``dz.sum(0)`` into dbias), fp32, zero-initialised
(6 N D V FLOPs; the order of the fp32 additions, hence the last bits, is not deterministic).

Gradient filtering (``Plan.filter_eps``): a tile whose softmax is below eps everywhere is
skipped (its dz is at most eps * |g_lse|). Only valid without the logit-sum cotangent
(``need_sum=False``), which adds a dense term to every element; the wrapper enforces that.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ls_jax.logit_stats import dz_tile, head_back, head_outer, vocab_axis

from .tiles import Plan, dot_precision, head_block, logit_tile, spec_for


def _dz_tile(h_ref, w_ref, b_ref, vec, h_row, w_row, w_col0, p: Plan):
    """float32 dz ``[bn, bv]`` of the recomputed logit tile (``logit_stats.dz_tile``; zero on padded
    columns), and whether the tile counts: a traced bool when filtering (some softmax value >= eps,
    or a target class in the tile), else None. ``vec``: the token rows' lse, comp, g_lse, g_sum
    (None unless need_sum) ``[bn]``, and K-lists of ids and coef ``[bn]``."""
    lse, comp, g_lse, g_sum, ids, coef = vec
    z, valid = logit_tile(h_ref, w_ref, b_ref, h_row, w_row, w_col0, p)
    cols = w_col0 + jax.lax.broadcasted_iota(jnp.int32, (1, p.block_v), 1)
    dz, prob, hit = dz_tile(z, cols, lse, comp, g_lse, g_sum, ids, coef, p.softcap, valid)
    if p.filter_eps is None:
        return dz, None
    keep = (prob.max(axis=1).max(axis=0) >= p.filter_eps) | (hit.astype(jnp.int32).max(axis=1).max(axis=0) > 0)
    return dz, keep


def _vectors(lse_ref, comp_ref, g_lse_ref, g_sum_ref, ids_ref, coef_ref, rows):
    """The per-token vectors of ``rows`` (a slice, or ``...`` for the whole block)."""
    k = range(ids_ref.shape[0])
    return (
        lse_ref[rows],
        comp_ref[rows],
        g_lse_ref[rows],
        None if g_sum_ref is None else g_sum_ref[rows],
        [ids_ref[i, rows] for i in k],
        [coef_ref[i, rows] for i in k],
    )


def _d_axis(head: bool, p: Plan) -> int:
    """The D axis of a slab: dh's ``[bn, d_pad]`` (1), or dW's in the head's layout."""
    return 1 - vocab_axis(p.layout) if head else 1


def _over_chunks(out_ref, new_chunk, head: bool, p: Plan):
    """``out_ref[chunk] = new_chunk(chunk)`` for every ``bd`` chunk of the slab's D axis (see
    ``_d_axis``), then (on the GPU) a barrier, so that the next reads of the slab by other
    threads see these writes."""
    axis = _d_axis(head, p)

    def chunk(k, _):
        cols = pl.ds(pl.multiple_of(k * p.block_d, p.block_d), p.block_d)
        at = (slice(None), cols) if axis == 1 else (cols, slice(None))
        out_ref[at] = new_chunk(at, cols)

    jax.lax.fori_loop(0, p.d_pad // p.block_d, chunk, None)
    if not p.interpret:
        plgpu.debug_barrier()


def _zero(out_ref, head: bool, p: Plan):
    shape = tuple(p.block_d if a == _d_axis(head, p) else s for a, s in enumerate(out_ref.shape))
    _over_chunks(out_ref, lambda at, cols: jnp.zeros(shape, out_ref.dtype), head, p)


def _add_chunks(out_ref, product, keep, head: bool, p: Plan):
    """``out_ref[chunk] += product(cols)`` over D, only if ``keep`` (a traced bool; None: always)."""
    add = lambda: _over_chunks(out_ref, lambda at, cols: out_ref[at] + product(cols), head, p)
    if keep is None:
        add()
    else:
        pl.when(keep)(add)


def _dh_kernel(p: Plan, h_ref, w_ref, b_ref, lse_ref, comp_ref, g_lse_ref, g_sum_ref, ids_ref, coef_ref, dh_ref):
    vec = _vectors(lse_ref, comp_ref, g_lse_ref, g_sum_ref, ids_ref, coef_ref, slice(None))
    prec = dot_precision(w_ref.dtype)
    _zero(dh_ref, False, p)

    def step(j, _):
        w_row = j * p.block_v
        dz, keep = _dz_tile(h_ref, w_ref, b_ref, vec, 0, w_row, w_row, p)
        dz = dz.astype(w_ref.dtype)
        _add_chunks(
            dh_ref, lambda cols: head_back(dz, head_block(w_ref, w_row, w_row, cols, p), p.layout, prec), keep, False, p
        )

    jax.lax.fori_loop(0, p.v_pad // p.block_v, step, None)


def _dw_kernel(
    p: Plan, h_ref, w_ref, b_ref, lse_ref, comp_ref, g_lse_ref, g_sum_ref, ids_ref, coef_ref, dw_ref, db_ref
):
    prec = dot_precision(h_ref.dtype)
    w_col0 = pl.program_id(0) * p.block_v
    _zero(dw_ref, True, p)

    def step(i, db):
        rows = pl.ds(pl.multiple_of(i * p.block_n, p.block_n), p.block_n)
        vec = _vectors(lse_ref, comp_ref, g_lse_ref, g_sum_ref, ids_ref, coef_ref, rows)
        dz, keep = _dz_tile(h_ref, w_ref, b_ref, vec, i * p.block_n, 0, w_col0, p)
        dz_lo = dz.astype(h_ref.dtype)
        _add_chunks(dw_ref, lambda cols: head_outer(dz_lo, h_ref[rows, cols], p.layout, prec), keep, True, p)
        return db + dz.sum(axis=0) if db_ref is not None else db

    db = jax.lax.fori_loop(0, p.n_pad // p.block_n, step, jnp.zeros((p.block_v,), jnp.float32))
    if db_ref is not None:
        db_ref[...] = db


def _atomic_kernel(
    p: Plan,
    h_ref,
    w_ref,
    b_ref,
    lse_ref,
    comp_ref,
    g_lse_ref,
    g_sum_ref,
    ids_ref,
    coef_ref,
    dh_in,
    dw_in,
    db_in,
    dh_ref,
    dw_ref,
    db_ref,
):
    """dh_ref, dw_ref, db_ref: whole zero-initialised outputs aliased to dh_in, dw_in, db_in."""
    prec = dot_precision(h_ref.dtype)
    i, j = pl.program_id(0), pl.program_id(1)
    vec = _vectors(lse_ref, comp_ref, g_lse_ref, g_sum_ref, ids_ref, coef_ref, slice(None))
    dz, keep = _dz_tile(h_ref, w_ref, b_ref, vec, 0, 0, j * p.block_v, p)
    dz_lo = dz.astype(h_ref.dtype)
    rows, vrows = pl.ds(i * p.block_n, p.block_n), pl.ds(j * p.block_v, p.block_v)

    def chunk(k, _):
        cols = pl.ds(pl.multiple_of(k * p.block_d, p.block_d), p.block_d)
        plgpu.atomic_add(
            dh_ref, (rows, cols), head_back(dz_lo, head_block(w_ref, 0, j * p.block_v, cols, p), p.layout, prec)
        )
        plgpu.atomic_add(dw_ref, p.head(vrows, cols), head_outer(dz_lo, h_ref[:, cols], p.layout, prec))

    add = lambda: jax.lax.fori_loop(0, p.d_pad // p.block_d, chunk, None)
    if keep is None:
        add()
    else:
        pl.when(keep)(add)
    if db_ref is not None:
        plgpu.atomic_add(db_ref, (vrows,), dz.sum(axis=0))


def _backward_atomic(h, w, b, vecs, p: Plan):
    zeros = [
        jnp.zeros((p.n_pad, p.d_pad), jnp.float32),
        jnp.zeros(p.head(p.v_pad, p.d_pad), jnp.float32),
        None if b is None else jnp.zeros((p.v_pad,), jnp.float32),
    ]
    lse, comp, g_lse, g_sum, ids, coef = vecs
    by_token = lambda shape: pl.BlockSpec(shape, lambda i, j: (i,) + (0,) * (len(shape) - 1))
    by_vocab = lambda shape: pl.BlockSpec(shape, lambda i, j: (j,) + (0,) * (len(shape) - 1))
    by_token_k = pl.BlockSpec((ids.shape[0], p.block_n), lambda i, j: (0, i))
    whole = lambda x: None if x is None else pl.BlockSpec(x.shape, lambda i, j: (0,) * x.ndim)  # absent: None
    inputs = [h, w, b, *vecs, *zeros]
    head_blocks = pl.BlockSpec(p.head(p.block_v, p.d_pad), lambda i, j: p.head(j, 0))
    specs = [
        by_token((p.block_n, p.d_pad)),
        head_blocks,
        spec_for(b, by_vocab((p.block_v,))),
        *[by_token((p.block_n,))] * 3,
        spec_for(g_sum, by_token((p.block_n,))),
        by_token_k,
        by_token_k,
        *(whole(z) for z in zeros),
    ]
    n_in, n_out = sum(x is not None for x in inputs), sum(z is not None for z in zeros)
    return pl.pallas_call(
        partial(_atomic_kernel, p),
        out_shape=tuple(None if z is None else jax.ShapeDtypeStruct(z.shape, z.dtype) for z in zeros),
        grid=(p.n_pad // p.block_n, p.v_pad // p.block_v),
        in_specs=specs,
        out_specs=tuple(whole(z) for z in zeros),
        input_output_aliases={n_in - n_out + k: k for k in range(n_out)},  # flat indices: absent inputs skipped
        compiler_params=p._replace(num_stages=2).compiler_params,  # 3 stages overflow 227 KB
        interpret=p.interpret,
        name="logit_stats_bwd_atomic",
    )(*inputs)


def backward(h, w, b, lse, comp, g_lse, g_sum, ids, coef, p: Plan):
    """fp32 ``(dh [n_pad, d_pad], dW p.head(v_pad, d_pad), db [v_pad] or None)`` for padded inputs:
    hidden, weight, bias as in ``forward_partials``; lse, comp, g_lse, g_sum (None unless
    need_sum) float32 ``[n_pad]``; target ids int32 and coef float32 ``[K, n_pad]`` (zero cotangents and
    coefficients on padded rows); by ``p.backward``'s kernels. An absent bias or g_sum has a None
    BlockSpec (``tiles.spec_for``) and reaches the kernel as a None ref."""
    vecs = [lse, comp, g_lse, g_sum, ids, coef]
    if p.backward == "atomic":
        return _backward_atomic(h, w, b, vecs, p)
    k = ids.shape[0]
    inputs = [h, w, b, *vecs]
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    blocked = lambda shape: pl.BlockSpec(shape, lambda i: (i,) + (0,) * (len(shape) - 1))
    dh = pl.pallas_call(
        partial(_dh_kernel, p),
        out_shape=jax.ShapeDtypeStruct((p.n_pad, p.d_pad), jnp.float32),
        grid=(p.n_pad // p.block_n,),
        in_specs=[
            blocked((p.block_n, p.d_pad)),
            whole(p.head(p.v_pad, p.d_pad)),
            spec_for(b, whole((p.v_pad,))),
            *[blocked((p.block_n,))] * 3,
            spec_for(g_sum, blocked((p.block_n,))),
            *[pl.BlockSpec((k, p.block_n), lambda i: (0, i))] * 2,
        ],
        out_specs=blocked((p.block_n, p.d_pad)),
        compiler_params=p.compiler_params,
        interpret=p.interpret,
        name="logit_stats_bwd_dh",
    )(*inputs)

    q = p.for_dw()
    head_blocks = pl.BlockSpec(q.head(q.block_v, q.d_pad), lambda i: q.head(i, 0))
    dw, db = pl.pallas_call(
        partial(_dw_kernel, q),
        out_shape=(
            jax.ShapeDtypeStruct(q.head(q.v_pad, q.d_pad), jnp.float32),
            spec_for(b, jax.ShapeDtypeStruct((q.v_pad,), jnp.float32)),
        ),
        grid=(q.v_pad // q.block_v,),
        in_specs=[
            whole((q.n_pad, q.d_pad)),
            head_blocks,
            spec_for(b, blocked((q.block_v,))),
            *[whole((q.n_pad,))] * 3,
            spec_for(g_sum, whole((q.n_pad,))),
            *[whole((k, q.n_pad))] * 2,
        ],
        out_specs=(head_blocks, spec_for(b, blocked((q.block_v,)))),
        compiler_params=q.compiler_params,
        interpret=q.interpret,
        name="logit_stats_bwd_dw",
    )(*inputs)
    return dh, dw, db
