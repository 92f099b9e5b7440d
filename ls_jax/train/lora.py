"""LoRA fine-tuning through qwix (Google's JAX LoRA / QLoRA library, the one Tunix uses).

:func:`add_lora` returns a copy of the model whose ``nnx.Linear`` layers with a module path
(``model/layers/0/self_attn/q_proj``) matching ``targets`` (a regular expression, matched
in full) compute ``x @ W + b + (alpha / rank) * x @ A @ B``: ``A [in, rank]`` he-uniform,
``B [rank, out]`` zero at the start (so the copy computes exactly what the original did),
both ``nnx.LoRAParam`` named ``kernel_lora_a`` / ``kernel_lora_b`` beside the kernel. Train
only those by splitting on that type (plus whatever else must train, e.g. a fresh head).
:func:`merge_lora` folds them into the kernels for export.
"""

import re

import jax.numpy as jnp
from flax import nnx

from ls_jax.train.config import LORA_TARGETS


def add_lora(
    model: nnx.Module, rank: int, *, alpha: float | None = None, targets: str = LORA_TARGETS, seed: int = 0
) -> nnx.Module:
    """The LoRA-adapted copy of ``model`` (a qwix ``LoraProvider`` over ``targets``).

    alpha: the LoRA scale numerator (default ``rank``: scale 1). ``model`` must take
    ``input_ids [B, T]`` as its first argument (qwix runs it once to create the adapters).
    Raises ValueError on a bad rank / alpha, or when no ``nnx.Linear`` path matches ``targets``.
    """
    import qwix

    lora_targets(model, targets)
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    provider = qwix.LoraProvider(module_path=targets, rank=rank, alpha=alpha)
    return qwix.apply_lora_to_model(model, provider, jnp.zeros((1, 2), jnp.int32), rngs=nnx.Rngs(seed))


def lora_targets(model: nnx.Module, targets: str) -> list:
    """Module paths of the ``nnx.Linear`` layers that ``targets`` matches in full (qwix's rule);
    ValueError when there are none (the adapters would train nothing)."""
    paths = ["/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
    matched = [p for p in paths if re.fullmatch(targets, p)]
    if not matched:
        raise ValueError(
            f"no nnx.Linear layer has a module path matching {targets!r} to put LoRA adapters on "
            f"(paths look like {paths[0] if paths else 'nothing: the model has no nnx.Linear'})"
        )
    return matched


def lora_layers(model: nnx.Module) -> list:
    """The ``nnx.Linear`` layers of ``model`` that carry LoRA adapters."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear) and hasattr(m, "kernel_lora_a")]


def merge_lora(model: nnx.Module, alpha: float | None = None) -> int:
    """Fold, in place, every adapter into its kernel: ``W + (alpha / rank) * A @ B`` (nnx
    layouts: ``W [in, out]``, ``A [in, rank]``, ``B [rank, out]``), summed in float32 and stored
    in ``W``'s dtype; drop the adapters and qwix's interception, so the model is a plain one
    again. ``alpha``: as given to :func:`add_lora` (default the rank). Returns how many merged."""
    layers = lora_layers(model)
    for layer in layers:
        a = jnp.asarray(layer.kernel_lora_a.get_value(), jnp.float32)
        b = jnp.asarray(layer.kernel_lora_b.get_value(), jnp.float32)
        scale = (a.shape[-1] if alpha is None else alpha) / a.shape[-1]
        kernel = layer.kernel.get_value()
        layer.kernel.set_value((jnp.asarray(kernel, jnp.float32) + scale * (a @ b)).astype(kernel.dtype))
        del layer.kernel_lora_a, layer.kernel_lora_b
    plain = getattr(type(model), "_unquantized_type", None)  # the class qwix wrapped
    if plain is not None:
        model.__class__ = plain
    return len(layers)
