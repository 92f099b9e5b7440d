"""Calibration metrics: binned calibration errors, Brier, NLL, temperature scaling, diagrams.

Everything is jnp and jit-able (numpy inputs work too); ``N`` samples, ``K`` classes.
``scores`` are probabilities ``[N, K]``, or logits when ``from_logits=True``.

Top-label binning: a sample's confidence is its largest probability and it is correct when
the argmax (lowest index on ties) equals the label. Equal-width bins follow torchmetrics'
convention: bin ``k`` holds ``edges[k] <= c < edges[k + 1]`` with float32 edges
``k / n_bins`` (so 0 is in bin 0 and an edge value opens the bin above it), and a confidence of
exactly 1.0 gets a bin of its own, index ``n_bins``; hence every bin array has ``n_bins + 1``
entries. (Our edges are ``k / n_bins`` correctly rounded; ``torch.linspace`` rounds a few of
them one ulp apart, e.g. 12/15, so a confidence exactly on such an edge can land one bin away
from torchmetrics; with 10 bins all edges agree.) Equal-mass bins sort the confidences and split them like ``np.array_split`` (the
first ``N mod n_bins`` bins hold one sample more; ties may straddle two bins).

Per-bin sums (:class:`CalibrationBins`) are the common currency: equal-width bins of separate
batches merge by addition, so a whole evaluation set streams through
:func:`token_calibration` (a causal LM's next-token confidence, blockwise over the
vocabulary via the fused loss) and gives exactly the one-shot result.
"""

import dataclasses
from functools import partial, wraps
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ls_jax.losses import linear_smoothed_cross_entropy
from ls_jax.targets import is_concrete

NORMS = ("l1", "l2", "max")
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
        """Elementwise sum: the bins of the union of both sample sets."""
        return CalibrationBins(*(a + b for a, b in zip(self, other)))


def bin_edges(n_bins: int) -> np.ndarray:
    """float32 edges ``[n_bins + 1]``: ``k / n_bins`` correctly rounded."""
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    return (np.arange(n_bins + 1, dtype=np.float64) / n_bins).astype(np.float32)


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
    """Top-label ``(confidence [N] float32, correct [N] bool)`` of scores [N, K], labels [N]."""
    scores, labels, _ = _check(scores, labels, None)
    prediction = jnp.argmax(scores, axis=-1)
    if from_logits:
        confidence = jnp.exp(scores.max(-1) - jax.nn.logsumexp(scores, axis=-1))
    else:
        confidence = scores.max(-1)
    return jnp.clip(confidence, 0.0, 1.0), prediction == labels


@partial(jax.jit, static_argnames=("n_bins", "binning"))
def bin_statistics(confidence, correct, *, n_bins: int = 15, binning: str = "width", where=None,
                   nll=None, brier=None) -> CalibrationBins:
    """:class:`CalibrationBins` of confidences [N] in [0, 1] and correct flags [N] (bool).

    binning: "width" (mergeable across batches) or "mass" (equal counts, over the valid
    samples of this call only). where: bool [N], samples to count. nll, brier: optional
    per-sample float [N], summed over the valid samples.
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
    """float32 scalars from bins: ``ece`` (l1), ``rms`` (l2), ``mce`` (max over non-empty bins),
    ``accuracy``, ``confidence`` (mean), ``nll`` (mean of the given NLL), ``brier`` (mean of
    the given Brier scores, NaN when not given); all 0 with no samples."""
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


@_metric("from_logits", "n_bins", "binning", "norm")
def calibration_error(scores, labels, *, from_logits: bool = False, n_bins: int = 15,
                      binning: str = "width", norm: str = "l1", where=None):
    """Top-label calibration error (float32 scalar) of scores [N, K] and labels [N].

    norm: "l1" = expected calibration error (ECE), "l2" = RMS calibration error (the square
    root of the count-weighted mean squared gap, not debiased), "max" = maximum calibration
    error over non-empty bins. binning: "width" or "mass" (module docstring).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    scores, labels, valid = _check(scores, labels, where)
    confidence, correct = top_label(scores, labels, from_logits=from_logits)
    bins = bin_statistics(confidence, correct, n_bins=n_bins, binning=binning, where=valid)
    return errors_from_bins(bins)[{"l1": "ece", "l2": "rms", "max": "mce"}[norm]]


@_metric("from_logits", "n_bins")
def classwise_calibration_error(scores, labels, *, from_logits: bool = False, n_bins: int = 15, where=None):
    """Classwise ECE (Kull et al. 2019), float32: the mean over the K classes of the
    equal-width l1 calibration error of ``p_k`` against ``labels == k``."""
    scores, labels, valid = _check(scores, labels, where)
    probs = jnp.exp(_log_probs(scores, from_logits))
    k = jnp.arange(probs.shape[1])
    per_class = jax.vmap(lambda p, hit: bin_statistics(p, hit, n_bins=n_bins, where=valid))(
        probs.T, labels[None, :] == k[:, None]
    )
    return jax.vmap(errors_from_bins)(per_class)["ece"].mean()


@_metric("from_logits")
def brier_score(scores, labels, *, from_logits: bool = False, where=None):
    """Mean over samples of ``sum_k (p_k - onehot(label)_k)^2`` (range [0, 2]), float32."""
    scores, labels, valid = _check(scores, labels, where)
    probs = jnp.exp(_log_probs(scores, from_logits))
    per = jnp.square(probs - jax.nn.one_hot(labels, probs.shape[1])).sum(-1)
    return jnp.where(valid, per, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def _nll_per_sample(scores, labels, from_logits):
    """-log p(label) [N] float32 (inf where a probability is exactly 0)."""
    return -jnp.take_along_axis(_log_probs(scores, from_logits), labels[:, None], axis=-1)[:, 0]


@_metric("from_logits")
def negative_log_likelihood(scores, labels, *, from_logits: bool = False, where=None):
    """Mean ``-log p(label)`` over samples, float32."""
    scores, labels, valid = _check(scores, labels, where)
    nll = _nll_per_sample(scores, labels, from_logits)
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(valid.sum(), 1)


@_metric("from_logits")
def accuracy(scores, labels, *, from_logits: bool = False, where=None):
    """Fraction of samples whose argmax equals the label, float32."""
    scores, labels, valid = _check(scores, labels, where)
    hit = (jnp.argmax(scores, axis=-1) == labels) & valid
    return hit.sum() / jnp.maximum(valid.sum(), 1)


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


def token_brier(hidden, weight, labels, stats, *, bias=None, ignore_index: int = -100, where=None,
                logit_softcap: Optional[float] = None, impl: str = "auto", blocks=None) -> jax.Array:
    """Exact multi-class Brier score per token ``sum_v p_v^2 - 2 p_label + 1`` ``[...]`` float32,
    given the :class:`ls_jax.losses.TokenStats` of the same (unsmoothed) problem, from one more
    fused pass: ``sum_v p_v^2 = exp(lse(2z) - 2 lse(z))``, and ``2z`` is the same problem with
    hidden and bias doubled and the softcap doubled (``2c tanh(x / c) = 2c tanh(2x / 2c)``)."""
    _, doubled = linear_smoothed_cross_entropy(
        2 * jnp.asarray(hidden), weight, labels, bias=None if bias is None else 2 * jnp.asarray(bias),
        logit_softcap=None if logit_softcap is None else 2 * logit_softcap, ignore_index=ignore_index,
        where=where, reduction="none", impl=impl, blocks=blocks, return_stats=True)
    return jnp.exp(doubled.lse - 2 * stats.lse) - 2 * jnp.exp(stats.target_logprob) + 1


def token_bins(stats, labels, *, n_bins: int = 15, brier=None) -> CalibrationBins:
    """Equal-width :class:`CalibrationBins` of next-token predictions from their
    :class:`ls_jax.losses.TokenStats` ``[...]``: confidence ``exp(max_logit - lse)``, correct
    ``prediction == label``, NLL ``-target_logprob`` (unsmoothed, whatever the loss' smoothing);
    ``brier`` from :func:`token_brier` or None."""
    correct = stats.prediction == jnp.asarray(labels)
    return bin_statistics(stats.confidence, correct, n_bins=n_bins, where=stats.valid,
                          nll=-stats.target_logprob, brier=brier)


@partial(jax.jit, static_argnames=("n_bins", "ignore_index", "logit_softcap", "impl", "blocks", "with_brier"))
def token_calibration(hidden, weight, labels, *, n_bins: int = 15, bias=None, ignore_index: int = -100,
                      where=None, logit_softcap: Optional[float] = None, impl: str = "auto",
                      blocks=None, with_brier: bool = True) -> CalibrationBins:
    """Equal-width :class:`CalibrationBins` of next-token predictions, without ``[N, V]`` logits.

    hidden [..., D], weight [V, D], labels [...] aligned with hidden (the token each position
    predicts; ``ignore_index`` or ``where=False`` for prompt / padding tokens): one pass of
    :func:`ls_jax.losses.linear_smoothed_cross_entropy` (``impl``, ``blocks`` as there) and, with
    ``with_brier``, one more for the exact Brier score (:func:`token_brier`). Merge the bins of
    successive batches, then :meth:`CalibrationReport.from_bins`.
    """
    common = dict(bias=bias, ignore_index=ignore_index, where=where, logit_softcap=logit_softcap, impl=impl,
                  blocks=blocks)
    _, stats = linear_smoothed_cross_entropy(hidden, weight, labels, reduction="none", return_stats=True, **common)
    brier = token_brier(hidden, weight, labels, stats, **common) if with_brier else None
    return token_bins(stats, labels, n_bins=n_bins, brier=brier)


def _draw_reliability(top, bottom, bins: CalibrationBins, title: Optional[str], ceiling: Optional[float]) -> None:
    """One reliability diagram of equal-width ``bins`` on the axes ``top`` (accuracy per bin, the
    gap to the mean confidence, the diagonal, an optional vertical confidence ``ceiling``) and
    ``bottom`` (sample counts)."""
    bins = CalibrationBins(*(np.asarray(x) for x in bins))
    n_bins = len(bins.count) - 1
    count = bins.count.astype(np.float64)
    acc = bins.correct_sum / np.maximum(count, 1.0)
    conf = bins.confidence_sum / np.maximum(count, 1.0)
    edges = bin_edges(n_bins).astype(np.float64)
    left, width, full = edges[:-1], 1.0 / n_bins, count[:-1] > 0
    ece = float(errors_from_bins(bins)["ece"])
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.bar(left[full], acc[:-1][full], width=width, align="edge", edgecolor="k", color="tab:blue",
            label="accuracy")
    top.bar(left[full], (conf - acc)[:-1][full], bottom=acc[:-1][full], width=width, align="edge",
            color="tab:red", alpha=0.35, edgecolor="tab:red", hatch="//", label="gap to confidence")
    if count[-1] > 0:
        top.plot([1.0], [acc[-1]], "o", color="tab:purple", label="confidence = 1.0")
    if ceiling is not None:
        top.axvline(ceiling, color="tab:green", lw=1.5, label=f"smoothing ceiling {ceiling:.4f}")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=7)
    top.set_title(f"{title + ': ' if title else ''}ECE = {ece:.4f} (n = {int(count.sum())}, {n_bins} bins)",
                  fontsize=9)
    bottom.bar(left, count[:-1], width=width, align="edge", edgecolor="k", color="tab:gray")
    if count[-1] > 0:
        bottom.bar([1.0], [count[-1]], width=width / 4, color="tab:purple")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")


def reliability_diagram(bins: CalibrationBins, path, *, title: Optional[str] = None,
                        ceiling: Optional[float] = None) -> str:
    """Write a reliability diagram PNG of equal-width ``bins`` to ``path``; returns the path.

    Top: per-bin accuracy bars over ``[k / n, (k + 1) / n)``, the gap to the mean confidence
    in red, the diagonal; a non-empty "exactly 1.0" bin is a point at x = 1; ``ceiling``: a
    vertical line at the highest confidence the training target allows (label smoothing:
    ``1 - a + a / V``). Bottom: the sample count per bin. Title: the ECE (and ``title`` before it).
    """
    return reliability_diagrams([[(title, bins, ceiling)]], path)


def reliability_diagrams(grid, path) -> str:
    """Write a PNG of reliability diagrams side by side: ``grid`` is a list of rows, each a list
    of ``(title, bins, ceiling)`` panels as in :func:`reliability_diagram`; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = len(grid), max(len(row) for row in grid)
    fig = Figure(figsize=(5.0 * n_cols, 6.0 * n_rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * n_rows, n_cols, squeeze=False, gridspec_kw={"height_ratios": [3, 1] * n_rows})
    for r in range(n_rows):
        for c in range(n_cols):
            top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
            if c < len(grid[r]):
                bottom.sharex(top)
                _draw_reliability(top, bottom, grid[r][c][1], grid[r][c][0], grid[r][c][2])
            else:
                top.axis("off")
                bottom.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)
