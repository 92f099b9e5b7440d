"""A calibration summary of all metrics (:class:`CalibrationReport`), from scores or from bins."""

import dataclasses

import numpy as np

from ls_jax.calibration.bins import CalibrationBins, bin_edges, bin_statistics, errors_from_bins
from ls_jax.calibration.metrics import _check, _nll_per_sample, brier_score, classwise_calibration_error, top_label


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
    """Calibration summary (Python floats). Fields that the source cannot give are None
    (streamed token bins carry no equal-mass or classwise ECE).

    count: samples; accuracy, mean_confidence, nll (mean), ece, rms_calibration_error,
    max_calibration_error: of the ``n_bins`` equal-width ``bins`` (:class:`CalibrationBins`,
    ``[n_bins + 1]`` per field); ece_equal_mass: ECE over equal-mass bins; brier: mean multi-class
    Brier score; classwise_ece: :func:`~ls_jax.calibration.classwise_calibration_error`.
    """

    count: int
    accuracy: float
    mean_confidence: float
    nll: float
    ece: float
    rms_calibration_error: float
    max_calibration_error: float
    n_bins: int
    bins: CalibrationBins
    ece_equal_mass: float | None = None
    brier: float | None = None
    classwise_ece: float | None = None

    @classmethod
    def from_bins(cls, bins: CalibrationBins, **extra) -> "CalibrationReport":
        """Report of equal-width bins (e.g. accumulated over a data set).

        Args:
          bins: :class:`CalibrationBins`, ``[n_bins + 1]`` per field; their Brier sum, unless NaN,
            gives ``brier``.
          **extra: the optional fields (``ece_equal_mass``, ``brier``, ``classwise_ece``) by name.

        Returns:
          :class:`CalibrationReport`, its ``bins`` as numpy arrays.

        Examples:
          >>> from ls_jax.calibration import CalibrationReport, bin_statistics
          >>> bins = bin_statistics([0.3, 0.6, 0.9, 1.0], [True, False, True, True], n_bins=2)
          >>> report = CalibrationReport.from_bins(bins)
          >>> print(report.count, report.n_bins, round(report.ece, 4), report.brier)
          4 2 0.3 None
        """
        bins = CalibrationBins(*(np.asarray(x) for x in bins))
        e = {k: float(v) for k, v in errors_from_bins(bins).items()}
        if not np.isnan(e["brier"]):
            extra.setdefault("brier", e["brier"])
        return cls(
            count=int(bins.count.sum()),
            accuracy=e["accuracy"],
            mean_confidence=e["confidence"],
            nll=e["nll"],
            ece=e["ece"],
            rms_calibration_error=e["rms"],
            max_calibration_error=e["mce"],
            n_bins=len(bins.count) - 1,
            bins=bins,
            **extra,
        )

    def to_dict(self) -> dict:
        """JSON-ready dict: the scalar fields, and ``bins``: ``edges`` (``[n_bins + 2]``, the last 1.0
        again for the "exactly 1.0" bin), per-bin ``count``, ``accuracy`` and mean ``confidence``
        lists (``[n_bins + 1]``; 0 for an empty bin).

        Returns:
          dict of Python scalars and lists.

        Examples:
          >>> from ls_jax.calibration import CalibrationReport, bin_statistics
          >>> bins = bin_statistics([0.3, 0.6, 0.9, 1.0], [True, False, True, True], n_bins=2)
          >>> out = CalibrationReport.from_bins(bins).to_dict()
          >>> print(out["bins"]["count"], out["bins"]["accuracy"])
          [1, 2, 1] [1.0, 0.5, 1.0]
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "bins"}
        count = self.bins.count.astype(np.float64)
        nonzero = np.maximum(count, 1.0)
        out["bins"] = {
            "edges": bin_edges(self.n_bins).tolist() + [1.0],
            "count": self.bins.count.tolist(),
            "accuracy": (self.bins.correct_sum / nonzero).tolist(),
            "confidence": (self.bins.confidence_sum / nonzero).tolist(),
        }
        return out


def calibration_report(
    scores, labels, *, from_logits: bool = False, n_bins: int = 15, where=None, classwise: bool = True
) -> CalibrationReport:
    """All the metrics of scores and labels in one :class:`CalibrationReport`.

    Args:
      scores: float ``[N, K]``, probabilities (or logits with ``from_logits``).
      labels: int ``[N]``, class ids in ``[0, K)``.
      from_logits: whether ``scores`` are logits.
      n_bins: number of bins (equal-width and equal-mass).
      where: bool ``[N]``, the samples to count (default all).
      classwise: whether to compute ``classwise_ece`` (K binnings).

    Returns:
      :class:`CalibrationReport` with every field set.

    Raises:
      ValueError: ``scores`` is not ``[N, K]`` or ``labels`` not ``[N]`` integers, or a label (when
        concrete: not under an outer jit) lies outside ``[0, K)``.

    Examples:
      >>> import numpy as np
      >>> from ls_jax import calibration
      >>> probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
      >>> labels = np.array([0, 0, 2, 1])
      >>> report = calibration.calibration_report(probs, labels, n_bins=5)
      >>> print(report.count, round(report.accuracy, 4), round(report.ece, 4), round(report.brier, 4))
      4 0.5 0.35 0.39
    """
    scores, labels, valid = _check(scores, labels, where)
    confidence, correct = top_label(scores, labels, from_logits=from_logits)
    nll = _nll_per_sample(scores, labels, from_logits)
    bins = bin_statistics(confidence, correct, n_bins=n_bins, where=valid, nll=nll)
    mass = bin_statistics(confidence, correct, n_bins=n_bins, binning="mass", where=valid)
    extra = dict(
        ece_equal_mass=float(errors_from_bins(mass)["ece"]),
        brier=float(brier_score(scores, labels, from_logits=from_logits, where=valid)),
    )
    if classwise:
        extra["classwise_ece"] = float(
            classwise_calibration_error(scores, labels, from_logits=from_logits, n_bins=n_bins, where=valid)
        )
    return CalibrationReport.from_bins(bins, **extra)
