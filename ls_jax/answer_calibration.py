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
from collections.abc import Sequence

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
    """Per-answer scores of one kind of question: float64 ``confidence [N]``, bool ``correct [N]``,
    float64 ``nll [N]`` and ``brier [N]``.
    """

    confidence: np.ndarray
    correct: np.ndarray
    nll: np.ndarray
    brier: np.ndarray

    def bins(self, n_bins: int = 15) -> CalibrationBins:
        """Equal-width bins of the answers (for reliability diagrams).

        Args:
          n_bins: number of bins.

        Returns:
          :class:`~ls_jax.calibration.CalibrationBins`, ``[n_bins + 1]`` per field, with the NLL and
          Brier sums.

        Examples:
          >>> import numpy as np
          >>> from ls_jax.answer_calibration import option_scores
          >>> logits = np.array([[2.0, 0.0, -np.inf], [0.0, 1.0, 0.0]])  # the first question has 2 options
          >>> scores = option_scores(logits, np.array([0, 2]))
          >>> print(scores.bins(n_bins=4).count.tolist())
          [0, 0, 1, 1, 0]
        """
        return bin_statistics(self.confidence, self.correct, n_bins=n_bins, nll=self.nll, brier=self.brier)

    def metrics(self) -> dict[str, float]:
        """The summary of the answers.

        Returns:
          dict of Python numbers: ``count``, ``accuracy``, ``confidence`` (mean), ``ece`` (15 bins),
          ``ece10`` (10 bins), ``brier`` and ``nll`` (means).

        Examples:
          >>> import numpy as np
          >>> from ls_jax.answer_calibration import option_scores
          >>> logits = np.array([[2.0, 0.0, -np.inf], [0.0, 1.0, 0.0]])  # the first question has 2 options
          >>> scores = option_scores(logits, np.array([0, 2]))
          >>> m = scores.metrics()
          >>> print(m["count"], m["accuracy"], round(m["nll"], 4))
          2 0.5 0.8392
        """
        e15, e10 = (errors_from_bins(self.bins(n)) for n in (15, 10))
        return {
            "count": int(len(self.correct)),
            "accuracy": float(e15["accuracy"]),
            "confidence": float(e15["confidence"]),
            "ece": float(e15["ece"]),
            "ece10": float(e10["ece"]),
            "brier": float(e15["brier"]),
            "nll": float(e15["nll"]),
        }


def option_scores(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> AnswerScores:
    """:class:`AnswerScores` of multiple-choice option logits: softmax over the options.

    Args:
      logits: float ``[N, K]``, the option logits (-inf for the absent options of a question with
        fewer than K).
      labels: int ``[N]``, the right option of each question.
      temperature: the logits are divided by it first.

    Returns:
      :class:`AnswerScores` ``[N]``: the top option's probability, whether it is the label,
      ``-log p(label)`` and the multi-class Brier score over the options.

    Examples:
      >>> import numpy as np
      >>> from ls_jax.answer_calibration import option_scores
      >>> logits = np.array([[2.0, 0.0, -np.inf], [0.0, 1.0, 0.0]])  # the first question has 2 options
      >>> scores = option_scores(logits, np.array([0, 2]))
      >>> print([round(float(c), 4) for c in scores.confidence], scores.correct.tolist())
      [0.8808, 0.5761] [True, False]
    """
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1), np.float64)
    p = np.exp(logp)
    rows = np.arange(len(labels))
    onehot = np.eye(p.shape[1])[labels]
    return AnswerScores(p.max(-1), p.argmax(-1) == labels, -logp[rows, labels], ((p - onehot) ** 2).sum(-1))


@dataclasses.dataclass(frozen=True)
class SequenceLogits:
    """Teacher-forced logits of continuations: ``logits [M, V]`` float32 (one row per predicted
    token of every continuation), ``tokens [M]`` int32 (the tokens they predict), ``row [M]``
    int32 (the question each belongs to), ``n`` questions.
    """

    logits: np.ndarray
    tokens: np.ndarray
    row: np.ndarray
    n: int

    def log_prob(self, temperature: float = 1.0) -> np.ndarray:
        """Each continuation's summed log-probability at a temperature.

        Args:
          temperature: the logits are divided by it first.

        Returns:
          float64 ``[n]`` (0 for a question without tokens).

        Examples:
          >>> import numpy as np
          >>> from ls_jax.answer_calibration import SequenceLogits
          >>> logits = np.log(np.array([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]], np.float32))
          >>> seqs = SequenceLogits(logits, np.array([0, 1, 0]), np.array([0, 0, 1]), 2)
          >>> print([round(float(x), 4) for x in np.exp(seqs.log_prob())])
          [0.375, 0.9]
        """
        logp = jax.nn.log_softmax(jnp.asarray(self.logits) / temperature, axis=-1)
        per_token = np.asarray(jnp.take_along_axis(logp, jnp.asarray(self.tokens)[:, None], axis=-1)[:, 0], np.float64)
        return np.bincount(self.row, weights=per_token, minlength=self.n)


@nnx.jit
def _position_logits(model, input_ids, attention_mask, positions):
    """float32 ``[B, L, V]``: logits at ``positions [B, L]`` of each row of ``input_ids [B, T]``."""
    return model.project(jnp.take_along_axis(model(input_ids, attention_mask), positions[..., None], axis=1))


def continuation_logits(
    model,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 64,
) -> SequenceLogits:
    """Teacher-forced logits of each continuation after its prompt, batched (right-padded).

    Args:
      model: a :class:`~ls_jax.models.CausalLM`.
      prompts: token-id lists, one per question (each at least one token).
      continuations: token-id lists, one per question.
      pad_id: the padding token id.
      batch_size: rows per forward pass.

    Returns:
      :class:`SequenceLogits` with ``M = sum(len(c) for c in continuations)`` rows.

    Examples:
      >>> from ls_jax.models import from_config, tiny_llama_config
      >>> from ls_jax.tokenizer import train_bpe_tokenizer
      >>> tok = train_bpe_tokenizer(["2 + 2 = 4", "3 + 4 = 7", "Answer: A", "Answer: B"] * 4)
      >>> model = from_config(tiny_llama_config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1))
      >>> seqs = continuation_logits(model, [[1, 20, 21], [1, 22]], [[22, 2], [2]], pad_id=0)
      >>> print(seqs.logits.shape == (3, len(tok)), seqs.tokens.tolist(), seqs.row.tolist(), seqs.log_prob().shape)
      True [22, 2, 2] [0, 0, 1] (2,)
    """
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    width = max(1, max(len(c) for c in continuations))
    out = ([], [], [])
    for rows, ids, mask in padded_batches(seqs, batch_size, pad_id, "right", 16):
        pos = np.zeros((len(ids), width), np.int32)
        for i, r in enumerate(rows):
            start = len(prompts[r]) - 1
            pos[i, : len(continuations[r])] = np.arange(start, start + len(continuations[r]))
        z = np.asarray(_position_logits(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
        for i, r in enumerate(rows):
            k = len(continuations[r])
            out[0].append(z[i, :k])
            out[1].append(np.asarray(continuations[r], np.int32))
            out[2].append(np.full(k, r, np.int32))
    logits, tokens, row = (np.concatenate(x) if x else np.zeros((0,), np.int32) for x in out)
    return SequenceLogits(logits, tokens, row, len(seqs))


def split_rows(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The rows of each kind of question.

    Args:
      rows: data rows (dicts).

    Returns:
      ``(multiple-choice rows: with ``choices`` and ``answer``, generated-answer rows: the others)``.

    Examples:
      >>> from ls_jax.answer_calibration import split_rows
      >>> mc, gen = split_rows([{"question": "1 + 1?", "choices": ["2", "3"], "answer": 0},
      ...                       {"prompt": "1 + 1 =", "response": " 2"}])
      >>> print(len(mc), gen)
      1 [{'prompt': '1 + 1 =', 'response': ' 2'}]
    """
    is_mc = [r.get("choices") is not None and r.get("answer") is not None for r in rows]
    return [r for r, m in zip(rows, is_mc) if m], [r for r, m in zip(rows, is_mc) if not m]


def _prompt_and_reference(row: dict, tokenizer, where: str) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference response ids) as the trainer tokenises ``row``, or None when the
    row has not exactly one response ending in end-of-sequence."""
    ids, labels = tokenize_example(row, tokenizer, where)
    response = np.flatnonzero(labels != IGNORE_INDEX)
    if (
        len(response) == 0
        or response[-1] - response[0] + 1 != len(response)
        or ids[response[-1]] != tokenizer.eos_token_id
    ):
        return None
    return ids[: response[0]].tolist(), ids[response[0] : response[-1] + 1].tolist()


@dataclasses.dataclass(frozen=True)
class GeneratedAnswers:
    """Greedy answers of generated-answer rows (``N`` answered rows, ``M`` references in all).

    answers: token lists, end-of-sequence included when reached; correct: bool ``[N]``, the answer
    is the row's heaviest reference; target: float64 ``[N]``, the probability the row gives the
    answer; answer_logits: the teacher-forced :class:`SequenceLogits` of the answers;
    reference_logits: those of every reference (one continuation each), reference_row: int
    ``[M]``, the row each belongs to, reference_p: float64 ``[M]``, its probability; skipped:
    rows without end-of-sequence-terminated responses.
    """

    answers: list[list[int]]
    correct: np.ndarray
    target: np.ndarray
    answer_logits: SequenceLogits
    reference_logits: SequenceLogits
    reference_row: np.ndarray
    reference_p: np.ndarray
    skipped: int

    def scores(self, temperature: float = 1.0) -> AnswerScores:
        """:class:`AnswerScores` of the answers at a temperature.

        Args:
          temperature: the logits are divided by it first (the answers themselves do not change).

        Returns:
          :class:`AnswerScores` ``[N]``: confidence the answer's probability, NLL
          ``-sum_r t_r log p(r)`` over the references, Brier ``(confidence - target)^2``.
        """
        confidence = np.exp(self.answer_logits.log_prob(temperature))
        log_p = self.reference_logits.log_prob(temperature)
        nll = -np.bincount(self.reference_row, weights=self.reference_p * log_p, minlength=len(self.answers))
        return AnswerScores(confidence, self.correct, nll, (confidence - self.target) ** 2)


def reference_answers(
    tokenizer, rows: Sequence[dict]
) -> tuple[list[list[int]], list[list[tuple[list[int], float]]], int]:
    """Prompts and weighted references of generated-answer rows, tokenised as the trainer tokenises them.

    Args:
      tokenizer: a transformers tokenizer with an end-of-sequence token.
      rows: generated-answer rows (``prompt`` / ``response``, chat ``messages``, or weighted
        ``responses``).

    Returns:
      ``(prompts, references, skipped)``: prompt ids per kept row; per kept row a list of
      ``(ids, p)``, its one response with p = 1 or its weighted ``responses`` (ids end in
      end-of-sequence); the number of rows skipped (a response not ending in end-of-sequence).

    Raises:
      ls_jax.data.DataError: a malformed row or ``responses`` list.

    Examples:
      >>> from ls_jax.tokenizer import train_bpe_tokenizer
      >>> tok = train_bpe_tokenizer(["2 + 2 = 4", "3 + 4 = 7"])
      >>> prompts, refs, skipped = reference_answers(tok, [{"prompt": "2 + 2 =", "responses": [
      ...     {"text": " 4", "p": 0.75}, {"text": " 5", "p": 0.25}]}])
      >>> print(len(prompts), [p for _, p in refs[0]], refs[0][0][0][-1] == tok.eos_token_id, skipped)
      1 [0.75, 0.25] True 0
    """
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


def references(tokenizer, rows: Sequence[dict]) -> tuple[list[list[int]], list[list[int]], int]:
    """:func:`reference_answers` with one reference per row, its heaviest (the first of equals).

    Args:
      tokenizer: a transformers tokenizer with an end-of-sequence token.
      rows: generated-answer rows.

    Returns:
      ``(prompts, references, skipped)``: prompt ids and reference ids per kept row, rows skipped.

    Raises:
      ls_jax.data.DataError: a malformed row or ``responses`` list.

    Examples:
      >>> from ls_jax.tokenizer import train_bpe_tokenizer
      >>> tok = train_bpe_tokenizer(["2 + 2 = 4", "3 + 4 = 7"])
      >>> _, refs, _ = references(tok, [{"prompt": "2 + 2 =", "responses": [
      ...     {"text": " 5", "p": 0.25}, {"text": " 4", "p": 0.75}]}])
      >>> tok.decode(refs[0], skip_special_tokens=True)
      ' 4'
    """
    prompts, answers, skipped = reference_answers(tokenizer, rows)
    return prompts, _heaviest(answers), skipped


def _heaviest(answers) -> list[list[int]]:
    """Each row's heaviest reference (the first of equals) of :func:`reference_answers`'s lists."""
    return [max(a, key=lambda ref_p: ref_p[1])[0] for a in answers]


def generate_answers(
    model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int | None = None, batch_size: int = 64
) -> GeneratedAnswers:
    """Greedy answers to generated-answer rows (:func:`ls_jax.generation.generate`), compared with
    their references.

    Args:
      model: a :class:`~ls_jax.models.CausalLM`.
      tokenizer: its tokenizer (with an end-of-sequence token).
      rows: generated-answer rows.
      max_new_tokens: the longest answer (default: the longest reference plus 8).
      batch_size: prompts per batch.

    Returns:
      :class:`GeneratedAnswers` of the rows kept.

    Raises:
      ls_jax.data.DataError: a malformed row.

    Examples:
      >>> from ls_jax.models import from_config, tiny_llama_config
      >>> from ls_jax.tokenizer import train_bpe_tokenizer
      >>> tok = train_bpe_tokenizer(["2 + 2 = 4", "3 + 4 = 7", "Answer: A", "Answer: B"] * 4)
      >>> model = from_config(tiny_llama_config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1))
      >>> answers = generate_answers(model, tok, [{"prompt": "2 + 2 =", "response": " 4"}], max_new_tokens=4)
      >>> print(len(answers.answers), answers.correct.shape, answers.scores().confidence.shape, answers.skipped)
      1 (1,) (1,) 0
    """
    prompts, answers, skipped = reference_answers(tokenizer, rows)
    heaviest = _heaviest(answers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    limit = max_new_tokens or (max((len(ref) for a in answers for ref, _ in a), default=0) + 8)
    decoded = [g.tokens for g in generate(model, tokenizer, prompts, max_new_tokens=limit, batch_size=batch_size)]
    correct = np.array([d == h for d, h in zip(decoded, heaviest)], bool)
    target = np.array([sum(p for ref, p in a if ref == d) for d, a in zip(decoded, answers)], np.float64)
    answer_logits = continuation_logits(model, prompts, decoded, pad_id=pad, batch_size=batch_size)
    return GeneratedAnswers(
        decoded, correct, target, answer_logits, *_reference_logits(model, prompts, answers, pad, batch_size), skipped
    )


def _reference_logits(
    model, prompts, answers, pad: int, batch_size: int
) -> tuple[SequenceLogits, np.ndarray, np.ndarray]:
    """Teacher-forced logits of every reference of :func:`reference_answers` (one continuation
    each), with each reference's row ``[M]`` int64 and probability ``[M]`` float64."""
    row = np.array([i for i, a in enumerate(answers) for _ in a], np.int64)
    p = np.array([p for a in answers for _, p in a], np.float64)
    logits = continuation_logits(
        model, [prompts[i] for i in row], [ref for a in answers for ref, _ in a], pad_id=pad, batch_size=batch_size
    )
    return logits, row, p


@dataclasses.dataclass(frozen=True)
class AnswerCalibration:
    """Answer-level calibration per kind (``multiple_choice``, ``generated``): ``scores`` (raw),
    ``scaled`` (after temperature scaling; None without a calibration split) and ``temperature``
    (None without one).
    """

    scores: dict[str, AnswerScores]
    scaled: dict[str, AnswerScores | None]
    temperature: dict[str, float | None]

    def metrics(self) -> dict[str, dict]:
        """The summary of every kind present.

        Returns:
          ``{kind: metrics, kind + "_scaled": metrics + {"temperature": T}}`` (:meth:`AnswerScores.metrics`;
          the scaled entry only with a calibration split).
        """
        out = {}
        for kind, s in self.scores.items():
            out[kind] = s.metrics()
            if self.scaled[kind] is not None:
                out[kind + "_scaled"] = {**self.scaled[kind].metrics(), "temperature": self.temperature[kind]}
        return out


def _fit(logits, labels, weights=None) -> float:
    return float(fit_temperature(logits, labels, weights=weights)) if len(labels) else 1.0


def answer_calibration(
    model, tokenizer, rows: Sequence[dict], calibration_rows: Sequence[dict] = (), *, batch_size: int = 64
) -> AnswerCalibration:
    """Answer-level calibration of ``model`` on ``rows``, temperatures fitted on ``calibration_rows``.

    Args:
      model: a :class:`~ls_jax.models.CausalLM`.
      tokenizer: its tokenizer; multiple choice needs each option letter to be one token.
      rows: the scored rows, multiple-choice and generated-answer (:func:`split_rows`).
      calibration_rows: rows to fit one temperature per kind on (none: no temperature scaling).
      batch_size: rows per batch.

    Returns:
      :class:`AnswerCalibration`; kinds without rows are left out.

    Raises:
      ValueError: the tokenizer does not encode an option letter as one token.
      ls_jax.data.DataError: a malformed row.

    Examples:
      >>> from ls_jax.models import from_config, tiny_llama_config
      >>> from ls_jax.tokenizer import train_bpe_tokenizer
      >>> tok = train_bpe_tokenizer(["2 + 2 = 4", "3 + 4 = 7", "Answer: A", "Answer: B"] * 4)
      >>> model = from_config(tiny_llama_config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1))
      >>> rows = [{"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}]
      >>> held_out = [{"question": "3 + 4?", "choices": ["7", "8"], "answer": 0}]
      >>> result = answer_calibration(model, tok, rows, held_out)
      >>> sorted(result.metrics()), result.metrics()["multiple_choice"]["count"]
      (['multiple_choice', 'multiple_choice_scaled'], 1)
    """
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
