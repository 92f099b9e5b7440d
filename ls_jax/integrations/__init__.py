"""The fused smoothed loss inside other people's training code.

* :mod:`ls_jax.integrations.logits_models`: any Flax NNX model that returns logits and sows
  its final hidden state (``nnx.Intermediate``): the next-token loss from that hidden state and
  the head, without the ``[B, T, V]`` logits, plus the true NLL beside the smoothed loss.
* :mod:`ls_jax.integrations.tunix`: a ``loss_fn`` for Tunix's ``PeftTrainer.with_loss_fn``.
"""
