"""Temperature scaling: the temperature that minimises held-out NLL, and its application."""

import jax
import jax.numpy as jnp

from ls_jax.calibration.metrics import _check, _metric, _nll_per_sample


@_metric("iters")
def fit_temperature(logits, labels, *, where=None, weights=None, bounds=(1e-2, 1e2), iters: int = 64):
    """Temperature T > 0 (float32 scalar) minimising the mean NLL of ``softmax(logits / T)``.

    logits [N, K], labels [N] (held-out data); weights: float [N], each sample's weight in the
    NLL (default 1; e.g. the tokens of a weighted answer, its probability). The NLL is convex
    in 1/T, so its derivative in log T changes sign once: bisection on that sign over
    ``bounds`` (then clipped to them; a perfectly separable set drives T to the lower bound).
    ``iters`` halvings of log-range.
    """
    z, labels, valid = _check(logits, labels, where)
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)

    def nll_sum(log_t):
        nll = _nll_per_sample(z * jnp.exp(-log_t), labels, True)
        return jnp.where(valid, nll * w, 0.0).sum()

    def step(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        rising = jax.grad(nll_sum)(mid) >= 0  # 0: the NLL is flat (rounded to 0 in float32) below mid
        return jnp.where(rising, lo, mid), jnp.where(rising, mid, hi)

    lo, hi = jnp.log(jnp.asarray(bounds, jnp.float32))
    lo, hi = jax.lax.fori_loop(0, iters, step, (lo, hi))
    return jnp.exp(0.5 * (lo + hi))


def apply_temperature(logits, temperature):
    """Temperature-scaled logits ``logits / temperature`` (same shape, float32)."""
    return jnp.asarray(logits, jnp.float32) / temperature
