"""Forward kernel: LogitStats of ``softcap(hidden @ weight.T + bias)`` without storing logits.

Grid ``(n_pad / bn, splits)``. Program ``(i, s)`` owns token block i and vocabulary split s
(``v_pad / (splits * bv)`` consecutive vocabulary blocks). A ``fori_loop`` walks those blocks;
each step builds one float32 ``[bn, bv]`` logit tile (itself a loop over D chunks,
``tiles.logit_tile``) and folds it into an online log-sum-exp with the running max, argmax and,
if asked, the logit sum. Each program writes only its own ``[bn]`` slice of the per-split
partials ``[splits, n_pad]``; ``merge_splits`` combines them (flash-decoding style, deterministic).
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ls_jax.logit_stats import excluded_lse
from .tiles import Plan, logit_tile, present, with_absent


def _kernel(p: Plan, h_ref, w_ref, b_ref, first_ref, lse_ref, sum_ref, max_ref, arg_ref, excl_ref):
    per_split = p.v_pad // (p.splits * p.bv)
    first_col = pl.program_id(1) * per_split * p.bv

    first = first_ref[...]

    def step(j, carry):
        m, l, total, best, excl = carry
        w_row = j * p.bv
        z, valid = logit_tile(h_ref, w_ref, b_ref, 0, w_row, first_col + w_row, p)
        z = jnp.where(valid, z, -jnp.inf)
        tile_max = z.max(axis=1)
        new_m = jnp.maximum(m, tile_max)
        # -inf when every logit so far is -inf (-inf bias, or a split of padded columns only)
        shift = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
        e, rescale = jnp.exp(z - shift[:, None]), jnp.exp(m - shift)
        l = l * rescale + e.sum(axis=1)
        cols = first_col + w_row + jax.lax.broadcasted_iota(jnp.int32, (1, p.bv), 1)
        excl = excl * rescale + jnp.where(cols == first[:, None], 0.0, e).sum(axis=1)
        if p.need_sum:
            total = total + jnp.where(valid, z, 0.0).sum(axis=1)
        tile_arg = first_col + w_row + jnp.argmax(z, axis=1).astype(jnp.int32)
        best = jnp.where(tile_max > m, tile_arg, best)  # strict: lowest index wins ties
        return new_m, l, total, best, excl

    zeros = jnp.zeros((p.bn,), jnp.float32)
    init = (jnp.full((p.bn,), -jnp.inf, jnp.float32), zeros, zeros, jnp.zeros((p.bn,), jnp.int32), zeros)
    m, l, total, best, excl = jax.lax.fori_loop(0, per_split, step, init)
    lse_ref[...] = m + jnp.log(l)
    sum_ref[...] = total
    max_ref[...] = m
    arg_ref[...] = best
    excl_ref[...] = excluded_lse(m, excl)


def forward_partials(h, w, b, first, p: Plan):
    """Per-split partials, each ``[splits, n_pad]``: lse, logit sum, max (float32), argmax (int32)
    and the lse without class ``first [n_pad]`` (int32) of padded hidden ``[n_pad, d_pad]``,
    weight ``p.head(v_pad, d_pad)``, bias ``[v_pad]`` or None."""
    per_split_rows = p.v_pad // p.splits
    inputs = [h, w, b, first]
    in_specs = [pl.BlockSpec((p.bn, p.d_pad), lambda i, s: (i, 0)),
                pl.BlockSpec(p.head(per_split_rows, p.d_pad), lambda i, s: p.head(s, 0)),
                pl.BlockSpec((per_split_rows,), lambda i, s: (s,)),
                pl.BlockSpec((p.bn,), lambda i, s: (i,))]
    part = pl.BlockSpec((None, p.bn), lambda i, s: (s, i))
    f32 = jax.ShapeDtypeStruct((p.splits, p.n_pad), jnp.float32)
    return pl.pallas_call(
        with_absent(partial(_kernel, p), inputs),
        out_shape=(f32, f32, f32, jax.ShapeDtypeStruct((p.splits, p.n_pad), jnp.int32), f32),
        grid=(p.n_pad // p.bn, p.splits),
        in_specs=present(in_specs, inputs),
        out_specs=(part,) * 5,
        compiler_params=p.compiler_params,
        interpret=p.interpret,
        name="logit_stats_fwd",
    )(*present(inputs, inputs))


def merge_splits(lse, total, mx, arg, excl):
    """Combine per-split partials ``[S, N]`` into (lse, logit_sum, max_logit, prediction,
    lse_excl) ``[N]`` (lowest argmax on ties)."""
    best_split = jnp.argmax(mx, axis=0)
    return (jax.nn.logsumexp(lse, axis=0), total.sum(0), mx.max(0),
            jnp.take_along_axis(arg, best_split[None], axis=0)[0], jax.nn.logsumexp(excl, axis=0))
