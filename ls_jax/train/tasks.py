"""What a task (``--task``) decides in a run: its flags, data, model head, steps, evaluation and report.

The trainer (:mod:`ls_jax.train.setup`, :mod:`ls_jax.train.loop`, :mod:`ls_jax.train.main`) is
the same for every task; a :class:`Task` holds what differs. :func:`task_of` maps
``config.task`` to its task: :class:`CausalLM` (prompt / response rows, next-token loss) or
:class:`Classification` (text / label rows, a SequenceClassifier).
"""

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
from flax import nnx

from ls_jax import data
from ls_jax.answer_calibration import answer_calibration
from ls_jax.calibration import CalibrationReport
from ls_jax.train import classification, report, sharding, sources, synthetic
from ls_jax.train.config import ConfigError, TrainConfig
from ls_jax.train.distributed import allgather
from ls_jax.train.step import accumulate, make_eval_step, make_train_step


class Rows(NamedTuple):
    """A run's rows before encoding: training, held-out, their places in the data (``"line K"`` of a
    .jsonl file, ``"row K"``, for error messages; None for generated data) and the base stage's
    plain-text rows (``--base-steps``; else None)."""

    train: list[dict]
    held: list[dict]
    train_where: list[str] | None = None
    held_where: list[str] | None = None
    base: list[dict] | None = None


@dataclass
class Prepared:
    """A validated run: tokenizer, tokenised train / held-out examples, a model builder, the mesh.

    ``build_model(seed)`` returns a fresh NNX model (random init from ``seed``, default the
    run's, or the checkpoint). ``log`` holds the data-preparation lines (truncation counts) for
    the user. ``classes``: the class names of ``--task classification`` (examples are then padded
    rows with targets), else None. ``held_rows``: the held-out rows themselves (for answer-level
    scoring). ``base``: tokenised plain-text examples of the base stage (``--base-steps``), else None.
    ``targets``: with ``--soft-targets``, each training example's sparse targets
    (:func:`ls_jax.teacher_targets.soft_targets`), else None.
    """

    tokenizer: object
    train: list[tuple]
    held_out: list[tuple]
    build_model: Callable
    mesh: object
    log: list[str]
    classes: list[str] | None = None
    held_rows: list[dict] = field(default_factory=list)
    base: list[tuple] | None = None
    targets: list[dict] | None = None


class Steps(NamedTuple):
    """What the training loop runs: ``train_step(params, frozen, opt_state, batch) -> (params,
    opt_state, metrics)`` (:func:`ls_jax.train.step.make_train_step`), the training ``batches``
    (:class:`ls_jax.data.Batches`), and ``evaluate(params, frozen) -> {"metrics": {...}, "bins":
    CalibrationBins}`` over the held-out set."""

    train_step: Callable
    batches: data.Batches
    evaluate: Callable


class Task(ABC):
    """The interface: one instance per ``--task`` value (:data:`ls_jax.train.config.TASKS`)."""

    name: str
    usage: str  # how the exported hf/ checkpoint is used, for the closing line of train.py

    @abstractmethod
    def check(self, c: TrainConfig) -> None:
        """Raise :class:`ConfigError` for a flag that only another task takes."""

    @abstractmethod
    def generate(self, c: TrainConfig) -> Rows:
        """The embedded default data (no ``--data``), sized by ``--num-train`` / ``--num-eval``."""

    @abstractmethod
    def prepare(self, c: TrainConfig, tokenizer, rows: Rows, mesh, model: Callable) -> Prepared:
        """Encode ``rows`` and choose the model's head: ``model(num_labels=None)`` returns the model
        builder (a SequenceClassifier with ``num_labels``). Raises :class:`ConfigError` /
        :class:`ls_jax.data.DataError` on bad input."""

    def trainable(self, lora: bool):
        """The ``nnx`` filter of the trained parameters (``lora``: the LoRA adapters only)."""
        return nnx.LoRAParam if lora else nnx.Param

    @abstractmethod
    def steps(
        self, c: TrainConfig, prep: Prepared, graphdef, tx, *, param_shardings, frozen_shardings, opt_shardings, mesh
    ) -> Steps:
        """The jitted steps and the batches of a run on ``mesh``."""

    @abstractmethod
    def final(self, c: TrainConfig, prep: Prepared, model: Callable, progress: report.Progress) -> dict:
        """``final.json``'s task-specific entries of a finished run; ``model()`` merges the trained model."""

    @abstractmethod
    def summary(self, c: TrainConfig, results: list[dict]) -> str:
        """The final held-out tables of every run of ``c`` (``final.json`` contents, one per run)."""


class CausalLM(Task):
    """Prompt / response (or chat ``messages``) rows; the fused next-token loss on the response
    tokens; token-level calibration and, on the held-out rows, answer-level scoring."""

    name = "causal_lm"
    usage = "python -m ls_jax.evaluate --model RUN_DIR/hf"

    def check(self, c: TrainConfig) -> None:
        if c.smoothing_convention != "uniform":
            raise ConfigError("--smoothing-convention others is for --task classification")
        if c.classes:
            raise ConfigError("--classes is for --task classification")

    def generate(self, c: TrainConfig) -> Rows:
        try:
            base, train, held = synthetic.generate_splits(
                [c.num_base if c.base_steps else 0, c.num_train, c.num_eval], seed=c.seed
            )
        except ValueError as e:
            raise ConfigError(f"--num-train / --num-eval / --num-base: {e}") from None
        return Rows(train, held, base=synthetic.as_text(base) if c.base_steps else None)

    def prepare(self, c: TrainConfig, tokenizer, rows: Rows, mesh, model: Callable) -> Prepared:
        build = model()
        name = "generated" if c.data is None else c.data
        held, held_stats = _encode(c, rows.held, tokenizer, f"{c.eval_data or name} (held out)", rows.held_where)
        log, train_rows, train_where = [], rows.train, rows.train_where
        # last: a source's generation (--s3ft) is the slow part; the held-out rows keep their gold responses
        train_rows, train_where = sources.train_rows(c, build, tokenizer, train_rows, train_where, log)
        train, train_stats = _encode(c, train_rows, tokenizer, f"{name} (train)", train_where)
        packed = len(data.pack(train, c.max_length)) if c.packing else len(train)
        if packed < c.batch_size:
            raise data.DataError(
                f"{len(train)} training examples ({packed} rows) are fewer than --batch-size {c.batch_size}"
            )
        log += [train_stats.log_line("train", c.max_length), held_stats.log_line("held out", c.max_length)]
        targets = None if c.soft_targets is None else _soft_targets(c, tokenizer, train)
        base = None
        if rows.base:
            base, base_stats = _encode(c, rows.base, tokenizer, "generated (base)")
            log.insert(0, base_stats.log_line("base (plain text)", c.max_length))
        return Prepared(tokenizer, train, held, build, mesh, log, held_rows=list(rows.held), base=base, targets=targets)

    def steps(
        self, c: TrainConfig, prep: Prepared, graphdef, tx, *, param_shardings, frozen_shardings, opt_shardings, mesh
    ) -> Steps:
        shardings = dict(param_shardings=param_shardings, frozen_shardings=frozen_shardings, mesh=mesh)
        train_step = make_train_step(graphdef, tx, c, opt_shardings=opt_shardings, packed=c.packing, **shardings)
        evaluate = make_eval_step(
            graphdef, c, special_ids=prep.tokenizer.all_special_ids, packed=False, **shardings
        )  # eval_batches: one example a row
        pad = prep.tokenizer.pad_token_id
        batches = data.Batches(
            prep.train, c.batch_size, c.max_length, pad, seed=c.seed, packing=c.packing, targets=prep.targets
        )
        held = data.eval_batches(prep.held_out, c.eval_batch_size, c.max_length, pad)
        return Steps(train_step, batches, lambda params, frozen: _evaluate(evaluate, params, frozen, held, mesh))

    def final(self, c: TrainConfig, prep: Prepared, model: Callable, progress: report.Progress) -> dict:
        """The vocabulary size and the answer-level scores (:func:`_answer_level`)."""
        model = model()
        return {"vocab_size": int(model.unembedding().shape[0]), **_answer_level(c, prep, model, progress)}

    def summary(self, c: TrainConfig, results: list[dict]) -> str:
        questions = "addition questions" if c.data is None else f"questions of {os.path.basename(c.data)}"
        return report.summary_tables(results, questions)


class Classification(Task):
    """Text / label rows (:mod:`ls_jax.train.classification`); a SequenceClassifier on the last
    token, trained with the smoothed cross-entropy over the classes; class-level calibration."""

    name = "classification"
    usage = "a *ForSequenceClassification checkpoint"

    def check(self, c: TrainConfig) -> None:
        for given, flag in ((c.packing, "--packing"), (c.s3ft, "--s3ft"), (c.base_steps, "--base-steps")):
            if given:
                raise ConfigError(f"{flag} is for --task causal_lm")
        if c.soft_targets is not None:
            raise ConfigError("--soft-targets is for --task causal_lm, without --s3ft or --base-steps")

    def generate(self, c: TrainConfig) -> Rows:
        return Rows(*classification.generate(c.num_train, c.num_eval, seed=c.seed))

    def prepare(self, c: TrainConfig, tokenizer, rows: Rows, mesh, model: Callable) -> Prepared:
        train_where = rows.train_where or [f"row {i + 1}" for i in range(len(rows.train))]
        held_where = rows.held_where or [f"row {i + 1}" for i in range(len(rows.held))]
        classes = classification.label_classes(rows.train, train_where, c.classes)
        if c.smoothing_convention == "others":
            for a in [c.label_smoothing, *c.compare_smoothing]:
                if a > (len(classes) - 1) / len(classes):
                    raise ConfigError(
                        f"--smoothing-convention others: smoothing {a} leaves the target less than "
                        f"each other class; at most {(len(classes) - 1) / len(classes):.4g} on "
                        f"{len(classes)} classes"
                    )
        name = "generated" if c.data is None else c.data
        train, train_log = classification.prepare(
            rows.train, train_where, tokenizer, c.max_length, classes, f"{name} (train)"
        )
        held, held_log = classification.prepare(
            rows.held, held_where, tokenizer, c.max_length, classes, f"{c.eval_data or name} (held out)"
        )
        if len(train) < c.batch_size:
            raise data.DataError(f"{len(train)} training examples are fewer than --batch-size {c.batch_size}")
        log = [train_log, held_log, f"classes: {', '.join(classes)}"]
        return Prepared(tokenizer, train, held, model(num_labels=len(classes)), mesh, log, classes)

    def trainable(self, lora: bool):
        """With LoRA, the adapters and the fresh ``score`` head."""
        if not lora:
            return nnx.Param
        return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains("score")))

    def steps(
        self, c: TrainConfig, prep: Prepared, graphdef, tx, *, param_shardings, frozen_shardings, opt_shardings, mesh
    ) -> Steps:
        shardings = dict(param_shardings=param_shardings, frozen_shardings=frozen_shardings, mesh=mesh)
        train_step = make_train_step(
            graphdef,
            tx,
            c,
            opt_shardings=opt_shardings,
            loss_sum=classification.loss_sum,
            count=classification.count,
            total=classification.count,
            **shardings,
        )
        evaluate = classification.make_eval_step(graphdef, c, **shardings)
        batches = classification.ClassificationBatches(prep.train, c.batch_size, seed=c.seed)
        held = classification.eval_batches(prep.held_out, c.eval_batch_size)
        return Steps(
            train_step, batches, lambda params, frozen: classification.evaluate(evaluate, params, frozen, held, mesh)
        )

    def final(self, c: TrainConfig, prep: Prepared, model: Callable, progress: report.Progress) -> dict:
        return {}

    def summary(self, c: TrainConfig, results: list[dict]) -> str:
        return report.summary_table(results, report.CLASSIFICATION_COLUMNS)


# every task by name; ls_jax.train.config.TASKS (--task's choices) lists these names, in this order
BY_NAME = {task.name: task for task in (CausalLM(), Classification())}


def task_of(c: TrainConfig) -> Task:
    """The :class:`Task` of ``c.task`` (a name in :data:`ls_jax.train.config.TASKS`)."""
    return BY_NAME[c.task]


def _encode(c: TrainConfig, rows, tokenizer, name: str, where=None):
    """:func:`ls_jax.data.prepare` of ``rows``, each answer of a ``responses`` row an example
    weighted by its probability (:func:`ls_jax.data.expand_responses`); with several processes
    each tokenises its share."""
    try:
        rows, where, weights = data.expand_responses(rows, where)
    except data.DataError as e:
        raise data.DataError(f"{name}: {e}") from None
    encoded = None
    if jax.process_count() > 1:
        encoded = data.encode_shared(
            rows, tokenizer, c.max_length, where, jax.process_index(), jax.process_count(), allgather
        )
    return data.prepare(rows, tokenizer, c.max_length, name=name, where=where, encoded=encoded, weights=weights)


def _soft_targets(c: TrainConfig, tokenizer, examples) -> list[dict]:
    """Each training example's sparse targets from ``--soft-targets`` (matched by its tokens);
    :class:`ls_jax.data.DataError` when the file lacks one or was made with another tokenizer."""
    from ls_jax import teacher_targets

    table = teacher_targets.read_targets(c.soft_targets, tokenizer)
    out = []
    for i, example in enumerate(examples):
        target = table.get(example[0].tobytes())
        if target is None:
            raise data.DataError(
                f"--soft-targets {c.soft_targets} has no teacher targets for training example {i + 1} "
                f"(made from other data, or another --max-length?)"
            )
        try:
            out.append(
                teacher_targets.soft_targets(
                    example,
                    target,
                    temperature=c.distill_temperature,
                    rest=c.distill_rest,
                    hard_weight=c.distill_hard_weight,
                )
            )
        except data.DataError as e:
            raise data.DataError(f"--soft-targets {c.soft_targets}: training example {i + 1}: {e}") from None
    return out


def _evaluate(evaluate, params, frozen, batches, mesh) -> dict:
    """Held-out metrics: loss (all response tokens, weighted as in training), token-level
    accuracy, confidence, NLL, Brier and ECE over the content tokens, the same accuracy /
    confidence over the special tokens (``special_``), teacher-forced answer accuracy; plus the
    content tokens' bins."""
    total = None
    for b in batches:
        total = accumulate(total, evaluate(params, frozen, sharding.put_batch(b, mesh)))
    total = jax.device_get(total)
    content = CalibrationReport.from_bins(total["bins"])
    special = CalibrationReport.from_bins(total["special_bins"])
    weight = float(total["weight"])
    metrics = {
        "loss": float(total["loss_sum"]) / (weight if weight > 0 else 1.0),
        "accuracy": content.accuracy,
        "nll": content.nll,
        "brier": content.brier,
        "ece": content.ece,
        "rms_calibration_error": content.rms_calibration_error,
        "max_calibration_error": content.max_calibration_error,
        "mean_confidence": content.mean_confidence,
        "content_tokens": content.count,
        "special_tokens": special.count,
        "special_accuracy": special.accuracy,
        "special_mean_confidence": special.mean_confidence,
        "answer_accuracy": int(total["answers_correct"]) / max(int(total["answers"]), 1),
        "tokens": int(total["tokens"]),
    }
    return {"metrics": metrics, "bins": content.bins}


def _answer_level(config: TrainConfig, prep: Prepared, model, progress: report.Progress) -> dict:
    """``answers`` (per kind of question: accuracy, confidence, ECE 15 / 10 bins, Brier, NLL,
    and after temperature scaling) and ``answer_bins`` of the first ``answer_rows`` held-out
    rows: the first half fits the temperatures, the second is scored. Empty when off."""
    rows = prep.held_rows[: config.answer_rows]
    if len(rows) < 2:
        return {}
    half = len(rows) // 2
    try:
        result = answer_calibration(model, prep.tokenizer, rows[half:], rows[:half], batch_size=config.eval_batch_size)
    except ValueError as e:  # e.g. option letters that are not single tokens of the tokenizer
        progress.note(f"answer-level scoring skipped: {str(e).splitlines()[0]}")
        return {}
    bins = {k: report.bins_json(v.bins()) for k, v in result.scores.items()}
    return {"answers": result.metrics(), "answer_bins": bins}
