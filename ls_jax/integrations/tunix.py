"""A drop-in ``loss_fn`` for Tunix's ``PeftTrainer`` (``google-tunix``): the fused smoothed loss.

Usage (full fine-tuning, or LoRA applied with qwix as Tunix does)::

    from ls_jax.integrations.tunix import loss_fn
    trainer = peft_trainer.PeftTrainer(model, optimizer, config)
    trainer = trainer.with_gen_model_input_fn(gen_model_input_fn).with_loss_fn(
        loss_fn(label_smoothing=0.1), has_aux=True)

The returned function has the signature of Tunix's default loss,
``(model, input_tokens, input_mask, positions, attention_mask) -> (loss, aux)``, and scores
the same tokens (``input_tokens[:, 1:]`` where ``input_mask[:, 1:]``). The model runs with
``output_hidden_states=True``; its final hidden state and head (:func:`head`) go to the fused
loss. ``aux``: ``nll`` and ``perplexity`` (unsmoothed: Tunix's own ``perplexity`` is
``exp(loss)``, which smoothing inflates), ``accuracy``, ``mean_lse``, ``tokens`` (see
:func:`ls_jax.integrations.logits_models.next_token_loss`).
"""

from collections.abc import Callable

import jax

from ls_jax.integrations.logits_models import next_token_loss, sown_hidden_states
from ls_jax.logit_stats import BlockSizes


def head(model) -> tuple[jax.Array, str]:
    """The output head of a Tunix causal LM and its layout: ``lm_head.w [D, V]`` ("dv", Qwen /
    Llama without tied embeddings), else the tied ``embedder.input_embedding [V, D]`` ("vd")."""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        return lm_head.w[...], "dv"
    embedder = getattr(model, "embedder", None)
    if embedder is None or not hasattr(embedder, "input_embedding"):
        raise TypeError(
            f"{type(model).__name__} has neither lm_head.w nor embedder.input_embedding: not a Tunix causal LM"
        )
    return embedder.input_embedding[...], "vd"


def final_logit_softcap(model) -> float | None:
    """The final-logit softcap a Tunix model applies (Gemma 2's ``final_logits_softcap``), or None."""
    return getattr(model, "final_logits_softcap", None)


def loss_fn(
    *, label_smoothing: float = 0.0, z_loss: float = 0.0, impl: str = "auto", blocks: BlockSizes | None = None
) -> Callable:
    """A Tunix ``loss_fn`` (pass ``has_aux=True`` to ``with_loss_fn``) computing the mean
    label-smoothed next-token cross-entropy with the fused loss (options as in
    :func:`ls_jax.linear_smoothed_cross_entropy`)."""

    def tunix_loss(model, input_tokens, input_mask, positions, attention_mask):
        hidden = sown_hidden_states(
            model, lambda: model(input_tokens, positions, None, attention_mask, output_hidden_states=True)
        )
        weight, layout = head(model)
        return next_token_loss(
            hidden,
            weight,
            input_tokens,
            input_mask,
            head_layout=layout,
            logit_softcap=final_logit_softcap(model),
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            impl=impl,
            blocks=blocks,
        )

    return tunix_loss
