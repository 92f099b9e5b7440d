"""The fused next-token loss for NNX models that return logits (Tunix's, most NNX models).

Such a model computes ``logits = head(hidden)``; if it sows ``hidden`` (the final hidden state,
final norm applied) as ``nnx.Intermediate`` (Tunix's models do with
``output_hidden_states=True``; in your own add ``self.sow(nnx.Intermediate, name, hidden)``),
:func:`sown_hidden_states` takes it back and :func:`next_token_loss` scores it against the head
matrix. Under ``jit`` the returned logits are unused, so XLA drops the head's matmul: the
``[B, T, V]`` logits are never held.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ls_jax.lm_loss import next_token_targets, token_metrics
from ls_jax.logit_stats import BlockSizes
from ls_jax.losses import linear_smoothed_cross_entropy


def sown_hidden_states(model: nnx.Module, forward: Callable[[], object], name: str = "all_hidden_states") -> jax.Array:
    """Run ``forward()`` (a forward pass of ``model`` that sows its final hidden state as
    ``nnx.Intermediate`` ``name``), pop the model's intermediates and return the last value
    sown under ``name``: ``[B, T, D]``. ``forward``'s own result (the logits) is discarded."""
    forward()
    sown = nnx.pop(model, nnx.Intermediate)
    found = [value for path, value in nnx.to_flat_state(sown) if path[-1] == name]
    if not found:
        raise ValueError(
            f"the forward pass sowed no nnx.Intermediate named {name!r} "
            f"(sowed: {[path for path, _ in nnx.to_flat_state(sown)] or 'nothing'})"
        )
    values = found[-1].get_value()
    return values[-1] if isinstance(values, tuple) else values


def next_token_loss(
    hidden: jax.Array,
    head: jax.Array,
    input_ids: jax.Array,
    token_mask: jax.Array,
    *,
    head_layout: str = "vd",
    logit_softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    impl: str = "auto",
    blocks: BlockSizes | None = None,
):
    """Mean smoothed next-token cross-entropy of ``hidden [B, T, D]`` under ``head`` (``[V, D]``,
    ``head_layout="vd"``, or ``[D, V]``, "dv": Tunix's lm_head, nnx.Linear, MaxText; read in
    place, see ``weight_layout`` of :func:`ls_jax.linear_smoothed_cross_entropy`), and metrics.

    Position t is scored on ``input_ids[t + 1]`` where ``token_mask[t + 1]`` (bool / 0-1
    ``[B, T]``: the tokens that are targets, e.g. Tunix's ``input_mask``); the last position
    never is. Returns ``(loss, metrics)``: float32 scalars ``nll`` (mean unsmoothed negative
    log-likelihood, the true one when smoothing is on), ``perplexity`` (``exp(nll)``),
    ``accuracy``, ``mean_lse``, ``mean_confidence``, int32 ``tokens``, and the sums of
    :func:`ls_jax.lm_loss.token_metrics`.
    """
    weight = head.astype(hidden.dtype)
    labels = jnp.where(jnp.asarray(token_mask, bool), input_ids, -100)
    targets = next_token_targets(labels)
    loss, stats = linear_smoothed_cross_entropy(
        hidden,
        weight,
        targets,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        reduction="mean",
        impl=impl,
        blocks=blocks,
        weight_layout=head_layout,
        return_stats=True,
    )
    metrics = token_metrics(stats, targets)
    nll = -stats.target_logprob.sum() / jnp.maximum(metrics["tokens"], 1)
    return loss, {**metrics, "nll": nll, "perplexity": jnp.exp(nll)}
