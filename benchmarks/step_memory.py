"""The compiled train step's XLA temporaries per sequence length, per attention path and --remat.

The step is train.py's own (``ls_jax.train.step.make_train_step``: fused smoothed loss,
gradient, AdamW update) on one device, one unpacked row ``[1, T]`` of a tiny Llama (``--layers``
layers, default 2; D 64, 4 query / 2 key-value heads of 16, vocabulary 256). It is only compiled, never run:
the figure is ``compiled.memory_analysis().temp_size_in_bytes`` (buffers beyond inputs and
outputs). ``growth`` is the ratio to the previous (half) T: about 2 is linear in T, about 4
quadratic - the ``[B, heads, T, T]`` scores. ``f32 TxT``: the compiled step holds a float32
tensor whose last two dimensions are ``[T, T]`` (scores or probabilities); ``cudnn``: it calls
cuDNN's fused attention (a ``__cudnn$fmha`` custom call).

Attention paths (``DecoderSpec.attention``): "explicit", the einsum every layer had before
issue 24; "auto", ``jax.nn.dot_product_attention`` as the models now call it. On a CPU "auto"
is XLA's implementation, which materialises the scores too, so both grow quadratically
there; cuDNN's fused kernel ("auto" on a GPU, bf16) keeps no ``[T, T]`` scores, and its
figure needs the GPU (kernels/NOTES.md, "Plan on the GPU"). "splash" (the TPU path, T a
multiple of 128) compiles on a CPU in Pallas interpret mode: its blocked loops show the linear
growth there.

    python benchmarks/step_memory.py                     # T = 256 .. 4096, float32
    python benchmarks/step_memory.py --lengths 256,512 --dtype bfloat16 --remat none
"""

import argparse
import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from ls_jax.models import CausalLM, tiny_llama_config
from ls_jax.models.llama import llama_spec
from ls_jax.train import sharding
from ls_jax.train.config import TrainConfig
from ls_jax.train.optim import adamw
from ls_jax.train.step import make_train_step

KEYS = ("input_ids", "labels", "positions", "segment_ids")


def compiled_step(attention: str, remat: str, length: int, dtype, layers: int = 2):
    """The train step compiled for the default backend at sequence length ``length``.

    Args:
      attention: ``DecoderSpec.attention`` ("explicit", "auto", "xla", "cudnn", "splash").
      remat: "none", "full" or "dots". length: T of the one row. dtype: compute dtype.
      layers: decoder layers.
    Returns:
      the ``jax.stages.Compiled`` step.
    """
    spec = dataclasses.replace(
        llama_spec(tiny_llama_config(vocab_size=256, hidden_size=64, num_hidden_layers=layers)), attention=attention
    )
    model = nnx.eval_shape(lambda: CausalLM(spec, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    mesh = sharding.make_mesh("data=1,fsdp=1,tensor=1", jax.devices()[:1])
    tx = adamw(1e-3, weight_decay=0.01, b1=0.9, b2=0.98, clip_norm=1.0)
    opt_state = jax.eval_shape(tx.init, params)
    step = make_train_step(
        graphdef,
        tx,
        TrainConfig(label_smoothing=0.1),
        mesh=mesh,
        packed=False,
        param_shardings=sharding.tree_shardings(params, mesh),
        frozen_shardings=sharding.tree_shardings(frozen, mesh),
        opt_shardings=sharding.tree_shardings(opt_state, mesh),
    )
    batch = {k: jax.ShapeDtypeStruct((1, 1, length), jnp.int32) for k in KEYS}
    return step.lower(params, frozen, opt_state, batch).compile()


def holds_square_f32(hlo: str, length: int) -> bool:
    """Whether HLO text has a float32 tensor ending in ``[T, T]`` (T = ``length``)."""
    return re.search(rf"f32\[(\d+,)*{length},{length}\]", hlo) is not None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="256,512,1024,2048,4096", help="comma-separated sequence lengths T")
    p.add_argument("--attention", default="explicit,auto", help="comma-separated DecoderSpec.attention values")
    p.add_argument("--remat", default="none,full,dots", help="comma-separated --remat choices")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny model")
    a = p.parse_args(argv)
    lengths = [int(t) for t in a.lengths.split(",")]
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, compute dtype {a.dtype}, {a.layers} layers")
    print(f"{'attention':<10} {'remat':<6} {'T':>6} {'temp MiB':>10} {'growth':>7} {'f32 TxT':>8} {'cudnn':>6}")
    for attention in a.attention.split(","):
        for remat in a.remat.split(","):
            previous = None
            for length in lengths:
                compiled = compiled_step(attention, remat, length, jnp.dtype(a.dtype), a.layers)
                temp, hlo = compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()
                growth = f"{temp / previous:.2f}" if previous else ""
                square, cudnn = holds_square_f32(hlo, length), "__cudnn$fmha" in hlo
                print(
                    f"{attention:<10} {remat:<6} {length:>6} {temp / 2**20:>10.1f} {growth:>7} "
                    f"{'yes' if square else 'no':>8} {'yes' if cudnn else 'no':>6}",
                    flush=True,
                )
                previous = temp


if __name__ == "__main__":
    main()
