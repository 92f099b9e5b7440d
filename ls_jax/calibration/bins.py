"""Binned calibration statistics: equal-width and equal-mass bins of top-label confidences.

Top-label binning: a sample's confidence is its largest probability and it is correct when
the argmax (lowest index on ties) equals the label. Equal-width bins follow torchmetrics'
convention: bin ``k`` holds ``edges[k] <= c < edges[k + 1]`` with float32 edges
``k / n_bins`` (so 0 is in bin 0 and an edge value opens the bin above it), and a confidence of
exactly 1.0 gets a bin of its own, index ``n_bins``; hence every bin array has ``n_bins + 1``
entries. (Our edges are ``k / n_bins`` correctly rounded; ``torch.linspace`` rounds a few of
them one ulp apart, e.g. 12/15, so a confidence exactly on such an edge can land one bin away
from torchmetrics; with 10 bins all edges agree.) Equal-mass bins sort the confidences and split
them like ``np.array_split`` (the first ``N mod n_bins`` bins hold one sample more; ties may
straddle two bins).

Per-bin sums (:class:`CalibrationBins`) are the common currency: equal-width bins of separate
batches merge by addition, so a whole evaluation set streams through
:func:`ls_jax.calibration.token_calibration` (a causal LM's next-token confidence, blockwise over
the vocabulary via the fused loss) and gives exactly the one-shot result.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BINNINGS = ("width", "mass")


class CalibrationBins(NamedTuple):
    """Per-bin sums over samples, each ``[n_bins + 1]`` (last: confidence exactly 1.0).

    count: int32 samples; confidence_sum: float32 sum of confidences; correct_sum: int32
    correct samples; nll_sum: float32 scalar, the summed NLL of the samples (0 when not given);
    brier_sum: float32 scalar, the summed multi-class Brier score (NaN when not given).
    Equal-width bins from different batches merge with :meth:`merge`.
    """

    count: jax.Array
    confidence_sum: jax.Array
    correct_sum: jax.Array
    nll_sum: jax.Array
    brier_sum: jax.Array

    def merge(self, other: "CalibrationBins") -> "CalibrationBins":
        """Elementwise sum: the bins of the union of both sample sets.

        Args:
          other: bins with the same ``n_bins`` (equal-width bins; equal-mass bins do not merge).

        Returns:
          :class:`CalibrationBins`, each field the sum of both, shapes unchanged.

        Examples:
          >>> from ls_jax.calibration import bin_statistics
          >>> a = bin_statistics([0.2, 0.9], [False, True], n_bins=2)
          >>> b = bin_statistics([0.7], [False], n_bins=2)
          >>> print(a.merge(b).count.tolist())
          [1, 2, 0]
        """
        return CalibrationBins(*(a + b for a, b in zip(self, other)))


def bin_edges(n_bins: int) -> np.ndarray:
    """The equal-width bin edges ``k / n_bins``, correctly rounded to float32.

    Args:
      n_bins: number of bins, a positive int.

    Returns:
      float32 ``[n_bins + 1]``: ``0, 1 / n_bins, ..., 1``.

    Raises:
      ValueError: ``n_bins`` is not a positive int.

    Examples:
      >>> from ls_jax.calibration import bin_edges
      >>> print(bin_edges(4).tolist())
      [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    return (np.arange(n_bins + 1, dtype=np.float64) / n_bins).astype(np.float32)


@partial(jax.jit, static_argnames=("n_bins", "binning"))
def bin_statistics(
    confidence, correct, *, n_bins: int = 15, binning: str = "width", where=None, nll=None, brier=None
) -> CalibrationBins:
    """Per-bin sums of top-label confidences and correctness (binning conventions: module docstring).

    Args:
      confidence: float ``[N]`` in [0, 1] (clipped to it).
      correct: bool ``[N]``, whether each prediction is right.
      n_bins: number of bins (static).
      binning: ``"width"`` (mergeable across batches) or ``"mass"`` (equal counts, over the valid
        samples of this call only) (static).
      where: bool ``[N]``, the samples to count (default all).
      nll: optional float ``[N]``, per-sample NLL, summed over the valid samples.
      brier: optional float ``[N]``, per-sample Brier score, summed over the valid samples.

    Returns:
      :class:`CalibrationBins` with ``[n_bins + 1]`` per-bin fields (the last: confidence exactly 1.0).

    Raises:
      ValueError: ``binning`` is not one of :data:`BINNINGS`, or ``n_bins`` is not a positive int.

    Examples:
      >>> from ls_jax.calibration import bin_statistics
      >>> bins = bin_statistics([0.3, 0.6, 0.9, 1.0], [True, False, True, True], n_bins=2)
      >>> print(bins.count.tolist(), bins.correct_sum.tolist())
      [1, 2, 1] [1, 1, 1]
    """
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    edges = bin_edges(n_bins)
    confidence = jnp.clip(jnp.asarray(confidence, jnp.float32).ravel(), 0.0, 1.0)
    correct = jnp.asarray(correct, bool).ravel()
    n = confidence.shape[0]
    valid = jnp.ones((n,), bool) if where is None else jnp.broadcast_to(jnp.asarray(where, bool).ravel(), (n,))
    if binning == "width":
        index = jnp.searchsorted(jnp.asarray(edges), confidence, side="right") - 1
    else:
        order = jnp.argsort(jnp.where(valid, confidence, jnp.inf), stable=True)
        rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        m = valid.sum()
        q, r = m // n_bins, m % n_bins
        big = r * (q + 1)
        index = jnp.where(rank < big, rank // (q + 1), r + (rank - big) // jnp.maximum(q, 1))
        index = jnp.minimum(index, n_bins - 1)
    seg = partial(jax.ops.segment_sum, segment_ids=index, num_segments=n_bins + 1)

    def total(x, missing):
        return jnp.float32(missing) if x is None else jnp.where(valid, jnp.asarray(x, jnp.float32).ravel(), 0.0).sum()

    return CalibrationBins(
        count=seg(valid.astype(jnp.int32)),
        confidence_sum=seg(jnp.where(valid, confidence, 0.0)),
        correct_sum=seg((valid & correct).astype(jnp.int32)),
        nll_sum=total(nll, 0.0),
        brier_sum=total(brier, jnp.nan),
    )


def errors_from_bins(bins: CalibrationBins) -> dict:
    """Calibration errors and means of (e.g. accumulated) bins.

    Args:
      bins: :class:`CalibrationBins`, ``[n_bins + 1]`` per field.

    Returns:
      dict of float32 scalars: ``ece`` (l1), ``rms`` (l2), ``mce`` (max over non-empty bins),
      ``accuracy``, ``confidence`` (mean), ``nll`` (mean of the given NLL), ``brier`` (mean of
      the given Brier scores, NaN when not given); all 0 with no samples.

    Examples:
      >>> from ls_jax.calibration import bin_statistics, errors_from_bins
      >>> bins = bin_statistics([0.3, 0.6, 0.9, 1.0], [True, False, True, True], n_bins=2)
      >>> errors = errors_from_bins(bins)
      >>> print(round(float(errors["ece"]), 4), round(float(errors["accuracy"]), 4))
      0.3 0.75
    """
    count = bins.count.astype(jnp.float32)
    total = jnp.maximum(count.sum(), 1.0)
    diff = bins.confidence_sum - bins.correct_sum.astype(jnp.float32)
    gap = jnp.abs(diff) / jnp.maximum(count, 1.0)
    return {
        "ece": jnp.abs(diff).sum() / total,
        "rms": jnp.sqrt((gap * jnp.abs(diff)).sum() / total),
        "mce": jnp.where(count > 0, gap, 0.0).max(),
        "accuracy": bins.correct_sum.sum() / total,
        "confidence": bins.confidence_sum.sum() / total,
        "nll": bins.nll_sum / total,
        "brier": bins.brier_sum / total,
    }
