"""The interface a causal language model needs for ``ls_jax.lm_loss.causal_lm_loss``.

Any Flax NNX module (ours or yours) that has these works with the fused smoothed loss:

* ``model(input_ids, attention_mask=None, positions=None, segment_ids=None) -> hidden [B, T, D]``
  input_ids int32 ``[B, T]``; attention_mask: the *token* mask ``[B, T]`` (1 token, 0 padding)
  or None, not a ``[B, T, T]`` attention matrix; positions int ``[B, T]`` or None;
  segment_ids ``[B, T]`` or None (packed sequences). ``hidden`` is the final hidden state
  (final norm applied), *not* logits.
* ``model.unembedding() -> W [V, D]``: the output embedding in Hugging Face layout
  (lm_head weight, or the tied token-embedding table); logits are ``hidden @ W.T``.
* ``model.final_logit_softcap``: float c (logits become ``c * tanh(z / c)``) or None.

The loss never asks for logits. A model that returns logits (Tunix's, most NNX models) and
sows its final hidden state works through :mod:`ls_jax.integrations` instead.
"""

from typing import Protocol, runtime_checkable

import jax


@runtime_checkable
class CausalLMProtocol(Protocol):
    final_logit_softcap: float | None

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array: ...

    def unembedding(self) -> jax.Array: ...
