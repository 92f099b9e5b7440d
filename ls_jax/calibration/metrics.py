"""Calibration metrics of scores and labels: calibration errors, Brier score, NLL, accuracy.

Everything is jnp and jit-able (numpy inputs work too); ``N`` samples, ``K`` classes.
``scores`` are probabilities ``[N, K]``, or logits when ``from_logits=True``. Binning
conventions: :mod:`ls_jax.calibration.bins`.
"""

from functools import wraps

import jax
import jax.numpy as jnp

from ls_jax.calibration.bins import bin_statistics, errors_from_bins
from ls_jax.targets import is_concrete

NORMS = ("l1", "l2", "max")


def _check(scores, labels, where):
    """scores [N, K] float32, labels [N] int32, valid [N] bool; ValueError on bad shapes/values."""
    scores, labels = jnp.asarray(scores), jnp.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"need scores [N, K] and labels [N]; got {scores.shape} and {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
    if is_concrete(labels) and labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}), got [{labels.min()}, {labels.max()}]")
    valid = jnp.ones(labels.shape, bool) if where is None else jnp.broadcast_to(jnp.asarray(where, bool), labels.shape)
    return scores.astype(jnp.float32), labels.astype(jnp.int32), valid


def _metric(*static):
    """jit with ``static`` keyword arguments, after checking concrete labels' range (skipped
    when called under an outer jit: out-of-range labels then give unspecified values)."""

    def wrap(fn):
        jitted = jax.jit(fn, static_argnames=static)

        @wraps(fn)
        def checked(scores, labels, **kwargs):
            _check(scores, labels, kwargs.get("where"))
            return jitted(scores, labels, **kwargs)

        return checked

    return wrap


def _log_probs(scores, from_logits: bool):
    """float32 log-probabilities [N, K] of probabilities or logits [N, K] (log 0 = -inf)."""
    if from_logits:
        return jax.nn.log_softmax(scores, axis=-1)
    return jnp.log(scores)


def top_label(scores, labels, *, from_logits: bool = False):
    """Top-label confidence and correctness: the largest probability, and argmax == label.

    Args:
      scores: float ``[N, K]``, probabilities (or logits with ``from_logits``).
      labels: int ``[N]``, class ids in ``[0, K)``.
      from_logits: whether ``scores`` are logits (static).

    Returns:
      ``(confidence, correct)``: float32 ``[N]`` in [0, 1] and bool ``[N]`` (argmax: lowest index on ties).

    Raises:
      ValueError: ``scores`` is not ``[N, K]`` or ``labels`` not ``[N]`` integers, or a label (when
        concrete: not under an outer jit) lies outside ``[0, K)``.

    Examples:
      >>> import numpy as np
      >>> from ls_jax import calibration
      >>> probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
      >>> labels = np.array([0, 0, 2, 1])
      >>> confidence, correct = calibration.top_label(probs, labels)
      >>> print([round(float(c), 4) for c in confidence], np.asarray(correct).tolist())
      [0.7, 0.5, 0.8, 0.4] [True, False, True, False]
    """
    scores, labels, _ = _check(scores, labels, None)
    prediction = jnp.argmax(scores, axis=-1)
    if from_logits:
        confidence = jnp.exp(scores.max(-1) - jax.nn.logsumexp(scores, axis=-1))
    else:
        confidence = scores.max(-1)
    return jnp.clip(confidence, 0.0, 1.0), prediction == labels


@_metric("from_logits", "n_bins", "binning", "norm")
def calibration_error(
    scores, labels, *, from_logits: bool = False, n_bins: int = 15, binning: str = "width", norm: str = "l1", where=None
):
    """Top-label calibration error: ECE, RMS or maximum calibration error.

    Args:
      scores: float ``[N, K]``, probabilities (or logits with ``from_logits``).
      labels: int ``[N]``, class ids in ``[0, K)``.
      from_logits: whether ``scores`` are logits (static).
      n_bins: number of bins (static).
      binning: ``"width"`` or ``"mass"`` (:mod:`ls_jax.calibration.bins`) (static).
      norm: ``"l1"`` = expected calibration error (ECE), ``"l2"`` = RMS calibration error (the square
        root of the count-weighted mean squared gap, not debiased), ``"max"`` = maximum calibration
        error over non-empty bins (static).
      where: bool ``[N]``, the samples to count (default all).

    Returns:
      float32 scalar.

    Raises:
      ValueError: ``scores`` is not ``[N, K]`` or ``labels`` not ``[N]`` integers, or a label (when
        concrete: not under an outer jit) lies outside ``[0, K)``.
      ValueError: ``norm`` is not one of :data:`NORMS` or ``binning`` not one of ``BINNINGS``.

    Examples:
      >>> import numpy as np
      >>> from ls_jax import calibration
      >>> probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
      >>> labels = np.array([0, 0, 2, 1])
      >>> print(round(float(calibration.calibration_error(probs, labels, n_bins=5)), 4))
      0.35
      >>> print(round(float(calibration.calibration_error(probs, labels, n_bins=5, norm="max")), 4))
      0.45
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    scores, labels, valid = _check(scores, labels, where)
    confidence, correct = top_label(scores, labels, from_logits=from_logits)
    bins = bin_statistics(confidence, correct, n_bins=n_bins, binning=binning, where=valid)
    return errors_from_bins(bins)[{"l1": "ece", "l2": "rms", "max": "mce"}[norm]]


@_metric("from_logits", "n_bins")
def classwise_calibration_error(scores, labels, *, from_logits: bool = False, n_bins: int = 15, where=None):
    """Classwise ECE (Kull et al. 2019): the mean over the K classes of the equal-width l1
    calibration error of ``p_k`` against ``labels == k``.

    Args:
      scores: float ``[N, K]``, probabilities (or logits with ``from_logits``).
      labels: int ``[N]``, class ids in ``[0, K)``.
      from_logits: whether ``scores`` are logits (static).
      n_bins: number of bins (static).
      where: bool ``[N]``, the samples to count (default all).

    Returns:
      float32 scalar.

    Raises:
      ValueError: ``scores`` is not ``[N, K]`` or ``labels`` not ``[N]`` integers, or a label (when
        concrete: not under an outer jit) lies outside ``[0, K)``.

    Examples:
      >>> import numpy as np
      >>> from ls_jax import calibration
      >>> probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
      >>> labels = np.array([0, 0, 2, 1])
      >>> print(round(float(calibration.classwise_calibration_error(probs, labels, n_bins=5)), 4))
      0.3
    """
    scores, labels, valid = _check(scores, labels, where)
    probs = jnp.exp(_log_probs(scores, from_logits))
    k = jnp.arange(probs.shape[1])
    per_class = jax.vmap(lambda p, hit: bin_statistics(p, hit, n_bins=n_bins, where=valid))(
        probs.T, labels[None, :] == k[:, None]
    )
    return jax.vmap(errors_from_bins)(per_class)["ece"].mean()


@_metric("from_logits")
def brier_score(scores, labels, *, from_logits: bool = False, where=None):
    """Multi-class Brier score: the mean over samples of ``sum_k (p_k - onehot(label)_k)^2``.

    Args:
      scores: float ``[N, K]``, probabilities (or logits with ``from_logits``).
      labels: int ``[N]``, class ids in ``[0, K)``.
      from_logits: whether ``scores`` are logits (static).
      where: bool ``[N]``, the samples to count (default all).

    Returns:
      float32 scalar in [0, 2].

    Raises:
      ValueError: ``scores`` is not ``[N, K]`` or ``labels`` not ``[N]`` integers, or a label (when
        concrete: not under an outer jit) lies outside ``[0, K)``.

    Examples:
      >>> import numpy as np
      >>> from ls_jax import calibration
      >>> probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
      >>> labels = np.array([0, 0, 2, 1])
      >>> print(round(float(calibration.brier_score(probs, labels)), 4))
      0.39
    """
    scores, labels, valid = _check(scores, labels, where)
    probs = jnp.exp(_log_probs(scores, from_logits))
    per = jnp.square(probs - jax.nn.one_hot(labels, probs.shape[1])).sum(-1)
    return jnp.where(valid, per, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def _nll_per_sample(scores, labels, from_logits):
    """-log p(label) [N] float32 (inf where a probability is exactly 0)."""
    return -jnp.take_along_axis(_log_probs(scores, from_logits), labels[:, None], axis=-1)[:, 0]


@_metric("from_logits")
def negative_log_likelihood(scores, labels, *, from_logits: bool = False, where=None):
    """Mean ``-log p(label)`` over samples (inf where a probability of a label is exactly 0).

    Args:
      scores: float ``[N, K]``, probabilities (or logits with ``from_logits``).
      labels: int ``[N]``, class ids in ``[0, K)``.
      from_logits: whether ``scores`` are logits (static).
      where: bool ``[N]``, the samples to count (default all).

    Returns:
      float32 scalar.

    Raises:
      ValueError: ``scores`` is not ``[N, K]`` or ``labels`` not ``[N]`` integers, or a label (when
        concrete: not under an outer jit) lies outside ``[0, K)``.

    Examples:
      >>> import numpy as np
      >>> from ls_jax import calibration
      >>> probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
      >>> labels = np.array([0, 0, 2, 1])
      >>> print(round(float(calibration.negative_log_likelihood(probs, labels)), 4))
      0.675
      >>> print(round(float(calibration.negative_log_likelihood(np.log(probs), labels, from_logits=True)), 4))
      0.675
    """
    scores, labels, valid = _check(scores, labels, where)
    nll = _nll_per_sample(scores, labels, from_logits)
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(valid.sum(), 1)


@_metric("from_logits")
def accuracy(scores, labels, *, from_logits: bool = False, where=None):
    """Fraction of samples whose argmax (lowest index on ties) equals the label.

    Args:
      scores: float ``[N, K]``, probabilities (or logits with ``from_logits``).
      labels: int ``[N]``, class ids in ``[0, K)``.
      from_logits: whether ``scores`` are logits (static).
      where: bool ``[N]``, the samples to count (default all).

    Returns:
      float32 scalar in [0, 1].

    Raises:
      ValueError: ``scores`` is not ``[N, K]`` or ``labels`` not ``[N]`` integers, or a label (when
        concrete: not under an outer jit) lies outside ``[0, K)``.

    Examples:
      >>> import numpy as np
      >>> from ls_jax import calibration
      >>> probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
      >>> labels = np.array([0, 0, 2, 1])
      >>> print(round(float(calibration.accuracy(probs, labels)), 4))
      0.5
      >>> print(round(float(calibration.accuracy(probs, labels, where=[True, True, True, False])), 4))
      0.6667
    """
    scores, labels, valid = _check(scores, labels, where)
    hit = (jnp.argmax(scores, axis=-1) == labels) & valid
    return hit.sum() / jnp.maximum(valid.sum(), 1)
