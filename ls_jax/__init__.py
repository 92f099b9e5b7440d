"""ls_jax: label-smoothed, memory-efficient cross-entropy for JAX/Flax.

Losses: :func:`smoothed_cross_entropy` (materialised logits) and
:func:`linear_smoothed_cross_entropy` (fused ``hidden @ W.T``; never holds ``[N, V]``);
:func:`causal_lm_loss` plugs the fused loss into any Flax NNX model following
``ls_jax.models.protocol``. Calibration metrics live in :mod:`ls_jax.calibration`, the models
in :mod:`ls_jax.models`, multiple-choice evaluation in :mod:`ls_jax.evaluate`, the trainer
in :mod:`ls_jax.train`.
"""

from ls_jax.calibration import (
    CalibrationBins,
    CalibrationReport,
    accuracy,
    apply_temperature,
    bin_statistics,
    brier_score,
    calibration_error,
    calibration_report,
    classwise_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_diagram,
    token_calibration,
)
from ls_jax.lm_loss import causal_lm_loss
from ls_jax.logit_stats import BlockSizes, LogitStats
from ls_jax.losses import TokenStats, linear_smoothed_cross_entropy, smoothed_cross_entropy

__all__ = [
    "BlockSizes",
    "CalibrationBins",
    "CalibrationReport",
    "LogitStats",
    "TokenStats",
    "accuracy",
    "apply_temperature",
    "bin_statistics",
    "brier_score",
    "calibration_error",
    "calibration_report",
    "causal_lm_loss",
    "classwise_calibration_error",
    "fit_temperature",
    "linear_smoothed_cross_entropy",
    "negative_log_likelihood",
    "reliability_diagram",
    "smoothed_cross_entropy",
    "token_calibration",
]
