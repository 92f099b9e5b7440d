"""The jitted train and eval steps over a split NNX model (pure functions of arrays).

The model is split once into ``graphdef`` (static), ``params`` (trained: ``nnx.Param``, or
only ``nnx.LoRAParam`` adapters) and ``frozen`` (everything else); the steps merge them back
inside ``jit``. Placement is explicit: ``jax.jit`` with in/out NamedShardings (the mesh rules
of :mod:`ls_jax.train.sharding`), so the same code runs on one device or many.

A train batch is a dict of arrays ``[grad_accum, B, T]`` (``ls_jax.data`` rows stacked: int32
ids, float32 token weights): the gradient is accumulated over the ``grad_accum`` micro-batches
with ``lax.scan``, each weighted by its share of the step's (weighted) response tokens, so the
update equals that of one batch of ``grad_accum * B`` rows (up to float rounding).
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ls_jax.calibration import token_bins, token_brier
from ls_jax.data import IGNORE_INDEX
from ls_jax.lm_loss import causal_lm_loss, next_token_targets, next_token_weights, shift_left
from ls_jax.losses import linear_smoothed_cross_entropy
from ls_jax.train import sharding
from ls_jax.train.config import LossOptions


def model_inputs(batch: dict[str, jax.Array], packed: bool = True) -> dict[str, Any]:
    """The model's keyword inputs from a data batch: mask, positions and segments of each row.

    ``packed=False`` (rows of one right-padded example each, ``--no-packing``) leaves out the
    mask and segments: under causal attention no real token attends to the padding after it,
    so real tokens' outputs (all the loss reads: padding labels are ignored) are the same, and
    the model's attention keeps the plain causal form cuDNN's fused kernel takes on a GPU.
    """
    if not packed:
        return {"attention_mask": None, "positions": batch["positions"], "segment_ids": None}
    return {
        "attention_mask": batch["segment_ids"] > 0,
        "positions": batch["positions"],
        "segment_ids": batch["segment_ids"],
    }


def _loss_sum(model, batch, opts: LossOptions, mesh=None, packed: bool = True):
    """Summed smoothed loss over the batch's response tokens (the wrapper shifts the labels),
    each device computing its own tokens and vocabulary shard on ``mesh``; against the batch's
    sparse targets when it has them (:func:`soft_loss_sum`)."""
    if "target_ids" in batch:
        return soft_loss_sum(model, batch, opts, mesh)
    loss, _ = causal_lm_loss(
        model,
        {
            "input_ids": batch["input_ids"],
            "labels": batch["labels"],
            "weights": batch.get("weights"),
            **model_inputs(batch, packed),
        },
        reduction="sum",
        mesh=mesh,
        **opts.loss_kwargs(),
    )
    return loss


def soft_loss_sum(model, batch, opts: LossOptions, mesh=None) -> jax.Array:
    """float32 summed loss of the batch's response tokens against sparse soft targets, without
    the student's logits: ``target_ids`` / ``target_weights [B, T, K]`` (int32 / float32, aligned
    with the labels and shifted here like them; ``ls_jax.teacher_targets.soft_targets``) and, if present,
    ``target_uniform [B, T]``, mass spread uniformly over the vocabulary. Per token the target is
    ``(1 - a) (t_sparse + u / V) + a / V`` with smoothing a; each token weighs ``weights``. The
    uniform part is a second vocabulary pass (smoothing 1 on zero-weight labels: ``lse - mean z``).
    """
    inputs = model_inputs(batch)
    hidden = model(batch["input_ids"], **inputs)
    weight = model.unembedding().astype(hidden.dtype)  # the compute dtype, as causal_lm_loss
    scored = next_token_targets(batch["labels"], inputs["attention_mask"], inputs["segment_ids"]) != IGNORE_INDEX
    ids = jnp.where(scored[..., None], shift_left(batch["target_ids"]), IGNORE_INDEX)
    token_weights = next_token_weights(batch["weights"])
    kw = dict(opts.loss_kwargs(), logit_softcap=opts.softcap(model), reduction="sum", mesh=mesh)
    loss = linear_smoothed_cross_entropy(
        hidden, weight, (ids, shift_left(batch["target_weights"])), weights=token_weights, **kw
    )
    if "target_uniform" in batch:
        uniform = (1.0 - opts.label_smoothing) * shift_left(batch["target_uniform"]) * token_weights
        loss += linear_smoothed_cross_entropy(
            hidden,
            weight,
            (ids, jnp.zeros(ids.shape, jnp.float32)),
            weights=uniform,
            **{**kw, "label_smoothing": 1.0, "z_loss": 0.0},
        )
    return loss


def response_tokens(labels: jax.Array) -> jax.Array:
    """int32 count of predicted (shifted) response tokens in labels ``[..., T]``."""
    return (labels[..., 1:] != IGNORE_INDEX).sum().astype(jnp.int32)


def lm_tokens(batch) -> jax.Array:
    """int32 count of the response tokens a causal-LM batch scores."""
    return response_tokens(batch["labels"])


def lm_weight(batch) -> jax.Array:
    """float32 total weight of the response tokens a causal-LM batch scores (each token weighs
    its example's weight: 1, or a weighted answer's probability; 1 when the batch has none)."""
    scored = batch["labels"][..., 1:] != IGNORE_INDEX
    weights = batch.get("weights")
    return jnp.where(scored, 1.0 if weights is None else weights[..., 1:], 0.0).sum()


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    opts: LossOptions,
    *,
    param_shardings,
    frozen_shardings,
    opt_shardings,
    mesh,
    loss_sum: Callable | None = None,
    count: Callable = lm_tokens,
    total: Callable = lm_weight,
    packed: bool = True,
) -> Callable:
    """``step(params, frozen, opt_state, batch) -> (params, opt_state, metrics)``, jitted.

    loss_sum(model, micro_batch, opts): the summed (weighted) loss (default: the causal LM's, each
    device computing its own tokens and vocabulary shard on ``mesh``); count(batch): int32 scored
    units (default: the causal LM's response tokens; ``ls_jax.train.classification`` passes its
    rows); total(batch): their float32 total weight, which the summed loss is divided by (default:
    :func:`lm_weight`). packed: rows may hold several examples (see :func:`model_inputs`; default
    loss only).
    metrics: float32 ``loss`` (the step's weighted mean), ``grad_norm`` (before
    clipping), int32 ``tokens`` (units scored in the step), bool ``finite`` (every updated
    parameter is finite), ``real_tokens`` (all non-padding tokens). All replicated.
    """

    def step(params, frozen, opt_state, batch):
        weight = total(batch).astype(jnp.float32)
        weight = jnp.where(weight > 0, weight, 1.0)

        def micro(acc, mb):
            def weighted(p):
                model = nnx.merge(graphdef, p, frozen)
                return (loss_sum or partial(_loss_sum, mesh=mesh, packed=packed))(model, mb, opts) / weight

            loss, grads = jax.value_and_grad(weighted)(params)
            return jax.tree.map(jnp.add, acc, grads), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses = jax.lax.scan(micro, zeros, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))
        metrics = {
            "loss": losses.sum(),
            "grad_norm": optax.tree.norm(grads),
            "tokens": count(batch),
            "real_tokens": (batch["segment_ids"] > 0).sum(),
            "finite": finite,
        }
        return params, opt_state, metrics

    out_shardings = (param_shardings, opt_shardings, sharding.replicated(mesh))
    return jax.jit(
        sharding.on_mesh(step, mesh, out_shardings),
        in_shardings=(param_shardings, frozen_shardings, opt_shardings, sharding.batch_sharding(mesh, leading=1)),
        out_shardings=out_shardings,
        donate_argnums=(0, 2),
    )


def make_eval_step(
    graphdef,
    opts: LossOptions,
    *,
    param_shardings,
    frozen_shardings,
    mesh,
    special_ids: Sequence[int] = (),
    n_bins: int = 15,
    packed: bool = True,
) -> Callable:
    """``evaluate(params, frozen, batch) -> sums`` for a batch ``[B, T]``, jitted.

    One forward pass; the training loss' own path (same implementation, blocks and compute
    dtype) gives the loss and token statistics, one more vocabulary pass the Brier score. Sums
    (add them over batches): ``loss_sum`` (the training loss, smoothing included, each token
    weighted as in training), ``weight`` (their total weight, :func:`lm_weight`), ``tokens``,
    ``answers`` / ``answers_correct`` (rows with a response / rows whose response tokens are
    all argmax-correct under teacher forcing, i.e. greedy decoding reproduces the answer),
    ``bins``: token-level :class:`ls_jax.calibration.CalibrationBins` of the content tokens
    (response tokens other than ``special_ids``: end-of-sequence and chat-template markers,
    whose confidence smoothing caps at ``1 - a + a / V`` by construction), and
    ``special_bins``: the same over the ``special_ids`` response tokens alone. packed: as in
    :func:`make_train_step`.
    """
    special_ids = jnp.asarray(sorted(set(special_ids)) or [-1], jnp.int32)

    def evaluate(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        inputs = model_inputs(batch, packed)
        hidden = model(batch["input_ids"], **inputs)
        weight = model.unembedding().astype(hidden.dtype)  # the compute dtype, as causal_lm_loss
        targets = next_token_targets(batch["labels"], inputs["attention_mask"], inputs["segment_ids"])
        kw = dict(opts.loss_kwargs(), logit_softcap=opts.softcap(model))
        loss, stats = linear_smoothed_cross_entropy(
            hidden,
            weight,
            targets,
            reduction="none",
            return_stats=True,
            weights=next_token_weights(batch["weights"]),
            mesh=mesh,
            **kw,
        )
        brier = token_brier(
            hidden, weight, targets, stats, logit_softcap=kw["logit_softcap"], impl=opts.impl, blocks=kw["blocks"]
        )
        special = jnp.isin(targets, special_ids)
        bins = {
            name: token_bins(stats._replace(valid=stats.valid & keep), targets, n_bins=n_bins, brier=brier)
            for name, keep in (("bins", ~special), ("special_bins", special))
        }
        wrong = (stats.valid & (stats.prediction != targets)).any(-1)
        answered = stats.valid.any(-1)
        return {
            "loss_sum": loss.sum(),
            "weight": lm_weight(batch),
            "tokens": stats.valid.sum(),
            "answers": answered.sum(),
            "answers_correct": (answered & ~wrong).sum(),
            **bins,
        }

    return jax.jit(
        sharding.on_mesh(evaluate, mesh, sharding.replicated(mesh)),
        in_shardings=(param_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def accumulate(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Sum eval-step outputs (bins merge by addition)."""
    if total is None:
        return part
    return jax.tree.map(jnp.add, total, part)
