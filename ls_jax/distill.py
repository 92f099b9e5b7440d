"""A teacher's top-k next-token distributions as training targets (distillation in the fused loss).

``python -m ls_jax.distill --teacher CKPT --data train.jsonl --top-k 16 --out targets.parquet``
runs a local teacher checkpoint (:func:`ls_jax.models.from_pretrained`, its own tokenizer) over
the responses of ``--data``, tokenised exactly as ``train.py`` tokenises them (:mod:`ls_jax.data`,
same ``--max-length``), its parameters and batches sharded over a device mesh as in training
(``--mesh``, :mod:`ls_jax.train.sharding`), and writes the teacher's top k per response token
(:mod:`ls_jax.teacher_targets`: the file's format, and the per-token sparse targets built from it).

``train.py --soft-targets targets.parquet`` trains on them (``ls_jax.train.step`` feeds them to
``linear_smoothed_cross_entropy`` as ``(ids, weights)`` labels, the student's logits never
materialised). Only k numbers per token are stored, where Liger's fused linear JSD needs the
teacher's full logits.
"""

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from ls_jax.data import IGNORE_INDEX, Example, eval_batches, expand_responses, load_rows, prepare
from ls_jax.teacher_targets import tokenizer_fingerprint, write_targets


def teacher_top_k(
    model, examples: Sequence[Example], k: int, *, pad_id: int, max_length: int, batch_size: int = 16, mesh=None
) -> list[dict[str, np.ndarray]]:
    """The teacher's k most likely next tokens at every response token of every example.

    The model's parameters are placed as training places them on ``mesh`` (vocabulary- and
    tensor-parallel with a ``tensor`` axis, FSDP with ``fsdp``) and each batch's rows go over
    its batch axes; the logits exist one position at a time, ``[batch_size / (data x fsdp), V]``
    per device (the vocabulary split over ``tensor``).

    Args:
      model: an ls_jax causal LM (``ls_jax.models``), the teacher.
      examples: tokenised examples ``(input_ids [T], labels [T], weight)`` (:func:`ls_jax.data.prepare`).
      k: tokens kept per position, ``1 <= k <= V``.
      pad_id: the tokenizer's pad id. max_length: the batches' row length T.
      batch_size: rows per batch, divisible by the mesh's data x fsdp.
      mesh: a (data, fsdp, tensor) ``jax.sharding.Mesh``; None: every device over ``data``.
    Returns:
      Per example a dict: ``positions [n]`` int32 (its response tokens' places j >= 1),
      ``top_ids [n, k]`` int32 and ``top_p [n, k]`` float32 (the teacher's k most likely tokens at
      place j given the tokens before it, descending), ``rest [n]`` float32 (1 - their sum).
    Raises:
      ls_jax.train.sharding.MeshError: when ``batch_size`` does not split over the batch axes.
    """
    import jax
    from flax import nnx

    from ls_jax.train import sharding

    mesh = sharding.make_mesh("data=-1") if mesh is None else mesh
    sharding.check_batch(batch_size, mesh)
    graphdef, state = nnx.split(model)
    state_sh = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, state_sh)

    def top(state, batch):
        model = nnx.merge(graphdef, state)
        hidden = model(batch["input_ids"], batch["segment_ids"] > 0, batch["positions"], batch["segment_ids"])
        p, ids = jax.lax.map(
            lambda h: jax.lax.top_k(jax.nn.softmax(model.project(h), axis=-1), k), hidden.swapaxes(0, 1)
        )  # one position [B, D] at a time
        return ids.swapaxes(0, 1).astype(jax.numpy.int32), p.swapaxes(0, 1)

    out_sh = sharding.replicated(mesh)  # k numbers per token: every process reads them all
    step = jax.jit(
        sharding.on_mesh(top, mesh, out_sh),
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=out_sh,
    )
    out = []
    for start, batch in zip(
        range(0, len(examples), batch_size), eval_batches(examples, batch_size, max_length, pad_id)
    ):
        ids, p = jax.device_get(step(state, sharding.put_batch(batch, mesh)))
        for row, (_, labels, _) in enumerate(examples[start : start + batch_size]):
            at = np.flatnonzero(labels[1:] != IGNORE_INDEX) + 1
            out.append(
                {
                    "positions": at.astype(np.int32),
                    "top_ids": ids[row, at - 1],
                    "top_p": p[row, at - 1].astype(np.float32),
                    "rest": np.maximum(1.0 - p[row, at - 1].astype(np.float64).sum(-1), 0.0).astype(np.float32),
                }
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ls_jax.distill``: exit status 0, or 2 with one ``error:`` line on bad input."""
    p = argparse.ArgumentParser(prog="python -m ls_jax.distill", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="local Hugging Face checkpoint directory with its tokenizer")
    p.add_argument("--data", required=True, help="the training data (as train.py --data)")
    p.add_argument("--out", required=True, help="the parquet file to write")
    p.add_argument("--top-k", type=int, default=16, help="teacher tokens kept per position (default: 16)")
    p.add_argument("--max-length", type=int, default=48, help="as train.py's --max-length (default: 48)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="examples per teacher batch, divisible by the mesh's data x fsdp (default: 16)",
    )
    p.add_argument(
        "--mesh",
        default="data=-1,fsdp=1,tensor=1",
        help="device mesh sizes, as train.py's --mesh (default: data=-1,fsdp=1,tensor=1)",
    )
    p.add_argument("--split", default="train", help="split of a saved DatasetDict (default: train)")
    a = p.parse_args(argv)
    from ls_jax.tokenizer import load_tokenizer
    from ls_jax.train import sharding

    try:
        if a.top_k < 1 or a.batch_size < 1 or a.max_length < 2:
            raise ValueError("--top-k and --batch-size must be >= 1, --max-length >= 2")
        mesh = sharding.make_mesh(a.mesh)
        sharding.check_batch(a.batch_size, mesh)
        tokenizer = load_tokenizer(a.teacher)
        rows, where = load_rows(a.data, a.split)
        rows, where, weights = expand_responses(rows, where)
        examples, stats = prepare(rows, tokenizer, a.max_length, name=a.data, where=where, weights=weights)
        from ls_jax.models import from_pretrained

        model = from_pretrained(a.teacher)
        if a.top_k > model.spec.vocab_size:
            raise ValueError(f"--top-k {a.top_k} is larger than the vocabulary ({model.spec.vocab_size})")
    except (ValueError, OSError) as e:  # MeshError, DataError, bad flags; a checkpoint that does not load
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(stats.log_line("data", a.max_length), file=sys.stderr)
    targets = teacher_top_k(
        model,
        examples,
        a.top_k,
        pad_id=tokenizer.pad_token_id,
        max_length=a.max_length,
        batch_size=a.batch_size,
        mesh=mesh,
    )
    write_targets(
        a.out,
        examples,
        targets,
        {
            "teacher": a.teacher,
            "top_k": a.top_k,
            "max_length": a.max_length,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        },
    )
    tokens = sum(len(t["positions"]) for t in targets)
    rest = float(np.mean(np.concatenate([t["rest"] for t in targets])))
    print(
        f"{a.out}: {len(examples)} examples, {tokens} response tokens, top {a.top_k} (mean mass outside it {rest:.4f})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
