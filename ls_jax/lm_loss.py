"""The fused, label-smoothed next-token loss of a causal language model.

Works with any Flax NNX model following ``ls_jax.models.protocol`` (hidden states plus
``unembedding()``): the logits ``[B, T, V]`` are never materialised, the loss goes through
:func:`ls_jax.losses.linear_smoothed_cross_entropy`.
"""

import contextlib

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ls_jax.logit_stats import BlockSizes
from ls_jax.losses import TokenStats, linear_smoothed_cross_entropy
from ls_jax.sharded import context_mesh


def shift_left(x: jax.Array, fill=0) -> jax.Array:
    """``x`` aligned with the next token.

    Args:
      x: ``[B, T, ...]``.
      fill: the value of the last position.

    Returns:
      ``[B, T, ...]``, position t holding ``x[:, t + 1]``, the last ``fill``.

    Examples:
      >>> import jax.numpy as jnp
      >>> print(shift_left(jnp.array([[1, 2, 3]]), fill=-1))
      [[ 2  3 -1]]
    """
    return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


def next_token_targets(
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    ignore_index: int = -100,
) -> jax.Array:
    """Shift labels so position t is scored on token t + 1 (Hugging Face convention).

    Args:
      labels: int ``[B, T]``.
      attention_mask: ``[B, T]`` (1 / True: a real token) or None.
      segment_ids: int ``[B, T]`` of packed sequences, or None.
      ignore_index: the label of a position that is not scored.

    Returns:
      int32 ``[B, T]``: ``labels[:, t + 1]``, and ``ignore_index`` at the last position, at
      positions whose next token is padding or belongs to another packed segment, and at
      padding positions themselves.

    Examples:
      >>> import jax.numpy as jnp
      >>> print(next_token_targets(jnp.array([[5, 6, 7, 8]]), jnp.array([[1, 1, 1, 0]])))
      [[   6    7 -100 -100]]
      >>> print(next_token_targets(jnp.array([[5, 6, 7, 8]]), segment_ids=jnp.array([[1, 1, 2, 2]])))
      [[   6 -100    8 -100]]
    """
    labels = jnp.asarray(labels, jnp.int32)
    targets = shift_left(labels, ignore_index)
    keep = jnp.ones(labels.shape, bool)
    if attention_mask is not None:
        real = attention_mask.astype(bool)
        keep = keep & real & shift_left(real, False)
    if segment_ids is not None:
        keep = keep & (shift_left(segment_ids) == segment_ids)
    return jnp.where(keep, targets, ignore_index)


def next_token_weights(weights: jax.Array) -> jax.Array:
    """Per-token weights aligned with the labels, shifted as :func:`next_token_targets` shifts them.

    Args:
      weights: float ``[B, T]``, each label's weight.

    Returns:
      float32 ``[B, T]``: position t gets ``weights[:, t + 1]``; 0 at the end.

    Examples:
      >>> import jax.numpy as jnp
      >>> print(next_token_weights(jnp.array([[1.0, 0.5, 2.0]])))
      [[0.5 2.  0. ]]
    """
    return shift_left(jnp.asarray(weights, jnp.float32))


def token_metrics(stats: TokenStats, targets: jax.Array) -> dict:
    """Sums and means over the valid tokens of a loss's side outputs.

    Args:
      stats: :class:`ls_jax.losses.TokenStats` ``[...]`` (``return_stats=True`` of a loss).
      targets: int ``[...]``, the target of each token.

    Returns:
      dict of scalars: ``tokens`` (int32), ``correct``, ``confidence_sum`` (sum of top-class
      probabilities, for calibration), ``lse_sum``, and ``accuracy``, ``mean_confidence``,
      ``mean_lse`` (float32; the means are 0 without valid tokens).

    Examples:
      >>> import jax.numpy as jnp
      >>> from ls_jax.losses import smoothed_cross_entropy
      >>> logits, targets = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]), jnp.array([0, 1])
      >>> _, stats = smoothed_cross_entropy(logits, targets, return_stats=True)
      >>> metrics = token_metrics(stats, targets)
      >>> print(int(metrics["tokens"]), round(float(metrics["accuracy"]), 3), round(float(metrics["mean_lse"]), 3))
      2 0.5 2.751
    """
    valid = stats.valid
    tokens = valid.sum().astype(jnp.int32)
    count = jnp.maximum(tokens, 1).astype(jnp.float32)
    correct = ((stats.prediction == targets) & valid).sum().astype(jnp.float32)
    confidence = jnp.where(valid, stats.confidence, 0.0).sum()
    lse = jnp.where(valid, stats.lse, 0.0).sum()
    return {
        "tokens": tokens,
        "correct": correct,
        "confidence_sum": confidence,
        "lse_sum": lse,
        "accuracy": correct / count,
        "mean_confidence": confidence / count,
        "mean_lse": lse / count,
    }


def causal_lm_loss(
    model,
    batch: dict,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    logit_softcap: str | float | None = "model",
    shift_labels: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    blocks: BlockSizes | None = None,
    mesh=None,
):
    """Label-smoothed next-token cross-entropy of ``model`` on ``batch``, and metrics.

    The unembedding is cast to the hidden states' (compute) dtype, as the model's own matmuls.
    Under a mesh with Explicit axes (ambient, or carried by the placed parameters or batch) the
    model and loss run with every axis Auto (``jax.sharding.auto_axes``), as the models are
    written for.

    Args:
      model: a Flax NNX causal LM following ``ls_jax.models.protocol`` (hidden states and
        ``unembedding()``).
      batch: ``input_ids [B, T]`` int, ``labels [B, T]`` int (``ignore_index`` on prompt and
        padding tokens; usually a copy of input_ids), optional ``attention_mask``,
        ``positions``, ``segment_ids [B, T]``, ``weights [B, T]`` float (each label's weight in
        the loss, e.g. a weighted answer's probability: "mean" is over the scored tokens' total
        weight).
      label_smoothing, z_loss, ignore_index: as in :func:`ls_jax.losses.smoothed_cross_entropy`.
      logit_softcap: "model" uses ``model.final_logit_softcap``; a float or None overrides it.
      shift_labels: True (default, as Hugging Face): ``labels[t + 1]`` is the target of
        position t (:func:`next_token_targets`, weights shifted alike); False: labels and
        weights are already shifted and used as they are (``ignore_index`` still masks).
      reduction: "mean" over scored tokens or "sum" (e.g. for gradient accumulation).
      impl, blocks, mesh: passed to :func:`ls_jax.losses.linear_smoothed_cross_entropy` (mesh:
        each device computes the loss of its own tokens and vocabulary shard).

    Returns:
      ``(loss, metrics)``: loss a float32 scalar, metrics from :func:`token_metrics`.

    Raises:
      ValueError: a reduction other than "mean" / "sum", or a logit_softcap string other than
        "model"; and the loss's own (:func:`ls_jax.losses.linear_smoothed_cross_entropy`).

    Examples:
      >>> import jax.numpy as jnp
      >>> from ls_jax.models import from_config
      >>> from ls_jax.models.llama import tiny_llama_config
      >>> model = from_config(tiny_llama_config(vocab_size=32, hidden_size=16, num_hidden_layers=1))
      >>> ids = jnp.array([[1, 2, 3, 4, 5]])
      >>> loss, metrics = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, label_smoothing=0.1)
      >>> print(loss.shape, loss.dtype, int(metrics["tokens"]))  # 4 scored tokens: the last has no next
      () float32 4
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    cap = logit_softcap
    if isinstance(cap, str):
        if cap != "model":
            raise ValueError(f"logit_softcap must be 'model', a float or None, got {cap!r}")
        cap = model.final_logit_softcap

    def loss_and_metrics(model, batch):
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention_mask, segment_ids = batch.get("attention_mask"), batch.get("segment_ids")
        hidden = model(input_ids, attention_mask, batch.get("positions"), segment_ids)
        if shift_labels:
            targets = next_token_targets(labels, attention_mask, segment_ids, ignore_index)
        else:
            targets = jnp.asarray(labels, jnp.int32)
        weights = batch.get("weights")
        if weights is not None and shift_labels:
            weights = next_token_weights(weights)
        weight = model.unembedding().astype(hidden.dtype)  # compute dtype, as the model's own matmuls
        loss, stats = linear_smoothed_cross_entropy(
            hidden,
            weight,
            targets,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            z_loss=z_loss,
            weights=weights,
            logit_softcap=cap,
            reduction=reduction,
            impl=impl,
            blocks=blocks,
            mesh=mesh,
            return_stats=True,
        )
        return loss, token_metrics(stats, targets)

    # the models leave their activations' placement to XLA's partitioner, which Explicit mesh axes
    # (jax.make_mesh's default) refuse: every axis is Auto inside
    context = context_mesh((model, batch))
    with contextlib.nullcontext() if context is None else jax.sharding.use_abstract_mesh(context):
        return jax.sharding.auto_axes(loss_and_metrics, out_sharding=P())(model, batch)
