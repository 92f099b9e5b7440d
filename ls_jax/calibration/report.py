"""A calibration summary of all metrics (:class:`CalibrationReport`), from scores or from bins."""

import dataclasses
from typing import Optional

import numpy as np

from ls_jax.calibration.bins import CalibrationBins, bin_edges, bin_statistics, errors_from_bins
from ls_jax.calibration.metrics import _check, _nll_per_sample, brier_score, classwise_calibration_error, top_label


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
    """Calibration summary (Python floats). Fields that the source cannot give are None
    (streamed token bins carry no equal-mass or classwise ECE)."""

    count: int
    accuracy: float
    mean_confidence: float
    nll: float
    ece: float
    rms_calibration_error: float
    max_calibration_error: float
    n_bins: int
    bins: CalibrationBins
    ece_equal_mass: Optional[float] = None
    brier: Optional[float] = None
    classwise_ece: Optional[float] = None

    @classmethod
    def from_bins(cls, bins: CalibrationBins, **extra) -> "CalibrationReport":
        """Report of equal-width bins (e.g. accumulated over a data set); extra fields by name."""
        bins = CalibrationBins(*(np.asarray(x) for x in bins))
        e = {k: float(v) for k, v in errors_from_bins(bins).items()}
        if not np.isnan(e["brier"]):
            extra.setdefault("brier", e["brier"])
        return cls(count=int(bins.count.sum()), accuracy=e["accuracy"], mean_confidence=e["confidence"],
                   nll=e["nll"], ece=e["ece"], rms_calibration_error=e["rms"],
                   max_calibration_error=e["mce"], n_bins=len(bins.count) - 1, bins=bins, **extra)

    def to_dict(self) -> dict:
        """JSON-ready dict: the scalars, and per-bin count / accuracy / confidence lists."""
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


def calibration_report(scores, labels, *, from_logits: bool = False, n_bins: int = 15,
                       where=None, classwise: bool = True) -> CalibrationReport:
    """All metrics of scores [N, K] and labels [N] in one :class:`CalibrationReport`."""
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
