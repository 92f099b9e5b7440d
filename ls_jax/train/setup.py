"""Everything a run needs, checked before anything is written: config, tokenizer, data, model, mesh.

:func:`prepare` raises :class:`ConfigError` / :class:`ls_jax.data.DataError` /
:class:`ls_jax.train.sharding.MeshError` (one-line messages) on bad input; only after it
returns does the trainer create its output directory.
"""

import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import jax

from ls_jax import data
from ls_jax.targets import check_options
from ls_jax.s3ft import judges
from ls_jax.train import sharding, synthetic
from ls_jax.train.distributed import allgather
from ls_jax.train.config import DTYPES, SMOOTHING_CONFLICT, ConfigError, TrainConfig, check_choices

# --model NAME -> overrides of ls_jax.models.tiny_llama_config (vocabulary from the tokenizer)
TINY_MODELS = {"tiny": dict(hidden_size=64, num_hidden_layers=2)}

@dataclass
class Prepared:
    """A validated run: tokenizer, tokenised train / held-out examples, a model builder, the mesh.

    ``build_model(seed)`` returns a fresh NNX model (random init from ``seed``, default the
    run's, or the checkpoint). ``log`` holds the data-preparation lines (truncation counts) for
    the user. ``classes``: the class names of ``--task classification`` (examples are then padded
    rows with targets), else None. ``held_rows``: the held-out rows themselves (for answer-level
    scoring). ``base``: tokenised plain-text examples of the base stage (``--base-steps``), else None.
    ``targets``: with ``--soft-targets``, each training example's sparse targets
    (:func:`ls_jax.distill.soft_targets`), else None.
    """

    tokenizer: object
    train: List[Tuple]
    held_out: List[Tuple]
    build_model: Callable
    mesh: object
    log: List[str]
    classes: Optional[List[str]] = None
    held_rows: List[dict] = field(default_factory=list)
    base: Optional[List[Tuple]] = None
    targets: Optional[List[dict]] = None


def check_config(c: TrainConfig) -> None:
    """Raise :class:`ConfigError` for out-of-range or unknown flag values (the declared choices:
    :func:`ls_jax.train.config.check_choices`) and for flags that contradict each other."""
    check_choices(c)
    positive = ("steps", "batch_size", "grad_accum", "max_length", "save_every", "eval_every", "log_every",
                "eval_batch_size", "keep_checkpoints", "num_train", "num_eval")
    for name in positive:
        if getattr(c, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
    for flag, values in (("--label-smoothing", [c.label_smoothing]), ("--compare-smoothing", c.compare_smoothing)):
        for a in values:
            if not 0 <= a < 1:  # NaN fails too; a = 1 is a uniform target: nothing to learn
                raise ConfigError(f"{flag} must be in [0, 1), got {a:g}")
    try:
        check_options(c.label_smoothing, c.z_loss, None if c.logit_softcap == "model" else c.logit_softcap, "mean")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    checks = [
        (not (c.label_smoothing and c.compare_smoothing), SMOOTHING_CONFLICT),
        (c.task == "classification" or c.smoothing_convention == "uniform",
         "--smoothing-convention others is for --task classification"),
        (c.task == "causal_lm" or not c.packing, "--packing is for --task causal_lm"),
        (c.task == "causal_lm" or not c.s3ft, "--s3ft is for --task causal_lm"),
        (c.task == "causal_lm" or not c.base_steps, "--base-steps is for --task causal_lm"),
        (c.soft_targets is None or (c.task == "causal_lm" and not c.s3ft and not c.base_steps),
         "--soft-targets is for --task causal_lm, without --s3ft or --base-steps"),
        (0 < c.distill_temperature < math.inf, "--distill-temperature must be finite and > 0"),
        (0 <= c.distill_hard_weight <= 1, "--distill-hard-weight must be in [0, 1]"),
        (0 < c.lr < math.inf, "--lr must be finite and > 0"),
        (0 <= c.b1 < 1, "--b1 must be in [0, 1)"),
        (0 <= c.b2 < 1, "--b2 must be in [0, 1)"),
        (0 <= c.weight_decay < math.inf, "--weight-decay must be finite and >= 0"),
        (0 <= c.clip_norm < math.inf, "--clip-norm must be finite and >= 0 (0: off)"),
        (c.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (0 <= c.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
        (c.lora_rank >= 0, "--lora-rank must be >= 0"),
        (c.lora_alpha is None or c.lora_alpha > 0, "--lora-alpha must be > 0"),
        (0 < c.eval_fraction < 1, "--eval-fraction must be in (0, 1)"),
        (c.max_length >= 2, "--max-length must be >= 2"),
        (c.judge in judges.NAMES, f"--judge must be one of {judges.NAMES}, got {c.judge!r}"),
        (c.data is not None or c.eval_data is None, "--eval-data needs --data (the generated data has its own held-out set)"),
        (c.base_steps >= 0 and c.answer_rows >= 0 and c.num_base >= 0, "--base-steps, --answer-rows and --num-base must be >= 0"),
        (c.data is None or not c.base_steps, "--base-steps needs the generated data (a checkpoint of your own is --model)"),
        (len(set(c.seeds)) == len(c.seeds), "--seeds repeats a seed"),
        (c.task == "classification" or not c.classes, "--classes is for --task classification"),
        (len(set(c.classes)) == len(c.classes), "--classes repeats a class"),
        (len(c.classes) != 1, "--classes needs at least 2 classes"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        judges.require_opt_in(c.judge if c.s3ft else None, c.allow_code_execution)
    except judges.CodeExecutionRefused as e:
        raise ConfigError(str(e)) from None
    try:
        re.compile(c.lora_targets)
    except re.error as e:
        raise ConfigError(f"--lora-targets {c.lora_targets!r} is not a regular expression: {e}") from None
    try:
        c.blocks()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--block-n/-v/-d: {e}") from None


def _rows(c: TrainConfig):
    """(train rows, held-out rows, train rows' places, held-out rows' places, base rows) for the
    config; the places (``"line K"`` of a .jsonl file, ``"row K"``, for error messages) are None
    for the generated data; base rows (plain text) only for the generated data with --base-steps."""
    if c.data is None and c.task == "classification":
        from ls_jax.train import classification

        train, held = classification.generate(c.num_train, c.num_eval, seed=c.seed)
        return train, held, None, None, None
    if c.data is None:
        try:
            base, train, held = synthetic.generate_splits(
                [c.num_base if c.base_steps else 0, c.num_train, c.num_eval], seed=c.seed)
        except ValueError as e:
            raise ConfigError(f"--num-train / --num-eval / --num-base: {e}") from None
        return train, held, None, None, synthetic.as_text(base) if c.base_steps else None
    rows, where = data.load_rows(c.data, c.split)
    if c.eval_data is not None:
        held, held_where = data.load_rows(c.eval_data, c.split)
        return rows, held, where, held_where, None
    order = list(range(len(rows)))
    random.Random(c.seed).shuffle(order)
    n_eval = max(1, int(round(c.eval_fraction * len(rows))))
    if n_eval >= len(rows):
        raise data.DataError(f"{c.data}: {len(rows)} rows are too few to hold out --eval-fraction {c.eval_fraction}")
    train, held = order[n_eval:], order[:n_eval]
    return [rows[i] for i in train], [rows[i] for i in held], [where[i] for i in train], [where[i] for i in held], None


def _tokenizer(c: TrainConfig, train_rows, saved_tokenizer: Optional[str]):
    """The run's tokenizer: a resumed run's, the checkpoint's, or a BPE trained on the train rows."""
    from ls_jax.tokenizer import load_tokenizer, train_bpe_tokenizer

    path = saved_tokenizer if saved_tokenizer is not None else c.model if os.path.isdir(c.model) else None
    if path is not None:
        try:
            return load_tokenizer(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def text(r):
        turns = " ".join(str(m.get("content", "")) for m in (r.get("messages") or []) if isinstance(m, dict))
        answers = r.get("responses") if isinstance(r.get("responses"), list) else []
        answers = " ".join(str(a.get("text", "")) for a in answers if isinstance(a, dict))
        return str(r.get("prompt", "")) + str(r.get("response", "")) + turns + answers + str(r.get("text", ""))

    return train_bpe_tokenizer([text(r) for r in train_rows])


def _model_config(c: TrainConfig):
    """The transformers config of ``--model`` (checked to be a supported architecture), or None
    for a built-in tiny model (its config needs the tokenizer's vocabulary)."""
    from transformers import AutoConfig

    from ls_jax.models import decoder_spec

    if not os.path.isdir(c.model):
        if c.model not in TINY_MODELS:
            raise ConfigError(f"--model {c.model!r} is neither a local checkpoint directory nor a built-in "
                              f"model ({', '.join(TINY_MODELS)})")
        return None
    try:
        config = AutoConfig.from_pretrained(c.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {c.model}: cannot read config.json: {str(e).splitlines()[0]}") from None
    try:
        decoder_spec(config)
    except ValueError as e:
        raise ConfigError(f"--model {c.model}: {e}") from None
    return config


def _model_builder(c: TrainConfig, config, vocab: int, num_labels: Optional[int] = None) -> Callable:
    """A builder ``build(seed=run's seed)`` of the model (random init from the seed, or the
    checkpoint); with ``num_labels`` a SequenceClassifier (a checkpoint's decoder, a fresh ``score`` head)."""
    from ls_jax.models import check_pretrained, from_config, tiny_llama_config

    task = dict(task="sequence_classification", num_labels=num_labels) if num_labels else {}
    dtypes = dict(dtype=DTYPES[c.compute_dtype], param_dtype=DTYPES[c.param_dtype], remat=c.remat)
    if config is None:
        tiny = tiny_llama_config(vocab_size=vocab, **TINY_MODELS[c.model])
        _check_lora_targets(c, tiny, task)
        return lambda seed=c.seed: from_config(tiny, seed=seed, **task, **dtypes)
    if config.vocab_size < vocab:
        raise ConfigError(f"--model {c.model}: vocabulary of {config.vocab_size} is smaller than the tokenizer's {vocab}")
    try:  # the weights' files, names and shapes (headers only), before the run writes anything
        check_pretrained(c.model, **task)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {c.model}: {str(e).splitlines()[0]}") from None
    _check_lora_targets(c, config, task)
    return checkpoint_builder(c, c.model, **task)


def checkpoint_builder(c: TrainConfig, path: str, **task) -> Callable:
    """A builder ``build(seed=run's seed)`` of the model in the checkpoint directory ``path``, in
    the run's dtypes (the seed initialises only a fresh classification head)."""
    from ls_jax.models import from_pretrained

    dtypes = dict(dtype=DTYPES[c.compute_dtype], param_dtype=DTYPES[c.param_dtype], remat=c.remat)
    return lambda seed=c.seed: from_pretrained(path, seed=seed, **task, **dtypes)


def _check_lora_targets(c: TrainConfig, config, task: dict) -> None:
    """With --lora-rank, --lora-targets must name a layer of the model (checked on its shapes only)."""
    if not c.lora_rank:
        return
    from flax import nnx

    from ls_jax.models import from_config
    from ls_jax.train.lora import lora_targets

    try:
        lora_targets(nnx.eval_shape(lambda: from_config(config, **task)), c.lora_targets)
    except ValueError as e:
        raise ConfigError(f"--lora-targets: {e}") from None


def _s3ft_rows(c: TrainConfig, build, tokenizer, rows, where, log: List[str]):
    """The S3FT training rows (built, or reused when current) and their places in the data;
    the counts per source go to ``log``. Rows left out are reported there, never silently."""
    from ls_jax.s3ft.pipeline import build_cached, checkpoint_id

    out = c.s3ft_out or os.path.join(os.path.dirname(os.path.abspath(c.output_dir or "runs/x")), "s3ft-cache",
                                     f"{os.path.basename(c.data or 'generated')}-{os.path.basename(c.model)}.jsonl")
    model_id = checkpoint_id(c.model) if os.path.isdir(c.model) else f"{c.model} seed={c.seed} {c.param_dtype}"
    try:
        result = build_cached(out, build, tokenizer, rows, model_id, force=False, log=log.append, where=where,
                              allow_code_execution=c.allow_code_execution, judge=c.judge,
                              paraphrase=c.s3ft_paraphrase, max_new_tokens=c.max_length,
                              batch_size=c.eval_batch_size, progress=c.progress)
    except judges.CodeExecutionRefused as e:  # a row asks for the code judge
        raise ConfigError(str(e)) from None
    log.extend(["s3ft targets (train rows):", *result.table().splitlines()])
    if not result.rows:
        raise data.DataError(f"s3ft: no training row left ({len(result.skipped)} left out; see {out}.skipped.jsonl)")
    return result.rows, None if where is None else [where[r] for r in result.kept_rows()]

def _classification(c: TrainConfig, tokenizer, train_rows, held_rows, train_where, held_where) -> Tuple:
    """(classes, train rows, held-out rows, log lines) of --task classification."""
    from ls_jax.train import classification

    train_where = train_where or [f"row {i + 1}" for i in range(len(train_rows))]
    held_where = held_where or [f"row {i + 1}" for i in range(len(held_rows))]
    classes = classification.label_classes(train_rows, train_where, c.classes)
    if c.smoothing_convention == "others":
        for a in [c.label_smoothing, *c.compare_smoothing]:
            if a > (len(classes) - 1) / len(classes):
                raise ConfigError(f"--smoothing-convention others: smoothing {a} leaves the target less than each "
                                  f"other class; at most {(len(classes) - 1) / len(classes):.4g} on {len(classes)} classes")
    name = "generated" if c.data is None else c.data
    train, train_log = classification.prepare(train_rows, train_where, tokenizer, c.max_length, classes,
                                              f"{name} (train)")
    held, held_log = classification.prepare(held_rows, held_where, tokenizer, c.max_length, classes,
                                            f"{c.eval_data or name} (held out)")
    if len(train) < c.batch_size:
        raise data.DataError(f"{len(train)} training examples are fewer than --batch-size {c.batch_size}")
    return classes, train, held, [train_log, held_log, f"classes: {', '.join(classes)}"]


def _prepare(c: TrainConfig, rows, tokenizer, name: str, where=None):
    """:func:`ls_jax.data.prepare` of ``rows``, each answer of a ``responses`` row an example
    weighted by its probability (:func:`ls_jax.data.expand_responses`); with several processes
    each tokenises its share."""
    try:
        rows, where, weights = data.expand_responses(rows, where)
    except data.DataError as e:
        raise data.DataError(f"{name}: {e}") from None
    encoded = None
    if jax.process_count() > 1:
        encoded = data.encode_shared(rows, tokenizer, c.max_length, where, jax.process_index(), jax.process_count(),
                                     allgather)
    return data.prepare(rows, tokenizer, c.max_length, name=name, where=where, encoded=encoded, weights=weights)


def _soft_targets(c: TrainConfig, tokenizer, examples) -> List[dict]:
    """Each training example's sparse targets from ``--soft-targets`` (matched by its tokens);
    :class:`ls_jax.data.DataError` when the file lacks one or was made with another tokenizer."""
    from ls_jax import distill

    table = distill.read_targets(c.soft_targets, tokenizer)
    out = []
    for i, example in enumerate(examples):
        target = table.get(example[0].tobytes())
        if target is None:
            raise data.DataError(f"--soft-targets {c.soft_targets} has no teacher targets for training example {i + 1} "
                                 f"(made from other data, or another --max-length?)")
        try:
            out.append(distill.soft_targets(example, target, temperature=c.distill_temperature, rest=c.distill_rest,
                                            hard_weight=c.distill_hard_weight))
        except data.DataError as e:
            raise data.DataError(f"--soft-targets {c.soft_targets}: training example {i + 1}: {e}") from None
    return out


def prepare(c: TrainConfig, saved_tokenizer: Optional[str] = None) -> Prepared:
    """Validate the config and load everything; no file is written (with --s3ft, the S3FT set is
    built, or reused, once the rest is valid: see :mod:`ls_jax.s3ft`).

    ``saved_tokenizer``: a directory holding the tokenizer of the run being resumed.
    """
    check_config(c)
    train_rows, held_rows, train_where, held_where, base_rows = _rows(c)
    mesh = sharding.make_mesh(c.mesh)
    sharding.check_batch(c.batch_size, mesh)
    sharding.check_batch(c.eval_batch_size, mesh, "--eval-batch-size")
    model_config = _model_config(c)
    tokenizer = _tokenizer(c, (base_rows or []) + list(train_rows), saved_tokenizer)
    if c.task == "classification":
        classes, train, held, log = _classification(c, tokenizer, train_rows, held_rows, train_where, held_where)
        build = _model_builder(c, model_config, len(tokenizer), num_labels=len(classes))
        return Prepared(tokenizer, train, held, build, mesh, log, classes)
    build = _model_builder(c, model_config, len(tokenizer))
    name = "generated" if c.data is None else c.data
    held, held_stats = _prepare(c, held_rows, tokenizer, f"{c.eval_data or name} (held out)", held_where)
    log = []
    if c.s3ft:  # last: generation is the slow part (the held-out rows keep their gold responses)
        train_rows, train_where = _s3ft_rows(c, build, tokenizer, train_rows, train_where, log)
    train, train_stats = _prepare(c, train_rows, tokenizer, f"{name} (train)", train_where)
    rows = len(data.pack(train, c.max_length)) if c.packing else len(train)
    if rows < c.batch_size:
        raise data.DataError(f"{len(train)} training examples ({rows} rows) are fewer than --batch-size {c.batch_size}")
    log += [train_stats.log_line("train", c.max_length), held_stats.log_line("held out", c.max_length)]
    targets = None if c.soft_targets is None else _soft_targets(c, tokenizer, train)
    base = None
    if base_rows:
        base, base_stats = _prepare(c, base_rows, tokenizer, "generated (base)")
        log.insert(0, base_stats.log_line("base (plain text)", c.max_length))
    return Prepared(tokenizer, train, held, build, mesh, log, held_rows=list(held_rows), base=base, targets=targets)
