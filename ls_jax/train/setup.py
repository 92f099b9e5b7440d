"""Everything a run needs, checked before anything is written: config, tokenizer, data, model, mesh.

:func:`prepare` raises :class:`ConfigError` / :class:`ls_jax.data.DataError` /
:class:`ls_jax.train.sharding.MeshError` (one-line messages) on bad input; only after it
returns does the trainer create its output directory.
"""

import math
import os
import random
import re
from collections.abc import Callable

from ls_jax import data
from ls_jax.targets import check_options
from ls_jax.train import sharding, sources
from ls_jax.train.config import DTYPES, SMOOTHING_CONFLICT, ConfigError, TrainConfig, check_choices
from ls_jax.train.tasks import Prepared, Rows, task_of

# --model NAME -> overrides of ls_jax.models.tiny_llama_config (vocabulary from the tokenizer)
TINY_MODELS = {"tiny": dict(hidden_size=64, num_hidden_layers=2)}


def check_config(c: TrainConfig) -> None:
    """Raise :class:`ConfigError` for out-of-range or unknown flag values (the declared choices:
    :func:`ls_jax.train.config.check_choices`), for flags that contradict each other, for flags of
    another task (:meth:`ls_jax.train.tasks.Task.check`) and for the data sources' flags
    (:func:`ls_jax.train.sources.check`)."""
    check_choices(c)
    task_of(c).check(c)
    positive = (
        "steps",
        "batch_size",
        "grad_accum",
        "max_length",
        "save_every",
        "eval_every",
        "log_every",
        "eval_batch_size",
        "keep_checkpoints",
        "num_train",
        "num_eval",
    )
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
        (
            c.soft_targets is None or not (c.s3ft or c.base_steps),
            "--soft-targets is for --task causal_lm, without --s3ft or --base-steps",
        ),
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
        (
            c.data is not None or c.eval_data is None,
            "--eval-data needs --data (the generated data has its own held-out set)",
        ),
        (
            c.base_steps >= 0 and c.answer_rows >= 0 and c.num_base >= 0,
            "--base-steps, --answer-rows and --num-base must be >= 0",
        ),
        (
            c.data is None or not c.base_steps,
            "--base-steps needs the generated data (a checkpoint of your own is --model)",
        ),
        (len(set(c.seeds)) == len(c.seeds), "--seeds repeats a seed"),
        (len(set(c.classes)) == len(c.classes), "--classes repeats a class"),
        (len(c.classes) != 1, "--classes needs at least 2 classes"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    sources.check(c)  # --s3ft's flags (ls_jax.s3ft)
    try:
        re.compile(c.lora_targets)
    except re.error as e:
        raise ConfigError(f"--lora-targets {c.lora_targets!r} is not a regular expression: {e}") from None
    try:
        c.blocks()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--block-n/-v/-d: {e}") from None


def _rows(c: TrainConfig) -> Rows:
    """The run's rows: the task's generated data (no ``--data``), ``--data`` with ``--eval-data``, or
    ``--data`` less the held-out ``--eval-fraction`` (drawn with ``--seed``)."""
    if c.data is None:
        return task_of(c).generate(c)
    rows, where = data.load_rows(c.data, c.split)
    if c.eval_data is not None:
        held, held_where = data.load_rows(c.eval_data, c.split)
        return Rows(rows, held, where, held_where)
    order = list(range(len(rows)))
    random.Random(c.seed).shuffle(order)
    n_eval = max(1, int(round(c.eval_fraction * len(rows))))
    if n_eval >= len(rows):
        raise data.DataError(f"{c.data}: {len(rows)} rows are too few to hold out --eval-fraction {c.eval_fraction}")
    train, held = order[n_eval:], order[:n_eval]
    return Rows([rows[i] for i in train], [rows[i] for i in held], [where[i] for i in train], [where[i] for i in held])


def _tokenizer(c: TrainConfig, train_rows, saved_tokenizer: str | None):
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
            raise ConfigError(
                f"--model {c.model!r} is neither a local checkpoint directory nor a built-in "
                f"model ({', '.join(TINY_MODELS)})"
            )
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


def _model_builder(c: TrainConfig, config, vocab: int, num_labels: int | None = None) -> Callable:
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
        raise ConfigError(
            f"--model {c.model}: vocabulary of {config.vocab_size} is smaller than the tokenizer's {vocab}"
        )
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


def prepare(c: TrainConfig, saved_tokenizer: str | None = None) -> Prepared:
    """Validate the config and load everything; no file is written (with --s3ft, the S3FT set is
    built, or reused, once the rest is valid: see :mod:`ls_jax.s3ft`).

    ``saved_tokenizer``: a directory holding the tokenizer of the run being resumed.
    """
    check_config(c)
    rows = _rows(c)
    mesh = sharding.make_mesh(c.mesh)
    sharding.check_batch(c.batch_size, mesh)
    sharding.check_batch(c.eval_batch_size, mesh, "--eval-batch-size")
    model_config = _model_config(c)
    tokenizer = _tokenizer(c, (rows.base or []) + list(rows.train), saved_tokenizer)
    return task_of(c).prepare(
        c, tokenizer, rows, mesh, lambda num_labels=None: _model_builder(c, model_config, len(tokenizer), num_labels)
    )
