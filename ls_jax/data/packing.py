"""Examples placed in fixed-length rows: greedy packing and one padded row with segment ids."""

from collections.abc import Sequence

import numpy as np

from ls_jax.data.chat import IGNORE_INDEX
from ls_jax.data.encoding import Example


def pack(examples: Sequence[Example], max_length: int) -> list[list[int]]:
    """Greedy first-fit packing: a list of rows, each the indices of the examples it holds."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, example in enumerate(examples):
        n = len(example[0])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def build_row(
    examples,
    members: Sequence[int],
    max_length: int,
    pad_id: int,
    targets: Sequence[dict[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """One padded row ``[max_length]`` from the examples ``members`` placed end to end.

    input_ids, labels (IGNORE_INDEX on padding and on each segment's first token, so no
    token is predicted across a segment boundary), positions (restart at 0 per segment),
    segment_ids (1, 2, ... per example; 0 on padding): int32; weights: float32, each example's
    weight on its tokens (0 on padding). ``targets``: per example, arrays ``[T_i, ...]`` aligned
    with its tokens (a teacher's sparse targets, :func:`ls_jax.teacher_targets.soft_targets`), placed
    as the labels are (zeros, or IGNORE_INDEX for int arrays, elsewhere).
    """
    out = {
        "input_ids": np.full(max_length, pad_id, np.int32),
        "labels": np.full(max_length, IGNORE_INDEX, np.int32),
        "positions": np.zeros(max_length, np.int32),
        "segment_ids": np.zeros(max_length, np.int32),
        "weights": np.zeros(max_length, np.float32),
    }
    for key, value in (targets[0] if targets else {}).items():
        fill = IGNORE_INDEX if np.issubdtype(value.dtype, np.integer) else 0
        out[key] = np.full((max_length,) + value.shape[1:], fill, value.dtype)
    at = 0
    for seg, i in enumerate(members, 1):
        ids, labels, weight = examples[i]
        n = len(ids)
        out["input_ids"][at : at + n] = ids
        out["labels"][at + 1 : at + n] = labels[1:]
        out["positions"][at : at + n] = np.arange(n)
        out["segment_ids"][at : at + n] = seg
        out["weights"][at : at + n] = weight
        for key, value in (targets[i] if targets else {}).items():
            out[key][at + 1 : at + n] = value[1:]
        at += n
    return out
