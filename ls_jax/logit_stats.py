"""The seam between the loss and its implementations: per-token statistics of the logits.

Every implementation (``reference``, ``xla``, ``pallas``) computes, for
``z = softcap(hidden @ weight.T + bias)``, without the loss ever seeing ``z``:

* ``lse[n]       = log sum_v exp(z[n, v])``                    (differentiable)
* ``logit_sum[n] = sum_v z[n, v]``  (only when asked; else 0)    (differentiable)
* ``max_logit[n] = max_v z[n, v]`` and ``argmax[n]``             (no gradient)

Their vector-Jacobian product, for cotangents ``g_lse`` and ``g_sum`` (both ``[N]``), is
``dz[n, v] = (g_lse[n] * softmax(z)[n, v] + g_sum[n]) * softcap'(raw[n, v])`` pulled back
through the matmul: ``dhidden = dz @ weight``, ``dweight = dz.T @ hidden``,
``dbias = dz.sum(0)``. Everything else in the loss (target logits, the rank-1 smoothing
term without softcap, z-loss, masking) is plain jnp on top of these statistics.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class LogitStats(NamedTuple):
    """Per-token statistics of the logits; every field has shape ``[N]``.

    lse, logit_sum, max_logit: float32. argmax: int32 (lowest index on ties).
    max_logit and argmax carry no gradient (treat them as ``stop_gradient``).
    """

    lse: jax.Array
    logit_sum: jax.Array
    max_logit: jax.Array
    argmax: jax.Array


def apply_softcap(raw: jax.Array, softcap: Optional[float]) -> jax.Array:
    """``softcap * tanh(raw / softcap)``, or ``raw`` when ``softcap`` is None. Any shape."""
    if softcap is None:
        return raw
    return softcap * jnp.tanh(raw / softcap)


def dense_logits(hidden, weight, bias, logit_softcap=None) -> jax.Array:
    """float32 logits ``[N, V]`` = softcap(hidden [N, D] @ weight [V, D].T + bias [V])."""
    z = jnp.einsum("nd,vd->nv", hidden, weight, preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + bias.astype(jnp.float32)
    return apply_softcap(z, logit_softcap)


def stats_from_logits(z: jax.Array, need_sum: bool) -> LogitStats:
    """LogitStats of materialised float32 logits ``z [N, V]`` (differentiable by autodiff)."""
    lse = jax.nn.logsumexp(z, axis=-1)
    logit_sum = z.sum(-1) if need_sum else jnp.zeros_like(lse)
    max_logit = jax.lax.stop_gradient(z.max(-1))
    argmax = jnp.argmax(jax.lax.stop_gradient(z), axis=-1).astype(jnp.int32)
    return LogitStats(lse, logit_sum, max_logit, argmax)


def reference_logit_stats(hidden, weight, bias=None, *, logit_softcap=None, need_sum=False) -> LogitStats:
    """Dense oracle: materialises the ``[N, V]`` float32 logits; gradients by plain autodiff."""
    return stats_from_logits(dense_logits(hidden, weight, bias, logit_softcap), need_sum)
