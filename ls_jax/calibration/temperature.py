"""Temperature scaling: the temperature that minimises held-out NLL, and its application."""

import jax
import jax.numpy as jnp

from ls_jax.calibration.metrics import _check, _metric, _nll_per_sample


@_metric("iters")
def fit_temperature(logits, labels, *, where=None, weights=None, bounds=(1e-2, 1e2), iters: int = 64):
    """The temperature T > 0 minimising the (weighted) NLL of ``softmax(logits / T)`` on held-out data.

    The NLL is convex in 1/T, so its derivative in log T changes sign once: bisection on that sign
    over ``bounds`` (then clipped to them; a perfectly separable set drives T to the lower bound).

    Args:
      logits: float ``[N, K]``.
      labels: int ``[N]``, class ids in ``[0, K)``.
      where: bool ``[N]``, the samples to use (default all).
      weights: float ``[N]``, each sample's weight in the NLL (default 1; e.g. the tokens of a
        weighted answer, its probability).
      bounds: ``(lowest, highest)`` temperature searched.
      iters: halvings of the log-range (static).

    Returns:
      float32 scalar, the temperature.

    Raises:
      ValueError: ``logits`` is not ``[N, K]`` or ``labels`` not ``[N]`` integers, or a label (when
        concrete: not under an outer jit) lies outside ``[0, K)``.

    Examples:
      >>> import numpy as np
      >>> from ls_jax import calibration
      >>> probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
      >>> labels = np.array([0, 0, 2, 1])
      >>> overconfident = 3 * np.log(probs)
      >>> t = calibration.fit_temperature(overconfident, labels)
      >>> print(round(float(t), 3))
      1.583
      >>> nll = calibration.negative_log_likelihood
      >>> scaled = calibration.apply_temperature(overconfident, t)
      >>> bool(nll(scaled, labels, from_logits=True) < nll(overconfident, labels, from_logits=True))
      True
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
    """Temperature-scaled logits ``logits / temperature``.

    Args:
      logits: float ``[..., K]``.
      temperature: scalar > 0 (e.g. from :func:`fit_temperature`).

    Returns:
      float32, the shape of ``logits``.

    Examples:
      >>> from ls_jax.calibration import apply_temperature
      >>> print(apply_temperature([[2.0, 0.0, -1.0]], 2.0).tolist())
      [[1.0, 0.0, -0.5]]
    """
    return jnp.asarray(logits, jnp.float32) / temperature
