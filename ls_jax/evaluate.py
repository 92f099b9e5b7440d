"""Multiple-choice evaluation with calibration, the way MMLU-style ECE is reported.

Each record (a dict, or a line of a local jsonl file) has ``question`` (str), ``choices``
(list of 2-26 str) and ``answer`` (0-based index, or letter "A", "B", ...). The prompt lists the
options as "A. ...", "B. ..." and ends with "Answer:"; the model's next-token logits of the
option letters (token of ``letter_prefix + letter``, " A" by default) are normalised over the
options (softmax over the letters only). Accuracy, ECE, Brier and NLL come from
:func:`ls_jax.calibration.calibration_report`.

Any model following ``ls_jax.models.protocol`` works: ``model(input_ids, attention_mask) ->
hidden [B, T, D]``, ``model.unembedding() -> W [V, D]``, ``model.final_logit_softcap``. Only
the K option rows of W are used (no ``[B, T, V]`` logits). Prompts are tokenized like
``ls_jax.data``: ``[bos] + tok(prompt)`` (bos when the tokenizer has one).

Command line: ``python -m ls_jax.evaluate --model DIR --data FILE.jsonl [--out DIR]``.
"""

import argparse
import dataclasses
import json
import os
import string
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ls_jax.atomic import atomic_path, check_output_dir, write_text
from ls_jax.calibration import CalibrationReport, calibration_report, reliability_diagram
from ls_jax.data import read_jsonl
from ls_jax.logit_stats import dense_logits
from ls_jax.models.classification import last_token_index

LETTERS = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class Question:
    """One parsed record: the question, its choices, the 0-based answer index."""

    question: str
    choices: list[str]
    answer: int


def format_prompt(question: str, choices: Sequence[str]) -> str:
    """``question``, then one "A. choice" line per option, then "Answer:" (no trailing space)."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\nAnswer:"


def parse_record(record, where: str) -> Question:
    """Validate one record; ``where`` (e.g. "file.jsonl: line 3") prefixes every error message."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    question, choices, answer = record["question"], record["choices"], record["answer"]
    if not isinstance(question, str):
        raise ValueError(f"{where}: question must be a string")
    if (
        not isinstance(choices, list)
        or not 2 <= len(choices) <= len(LETTERS)
        or not all(isinstance(c, str) for c in choices)
    ):
        raise ValueError(f"{where}: choices must be a list of 2 to {len(LETTERS)} strings")
    k = len(choices)
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    else:
        raise ValueError(f"{where}: answer must be an index or a letter, got {answer!r}")
    if not 0 <= index < k:
        raise ValueError(f"{where}: answer {answer!r} is out of range for {k} choices")
    return Question(question, list(choices), index)


def load_questions(path_or_records: str | os.PathLike | Sequence[dict]) -> list[Question]:
    """Questions from a jsonl path (blank lines skipped) or from a sequence of dicts."""
    if isinstance(path_or_records, (str, os.PathLike)):
        path = os.fspath(path_or_records)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"multiple-choice data file not found: {path}")
        questions = [parse_record(record, f"{path}: line {n}") for n, record in read_jsonl(path)]
        source = path
    else:
        questions = [parse_record(r, f"record {i}") for i, r in enumerate(path_or_records)]
        source = "the records"
    if not questions:
        raise ValueError(f"no questions in {source}")
    return questions


def option_token_ids(tokenizer, num_options: int, letter_prefix: str = " ") -> np.ndarray:
    """int32 ``[num_options]``: the single token of ``letter_prefix + letter`` for A, B, ...

    Raises ValueError when a letter is not exactly one token, is the unknown token, or two
    letters share a token.
    """
    ids = []
    for letter in LETTERS[:num_options]:
        text = letter_prefix + letter
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer does not encode {text!r} as one known token (got ids {pieces}, "
                f"{tokenizer.convert_ids_to_tokens(pieces)}); multiple-choice scoring needs one token "
                "per option letter: try another letter_prefix"
            )
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"option letters share tokens: {dict(zip(LETTERS, ids))}")
    return np.asarray(ids, np.int32)


@nnx.jit
def option_logits(model, input_ids, attention_mask, option_ids):
    """float32 ``[B, K]``: logits of the ``option_ids [K]`` tokens after the last real token
    of each row of ``input_ids [B, T]`` (left or right padding; ``attention_mask`` 1 = token)."""
    hidden = model(input_ids, attention_mask)
    last = last_token_index(input_ids, attention_mask, None)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    w = model.unembedding()[option_ids]
    return dense_logits(h, w.astype(h.dtype), None, model.final_logit_softcap)


def padded_batches(prompts: list[list[int]], batch_size: int, pad_id: int, padding_side: str, multiple: int):
    """(rows, input_ids [batch_size, T], attention_mask) with T a multiple of ``multiple``; a
    short last batch repeats its first row (dropped later) to keep shapes, hence compilations, few."""
    for start in range(0, len(prompts), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        seqs = [prompts[r] for r in rows]
        seqs += [seqs[0]] * (batch_size - len(seqs))
        t = -(-max(map(len, seqs)) // multiple) * multiple
        ids = np.full((batch_size, t), pad_id, np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        for i, s in enumerate(seqs):
            sl = slice(t - len(s), t) if padding_side == "left" else slice(0, len(s))
            ids[i, sl], mask[i, sl] = s, 1
        yield rows, ids, mask


@dataclasses.dataclass(frozen=True)
class MultipleChoiceResult:
    """report: calibration of the option probabilities. option_logits: float32 ``[N, K_max]``
    (-inf past a question's choices); probs: their softmax; labels: int ``[N]``."""

    report: CalibrationReport
    option_logits: np.ndarray
    probs: np.ndarray
    labels: np.ndarray

    def save(self, out_dir: str, title: str = "multiple choice") -> dict:
        """Write ``metrics.json``, ``reliability.png`` and ``predictions.jsonl`` (each atomically);
        returns the paths."""
        os.makedirs(out_dir, exist_ok=True)
        paths = {name: os.path.join(out_dir, name) for name in ("metrics.json", "reliability.png", "predictions.jsonl")}
        write_text(paths["metrics.json"], json.dumps(self.report.to_dict(), indent=2))
        with atomic_path(paths["reliability.png"]) as tmp:
            reliability_diagram(self.report.bins, tmp, title=title)
        lines = []
        for label, z, p in zip(self.labels, self.option_logits, self.probs):
            k = int(np.isfinite(z).sum())
            lines.append(
                json.dumps(
                    {
                        "answer": LETTERS[label],
                        "prediction": LETTERS[int(p.argmax())],
                        "probs": [round(float(x), 6) for x in p[:k]],
                    }
                )
                + "\n"
            )
        write_text(paths["predictions.jsonl"], "".join(lines))
        return paths


def evaluate_multiple_choice(
    model,
    tokenizer,
    path_or_records,
    *,
    batch_size: int = 8,
    n_bins: int = 15,
    padding_side: str = "right",
    letter_prefix: str = " ",
    prompt_fn: Callable[[str, Sequence[str]], str] = format_prompt,
    pad_to_multiple_of: int = 16,
) -> MultipleChoiceResult:
    """Score every question of ``path_or_records`` (jsonl path or dicts) with ``model``.

    tokenizer: a transformers tokenizer. prompt_fn(question, choices) -> prompt text, whose
    next token is the answer letter. Batches of ``batch_size`` prompts, padded on
    ``padding_side`` to a multiple of ``pad_to_multiple_of`` tokens; results do not depend on
    either (given a padding-correct model).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1 or pad_to_multiple_of < 1:
        raise ValueError("batch_size and pad_to_multiple_of must be positive")
    questions = load_questions(path_or_records)
    k_max = max(len(q.choices) for q in questions)
    option_ids = jnp.asarray(option_token_ids(tokenizer, k_max, letter_prefix))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = [
        bos + tokenizer(prompt_fn(q.question, q.choices), add_special_tokens=False)["input_ids"] for q in questions
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logits = np.empty((len(questions), k_max), np.float32)
    for rows, ids, mask in padded_batches(prompts, batch_size, pad_id, padding_side, pad_to_multiple_of):
        logits[rows] = np.asarray(option_logits(model, jnp.asarray(ids), jnp.asarray(mask), option_ids))[: len(rows)]
    present = np.arange(k_max)[None, :] < np.array([len(q.choices) for q in questions])[:, None]
    logits = np.where(present, logits, -np.inf).astype(np.float32)
    labels = np.array([q.answer for q in questions], np.int32)
    report = calibration_report(logits, labels, from_logits=True, n_bins=n_bins, classwise=False)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    return MultipleChoiceResult(report, logits, probs, labels)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: load a local checkpoint and tokenizer, evaluate, print (and save) metrics."""
    parser = argparse.ArgumentParser(prog="python -m ls_jax.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint dir (with tokenizer)")
    parser.add_argument("--data", required=True, help="jsonl: question, choices, answer")
    parser.add_argument("--out", help="write metrics.json, reliability.png, predictions.jsonl here")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-bins", type=int, default=15)
    parser.add_argument("--padding-side", choices=("left", "right"), default="right")
    parser.add_argument("--letter-prefix", default=" ", help="text before each option letter token")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from ls_jax.models import from_pretrained

    if not os.path.isfile(args.data):
        parser.error(f"--data: file not found: {args.data}")
    try:
        if args.out:
            check_output_dir(args.out)
    except ValueError as e:
        parser.error(f"--out {e}")
    dtype = jnp.dtype(args.dtype)
    try:  # bad input (checkpoint, tokenizer, records, options): one "error:" line, exit status 2
        model = from_pretrained(args.model, dtype=dtype, param_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        result = evaluate_multiple_choice(
            model,
            tokenizer,
            args.data,
            batch_size=args.batch_size,
            n_bins=args.n_bins,
            padding_side=args.padding_side,
            letter_prefix=args.letter_prefix,
        )
    except (OSError, ValueError) as e:
        parser.error(str(e).splitlines()[0])
    metrics = {k: v for k, v in result.report.to_dict().items() if k != "bins"}
    if args.out:
        metrics["files"] = result.save(args.out, title=os.path.basename(os.path.abspath(args.data)))
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
