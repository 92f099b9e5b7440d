"""Sequence-level soft labels: a row's weighted ``responses``, validated and expanded to one row per answer."""

import numbers
from collections.abc import Sequence

from ls_jax.data.errors import DataError

PROBABILITY_TOLERANCE = 1e-3


def probabilities(pairs: Sequence[tuple[str, object]], where: str, label) -> list[float]:
    """The probabilities of ``(name, p)`` pairs, checked to be a distribution: each a real number
    >= 0 (not a bool), summing to 1 within :data:`PROBABILITY_TOLERANCE`. ``label`` is shown in
    the error. Raises :class:`DataError` (``"WHERE: ..."``) otherwise."""
    for name, p in pairs:
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < float("inf"):
            raise DataError(f"{where}: soft label probability {p!r} of {name!r} is not a number >= 0")
    total = float(sum(float(p) for _, p in pairs))
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        raise DataError(f"{where}: soft label {label} is not a distribution (sums to {total:g}, not 1)")
    return [float(p) for _, p in pairs]


def weighted_responses(row: dict, where: str) -> list[tuple[str, float]] | None:
    """``[(text, p)]`` of a row's ``responses`` (validated, :func:`probabilities`), or None for a
    row without them. Raises :class:`DataError` for a malformed list or a row that also has a
    ``response``."""
    answers = row.get("responses")
    if answers is None:
        return None
    if row.get("response") is not None:
        raise DataError(f"{where}: has both 'response' and 'responses': give one")
    if (
        not isinstance(answers, (list, tuple))
        or not answers
        or not all(isinstance(a, dict) and isinstance(a.get("text"), str) and "p" in a for a in answers)
    ):
        raise DataError(f"{where}: 'responses' must be a non-empty list of {{'text': str, 'p': probability}} objects")
    pairs = [(a["text"], a["p"]) for a in answers]
    return list(zip((text for text, _ in pairs), probabilities(pairs, where, dict(pairs))))


def expand_responses(
    rows: Sequence[dict], where: Sequence[str] | None = None
) -> tuple[list[dict], list[str], list[float]]:
    """``(rows, where, weights)``: every row with ``responses`` replaced by one single-response row
    per answer (``prompt`` + ``response``, or ``messages`` + a final assistant message) of weight
    ``p``, its place ``"WHERE (response K)"``; other rows kept, weight 1. ``where`` as in
    :func:`prepare`. Raises :class:`DataError` for a bad ``responses`` list."""
    where = [f"row {i + 1}" for i in range(len(rows))] if where is None else where
    out, out_where, weights = [], [], []
    for row, w in zip(rows, where):
        answers = weighted_responses(row, w) if isinstance(row, dict) else None
        if answers is None:
            out.append(row)
            out_where.append(w)
            weights.append(1.0)
            continue
        for k, (text, p) in enumerate(answers, 1):
            single = {key: v for key, v in row.items() if key != "responses"}
            if single.get("messages") is not None:
                single["messages"] = list(single["messages"]) + [{"role": "assistant", "content": text}]
            else:
                single["response"] = text
            out.append(single)
            out_where.append(f"{w} (response {k})")
            weights.append(p)
    return out, out_where, weights
