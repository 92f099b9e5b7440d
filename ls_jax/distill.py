"""A teacher's top-k next-token distributions as training targets (distillation in the fused loss).

``python -m ls_jax.distill --teacher CKPT --data train.jsonl --top-k 16 --out targets.parquet``
runs a local teacher checkpoint (:func:`ls_jax.models.from_pretrained`, its own tokenizer) over
the responses of ``--data``, tokenised exactly as ``train.py`` tokenises them (:mod:`ls_jax.data`,
same ``--max-length``), and writes one parquet row per example: ``input_ids`` (the example's
tokens, which key it), ``positions`` (its response tokens' places j >= 1), and per response
token the teacher's ``top_ids [k]``, ``top_p [k]`` (probabilities of token j given the tokens
before it) and ``rest`` (1 - their sum: the mass outside the top k). The file's metadata names
the teacher, k and the tokenizer's fingerprint.

``train.py --soft-targets targets.parquet`` trains on them (:func:`soft_targets` builds each
token's sparse target; ``ls_jax.train.step`` feeds it to ``linear_smoothed_cross_entropy`` as
``(ids, weights)`` labels, the student's logits never materialised). Only k numbers per token
are stored, where Liger's fused linear JSD needs the teacher's full logits.
"""

import argparse
import hashlib
import json
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from ls_jax.data import IGNORE_INDEX, DataError, Example, eval_batches, expand_responses, load_rows, prepare

METADATA_KEY = b"ls_jax_distill"
REST_MODES = ("renormalise", "uniform")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary and special tokens: equal fingerprints encode alike."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def teacher_top_k(model, examples: Sequence[Example], k: int, *, pad_id: int, max_length: int,
                  batch_size: int = 16) -> List[Dict[str, np.ndarray]]:
    """Per example: ``positions [n]`` int32 (its response tokens' places), ``top_ids [n, k]``
    int32, ``top_p [n, k]`` float32 (the teacher's k most likely tokens at each, from the logits
    one place earlier, descending) and ``rest [n]`` float32 (the probability outside them).
    The teacher's logits exist one row ``[max_length, V]`` at a time."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def top(model, batch):
        hidden = model(batch["input_ids"], batch["segment_ids"] > 0, batch["positions"], batch["segment_ids"])
        p, ids = jax.lax.map(lambda h: jax.lax.top_k(jax.nn.softmax(model.project(h), axis=-1), k), hidden)
        return ids.astype(jnp.int32), p

    out = []
    batches = eval_batches(examples, batch_size, max_length, pad_id)
    for start, batch in zip(range(0, len(examples), batch_size), batches):
        ids, p = jax.device_get(top(model, {key: jnp.asarray(v) for key, v in batch.items()}))
        for row, (_, labels, _) in enumerate(examples[start:start + batch_size]):
            at = np.flatnonzero(labels[1:] != IGNORE_INDEX) + 1
            out.append({"positions": at.astype(np.int32), "top_ids": ids[row, at - 1],
                        "top_p": p[row, at - 1].astype(np.float32),
                        "rest": np.maximum(1.0 - p[row, at - 1].astype(np.float64).sum(-1), 0.0).astype(np.float32)})
    return out


def write_targets(path: str, examples: Sequence[Example], targets: Sequence[Dict[str, np.ndarray]],
                  metadata: dict) -> None:
    """One parquet row per example (see the module docstring); ``metadata`` as JSON in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ls_jax.atomic import atomic_path

    table = pa.table({"input_ids": [e[0].tolist() for e in examples],
                      "positions": [t["positions"].tolist() for t in targets],
                      "top_ids": [t["top_ids"].tolist() for t in targets],
                      "top_p": [t["top_p"].tolist() for t in targets],
                      "rest": [t["rest"].tolist() for t in targets]})
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_targets(path: str, tokenizer) -> Dict[bytes, Dict[str, np.ndarray]]:
    """The targets of ``path`` keyed by their example's ``input_ids`` (int32 bytes). Raises
    :class:`DataError` when the file is not one :func:`main` wrote, or was made with another
    tokenizer than ``tokenizer``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"--soft-targets {path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    meta = (table.schema.metadata or {}).get(METADATA_KEY)
    if meta is None:
        raise DataError(f"--soft-targets {path}: not written by python -m ls_jax.distill "
                        f"(no {METADATA_KEY.decode()} metadata)")
    meta = json.loads(meta)
    if meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise DataError(f"--soft-targets {path}: the teacher's tokenizer ({meta['teacher']}) is not this run's: "
                        f"the student must share it (--model a checkpoint with the same tokenizer)")
    out = {}
    for row in table.to_pylist():
        out[np.asarray(row["input_ids"], np.int32).tobytes()] = {
            "positions": np.asarray(row["positions"], np.int32),
            "top_ids": np.asarray(row["top_ids"], np.int32).reshape(-1, meta["top_k"]),
            "top_p": np.asarray(row["top_p"], np.float32).reshape(-1, meta["top_k"]),
            "rest": np.asarray(row["rest"], np.float32)}
    return out


def soft_targets(example: Example, target: Dict[str, np.ndarray], *, temperature: float = 1.0,
                 rest: str = "renormalise", hard_weight: float = 0.0) -> Dict[str, np.ndarray]:
    """The sparse target of every token of one example, aligned with its ``input_ids [T]``:
    ``target_ids [T, k + 1]`` int32 (the teacher's top k, then the hard label; ``IGNORE_INDEX``
    where no token is scored), ``target_weights [T, k + 1]`` float32 and, with ``rest="uniform"``,
    ``target_uniform [T]`` float32, the mass spread uniformly over the vocabulary.

    The top-k probabilities are tempered and renormalised over the k, ``p_i^(1/T) / sum_j
    p_j^(1/T)``; ``rest``: "renormalise" drops the teacher's remaining mass (the target is the
    k alone), "uniform" keeps it (the rest at T = 1), spread uniformly. ``hard_weight`` b mixes in
    the hard label: ``b onehot(y) + (1 - b) teacher``. Label smoothing applies on top, in the loss.
    """
    ids, labels, _ = example
    if not np.array_equal(target["positions"], np.flatnonzero(labels[1:] != IGNORE_INDEX) + 1):
        raise DataError("the teacher's targets are not for this example's response tokens")
    logp = np.log(np.maximum(target["top_p"].astype(np.float64), 1e-30)) / temperature
    p = np.exp(logp - logp.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    kept = 1.0 - target["rest"].astype(np.float64) if rest == "uniform" else 1.0
    at, k = target["positions"], p.shape[-1]
    out = {"target_ids": np.full((len(ids), k + 1), IGNORE_INDEX, np.int32),
           "target_weights": np.zeros((len(ids), k + 1), np.float32)}
    out["target_ids"][at] = np.concatenate([target["top_ids"], labels[at, None]], axis=-1)
    out["target_weights"][at] = np.concatenate([(1 - hard_weight) * np.reshape(kept, (-1, 1)) * p,
                                                np.full((len(at), 1), hard_weight)], axis=-1)
    if rest == "uniform":
        out["target_uniform"] = np.zeros(len(ids), np.float32)
        out["target_uniform"][at] = (1 - hard_weight) * (1.0 - kept)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ls_jax.distill``: exit status 0, or 2 with one ``error:`` line on bad input."""
    p = argparse.ArgumentParser(prog="python -m ls_jax.distill", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="local Hugging Face checkpoint directory with its tokenizer")
    p.add_argument("--data", required=True, help="the training data (as train.py --data)")
    p.add_argument("--out", required=True, help="the parquet file to write")
    p.add_argument("--top-k", type=int, default=16, help="teacher tokens kept per position (default: 16)")
    p.add_argument("--max-length", type=int, default=48, help="as train.py's --max-length (default: 48)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per teacher batch (default: 16)")
    p.add_argument("--split", default="train", help="split of a saved DatasetDict (default: train)")
    a = p.parse_args(argv)
    from ls_jax.tokenizer import load_tokenizer

    try:
        if a.top_k < 1 or a.batch_size < 1 or a.max_length < 2:
            raise ValueError("--top-k and --batch-size must be >= 1, --max-length >= 2")
        tokenizer = load_tokenizer(a.teacher)
        rows, where = load_rows(a.data, a.split)
        rows, where, weights = expand_responses(rows, where)
        examples, stats = prepare(rows, tokenizer, a.max_length, name=a.data, where=where, weights=weights)
        from ls_jax.models import from_pretrained

        model = from_pretrained(a.teacher)
        if a.top_k > model.spec.vocab_size:
            raise ValueError(f"--top-k {a.top_k} is larger than the vocabulary ({model.spec.vocab_size})")
    except (ValueError, OSError) as e:  # bad flags, DataError; a checkpoint that does not load
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(stats.log_line("data", a.max_length), file=sys.stderr)
    targets = teacher_top_k(model, examples, a.top_k, pad_id=tokenizer.pad_token_id, max_length=a.max_length,
                            batch_size=a.batch_size)
    write_targets(a.out, examples, targets, {"teacher": a.teacher, "top_k": a.top_k, "max_length": a.max_length,
                                             "tokenizer": tokenizer_fingerprint(tokenizer)})
    tokens = sum(len(t["positions"]) for t in targets)
    rest = float(np.mean(np.concatenate([t["rest"] for t in targets])))
    print(f"{a.out}: {len(examples)} examples, {tokens} response tokens, top {a.top_k} "
          f"(mean mass outside it {rest:.4f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
