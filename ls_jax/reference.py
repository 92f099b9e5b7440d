"""``impl="reference"``: dense logits and plain autodiff, the oracle for gradient checks.

Materialises the float32 ``[N, V]`` logits (and autodiff keeps them for the backward): use it
for small problems and tests, never for a large vocabulary. Differentiable to any order and
in forward mode (jax.jvp, jax.hessian).
"""

import jax
import jax.numpy as jnp

from ls_jax.logit_stats import LogitStats, dense_logits, weighted_sum


def stats_from_logits(z, target, need_sum: bool) -> LogitStats:
    """LogitStats of float32 logits ``z [N, V]`` (capped) given the target term ``[N]``."""
    lse = jax.nn.logsumexp(z, axis=-1)
    logit_sum = z.sum(-1) if need_sum else jnp.zeros_like(lse)
    zs = jax.lax.stop_gradient(z)
    return LogitStats(lse, logit_sum, target, zs.max(-1), jnp.argmax(zs, axis=-1).astype(jnp.int32))


def logit_stats(hidden, weight, bias, ids, tw, *, softcap=None, need_sum=False, blocks=None, layout="vd") -> LogitStats:
    """LogitStats ``[N]`` of ``softcap(hidden [N, D] @ W.T + bias [V])``, W the head ``weight`` in
    ``layout`` ([V, D] "vd" or [D, V] "dv"), with targets ``ids [N, K]``, ``tw [N, K]``;
    ``blocks`` is ignored (nothing is blocked)."""
    z = dense_logits(hidden, weight, bias, softcap, layout)
    return stats_from_logits(z, weighted_sum(tw, jnp.take_along_axis(z, ids, axis=-1)), need_sum)
