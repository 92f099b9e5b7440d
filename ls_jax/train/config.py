"""Trainer configuration: one dataclass, its command-line flags, and its JSON form.

Each field is declared once, with :func:`flag`: its default, its ``--help`` text, whether
``--resume`` must match it (:data:`RESUME_FIELDS`) and its valid values (checked by
:func:`check_choices`); :func:`build_parser` derives the command line from these declarations.
"""

import argparse
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import jax.numpy as jnp

from ls_jax.dispatch import CHOICES
from ls_jax.logit_stats import BlockSizes
from ls_jax.models.classification import SMOOTHING_CONVENTIONS
from ls_jax.models.transformer import REMAT
from ls_jax.teacher_targets import REST_MODES
from ls_jax.train.optim import DECAYS

# module paths (regular expression, matched in full) that --lora-rank adapts: attention and MLP projections
LORA_TARGETS = r".*/(q|k|v|o|gate|up|down)_proj"
TASKS = ("causal_lm", "classification")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# the generated data's sizes: refused with --data, which they would not size
GENERATED_ONLY = ("num_train", "num_eval", "num_base")
SMOOTHING_CONFLICT = (
    "--label-smoothing with --compare-smoothing: each run takes its value from --compare-smoothing; give one of the two"
)


@dataclass(frozen=True)
class Flag:
    """What a :class:`TrainConfig` field declares besides its default (see :func:`flag`)."""

    help: str
    resume: bool = False
    choices: tuple | None = None
    parse_choices: bool = False
    parse: Callable[[str], object] | None = None


def flag(
    default,
    help: str,
    *,
    resume: bool = False,
    choices: Sequence | None = None,
    parse_choices: bool = False,
    parse: Callable[[str], object] | None = None,
):
    """A dataclass field declaring a flag ``--field-name`` (a list default is copied per instance).

    Args:
      default: the field's default value.
      help: the flag's ``--help`` text (``(default: ...)`` is appended unless it mentions its default).
      resume: ``--resume`` must keep the checkpoint's value (:data:`RESUME_FIELDS`).
      choices: the valid values; :func:`check_choices` refuses others.
      parse_choices: argparse refuses other values already (its usage line lists them).
      parse: argparse's ``type`` for a value that is not a plain int, float or str.

    Returns:
      A :func:`dataclasses.field` carrying a :class:`Flag` in its metadata.
    """
    meta = {"flag": Flag(help, resume, None if choices is None else tuple(choices), parse_choices, parse)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _softcap(text: str):
    if text in ("model", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'model', 'none' or a number, got {text!r}") from None


class ConfigError(ValueError):
    """An invalid flag, combination of flags or model (one-line message)."""


@dataclass
class LossOptions:
    """Keyword arguments of the fused loss (``ls_jax.lm_loss.causal_lm_loss``), one meaning each.

    logit_softcap: "model" (the model's own final-logit softcap), a float (overrides it) or
    None (off; ``--logit-softcap none``), as in ``causal_lm_loss``. block_n / block_v / block_d: the
    loss' :class:`ls_jax.logit_stats.BlockSizes` (None: the implementation's defaults).
    """

    label_smoothing: float = flag(
        0.0,
        resume=True,
        help=(
            "label smoothing a in [0, 1) of a single run (not with --compare-smoothing): target (1 - "
            "a) * onehot + a / V"
        ),
    )
    smoothing_convention: str = flag(
        "uniform",
        resume=True,
        choices=SMOOTHING_CONVENTIONS,
        help=(
            "classification: uniform ((1 - a) on the target + a / K on every class, as PyTorch / "
            "optax) or others (1 - a "
            "on the target, a / (K - 1) on each other class)"
        ),
    )
    z_loss: float = flag(0.0, "z-loss coefficient (adds z_loss * lse^2)", resume=True)
    logit_softcap: str | float | None = flag(
        "model",
        resume=True,
        parse=_softcap,
        help=("final-logit softcap: 'model' (the model's own, default), 'none' (off) or a number overriding it"),
    )
    impl: str = flag("auto", "loss implementation: " + ", ".join(CHOICES), choices=CHOICES)
    block_n: int | None = flag(None, "token block of the pallas kernel (default: its own)")
    block_v: int | None = flag(None, "vocabulary block of the xla and pallas implementations (default: their own)")
    block_d: int | None = flag(None, "hidden-size block of the pallas kernel (default: its own)")

    def blocks(self) -> BlockSizes:
        return BlockSizes(self.block_n, self.block_v, self.block_d)

    def loss_kwargs(self) -> dict:
        """Keyword arguments for ``causal_lm_loss`` / ``linear_smoothed_cross_entropy``
        (logit_softcap as given: resolve "model" with :meth:`softcap` for the latter)."""
        return dict(
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            logit_softcap=self.logit_softcap,
            impl=self.impl,
            blocks=self.blocks(),
        )

    def softcap(self, model) -> float | None:
        """The final-logit softcap in effect for ``model``."""
        if self.logit_softcap == "model":
            return getattr(model, "final_logit_softcap", None)
        return self.logit_softcap


@dataclass
class TrainConfig(LossOptions):
    """Every setting of a training run (flag ``--foo-bar`` sets field ``foo_bar``).

    ``data=None`` selects the embedded default: a tokenizer trained locally on generated
    arithmetic / multiple-choice data (``num_train`` / ``num_eval`` rows; with ``base_steps``
    a base model is first pre-trained on ``num_base`` more, as plain text). ``mesh`` names the
    sizes of the (data, fsdp, tensor) axes, ``-1`` meaning "all remaining devices".
    ``compare_smoothing`` trains one run per value (same seed, same data) into
    ``output_dir/ls<value>`` and compares them; empty means one run with ``label_smoothing``
    (on the command line it defaults to 0,0.1 for the generated data when ``--label-smoothing``
    is not given). ``seeds`` repeats every run per seed (``ls<value>-seed<s>``); the tables show
    the mean and spread. The command line's defaults for the generated data (no ``--data``) are
    :data:`EMBEDDED_DEFAULTS`.
    """

    # task, model, tokenizer and data
    task: str = flag(
        "causal_lm",
        resume=True,
        choices=TASKS,
        parse_choices=True,
        help=(
            "causal_lm (prompt/response or messages rows, next-token loss) or classification (rows with 'text' and "
            "'label': class index, class name or {name: probability}; a SequenceClassifier on the last token)"
        ),
    )
    classes: list[str] = flag(
        [],
        resume=True,
        parse=_names,
        help=(
            "classification: the class names, comma-separated, in class order (a class index in the data is a position "
            "in this list); a label naming another class is an error (default: the training labels' "
            "names, sorted, or 0 "
            ".. the largest index)"
        ),
    )
    model: str = flag(
        "tiny",
        resume=True,
        help=(
            "a local Hugging Face checkpoint directory holding its tokenizer files, or the name of a built-in tiny "
            "config (its tokenizer: a byte-level BPE trained on the training rows)"
        ),
    )
    data: str | None = flag(
        None,
        resume=True,
        help=(
            "training data: .jsonl / .json / .parquet file or a save_to_disk directory (rows with 'messages' or "
            "'prompt'/'response'; 'text'/'label' for --task classification); default: generated arithmetic data "
            "(sentiment-like reviews for --task classification)"
        ),
    )
    eval_data: str | None = flag(
        None, resume=True, help=("held-out data (same formats); default: --eval-fraction of --data")
    )
    split: str = flag("train", "split to read from a saved DatasetDict", resume=True)
    eval_fraction: float = flag(0.1, "fraction of --data held out (not with --eval-data)", resume=True)
    num_train: int = flag(256, "rows of generated data to train on (not with --data)", resume=True)
    num_eval: int = flag(800, "rows of generated held-out data (not with --data)", resume=True)
    num_base: int = flag(
        16000, help=("rows of generated text the base model is pre-trained on (with --base-steps; not with --data)")
    )
    base_steps: int = flag(
        0,
        help=(
            "embedded default: first pre-train a base model for this many steps on --num-base generated questions as "
            "plain text (loss on every token) into OUTPUT_DIR/base (--resume reuses a finished one), then fine-tune it "
            "(0: fine-tune a fresh model; default 1000 for the generated data unless --label-smoothing is given)"
        ),
    )
    max_length: int = flag(48, "tokens per row; longer examples are cut (and counted)", resume=True)
    packing: bool = flag(
        False, resume=True, help=("pack several examples per row (positions restart, attention stays within each)")
    )
    # optimisation
    steps: int = flag(320, "optimizer steps", resume=True)
    batch_size: int = flag(32, "rows per micro-batch (divisible by the data x fsdp mesh size)", resume=True)
    grad_accum: int = flag(1, "micro-batches per optimizer step", resume=True)
    lr: float = flag(3e-3, "peak learning rate", resume=True)
    warmup_steps: int = flag(30, "linear warmup steps", resume=True)
    decay: str = flag("cosine", "decay after warmup: cosine, linear or constant", resume=True, choices=DECAYS)
    min_lr_ratio: float = flag(0.1, "final learning rate as a fraction of --lr", resume=True)
    weight_decay: float = flag(0.01, "AdamW weight decay (not applied to 1-d parameters)", resume=True)
    b1: float = flag(0.9, "AdamW beta1", resume=True)
    b2: float = flag(0.98, "AdamW beta2", resume=True)
    clip_norm: float = flag(1.0, "clip gradients to this global norm (0: off)", resume=True)
    seed: int = flag(0, "seed of the model init, data split and batch order", resume=True)
    compute_dtype: str = flag("float32", "activation dtype: float32 or bfloat16", resume=True, choices=tuple(DTYPES))
    param_dtype: str = flag("float32", "parameter dtype: float32 or bfloat16", resume=True, choices=tuple(DTYPES))
    remat: str = flag(
        "none",
        choices=tuple(REMAT),
        help=(
            "recompute each block's activations in the backward pass: none, full (keep only the block's input) or dots "
            "(also keep its matmul outputs without batch dimensions - projections and MLP, not the attention scores: "
            "jax.checkpoint_policies.dots_with_no_batch_dims_saveable)"
        ),
    )
    lora_rank: int = flag(
        0,
        resume=True,
        help=("train only LoRA adapters (qwix) of this rank on the --lora-targets layers (0: full fine-tuning)"),
    )
    lora_alpha: float | None = flag(
        None,
        resume=True,
        help=("LoRA scale numerator: adapters add (alpha / rank) * x @ A @ B (default: the rank, scale 1)"),
    )
    lora_targets: str = flag(
        LORA_TARGETS,
        resume=True,
        help=(
            "regular expression matched in full against module paths such as model/layers/0/self_attn/q_proj (default: "
            "the attention and MLP projections)"
        ),
    )
    # S3FT: train on the model's own correct responses (ls_jax.s3ft)
    s3ft: bool = flag(
        False,
        resume=True,
        help=(
            "selective self-to-supervised fine-tuning: replace each training response by the model's own (greedy) "
            "response when --judge accepts it, else by an accepted paraphrase, else keep the gold"
        ),
    )
    judge: str = flag("exact", "S3FT judge of the rows without a 'judge' field: exact, numeric or code", resume=True)
    s3ft_paraphrase: bool = flag(
        True, resume=True, help=("S3FT: ask the model to paraphrase the gold when its own response is wrong")
    )
    s3ft_out: str | None = flag(
        None,
        help=(
            "where the S3FT set is written (default: s3ft-cache/ next to --output-dir); reused while "
            "the data, model and "
            "settings are unchanged"
        ),
    )
    allow_code_execution: bool = flag(
        False,
        help=(
            "S3FT: allow the code judge to run model-written Python code (with the rows' tests) on this machine, in a "
            "child process isolated and limited as far as the platform allows (not a sandbox for hostile code)"
        ),
    )
    # distillation: a teacher's top-k targets (ls_jax.distill)
    soft_targets: str | None = flag(
        None,
        resume=True,
        help=(
            "a parquet file of a teacher's top-k next-token distributions over the training responses (python -m "
            "ls_jax.distill, same tokenizer and --max-length): train on them instead of the hard labels"
        ),
    )
    distill_temperature: float = flag(
        1.0,
        resume=True,
        help=("--soft-targets: temperature of the teacher's top-k probabilities (renormalised over the k)"),
    )
    distill_rest: str = flag(
        "renormalise",
        resume=True,
        choices=REST_MODES,
        help=(
            "--soft-targets: the teacher's mass outside its top k: renormalise (dropped) or uniform (spread over the "
            "vocabulary)"
        ),
    )
    distill_hard_weight: float = flag(
        0.0, resume=True, help=("--soft-targets: weight b in [0, 1] of the hard label: b onehot + (1 - b) teacher")
    )
    # loss (the fields of LossOptions, plus)
    compare_smoothing: list[float] = flag(
        [],
        parse=_floats,
        help=(
            "comma-separated smoothing values, one run each, compared in the final tables (default 0,0.1 for the "
            "generated data unless --label-smoothing is given; '' for one run)"
        ),
    )
    seeds: list[int] = flag(
        [],
        parse=_ints,
        help=(
            "comma-separated seeds (batch order, initialisation), one run each per smoothing value; "
            "the tables show mean "
            "and spread (default 0,1 for the generated data unless --label-smoothing is given; '' for --seed alone)"
        ),
    )
    answer_rows: int = flag(
        1000,
        help=(
            "held-out rows scored at answer level after training (multiple choice: option letters; others: greedy "
            "decoding), the first half fitting the temperature, the second scored; 0: off"
        ),
    )
    # sharding, logging, checkpoints
    mesh: str = flag(
        "data=-1,fsdp=1,tensor=1", help=("device mesh sizes, e.g. data=2,fsdp=4,tensor=1 (-1: the remaining devices)")
    )
    output_dir: str | None = flag(None, "where checkpoints, metrics.jsonl and plots go (default runs/<timestamp>)")
    save_every: int = flag(200, "checkpoint every k steps (and at the end)")
    keep_checkpoints: int = flag(3, "checkpoints kept on disk")
    eval_every: int = flag(200, "evaluate every k steps (and at the end)")
    eval_batch_size: int = flag(64, "rows per held-out batch (divisible by the data x fsdp mesh size)")
    log_every: int = flag(10, "write a train line to metrics.jsonl every k steps")
    resume: bool = flag(False, "continue from the latest checkpoint in --output-dir")
    progress: bool = flag(True, "show a progress bar")
    # several processes (hosts): ls_jax.train.distributed
    coordinator: str | None = flag(
        None, help=("HOST:PORT of process 0, for a run over several processes (each host runs the same command)")
    )
    num_processes: int | None = flag(None, "how many processes take part (with --coordinator)")
    process_id: int | None = flag(None, "this process's number in [0, --num-processes) (with --coordinator)")
    distributed: bool = flag(
        False,
        help=(
            "join the other processes as JAX detects them (Slurm, TPU VMs, Open MPI) instead of --coordinator / "
            "--num-processes / --process-id"
        ),
    )
    init_timeout: int = flag(300, "seconds to wait for every process to join")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# the command line's defaults when neither --data nor --label-smoothing is given: the paper's
# setting (base model, then SFT with and without smoothing, 2 seeds); a flag given explicitly wins
EMBEDDED_DEFAULTS = {"compare_smoothing": [0.0, 0.1], "seeds": [0, 1], "base_steps": 1000}


def declarations() -> Iterator[tuple[str, Flag]]:
    """(field name, :class:`Flag`) of every :class:`TrainConfig` field, in flag order."""
    return ((f.name, f.metadata["flag"]) for f in dataclasses.fields(TrainConfig))


# config fields that must match between a checkpoint and the run resuming it
RESUME_FIELDS = tuple(name for name, declared in declarations() if declared.resume)


def check_choices(c: LossOptions) -> None:
    """Raise :class:`ConfigError` for a field of ``c`` outside its declared choices."""
    for f in dataclasses.fields(c):
        choices, value = f.metadata["flag"].choices, getattr(c, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {choices}, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """argparse flags for every :class:`TrainConfig` field, from its :func:`flag` declaration, each
    help showing the field's default (unless it says it already). The flags that :func:`parse_args`
    fills in or checks against the others (those of :data:`EMBEDDED_DEFAULTS` and
    :data:`GENERATED_ONLY`, ``--label-smoothing``, ``--eval-fraction``) parse to None when not given."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Supervised fine-tuning with the fused label-smoothed cross-entropy. "
        "With no arguments: a tiny model on generated arithmetic data, offline.",
    )
    for f in dataclasses.fields(TrainConfig):
        declared = f.metadata["flag"]
        name, helptext = "--" + f.name.replace("_", "-"), declared.help
        if f.type is not bool and f.default not in (None, dataclasses.MISSING) and "default" not in helptext:
            helptext += f" (default: {f.default})".replace("%", "%%")
        if f.type is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(name, action=action, **({"default": True} if f.default else {}), help=helptext)
            continue
        later = f.name in (*EMBEDDED_DEFAULTS, *GENERATED_ONLY, "label_smoothing", "eval_fraction")  # parse_args'
        t = str(f.type)  # int, float, str or Optional[...] of them, unless the flag declares its parser
        conv = declared.parse or (int if "int" in t else float if "float" in t else str)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        p.add_argument(
            name,
            type=conv,
            default=None if later else default,
            help=helptext,
            choices=declared.choices if declared.parse_choices else None,
        )
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from command-line flags (``argv=None``: ``sys.argv[1:]``).

    Raises :class:`ConfigError` for a flag the others would make ignored: ``--label-smoothing``
    with ``--compare-smoothing`` (each run has its value), the generated data's sizes
    (:data:`GENERATED_ONLY`) with ``--data``, ``--eval-fraction`` without ``--data`` or with
    ``--eval-data``.
    """
    ns = vars(build_parser().parse_args(argv))
    for name in GENERATED_ONLY:
        if ns[name] is not None and ns["data"] is not None:
            raise ConfigError(
                f"--{name.replace('_', '-')} sizes the generated data; with --data every row is used "
                f"(hold rows out with --eval-fraction or --eval-data)"
            )
    if ns["eval_fraction"] is not None and (ns["data"] is None or ns["eval_data"] is not None):
        raise ConfigError("--eval-fraction holds out part of --data: it needs --data, and --eval-data replaces it")
    if ns["label_smoothing"] is not None and ns["compare_smoothing"]:
        raise ConfigError(SMOOTHING_CONFLICT)
    demo = ns["data"] is None and ns["label_smoothing"] is None  # else one run, as asked
    fresh = TrainConfig()
    for name, value in EMBEDDED_DEFAULTS.items():
        lm_only = name != "compare_smoothing"  # the base stage and seeds: the causal-LM demo only
        if ns[name] is None:
            ns[name] = value if demo and not (lm_only and ns["task"] != "causal_lm") else getattr(fresh, name)
    for name in (*GENERATED_ONLY, "label_smoothing", "eval_fraction"):
        if ns[name] is None:
            ns[name] = getattr(fresh, name)
    return TrainConfig(**ns)
