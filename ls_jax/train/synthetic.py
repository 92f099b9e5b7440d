"""The embedded default data set: generated instruction data with checkable answers.

Two tasks, drawn half and half from a seed (no download):

* addition: prompt ``"What is 37 + 48?\\nAnswer: "``, response ``"85"``;
* multiple choice: ``"Which number is the largest?\\nA) 12\\nB) 45\\nC) 7\\nD) 30\\nAnswer: "``,
  response ``"B"``.

Rows are ``{"prompt": str, "response": str}``, the format ``ls_jax.data`` reads from files.
"""

import random
from typing import Dict, List, Tuple

LETTERS = "ABCD"


def _addition(rng: random.Random, max_operand: int) -> Dict[str, str]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return {"prompt": f"What is {a} + {b}?\nAnswer: ", "response": str(a + b)}


def _largest(rng: random.Random, max_operand: int) -> Dict[str, str]:
    values = rng.sample(range(max_operand + 1), len(LETTERS))
    options = "".join(f"{letter}) {v}\n" for letter, v in zip(LETTERS, values))
    answer = LETTERS[values.index(max(values))]
    return {"prompt": f"Which number is the largest?\n{options}Answer: ", "response": answer}


def generate(num_train: int, num_eval: int, seed: int = 0, max_operand: int = 99) -> Tuple[List[dict], List[dict]]:
    """Deterministic (train rows, held-out rows); no held-out prompt occurs in the train rows.

    Raises ValueError when more rows are asked for than there are distinct questions (half
    are additions, of which there are ``(max_operand + 1) ** 2``).
    """
    most = 2 * (max_operand + 1) ** 2
    if num_train + num_eval > most:
        raise ValueError(f"{num_train} + {num_eval} rows asked for, but the generated data has at most "
                         f"{most} distinct questions")
    rng = random.Random(seed)
    tasks = (_addition, _largest)
    seen, rows = set(), []
    budget = 50 * (num_train + num_eval)
    while len(rows) < num_train + num_eval and budget > 0:
        budget -= 1
        row = tasks[len(rows) % len(tasks)](rng, max_operand)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    if len(rows) < num_train + num_eval:
        raise ValueError(f"cannot draw {num_train + num_eval} distinct questions with max_operand={max_operand}")
    return rows[:num_train], rows[num_train:]
