"""Export a trained run as a Hugging Face checkpoint directory (``<run dir>/hf``).

``python -m ls_jax.evaluate --model <run dir>/hf`` and transformers'
``AutoModelForCausalLM.from_pretrained`` read it; LoRA adapters are merged into the weights.
"""

from collections.abc import Sequence

from flax import nnx

from ls_jax.models import save_pretrained
from ls_jax.train.lora import merge_lora


def export_hf(
    graphdef,
    params,
    frozen,
    tokenizer,
    path: str,
    lora_alpha: float | None = None,
    classes: Sequence[str] | None = None,
) -> None:
    """Write the model ``nnx.merge(graphdef, params, frozen)`` (LoRA merged with ``lora_alpha``,
    see :func:`ls_jax.train.lora.merge_lora`) and its tokenizer to ``path`` (config.json,
    model.safetensors, tokenizer files); a classifier's ``classes`` become config.json's
    ``id2label`` / ``label2id``."""
    model = nnx.merge(graphdef, params, frozen)
    merge_lora(model, lora_alpha)
    save_pretrained(model, path, labels=classes)
    tokenizer.save_pretrained(path)
