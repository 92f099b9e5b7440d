"""Megatron-style tensor parallelism of the trainer's step: what the compiled step communicates.

On a tensor=8 mesh the declared layouts (ls_jax.train.sharding.LAYOUTS) must give a step whose
only collectives are all-reduces of activations: no weight is ever gathered or communicated.
"""

import re

import jax
import jax.numpy as jnp
from flax import nnx

from ls_jax.models import from_config, tiny_llama_config
from ls_jax.train import sharding
from ls_jax.train.config import TrainConfig
from ls_jax.train.optim import adamw
from ls_jax.train.step import make_train_step

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _collectives(hlo: str):
    """(kind, [operand element counts]) of each collective instruction in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if m:
            shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
            found.append((m.group(2), [eval("*".join(s.split(",")) or "1") for s in shapes]))
    return found


def test_tensor_parallel_step_communicates_only_activations():
    layers, batch, length, d, vocab = 2, 4, 12, 64, 200
    model = from_config(tiny_llama_config(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
                                          num_attention_heads=8, num_key_value_heads=8), seed=0)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    mesh = sharding.make_mesh("tensor=8")
    param_sh, frozen_sh = sharding.tree_shardings(params, mesh), sharding.tree_shardings(frozen, mesh)
    assert all("tensor" in s.spec for s in jax.tree.leaves(param_sh) if len(s.spec) == 2)  # every matrix split
    tx = adamw(1e-3, weight_decay=0.01, b1=0.9, b2=0.98, clip_norm=1.0)
    opt = jax.eval_shape(tx.init, params)
    step = make_train_step(graphdef, tx, TrainConfig(impl="xla", label_smoothing=0.1), param_shardings=param_sh,
                           frozen_shardings=frozen_sh, opt_shardings=sharding.tree_shardings(opt, mesh), mesh=mesh)
    data = {k: jax.ShapeDtypeStruct((1, batch, length), jnp.int32)
            for k in ("input_ids", "labels", "positions", "segment_ids")}
    found = _collectives(step.lower(params, frozen, opt, data).compile().as_text())
    tokens = batch * length
    smallest_weight = min(x.size for x in jax.tree.leaves(params) if x.ndim == 2)
    assert tokens * d < smallest_weight  # so an operand of tokens x d elements cannot be a weight
    assert {kind for kind, _ in found} == {"all-reduce"}, found
    sizes = [n for _, operands in found for n in operands]
    assert max(sizes) <= tokens * d, found
    # Megatron's minimum: 2 all-reduces of [tokens, d] per layer forward and 2 backward; XLA
    # reduces q/k/v and gate/up input gradients separately (5 backward), plus the embedding
    # lookup, the loss's hidden gradient and its gather of the target rows of the head
    activations = sum(n == tokens * d for n in sizes)
    assert 4 * layers <= activations <= 7 * layers + 3, found
