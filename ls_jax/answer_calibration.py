"""Answer-level calibration of a causal LM, measured as the label-smoothing paper measures it.

Two kinds of question (rows as ``ls_jax.data`` reads them):

* **multiple choice**: rows with ``question``, ``choices`` and ``answer`` (0-based index or
  letter), asked in :func:`ls_jax.evaluate.format_prompt`'s format and scored by
  :func:`ls_jax.evaluate.evaluate_multiple_choice`: the probabilities of the option letters,
  normalised over the options. Confidence: the top option's probability; NLL: ``-log p(answer)``;
  Brier: multi-class over the options.
* **generated answers**: the other rows (``prompt`` / ``response``, or chat ``messages`` with
  one assistant reply ending in the tokenizer's end-of-sequence token). The model decodes
  greedily from the prompt until end-of-sequence; the answer is correct when its tokens equal
  the reference response's (end-of-sequence included). Confidence: the probability of the
  decoded sequence (the product of its tokens' probabilities); NLL: ``-log p(reference)``,
  teacher-forced; Brier: ``(confidence - correct)^2`` (top-label, as a binary event).
  A row with several weighted answers (``responses``: ``{text, p}``, :mod:`ls_jax.data`) is
  scored against its distribution t, as the classifier scores soft labels: correct when the
  answer is the heaviest one (the first of equals), NLL ``-sum_r t_r log p(r)`` (teacher-forced),
  Brier ``(confidence - t(answer))^2`` with ``t(answer)`` the probability the row gives the
  decoded answer (0 for another). A one-answer row is the case t = 1.

Temperature scaling (the post-hoc reference): one temperature per kind, fitted on a
calibration split by the NLL of the answers (option logits; the reference responses' token
logits, each weighted answer's tokens weighted by its probability), then applied to the
scored split (greedy answers do not change with the temperature, their probabilities do).
"""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ls_jax.calibration import CalibrationBins, bin_statistics, errors_from_bins, fit_temperature
from ls_jax.data import IGNORE_INDEX, expand_responses, tokenize_example
from ls_jax.evaluate import evaluate_multiple_choice, padded_batches
from ls_jax.generation import generate

@dataclasses.dataclass(frozen=True)
class AnswerScores:
    """Per-answer float64 ``confidence [N]``, bool ``correct [N]``, float64 ``nll [N]`` and
    ``brier [N]`` of one kind of question."""

    confidence: np.ndarray
    correct: np.ndarray
    nll: np.ndarray
    brier: np.ndarray

    def bins(self, n_bins: int = 15) -> CalibrationBins:
        """Equal-width :class:`CalibrationBins` (for reliability diagrams)."""
        return bin_statistics(self.confidence, self.correct, n_bins=n_bins, nll=self.nll, brier=self.brier)

    def metrics(self) -> Dict[str, float]:
        """count, accuracy, confidence (mean), ece (15 bins), ece10 (10 bins), brier, nll (means)."""
        e15, e10 = (errors_from_bins(self.bins(n)) for n in (15, 10))
        return {"count": int(len(self.correct)), "accuracy": float(e15["accuracy"]),
                "confidence": float(e15["confidence"]), "ece": float(e15["ece"]), "ece10": float(e10["ece"]),
                "brier": float(e15["brier"]), "nll": float(e15["nll"])}


def option_scores(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> AnswerScores:
    """:class:`AnswerScores` of option logits ``[N, K]`` (-inf for absent options) and labels ``[N]``."""
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1), np.float64)
    p = np.exp(logp)
    rows = np.arange(len(labels))
    onehot = np.eye(p.shape[1])[labels]
    return AnswerScores(p.max(-1), p.argmax(-1) == labels, -logp[rows, labels], ((p - onehot) ** 2).sum(-1))


@dataclasses.dataclass(frozen=True)
class SequenceLogits:
    """Teacher-forced logits of continuations: ``logits [M, V]`` float32 (one row per predicted
    token of every continuation), ``tokens [M]`` int32 (the tokens they predict), ``row [M]``
    int32 (the question each belongs to), ``n`` questions."""

    logits: np.ndarray
    tokens: np.ndarray
    row: np.ndarray
    n: int

    def log_prob(self, temperature: float = 1.0) -> np.ndarray:
        """float64 ``[n]``: each continuation's summed log-probability at ``temperature``."""
        logp = jax.nn.log_softmax(jnp.asarray(self.logits) / temperature, axis=-1)
        per_token = np.asarray(jnp.take_along_axis(logp, jnp.asarray(self.tokens)[:, None], axis=-1)[:, 0], np.float64)
        return np.bincount(self.row, weights=per_token, minlength=self.n)


@nnx.jit
def _position_logits(model, input_ids, attention_mask, positions):
    """float32 ``[B, L, V]``: logits at ``positions [B, L]`` of each row of ``input_ids [B, T]``."""
    return model.project(jnp.take_along_axis(model(input_ids, attention_mask), positions[..., None], axis=1))


def continuation_logits(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
                        pad_id: int, batch_size: int = 64) -> SequenceLogits:
    """Teacher-forced logits of each ``continuations[i]`` after ``prompts[i]`` (token id lists)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    width = max(1, max(len(c) for c in continuations))
    out = ([], [], [])
    for rows, ids, mask in padded_batches(seqs, batch_size, pad_id, "right", 16):
        pos = np.zeros((len(ids), width), np.int32)
        for i, r in enumerate(rows):
            start = len(prompts[r]) - 1
            pos[i, :len(continuations[r])] = np.arange(start, start + len(continuations[r]))
        z = np.asarray(_position_logits(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
        for i, r in enumerate(rows):
            k = len(continuations[r])
            out[0].append(z[i, :k])
            out[1].append(np.asarray(continuations[r], np.int32))
            out[2].append(np.full(k, r, np.int32))
    logits, tokens, row = (np.concatenate(x) if x else np.zeros((0,), np.int32) for x in out)
    return SequenceLogits(logits, tokens, row, len(seqs))


def split_rows(rows: Sequence[dict]) -> Tuple[List[dict], List[dict]]:
    """(multiple-choice rows: with ``choices`` and ``answer``, generated-answer rows: the others)."""
    is_mc = [r.get("choices") is not None and r.get("answer") is not None for r in rows]
    return [r for r, m in zip(rows, is_mc) if m], [r for r, m in zip(rows, is_mc) if not m]


def _prompt_and_reference(row: dict, tokenizer, where: str) -> Optional[Tuple[List[int], List[int]]]:
    """(prompt ids, reference response ids) as the trainer tokenises ``row``, or None when the
    row has not exactly one response ending in end-of-sequence."""
    ids, labels = tokenize_example(row, tokenizer, where)
    response = np.flatnonzero(labels != IGNORE_INDEX)
    if len(response) == 0 or response[-1] - response[0] + 1 != len(response) or ids[response[-1]] != tokenizer.eos_token_id:
        return None
    return ids[:response[0]].tolist(), ids[response[0]:response[-1] + 1].tolist()


@dataclasses.dataclass(frozen=True)
class GeneratedAnswers:
    """Greedy answers of generated-answer rows: ``answers`` (token lists, end-of-sequence
    included when reached), ``correct [N]`` (the answer is the row's heaviest reference),
    ``target [N]`` float64 (the probability the row gives the answer), the teacher-forced
    logits of the ``answers`` and of every reference (one continuation per reference:
    ``reference_row [M]`` int, the row it belongs to, ``reference_p [M]`` float64, its
    probability), ``skipped`` (rows without end-of-sequence-terminated responses)."""

    answers: List[List[int]]
    correct: np.ndarray
    target: np.ndarray
    answer_logits: SequenceLogits
    reference_logits: SequenceLogits
    reference_row: np.ndarray
    reference_p: np.ndarray
    skipped: int

    def scores(self, temperature: float = 1.0) -> AnswerScores:
        confidence = np.exp(self.answer_logits.log_prob(temperature))
        log_p = self.reference_logits.log_prob(temperature)
        nll = -np.bincount(self.reference_row, weights=self.reference_p * log_p, minlength=len(self.answers))
        return AnswerScores(confidence, self.correct, nll, (confidence - self.target) ** 2)


def reference_answers(tokenizer, rows: Sequence[dict]
                      ) -> Tuple[List[List[int]], List[List[Tuple[List[int], float]]], int]:
    """(prompt ids, references, rows skipped) of generated-answer rows, tokenised as the trainer
    tokenises them: a row's references are ``[(ids, p)]``, its one response with p = 1 or its
    weighted ``responses``; a row with a response that does not end in end-of-sequence is skipped."""
    prompts, answers, skipped = [], [], 0
    for i, row in enumerate(rows):
        singles, _, weights = expand_responses([row], [f"row {i + 1}"])
        pairs = [_prompt_and_reference(r, tokenizer, f"row {i + 1}") for r in singles]
        if any(p is None for p in pairs):
            skipped += 1
            continue
        prompts.append(pairs[0][0])
        answers.append([(ref, p) for (_, ref), p in zip(pairs, weights)])
    return prompts, answers, skipped


def references(tokenizer, rows: Sequence[dict]) -> Tuple[List[List[int]], List[List[int]], int]:
    """(prompt ids, reference ids, rows skipped) of :func:`reference_answers`, the reference of a
    row with weighted responses its heaviest (the first of equals)."""
    prompts, answers, skipped = reference_answers(tokenizer, rows)
    return prompts, _heaviest(answers), skipped


def _heaviest(answers) -> List[List[int]]:
    """Each row's heaviest reference (the first of equals) of :func:`reference_answers`'s lists."""
    return [max(a, key=lambda ref_p: ref_p[1])[0] for a in answers]


def generate_answers(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: Optional[int] = None,
                     batch_size: int = 64) -> GeneratedAnswers:
    """Greedy answers to generated-answer ``rows`` (:func:`ls_jax.generation.generate`),
    compared with their references. max_new_tokens: default the longest reference plus 8."""
    prompts, answers, skipped = reference_answers(tokenizer, rows)
    heaviest = _heaviest(answers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = max_new_tokens or (max((len(ref) for a in answers for ref, _ in a), default=0) + 8)
    decoded = [g.tokens for g in generate(model, tokenizer, prompts, max_new_tokens=limit, batch_size=batch_size)]
    correct = np.array([d == h for d, h in zip(decoded, heaviest)], bool)
    target = np.array([sum(p for ref, p in a if ref == d) for d, a in zip(decoded, answers)], np.float64)
    answer_logits = continuation_logits(model, prompts, decoded, pad_id=pad, batch_size=batch_size)
    return GeneratedAnswers(decoded, correct, target, answer_logits,
                            *_reference_logits(model, prompts, answers, pad, batch_size), skipped)


def _reference_logits(model, prompts, answers, pad: int, batch_size: int
                      ) -> Tuple[SequenceLogits, np.ndarray, np.ndarray]:
    """Teacher-forced logits of every reference of :func:`reference_answers` (one continuation
    each), with each reference's row ``[M]`` int64 and probability ``[M]`` float64."""
    row = np.array([i for i, a in enumerate(answers) for _ in a], np.int64)
    p = np.array([p for a in answers for _, p in a], np.float64)
    logits = continuation_logits(model, [prompts[i] for i in row], [ref for a in answers for ref, _ in a],
                                 pad_id=pad, batch_size=batch_size)
    return logits, row, p


@dataclasses.dataclass(frozen=True)
class AnswerCalibration:
    """Per kind (``multiple_choice``, ``generated``): ``scores`` (raw), ``scaled`` (after
    temperature scaling; None without a calibration split) and ``temperature``."""

    scores: Dict[str, AnswerScores]
    scaled: Dict[str, Optional[AnswerScores]]
    temperature: Dict[str, Optional[float]]

    def metrics(self) -> Dict[str, dict]:
        """``{kind: metrics, kind + "_scaled": metrics + {"temperature": T}}`` for the kinds present."""
        out = {}
        for kind, s in self.scores.items():
            out[kind] = s.metrics()
            if self.scaled[kind] is not None:
                out[kind + "_scaled"] = {**self.scaled[kind].metrics(), "temperature": self.temperature[kind]}
        return out


def _fit(logits, labels, weights=None) -> float:
    return float(fit_temperature(logits, labels, weights=weights)) if len(labels) else 1.0


def answer_calibration(model, tokenizer, rows: Sequence[dict], calibration_rows: Sequence[dict] = (), *,
                       batch_size: int = 64) -> AnswerCalibration:
    """Answer-level calibration of ``model`` on ``rows``; temperatures fitted on
    ``calibration_rows`` (none: no temperature scaling). Kinds without rows are left out."""
    mc, gen = split_rows(rows)
    mc_cal, gen_cal = split_rows(calibration_rows)
    scores, scaled, temperature = {}, {}, {}
    if mc:
        test = evaluate_multiple_choice(model, tokenizer, mc, batch_size=batch_size)
        scores["multiple_choice"] = option_scores(test.option_logits, test.labels)
        t = None
        if mc_cal:
            cal = evaluate_multiple_choice(model, tokenizer, mc_cal, batch_size=batch_size)
            t = _fit(cal.option_logits, cal.labels)
        temperature["multiple_choice"] = t
        scaled["multiple_choice"] = None if t is None else option_scores(test.option_logits, test.labels, t)
    if gen and references(tokenizer, gen)[0]:
        test = generate_answers(model, tokenizer, gen, batch_size=batch_size)
        scores["generated"] = test.scores()
        t = None
        if gen_cal:  # the token NLL of the calibration references, summed (weighted by p), is their sequence NLL
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ref, _, p = _reference_logits(model, *reference_answers(tokenizer, gen_cal)[:2], pad, batch_size)
            t = _fit(ref.logits, ref.tokens, p[ref.row])
        temperature["generated"] = t
        scaled["generated"] = None if t is None else test.scores(t)
    return AnswerCalibration(scores, scaled, temperature)
