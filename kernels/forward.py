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

from ls_jax.logit_stats import online_fold, online_init, online_result

from .tiles import Plan, logit_tile, spec_for


def _kernel(p: Plan, h_ref, w_ref, b_ref, first_ref, lse_ref, sum_ref, max_ref, arg_ref, excl_ref):
    per_split = p.v_pad // (p.splits * p.block_v)
    first_col = pl.program_id(1) * per_split * p.block_v

    first = first_ref[...]

    def step(j, state):
        w_row = j * p.block_v
        z, valid = logit_tile(h_ref, w_ref, b_ref, 0, w_row, first_col + w_row, p)
        return online_fold(state, jnp.where(valid, z, -jnp.inf), valid, first_col + w_row, first, p.need_sum)

    stats = online_result(jax.lax.fori_loop(0, per_split, step, online_init(p.block_n)))
    for ref, x in zip((lse_ref, sum_ref, max_ref, arg_ref, excl_ref), stats):
        ref[...] = x


def forward_partials(h, w, b, first, p: Plan):
    """Per-split partials, each ``[splits, n_pad]``: lse, logit sum, max (float32), argmax (int32)
    and the lse without class ``first [n_pad]`` (int32) of padded hidden ``[n_pad, d_pad]``,
    weight ``p.head(v_pad, d_pad)``, bias ``[v_pad]`` or None."""
    per_split_rows = p.v_pad // p.splits
    in_specs = [
        pl.BlockSpec((p.block_n, p.d_pad), lambda i, s: (i, 0)),
        pl.BlockSpec(p.head(per_split_rows, p.d_pad), lambda i, s: p.head(s, 0)),
        spec_for(b, pl.BlockSpec((per_split_rows,), lambda i, s: (s,))),
        pl.BlockSpec((p.block_n,), lambda i, s: (i,)),
    ]
    part = pl.BlockSpec((None, p.block_n), lambda i, s: (s, i))
    f32 = jax.ShapeDtypeStruct((p.splits, p.n_pad), jnp.float32)
    return pl.pallas_call(
        partial(_kernel, p),
        out_shape=(f32, f32, f32, jax.ShapeDtypeStruct((p.splits, p.n_pad), jnp.int32), f32),
        grid=(p.n_pad // p.block_n, p.splits),
        in_specs=in_specs,
        out_specs=(part,) * 5,
        compiler_params=p.compiler_params,
        interpret=p.interpret,
        name="logit_stats_fwd",
    )(h, w, b, first)


def merge_splits(lse, total, mx, arg, excl):
    """Combine per-split partials ``[S, N]`` into (lse, logit_sum, max_logit, prediction,
    lse_excl) ``[N]`` (lowest argmax on ties)."""
    best_split = jnp.argmax(mx, axis=0)
    return (
        jax.nn.logsumexp(lse, axis=0),
        total.sum(0),
        mx.max(0),
        jnp.take_along_axis(arg, best_split[None], axis=0)[0],
        jax.nn.logsumexp(excl, axis=0),
    )
