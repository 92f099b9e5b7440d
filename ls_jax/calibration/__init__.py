"""Calibration metrics: binned calibration errors, Brier, NLL, temperature scaling, diagrams.

``N`` samples, ``K`` classes; ``scores`` are probabilities ``[N, K]``, or logits when
``from_logits=True``. Modules, by responsibility:

- :mod:`~ls_jax.calibration.bins`: per-bin sums (:class:`CalibrationBins`), binning conventions,
  the errors of bins;
- :mod:`~ls_jax.calibration.metrics`: metrics of scores and labels (ECE, Brier, NLL, accuracy);
- :mod:`~ls_jax.calibration.temperature`: temperature scaling;
- :mod:`~ls_jax.calibration.report`: :class:`CalibrationReport`, every metric in one summary;
- :mod:`~ls_jax.calibration.token_metrics`: a causal LM's next-token calibration from the fused loss;
- :mod:`~ls_jax.calibration.plots`: reliability diagrams (matplotlib imported when drawing).
"""

from ls_jax.calibration.bins import BINNINGS, CalibrationBins, bin_edges, bin_statistics, errors_from_bins
from ls_jax.calibration.metrics import (
    NORMS,
    accuracy,
    brier_score,
    calibration_error,
    classwise_calibration_error,
    negative_log_likelihood,
    top_label,
)
from ls_jax.calibration.plots import reliability_diagram, reliability_diagrams
from ls_jax.calibration.report import CalibrationReport, calibration_report
from ls_jax.calibration.temperature import apply_temperature, fit_temperature
from ls_jax.calibration.token_metrics import token_bins, token_brier, token_calibration

__all__ = [
    "BINNINGS",
    "NORMS",
    "CalibrationBins",
    "CalibrationReport",
    "accuracy",
    "apply_temperature",
    "bin_edges",
    "bin_statistics",
    "brier_score",
    "calibration_error",
    "calibration_report",
    "classwise_calibration_error",
    "errors_from_bins",
    "fit_temperature",
    "negative_log_likelihood",
    "reliability_diagram",
    "reliability_diagrams",
    "token_bins",
    "token_brier",
    "token_calibration",
    "top_label",
]
