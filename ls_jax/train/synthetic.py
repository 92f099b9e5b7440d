"""The embedded default data set: generated questions with checkable answers.

Two tasks, alternating, drawn from a seed (no download):

* addition (a generated answer): prompt ``"What is 37 + 48?\\nAnswer:"``, response ``" 85"``;
* multiple choice, in the prompt format of :func:`ls_jax.evaluate.format_prompt` (so
  ``python -m ls_jax.evaluate`` scores the trained model the same way):
  ``"Which number is the largest?\\nA. 12\\nB. 45\\nC. 7\\nD. 30\\nAnswer:"``, response ``" B"``;
  the row also holds the record ``question`` / ``choices`` / ``answer`` (0-based index).

Rows are ``{"prompt": str, "response": str, ...}``, the format ``ls_jax.data`` reads from files.
"""

import random
from collections.abc import Sequence

from ls_jax.evaluate import LETTERS, format_prompt

NUM_OPTIONS = 4
LETTER_PREFIX = " "  # the response is LETTER_PREFIX + letter: ls_jax.evaluate's default prefix


def _addition(rng: random.Random, max_operand: int) -> dict:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return {"prompt": f"What is {a} + {b}?\nAnswer:", "response": f" {a + b}"}


def multiple_choice_row(question: str, choices: Sequence[str], answer: int) -> dict:
    """A training row of a multiple-choice record: prompt, response and the record's fields."""
    return {
        "prompt": format_prompt(question, choices),
        "response": LETTER_PREFIX + LETTERS[answer],
        "question": question,
        "choices": list(choices),
        "answer": answer,
    }


def _largest(rng: random.Random, max_operand: int) -> dict:
    values = rng.sample(range(max_operand + 1), NUM_OPTIONS)
    return multiple_choice_row("Which number is the largest?", [str(v) for v in values], values.index(max(values)))


def generate_splits(sizes: Sequence[int], seed: int = 0, max_operand: int = 99) -> list[list[dict]]:
    """Deterministic lists of rows of the given sizes; no prompt occurs twice across them.

    Raises ValueError when more rows are asked for than there are distinct questions (half
    are additions, of which there are ``(max_operand + 1) ** 2``).
    """
    total = sum(sizes)
    most = 2 * (max_operand + 1) ** 2
    if total > most:
        raise ValueError(
            f"{' + '.join(map(str, sizes))} rows asked for, but the generated data has at most "
            f"{most} distinct questions"
        )
    rng = random.Random(seed)
    tasks = (_addition, _largest)
    seen, rows = set(), []
    budget = 50 * total
    while len(rows) < total and budget > 0:
        budget -= 1
        row = tasks[len(rows) % len(tasks)](rng, max_operand)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    if len(rows) < total:
        raise ValueError(f"cannot draw {total} distinct questions with max_operand={max_operand}")
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [rows[a:b] for a, b in zip(starts, starts[1:])]


def generate(num_train: int, num_eval: int, seed: int = 0, max_operand: int = 99) -> tuple[list[dict], list[dict]]:
    """Deterministic (train rows, held-out rows); no held-out prompt occurs in the train rows."""
    train, held = generate_splits([num_train, num_eval], seed=seed, max_operand=max_operand)
    return train, held


def as_text(rows: Sequence[dict]) -> list[dict]:
    """The rows as plain text to model in full (pre-training): ``{"prompt": "", "response":
    prompt + response}``, so the loss covers every token."""
    return [{"prompt": "", "response": r["prompt"] + r["response"]} for r in rows]
