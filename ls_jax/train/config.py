"""Trainer configuration: one dataclass, its command-line flags, and its JSON form."""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from ls_jax.dispatch import CHOICES
from ls_jax.logit_stats import BlockSizes


# module paths (regular expression, matched in full) that --lora-rank adapts: attention and MLP projections
LORA_TARGETS = r".*/(q|k|v|o|gate|up|down)_proj"
TASKS = ("causal_lm", "classification")
# the generated data's sizes: refused with --data, which they would not size
GENERATED_ONLY = ("num_train", "num_eval", "num_base")
SMOOTHING_CONFLICT = ("--label-smoothing with --compare-smoothing: each run takes its value from --compare-smoothing; "
                      "give one of the two")


class ConfigError(ValueError):
    """An invalid flag, combination of flags or model (one-line message)."""


@dataclass
class LossOptions:
    """Keyword arguments of the fused loss (``ls_jax.lm_loss.causal_lm_loss``), one meaning each.

    logit_softcap: "model" (the model's own final-logit softcap), a float (overrides it) or
    None (off; ``--logit-softcap none``), as in ``causal_lm_loss``. block_n / block_v / block_d: the
    loss' :class:`ls_jax.logit_stats.BlockSizes` (None: the implementation's defaults).
    """

    label_smoothing: float = 0.0
    smoothing_convention: str = "uniform"
    z_loss: float = 0.0
    logit_softcap: Union[str, float, None] = "model"
    impl: str = "auto"
    block_n: Optional[int] = None
    block_v: Optional[int] = None
    block_d: Optional[int] = None

    def blocks(self) -> BlockSizes:
        return BlockSizes(self.block_n, self.block_v, self.block_d)

    def loss_kwargs(self) -> dict:
        """Keyword arguments for ``causal_lm_loss`` / ``linear_smoothed_cross_entropy``
        (logit_softcap as given: resolve "model" with :meth:`softcap` for the latter)."""
        return dict(label_smoothing=self.label_smoothing, z_loss=self.z_loss, logit_softcap=self.logit_softcap,
                    impl=self.impl, blocks=self.blocks())

    def softcap(self, model) -> Optional[float]:
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
    task: str = "causal_lm"
    classes: List[str] = field(default_factory=list)
    model: str = "tiny"
    data: Optional[str] = None
    eval_data: Optional[str] = None
    split: str = "train"
    eval_fraction: float = 0.1
    num_train: int = 256
    num_eval: int = 800
    num_base: int = 16000
    base_steps: int = 0
    max_length: int = 48
    packing: bool = False
    # optimisation
    steps: int = 320
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 30
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    clip_norm: float = 1.0
    seed: int = 0
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_targets: str = LORA_TARGETS
    # S3FT: train on the model's own correct responses (ls_jax.s3ft)
    s3ft: bool = False
    judge: str = "exact"
    s3ft_paraphrase: bool = True
    s3ft_out: Optional[str] = None
    allow_code_execution: bool = False
    # distillation: a teacher's top-k targets (ls_jax.distill)
    soft_targets: Optional[str] = None
    distill_temperature: float = 1.0
    distill_rest: str = "renormalise"
    distill_hard_weight: float = 0.0
    # loss (the fields of LossOptions, plus)
    compare_smoothing: List[float] = field(default_factory=list)
    seeds: List[int] = field(default_factory=list)
    answer_rows: int = 1000
    # sharding, logging, checkpoints
    mesh: str = "data=-1,fsdp=1,tensor=1"
    output_dir: Optional[str] = None
    save_every: int = 200
    keep_checkpoints: int = 3
    eval_every: int = 200
    eval_batch_size: int = 64
    log_every: int = 10
    resume: bool = False
    progress: bool = True
    # several processes (hosts): ls_jax.train.distributed
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    distributed: bool = False
    init_timeout: int = 300

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# the command line's defaults when neither --data nor --label-smoothing is given: the paper's
# setting (base model, then SFT with and without smoothing, 2 seeds); a flag given explicitly wins
EMBEDDED_DEFAULTS = {"compare_smoothing": [0.0, 0.1], "seeds": [0, 1], "base_steps": 1000}

_HELP = {
    "task": "causal_lm (prompt/response or messages rows, next-token loss) or classification (rows with 'text' "
            "and 'label': class index, class name or {name: probability}; a SequenceClassifier on the last token)",
    "classes": "classification: the class names, comma-separated, in class order (a class index in the data "
               "is a position in this list); a label naming another class is an error (default: the training "
               "labels' names, sorted, or 0 .. the largest index)",
    "smoothing_convention": "classification: uniform ((1 - a) on the target + a / K on every class, as PyTorch / optax) "
                            "or others (1 - a on the target, a / (K - 1) on each other class)",
    "model": "a local Hugging Face checkpoint directory holding its tokenizer files, or the name of a built-in "
             "tiny config (its tokenizer: a byte-level BPE trained on the training rows)",
    "data": "training data: .jsonl / .json / .parquet file or a save_to_disk directory "
            "(rows with 'messages' or 'prompt'/'response'; 'text'/'label' for --task classification); "
            "default: generated arithmetic data (sentiment-like reviews for --task classification)",
    "eval_data": "held-out data (same formats); default: --eval-fraction of --data",
    "split": "split to read from a saved DatasetDict",
    "eval_fraction": "fraction of --data held out (not with --eval-data)",
    "num_train": "rows of generated data to train on (not with --data)",
    "num_eval": "rows of generated held-out data (not with --data)",
    "num_base": "rows of generated text the base model is pre-trained on (with --base-steps; not with --data)",
    "base_steps": "embedded default: first pre-train a base model for this many steps on --num-base generated "
                  "questions as plain text (loss on every token) into OUTPUT_DIR/base (--resume reuses a finished "
                  "one), then fine-tune it (0: fine-tune a fresh model; default 1000 for the generated data "
                  "unless --label-smoothing is given)",
    "seeds": "comma-separated seeds (batch order, initialisation), one run each per smoothing value; the tables "
             "show mean and spread (default 0,1 for the generated data unless --label-smoothing is given; "
             "'' for --seed alone)",
    "answer_rows": "held-out rows scored at answer level after training (multiple choice: option letters; "
                   "others: greedy decoding), the first half fitting the temperature, the second scored; 0: off",
    "max_length": "tokens per row; longer examples are cut (and counted)",
    "packing": "pack several examples per row (positions restart, attention stays within each)",
    "steps": "optimizer steps",
    "batch_size": "rows per micro-batch (divisible by the data x fsdp mesh size)",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "warmup_steps": "linear warmup steps",
    "decay": "decay after warmup: cosine, linear or constant",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "clip_norm": "clip gradients to this global norm (0: off)",
    "compute_dtype": "activation dtype: float32 or bfloat16",
    "param_dtype": "parameter dtype: float32 or bfloat16",
    "remat": "recompute each block's activations in the backward pass: none, full (keep only the block's "
             "input) or dots (also keep its matmul outputs without batch dimensions - projections and MLP, "
             "not the attention scores: jax.checkpoint_policies.dots_with_no_batch_dims_saveable)",
    "lora_rank": "train only LoRA adapters (qwix) of this rank on the --lora-targets layers (0: full fine-tuning)",
    "lora_alpha": "LoRA scale numerator: adapters add (alpha / rank) * x @ A @ B (default: the rank, scale 1)",
    "s3ft": "selective self-to-supervised fine-tuning: replace each training response by the model's own "
            "(greedy) response when --judge accepts it, else by an accepted paraphrase, else keep the gold",
    "judge": "S3FT judge of the rows without a 'judge' field: exact, numeric or code",
    "s3ft_paraphrase": "S3FT: ask the model to paraphrase the gold when its own response is wrong",
    "s3ft_out": "where the S3FT set is written (default: s3ft-cache/ next to --output-dir); reused while "
                "the data, model and settings are unchanged",
    "allow_code_execution": "S3FT: allow the code judge to run model-written Python code (with the rows' tests) on "
                            "this machine, in a child process isolated and limited as far as the platform allows "
                            "(not a sandbox for hostile code)",
    "lora_targets": "regular expression matched in full against module paths such as model/layers/0/self_attn/q_proj "
                    "(default: the attention and MLP projections)",
    "soft_targets": "a parquet file of a teacher's top-k next-token distributions over the training responses "
                    "(python -m ls_jax.distill, same tokenizer and --max-length): train on them instead of the "
                    "hard labels",
    "distill_temperature": "--soft-targets: temperature of the teacher's top-k probabilities (renormalised over the k)",
    "distill_rest": "--soft-targets: the teacher's mass outside its top k: renormalise (dropped) or uniform "
                    "(spread over the vocabulary)",
    "distill_hard_weight": "--soft-targets: weight b in [0, 1] of the hard label: b onehot + (1 - b) teacher",
    "label_smoothing": "label smoothing a in [0, 1) of a single run (not with --compare-smoothing): "
                       "target (1 - a) * onehot + a / V",
    "compare_smoothing": "comma-separated smoothing values, one run each, compared in the final tables "
                         "(default 0,0.1 for the generated data unless --label-smoothing is given; '' for one run)",
    "z_loss": "z-loss coefficient (adds z_loss * lse^2)",
    "logit_softcap": "final-logit softcap: 'model' (the model's own, default), 'none' (off) or a number overriding it",
    "impl": "loss implementation: " + ", ".join(CHOICES),
    "block_n": "token block of the pallas kernel (default: its own)",
    "block_v": "vocabulary block of the xla and pallas implementations (default: their own)",
    "block_d": "hidden-size block of the pallas kernel (default: its own)",
    "weight_decay": "AdamW weight decay (not applied to 1-d parameters)",
    "b1": "AdamW beta1",
    "b2": "AdamW beta2",
    "seed": "seed of the model init, data split and batch order",
    "eval_batch_size": "rows per held-out batch (divisible by the data x fsdp mesh size)",
    "mesh": "device mesh sizes, e.g. data=2,fsdp=4,tensor=1 (-1: the remaining devices)",
    "output_dir": "where checkpoints, metrics.jsonl and plots go (default runs/<timestamp>)",
    "save_every": "checkpoint every k steps (and at the end)",
    "keep_checkpoints": "checkpoints kept on disk",
    "eval_every": "evaluate every k steps (and at the end)",
    "log_every": "write a train line to metrics.jsonl every k steps",
    "resume": "continue from the latest checkpoint in --output-dir",
    "progress": "show a progress bar",
    "coordinator": "HOST:PORT of process 0, for a run over several processes (each host runs the same command)",
    "num_processes": "how many processes take part (with --coordinator)",
    "process_id": "this process's number in [0, --num-processes) (with --coordinator)",
    "distributed": "join the other processes as JAX detects them (Slurm, TPU VMs, Open MPI) instead of "
                   "--coordinator / --num-processes / --process-id",
    "init_timeout": "seconds to wait for every process to join",
}


def _ints(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _softcap(text: str):
    if text in ("model", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'model', 'none' or a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """argparse flags for every :class:`TrainConfig` field, each help showing the field's default
    (unless it says it already). The flags that :func:`parse_args` fills in or checks against
    the others (those of :data:`EMBEDDED_DEFAULTS` and :data:`GENERATED_ONLY`,
    ``--label-smoothing``, ``--eval-fraction``) parse to None when not given."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Supervised fine-tuning with the fused label-smoothed cross-entropy. "
                    "With no arguments: a tiny model on generated arithmetic data, offline.",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        helptext = _HELP.get(f.name)
        if f.type is not bool and f.default not in (None, dataclasses.MISSING) and "default" not in helptext:
            helptext += f" (default: {f.default})".replace("%", "%%")
        later = f.name in (*EMBEDDED_DEFAULTS, *GENERATED_ONLY, "label_smoothing", "eval_fraction")  # parse_args'
        if f.type is bool and f.default:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=True, help=helptext)
        elif f.type is bool:
            p.add_argument(flag, action="store_true", help=helptext)
        elif f.name in ("seeds", "compare_smoothing", "classes"):
            p.add_argument(flag, type={"seeds": _ints, "compare_smoothing": _floats, "classes": _names}[f.name],
                           default=None if later else [], help=helptext)
        elif f.name == "logit_softcap":
            p.add_argument(flag, type=_softcap, default=f.default, help=helptext)
        else:
            t = str(f.type)  # int, float, str or Optional[...] of them
            conv = int if "int" in t else float if "float" in t else str
            p.add_argument(flag, type=conv, default=None if later else f.default, help=helptext,
                           choices=TASKS if f.name == "task" else None)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """A :class:`TrainConfig` from command-line flags (``argv=None``: ``sys.argv[1:]``).

    Raises :class:`ConfigError` for a flag the others would make ignored: ``--label-smoothing``
    with ``--compare-smoothing`` (each run has its value), the generated data's sizes
    (:data:`GENERATED_ONLY`) with ``--data``, ``--eval-fraction`` without ``--data`` or with
    ``--eval-data``.
    """
    ns = vars(build_parser().parse_args(argv))
    for name in GENERATED_ONLY:
        if ns[name] is not None and ns["data"] is not None:
            raise ConfigError(f"--{name.replace('_', '-')} sizes the generated data; with --data every row is used "
                              f"(hold rows out with --eval-fraction or --eval-data)")
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
