"""Fixed-shape batches of rows: a seeded order addressed by position (exact resume), and evaluation batches."""

import numpy as np

from ls_jax.data.errors import DataError
from ls_jax.data.packing import build_row, pack


class Batches:
    """Fixed-shape batches ``[batch_size, max_length]`` in a seeded order, addressed by position.

    ``batch(p)`` is batch number ``p`` counted from the start of training over all epochs:
    epoch ``p // per_epoch`` visits the rows in ``permutation(seed + epoch)`` order, and a
    trailing partial batch is skipped. The same ``p`` always gives the same batch, which is
    what makes ``--resume`` exact. With ``packing`` rows hold several examples; ``targets`` as in
    :func:`build_row`.
    """

    def __init__(
        self,
        examples,
        batch_size: int,
        max_length: int,
        pad_id: int,
        *,
        seed: int = 0,
        packing: bool = False,
        shuffle: bool = True,
        targets=None,
    ):
        members = pack(examples, max_length) if packing else [[i] for i in range(len(examples))]
        self.rows = [build_row(examples, m, max_length, pad_id, targets) for m in members]
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.per_epoch = len(self.rows) // batch_size
        if self.per_epoch == 0:
            raise DataError(f"only {len(self.rows)} rows of data for a batch size of {batch_size}")

    def batch(self, position: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Batch number ``position``: dict of arrays ``[batch_size, max_length]`` (:func:`build_row`); with
        ``rows``, only those rows of it (a process's share of a batch split across processes)."""
        epoch, k = divmod(position, self.per_epoch)
        order = (
            np.random.default_rng(self.seed + epoch).permutation(len(self.rows))
            if self.shuffle
            else np.arange(len(self.rows))
        )
        take = order[k * self.batch_size : (k + 1) * self.batch_size][rows]
        return {key: np.stack([self.rows[i][key] for i in take]) for key in self.rows[0]}

    def __len__(self) -> int:
        return self.per_epoch


def eval_batches(examples, batch_size: int, max_length: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Every example once, in order, padded to ``[batch_size, max_length]`` (pad rows are all-ignored)."""
    rows = [build_row(examples, [i], max_length, pad_id) for i in range(len(examples))]
    blank = build_row([], [], max_length, pad_id)
    rows += [blank] * (-len(rows) % batch_size)
    return [
        {k: np.stack([r[k] for r in rows[s : s + batch_size]]) for k in rows[0]}
        for s in range(0, len(rows), batch_size)
    ]
