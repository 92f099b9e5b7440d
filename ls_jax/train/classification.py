"""``train.py --task classification``: rows of text and a label, a SequenceClassifier, its report.

Rows: ``{"text": str, "label": L}`` where L is a class index (int), a class name (str), or a
soft label ``{"Positive": 0.6, "Neutral": 0.4}`` (:func:`ls_jax.data.probabilities`). The classes are
those declared (``--classes``, in class order: an index is a position in it, another name an
error), else the names found in the training rows (sorted), or ``0 .. max index`` when the
labels are indices. Each row becomes ``[bos] + tokens`` (cut to ``max_length``) and a target
distribution ``[K]`` float32. The embedded default (no ``--data``) is generated sentiment-like data.
"""

import numbers
import random
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ls_jax.calibration import calibration_report
from ls_jax.data import Batches, DataError, probabilities
from ls_jax.models.classification import sequence_classification_loss
from ls_jax.train import sharding
from ls_jax.train.config import LossOptions
from ls_jax.train.step import model_inputs

CLASSES = ("Negative", "Neutral", "Positive")
_WORDS = {
    "Negative": ("awful", "boring", "broken", "terrible", "slow", "rude", "bland", "noisy"),
    "Neutral": ("okay", "average", "fine", "ordinary", "plain", "usual", "standard", "fair"),
    "Positive": ("great", "lovely", "superb", "friendly", "fast", "tasty", "bright", "perfect"),
}
_THINGS = ("food", "service", "room", "movie", "staff", "screen", "book", "ride", "music", "price")


def generate(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Generated review-like rows: ``"the food was lovely and the staff was fast"`` labelled by
    the words' sentiment; a tenth of the training labels are flipped at random (noise), and a
    review mixing two sentiments gets the soft label ``{a: 0.5, b: 0.5}``."""
    rng = random.Random(seed)

    def row(train: bool) -> dict:
        first, second = rng.choice(CLASSES), rng.choice(CLASSES)
        if rng.random() < 0.7:
            second = first
        text = (
            f"the {rng.choice(_THINGS)} was {rng.choice(_WORDS[first])} "
            f"and the {rng.choice(_THINGS)} was {rng.choice(_WORDS[second])}"
        )
        if first != second:
            return {"text": text, "label": {first: 0.5, second: 0.5}}
        if train and rng.random() < 0.1:
            return {"text": text, "label": rng.choice(CLASSES)}
        return {"text": text, "label": first}

    return [row(True) for _ in range(num_train)], [row(False) for _ in range(num_eval)]


def label_classes(rows: Sequence[dict], where: Sequence[str], declared: Sequence[str] = ()) -> list[str]:
    """The class names: ``declared`` (``--classes``) when given, else the training rows' label
    names (sorted), or ``"0" .. "max"``; every row's label is checked to be one of the three kinds.
    A declared list makes a label naming another class an error (in :func:`target`): without it,
    a misspelled name becomes a class of its own."""
    names, indices = set(), set()
    for r, w in zip(rows, where):
        label = r.get("label") if isinstance(r, dict) else None
        if isinstance(label, bool) or label is None:
            raise DataError(f"{w}: needs 'text' and a 'label' (class index, class name or {{name: probability}})")
        if isinstance(label, numbers.Integral):
            indices.add(int(label))
        elif isinstance(label, str):
            names.add(label)
        elif isinstance(label, dict):
            names.update(map(str, label))
        else:
            raise DataError(f"{w}: label {label!r} is not a class index, class name or {{name: probability}}")
    if names and indices:
        raise DataError("labels mix class indices and class names: use one kind")
    if declared:
        return list(declared)
    classes = sorted(names) if names else [str(i) for i in range(max(indices) + 1)]
    if len(classes) < 2:
        raise DataError(f"classification needs at least 2 classes, the training labels have {classes}")
    return classes


def target(label, classes: Sequence[str], where: str) -> np.ndarray:
    """float32 ``[K]``: the target distribution of one label (see the module docstring)."""
    k = len(classes)
    out = np.zeros(k, np.float32)
    if isinstance(label, numbers.Integral) and not isinstance(label, bool):
        if not 0 <= label < k:
            raise DataError(f"{where}: class index {label} is outside [0, {k})")
        out[label] = 1.0
    elif isinstance(label, str) and label in classes:
        out[classes.index(label)] = 1.0
    elif isinstance(label, dict):
        for name in label:
            if str(name) not in classes:
                raise DataError(f"{where}: unknown class {name!r} (classes: {', '.join(classes)})")
        for name, p in zip(label, probabilities(list(label.items()), where, label)):
            out[classes.index(str(name))] += p
    else:
        raise DataError(f"{where}: label {label!r} is not one of the classes ({', '.join(classes)})")
    return out


def prepare(
    rows: Sequence[dict], where: Sequence[str], tokenizer, max_length: int, classes: Sequence[str], name: str
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Padded rows ``{input_ids, positions, segment_ids: int32 [max_length], targets: float32 [K]}``
    (segment_ids 1 on tokens, 0 on padding), and a log line with the truncation count."""
    out, cut = [], 0
    for r, w in zip(rows, where):
        text = r.get("text")
        if not isinstance(text, str) or not text:
            raise DataError(f"{name}: {w}: needs a non-empty string 'text'")
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        cut += len(ids) > max_length
        ids = ids[:max_length]
        row = {
            "input_ids": np.full(max_length, tokenizer.pad_token_id, np.int32),
            "positions": np.zeros(max_length, np.int32),
            "segment_ids": np.zeros(max_length, np.int32),
            "targets": target(r["label"], classes, f"{name}: {w}"),
        }
        row["input_ids"][: len(ids)], row["positions"][: len(ids)], row["segment_ids"][: len(ids)] = (
            ids,
            range(len(ids)),
            1,
        )
        out.append(row)
    return out, f"{name}: {len(out)} rows, {cut} cut to {max_length} tokens"


class ClassificationBatches(Batches):
    """:class:`ls_jax.data.Batches` (seeded order, addressed by position) over prepared rows."""

    def __init__(self, rows, batch_size: int, *, seed: int = 0):
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, True
        self.per_epoch = len(rows) // batch_size
        if self.per_epoch == 0:
            raise DataError(f"only {len(rows)} rows of data for a batch size of {batch_size}")


def eval_batches(rows, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every row once, in order; the last batch padded with all-zero rows (no target: not scored)."""
    blank = {k: np.zeros_like(v) for k, v in rows[0].items()}
    rows = list(rows) + [blank] * (-len(rows) % batch_size)
    return [
        {k: np.stack([r[k] for r in rows[s : s + batch_size]]) for k in rows[0]}
        for s in range(0, len(rows), batch_size)
    ]


def scored(batch) -> jax.Array:
    """bool ``[..., B]``: rows with a target (padding rows have none)."""
    return batch["targets"].sum(-1) > 0


def loss_sum(model, batch, opts) -> jax.Array:
    """Summed smoothed cross-entropy of the batch's scored rows (``opts.smoothing_convention``)."""
    inputs = {"input_ids": batch["input_ids"], "labels": batch["targets"], **model_inputs(batch)}
    loss, metrics = sequence_classification_loss(
        model,
        inputs,
        label_smoothing=opts.label_smoothing,
        smoothing_convention=opts.smoothing_convention,
        z_loss=opts.z_loss,
        where=scored(batch),
    )
    return loss * metrics["examples"]


def count(batch) -> jax.Array:
    """int32 number of scored rows."""
    return scored(batch).sum().astype(jnp.int32)


def make_eval_step(graphdef, opts: LossOptions, *, param_shardings, frozen_shardings, mesh):
    """``evaluate(params, frozen, batch) -> {"logits" [B, K] float32, "loss_sum"}``, jitted."""
    from flax import nnx

    def evaluate(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        logits = model(batch["input_ids"], **model_inputs(batch))
        return {"logits": logits, "loss_sum": loss_sum(model, batch, opts)}

    return jax.jit(
        sharding.on_mesh(evaluate, mesh, sharding.replicated(mesh)),
        in_shardings=(param_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def evaluate(step, params, frozen, batches, mesh) -> dict:
    """Held-out metrics of the classifier: ``loss`` (smoothed, as trained), ``accuracy`` (argmax
    against the label's heaviest class), ``log_loss`` (cross-entropy against the labels as given,
    soft ones included: the NLL for hard labels), ``ece``, ``brier``, ``mean_confidence``,
    ``examples``; plus the 15 equal-width reliability ``bins``."""
    logits, targets, loss = [], [], 0.0
    for b in batches:
        out = jax.device_get(step(params, frozen, sharding.put_batch(b, mesh)))
        logits.append(out["logits"])
        targets.append(b["targets"])
        loss += float(out["loss_sum"])
    logits, targets = np.concatenate(logits), np.concatenate(targets)
    keep = targets.sum(-1) > 0
    logits, targets = logits[keep], targets[keep]
    report = calibration_report(logits, targets.argmax(-1), from_logits=True, classwise=False)
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))
    log_loss = float(-(targets * np.where(targets > 0, log_probs, 0.0)).sum(-1).mean())
    n = int(keep.sum())
    metrics = {
        "loss": loss / n,
        "accuracy": report.accuracy,
        "log_loss": log_loss,
        "ece": report.ece,
        "brier": report.brier,
        "mean_confidence": report.mean_confidence,
        "examples": n,
    }
    return {"metrics": metrics, "bins": report.bins}
