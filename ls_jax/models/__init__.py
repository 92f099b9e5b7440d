"""Flax NNX language models (Llama 2/3, Mistral, Qwen2, Gemma 2) and local-checkpoint loading.

See :mod:`ls_jax.models.protocol` for the interface the loss wrapper relies on.
"""

from ls_jax.models.classification import SequenceClassifier, last_token_index, sequence_classification_loss
from ls_jax.models.llama import tiny_llama_config
from ls_jax.models.loading import (
    ARCHITECTURES,
    check_pretrained,
    decoder_spec,
    from_config,
    from_pretrained,
    save_pretrained,
)
from ls_jax.models.protocol import CausalLMProtocol
from ls_jax.models.transformer import CausalLM, Decoder, DecoderSpec, KVCache

__all__ = [
    "ARCHITECTURES",
    "CausalLM",
    "CausalLMProtocol",
    "Decoder",
    "DecoderSpec",
    "KVCache",
    "SequenceClassifier",
    "check_pretrained",
    "decoder_spec",
    "from_config",
    "from_pretrained",
    "last_token_index",
    "save_pretrained",
    "sequence_classification_loss",
    "tiny_llama_config",
]
