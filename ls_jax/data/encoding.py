"""Rows to examples: tokenise, truncate, count and drop, optionally sharing the work between processes."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ls_jax.data.chat import IGNORE_INDEX, _responses, tokenize_example
from ls_jax.data.errors import DataError


@dataclass
class PrepareStats:
    """Counts from :func:`prepare`: rows in, rows cut at max_length, rows dropped (no response
    left), rows kept whose responses are all empty text (only an end token is learned)."""

    rows: int
    truncated: int
    dropped: int
    empty: int = 0

    def log_line(self, name: str, max_length: int) -> str:
        line = (
            f"{name}: {self.rows} examples, {self.truncated} truncated to {max_length} tokens, "
            f"{self.dropped} dropped with no response token left"
        )
        return line + (f", {self.empty} with an empty response" if self.empty else "")


Encoded = tuple[np.ndarray, np.ndarray, bool]  # (input_ids, labels) cut to max_length, whether cut


def encode_row(rows, i: int, tokenizer, max_length: int, where: Sequence[str] | None = None) -> Encoded:
    """Row ``i`` of ``rows`` tokenised (:func:`tokenize_example`) and cut to ``max_length``; ``where``
    as in :func:`prepare`. Raises :class:`DataError` for a bad row."""
    ids, labels = tokenize_example(rows[i], tokenizer, f"row {i + 1}" if where is None else where[i])
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def encode_shared(
    rows,
    tokenizer,
    max_length: int,
    where: Sequence[str] | None,
    index: int,
    count: int,
    gather: Callable[[np.ndarray], list[np.ndarray]],
) -> Callable[[int], Encoded]:
    """:func:`encode_row` of every row, process ``index`` of ``count`` tokenising only its share
    (rows ``index``, ``index + count``, ...): the shares are exchanged through ``gather`` (every
    process's int32 array ``[*]``, in process order: an all-gather). Returns ``encoded(i)``. A row
    that failed is re-tokenised by whoever asks for it, so the same :class:`DataError` is raised
    by every process (:func:`prepare` asks in row order: the first bad row's error)."""
    mine = []
    for i in range(index, len(rows), count):
        try:
            ids, labels, cut = encode_row(rows, i, tokenizer, max_length, where)
            mine.append(np.concatenate([[i, 1, cut, len(ids)], ids, labels]))
        except DataError:
            mine.append(np.array([i, 0, 0, 0]))
    table = {}
    for part in gather(np.concatenate(mine + [np.zeros(0, np.int64)]).astype(np.int32)):
        at = 0
        while at < len(part):
            i, ok, cut, n = (int(x) for x in part[at : at + 4])
            table[i] = (part[at + 4 : at + 4 + n], part[at + 4 + n : at + 4 + 2 * n], bool(cut)) if ok else None
            at += 4 + 2 * n
    return lambda i: table[i] or encode_row(rows, i, tokenizer, max_length, where)


Example = tuple[np.ndarray, np.ndarray, float]  # (input_ids [T] int32, labels [T] int32, weight of its tokens)


def prepare(
    rows,
    tokenizer,
    max_length: int,
    name: str = "data",
    where: Sequence[str] | None = None,
    encoded: Callable[[int], Encoded] | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[list[Example], PrepareStats]:
    """Tokenise, truncate to ``max_length`` and drop examples without response tokens.

    Returns the examples ``(input_ids, labels, weight)`` and the counts; ``weights``: each row's
    weight (:func:`expand_responses`; default 1).

    Raises :class:`DataError` naming ``name`` and the row for a bad row (``where``: the rows'
    places in their source, default ``"row 1"``, ``"row 2"``, ...), and when nothing is left
    to learn: no response token, or only empty responses. A response token at position 0
    cannot be predicted (nothing precedes it), so only positions >= 1 count as response tokens.
    ``encoded(i)``: row ``i`` already tokenised (:func:`encode_shared`; default :func:`encode_row`).
    """
    examples, truncated, dropped, empty = [], 0, 0, 0
    for i, row in enumerate(rows):
        try:
            ids, labels, cut = (encoded or (lambda i: encode_row(rows, i, tokenizer, max_length, where)))(i)
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
        truncated += cut
        if not (labels[1:] != IGNORE_INDEX).any():
            dropped += 1
            continue
        empty += not any(text.strip() for text in _responses(row))
        examples.append((ids, labels, 1.0 if weights is None else float(weights[i])))
    stats = PrepareStats(len(rows), truncated, dropped, empty)
    if not examples:
        raise DataError(
            f"{name}: no example has a response token after truncation to {max_length} tokens "
            f"({stats.rows} rows, {stats.truncated} truncated)"
        )
    if empty == len(examples):
        raise DataError(
            f"{name}: every response is empty ({empty} examples): there is nothing to learn but the end token"
        )
    return examples, stats
