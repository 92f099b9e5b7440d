"""A teacher's top-k targets file: written by ``python -m ls_jax.distill``, read by ``train.py
--soft-targets``, and each training example's per-token sparse target built from it.

One parquet row per example: ``input_ids`` (the example's tokens, which key it), ``positions``
(its response tokens' places j >= 1), and per response token the teacher's ``top_ids [k]``,
``top_p [k]`` (probabilities of token j given the tokens before it) and ``rest`` (1 - their sum:
the mass outside the top k). The file's metadata names the teacher, k and the tokenizer's
fingerprint (:func:`tokenizer_fingerprint`): a student with another tokenizer is refused.
"""

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from ls_jax.data import IGNORE_INDEX, DataError, Example

METADATA_KEY = b"ls_jax_distill"
REST_MODES = ("renormalise", "uniform")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary and special tokens: equal fingerprints encode alike."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def write_targets(
    path: str, examples: Sequence[Example], targets: Sequence[dict[str, np.ndarray]], metadata: dict
) -> None:
    """One parquet row per example (see the module docstring); ``metadata`` as JSON in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ls_jax.atomic import atomic_path

    table = pa.table(
        {
            "input_ids": [e[0].tolist() for e in examples],
            "positions": [t["positions"].tolist() for t in targets],
            "top_ids": [t["top_ids"].tolist() for t in targets],
            "top_p": [t["top_p"].tolist() for t in targets],
            "rest": [t["rest"].tolist() for t in targets],
        }
    )
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_targets(path: str, tokenizer) -> dict[bytes, dict[str, np.ndarray]]:
    """The targets of ``path`` keyed by their example's ``input_ids`` (int32 bytes). Raises
    :class:`DataError` when the file is not one ``python -m ls_jax.distill`` wrote, or was made with another
    tokenizer than ``tokenizer``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"--soft-targets {path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    meta = (table.schema.metadata or {}).get(METADATA_KEY)
    if meta is None:
        raise DataError(
            f"--soft-targets {path}: not written by python -m ls_jax.distill (no {METADATA_KEY.decode()} metadata)"
        )
    meta = json.loads(meta)
    if meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise DataError(
            f"--soft-targets {path}: the teacher's tokenizer ({meta['teacher']}) is not this run's: "
            f"the student must share it (--model a checkpoint with the same tokenizer)"
        )
    out = {}
    for row in table.to_pylist():
        out[np.asarray(row["input_ids"], np.int32).tobytes()] = {
            "positions": np.asarray(row["positions"], np.int32),
            "top_ids": np.asarray(row["top_ids"], np.int32).reshape(-1, meta["top_k"]),
            "top_p": np.asarray(row["top_p"], np.float32).reshape(-1, meta["top_k"]),
            "rest": np.asarray(row["rest"], np.float32),
        }
    return out


def soft_targets(
    example: Example,
    target: dict[str, np.ndarray],
    *,
    temperature: float = 1.0,
    rest: str = "renormalise",
    hard_weight: float = 0.0,
) -> dict[str, np.ndarray]:
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
    out = {
        "target_ids": np.full((len(ids), k + 1), IGNORE_INDEX, np.int32),
        "target_weights": np.zeros((len(ids), k + 1), np.float32),
    }
    out["target_ids"][at] = np.concatenate([target["top_ids"], labels[at, None]], axis=-1)
    out["target_weights"][at] = np.concatenate(
        [(1 - hard_weight) * np.reshape(kept, (-1, 1)) * p, np.full((len(at), 1), hard_weight)], axis=-1
    )
    if rest == "uniform":
        out["target_uniform"] = np.zeros(len(ids), np.float32)
        out["target_uniform"][at] = (1 - hard_weight) * (1.0 - kept)
    return out
