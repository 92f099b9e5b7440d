"""LoRA fine-tuning: wrap a model's projection layers in ``flax.nnx.LoRA`` adapters.

Each targeted ``nnx.Linear`` (found by attribute name anywhere in the model) becomes
``nnx.LoRA(in, rank, out, base_module=linear)``: ``y = linear(x) + x @ A @ B`` with ``A``
he-uniform and ``B`` zero at the start (so the wrapped model computes exactly what the original
did). The adapters are ``nnx.LoRAParam``; train only those by splitting on that type.
:func:`merge_lora` folds them back into plain ``nnx.Linear`` layers for export.
"""

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: nnx.Module, rank: int, *, seed: int = 0, targets: Sequence[str] = PROJECTIONS) -> int:
    """Wrap, in place, every ``nnx.Linear`` attribute named in ``targets``; returns how many.

    Raises ValueError if the model has none (the adapters would train nothing).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    rngs = nnx.Rngs(seed)
    found = []
    for _, module in nnx.iter_modules(model):
        for name in targets:
            layer = getattr(module, name, None)
            if isinstance(layer, nnx.Linear):
                found.append((module, name, layer))
    if not found:
        raise ValueError(f"no nnx.Linear layer named any of {tuple(targets)} to put LoRA adapters on")
    for module, name, layer in found:
        setattr(module, name, nnx.LoRA(layer.in_features, rank, layer.out_features, base_module=layer,
                                       dtype=layer.dtype, param_dtype=layer.param_dtype, rngs=rngs))
    return len(found)


def merge_lora(model: nnx.Module) -> int:
    """Replace, in place, every ``nnx.LoRA`` wrapping an ``nnx.Linear`` by that linear with
    kernel ``W + A @ B`` (nnx layouts: ``W [in, out]``, ``A [in, rank]``, ``B [rank, out]``;
    ``nnx.LoRA`` computes ``x @ A @ B + x @ W + b`` with no scale), summed in float32 and
    stored in ``W``'s dtype; returns how many were merged."""
    found = [(module, name, layer) for _, module in nnx.iter_modules(model) for name, layer in vars(module).items()
             if isinstance(layer, nnx.LoRA) and isinstance(layer.base_module, nnx.Linear)]
    for module, name, layer in found:
        base = layer.base_module
        kernel = base.kernel.get_value()
        delta = jnp.asarray(layer.lora_a.get_value(), jnp.float32) @ jnp.asarray(layer.lora_b.get_value(), jnp.float32)
        base.kernel.set_value((jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype))
        setattr(module, name, base)
    return len(found)
