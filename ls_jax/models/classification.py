"""Sequence classification on the last real token, like Hugging Face ``*ForSequenceClassification``.

``score`` (``nnx.Linear [D, C]``, no bias) is applied to the final hidden state of the last
non-padding token; :func:`sequence_classification_loss` trains it with the smoothed
cross-entropy, hard or soft labels.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from ls_jax.losses import smoothed_cross_entropy
from ls_jax.models.transformer import Decoder, DecoderSpec


def last_token_index(input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None) -> jax.Array:
    """int32 ``[B]``: index of the rightmost real token of each row (left or right padding).

    Real tokens are ``attention_mask == 1``; without a mask, ids ``!= pad_token_id`` (HF's rule);
    with neither, the last position.
    """
    b, t = input_ids.shape
    if attention_mask is not None:
        real = attention_mask.astype(bool)
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return jnp.full((b,), t - 1, jnp.int32)
    return jnp.argmax(jnp.where(real, jnp.arange(t), -1), axis=-1).astype(jnp.int32)


class SequenceClassifier(nnx.Module):
    """Decoder (``model``) plus ``score`` head over ``num_labels`` classes.

    ``model(input_ids, attention_mask, positions, segment_ids)`` -> float32 logits ``[B, C]``.
    """

    def __init__(
        self,
        spec: DecoderSpec,
        num_labels: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        self.model = Decoder(spec, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.score = nnx.Linear(
            spec.hidden_size,
            num_labels,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.normal(spec.initializer_range),
            rngs=rngs,
        )
        self.num_labels = num_labels

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None) -> jax.Array:
        hidden = self.model(input_ids, attention_mask, positions, segment_ids)
        last = last_token_index(input_ids, attention_mask, self.model.spec.pad_token_id)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return self.score(pooled).astype(jnp.float32)


def _hard_class(labels) -> jax.Array:
    """The class a label points at ``[B]``: the id, or the heaviest class of a soft label."""
    if isinstance(labels, tuple):
        ids, weights = labels
        return jnp.take_along_axis(ids, jnp.argmax(weights, axis=-1)[:, None], axis=-1)[:, 0]
    labels = jnp.asarray(labels)
    return jnp.argmax(labels, axis=-1) if labels.ndim == 2 else labels


SMOOTHING_CONVENTIONS = ("uniform", "others")


def convention_smoothing(label_smoothing, num_classes: int, convention: str = "uniform"):
    """The uniform smoothing (PyTorch / optax: ``(1 - a) t + a / K``) equal to ``label_smoothing``
    under ``convention``. "uniform": ``a`` itself. "others": the target keeps ``1 - a`` and the
    mass ``a`` is spread over the *other* classes, ``a / (K - 1)`` each (``[0.8, 0.1, 0.1]`` for
    a = 0.2 on 3 classes; for a soft label t, ``(1 - a) t + a (1 - t) / (K - 1)``), which is
    uniform smoothing with ``a K / (K - 1)``. Works on traced values."""
    if convention not in SMOOTHING_CONVENTIONS:
        raise ValueError(f"smoothing_convention must be one of {SMOOTHING_CONVENTIONS}, got {convention!r}")
    if convention == "uniform":
        return label_smoothing
    if num_classes < 2:
        raise ValueError(f"the 'others' smoothing convention needs at least 2 classes, got {num_classes}")
    return label_smoothing * num_classes / (num_classes - 1)


def sequence_classification_loss(
    model: SequenceClassifier,
    batch: dict,
    *,
    label_smoothing: float = 0.0,
    smoothing_convention: str = "uniform",
    z_loss: float = 0.0,
    ignore_index: int = -100,
    where=None,
):
    """Mean smoothed cross-entropy of a batch, and metrics.

    batch: ``input_ids [B, T]``, ``attention_mask [B, T]`` (optional), ``labels``: class ids
    ``[B]`` (``ignore_index`` skips a row), dense soft labels ``[B, C]``, or sparse
    ``(ids [B, K], weights [B, K])``. where: bool ``[B]``, the rows to score (None: all).
    smoothing_convention: see :func:`convention_smoothing` ("others" needs
    ``label_smoothing <= (C - 1) / C``). Returns ``(loss, {"examples", "accuracy",
    "mean_confidence"})``; accuracy compares the argmax with the label's (heaviest) class.
    """
    logits = model(batch["input_ids"], batch.get("attention_mask"), batch.get("positions"), batch.get("segment_ids"))
    labels = batch["labels"]
    a = convention_smoothing(label_smoothing, logits.shape[-1], smoothing_convention)
    loss, stats = smoothed_cross_entropy(
        logits,
        labels,
        label_smoothing=a,
        z_loss=z_loss,
        where=where,
        ignore_index=ignore_index,
        reduction="mean",
        return_stats=True,
    )
    count = jnp.maximum(stats.valid.sum(), 1).astype(jnp.float32)
    correct = (stats.prediction == _hard_class(labels)) & stats.valid
    confidence = jnp.where(stats.valid, stats.confidence, 0.0)
    metrics = {
        "examples": stats.valid.sum(),
        "accuracy": correct.sum() / count,
        "mean_confidence": confidence.sum() / count,
    }
    return loss, metrics
