"""Does label smoothing lose its effect as the vocabulary grows relative to the hidden size?

The label-smoothing paper (arXiv 2508.00264) argues it does. Here: train.py's default demo
(a base model pre-trained on generated questions as plain text, then instruction-tuned on a
small set for many epochs with label smoothing 0 and 0.1, several seeds; answer-level and
content-token calibration on held-out questions) repeated for the built-in tiny Llama at several
vocabulary sizes V and hidden sizes D. V is the tokenizer's own (0 on the command line), or that
vocabulary padded with rows for tokens that never occur: the smoothing target still puts a / V on
each of them, and the softmax still spreads probability over them. Prints one table (stage means
over seeds) and writes ``large_vocab.json`` (every run's figures) and ``large_vocab.png``
(ECE and mean confidence against V, one line per D and stage) to ``--out``.

    python experiments/large_vocab.py --out runs/large_vocab      # docs/calibration.md's table (about an hour of CPU)
    python experiments/large_vocab.py --vocab 0,512 --hidden 16 --base-steps 2 --steps 2 --num-base 64 \\
        --seeds 0 --out /tmp/lv                                    # smoke
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LEVELS = (("mc", "multiple-choice answers"), ("add", "addition answers"), ("token", "content tokens"))
STAGES = ("base", "SFT a=0", "SFT a=0.1")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def checkpoint(out: str, vocab: int, hidden: int, tokenizer) -> str:
    """train.py's built-in tiny Llama (2 layers, its seed-0 init) with ``vocab`` rows (0: the
    tokenizer's size) and hidden size ``hidden``, saved with the tokenizer; returns the directory."""
    from ls_jax.models import from_config, save_pretrained, tiny_llama_config
    from ls_jax.train.setup import TINY_MODELS

    v = vocab or len(tokenizer)
    path = os.path.join(out, f"init-V{v}-D{hidden}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        layers = TINY_MODELS["tiny"]["num_hidden_layers"]
        model = from_config(tiny_llama_config(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers), seed=0)
        save_pretrained(model, path)
        tokenizer.save_pretrained(path)
    return path


def figures(result: dict, vocab: int, hidden: int) -> dict:
    """One run's held-out accuracy / confidence / ECE per level (train.py's final metrics)."""
    from ls_jax.train.report import stage_name

    row = {"V": vocab, "D": hidden, "stage": stage_name(result), "seed": result["seed"]}
    answers = result["answers"]
    for key, found in (("mc", answers["multiple_choice"]), ("add", answers["generated"])):
        row.update(
            {f"{key}_accuracy": found["accuracy"], f"{key}_confidence": found["confidence"], f"{key}_ece": found["ece"]}
        )
    row.update(token_accuracy=result["accuracy"], token_confidence=result["mean_confidence"], token_ece=result["ece"])
    return row


def stage_means(rows: list[dict]) -> list[dict]:
    """Per (V, D, stage): the mean over seeds of every figure, and half the range (``<key>_spread``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["V"], r["D"], r["stage"]), []).append(r)
    out = []
    for (v, d, stage), runs in groups.items():
        mean = {"V": v, "D": d, "stage": stage, "seeds": len(runs)}
        for key in (k for k in runs[0] if k.endswith(("accuracy", "confidence", "ece"))):
            values = np.array([r[key] for r in runs], np.float64)
            mean[key], mean[key + "_spread"] = float(values.mean()), float(np.ptp(values) / 2)
        out.append(mean)
    return out


def table(means: list[dict]) -> str:
    """A markdown table: V, D, V/D, stage, then accuracy / confidence / ECE per level."""
    header = ["V", "D", "V/D", "stage"] + [
        f"{name} {what}"
        for key, name in (("mc", "MC"), ("add", "add"), ("token", "token"))
        for what in ("acc", "conf", "ECE")
    ]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for m in means:
        cells = [str(m["V"]), str(m["D"]), f"{m['V'] / m['D']:.0f}", m["stage"]]
        for key, _ in LEVELS:
            cells += [f"{m[f'{key}_{what}']:.3f}" for what in ("accuracy", "confidence")]
            spread = m[f"{key}_ece_spread"]
            cells.append(f"{m[f'{key}_ece']:.3f}" + (f" ± {spread:.3f}" if m["seeds"] > 1 else ""))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot(means: list[dict], path: str) -> None:
    """ECE (top row) and mean confidence minus accuracy (bottom row) against V (log scale) per
    level, one line per (D, stage)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(LEVELS), squeeze=False)
    styles = {"base": ":", "SFT a=0": "--", "SFT a=0.1": "-"}
    hiddens = sorted({m["D"] for m in means})
    for col, (key, title) in enumerate(LEVELS):
        for d, color in zip(hiddens, ("C0", "C1", "C2", "C3", "C4")):
            for stage in STAGES:
                sel = sorted((m for m in means if m["D"] == d and m["stage"] == stage), key=lambda m: m["V"])
                if not sel:
                    continue
                vs = [m["V"] for m in sel]
                axes[0, col].errorbar(
                    vs,
                    [m[f"{key}_ece"] for m in sel],
                    yerr=[m[f"{key}_ece_spread"] for m in sel],
                    linestyle=styles[stage],
                    color=color,
                    marker="o",
                    capsize=2,
                    label=f"D={d}, {stage}",
                )
                axes[1, col].plot(
                    vs,
                    [m[f"{key}_confidence"] - m[f"{key}_accuracy"] for m in sel],
                    linestyle=styles[stage],
                    color=color,
                    marker="o",
                )
        for row, ylabel in enumerate(("ECE", "confidence - accuracy")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("vocabulary size V")
            ax.set_ylabel(ylabel)
            ax.axhline(0, color="0.8", linewidth=0.8)
        axes[0, col].set_title(f"held-out {title}")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> list[dict]:
    from ls_jax.atomic import write_text
    from ls_jax.train import TrainConfig, run
    from ls_jax.train.config import EMBEDDED_DEFAULTS

    fresh = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=_ints, default=[0, 2048, 16384], help="vocabulary sizes (0: the tokenizer's own)")
    p.add_argument("--hidden", type=_ints, default=[32, 64], help="hidden sizes")
    p.add_argument("--seeds", type=_ints, default=EMBEDDED_DEFAULTS["seeds"], help="fine-tuning seeds")
    p.add_argument("--base-steps", type=int, default=EMBEDDED_DEFAULTS["base_steps"])
    p.add_argument("--num-base", type=int, default=fresh.num_base)
    p.add_argument("--steps", type=int, default=fresh.steps, help="fine-tuning steps")
    p.add_argument("--num-train", type=int, default=fresh.num_train)
    p.add_argument("--num-eval", type=int, default=fresh.num_eval)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from ls_jax.train.setup import prepare

    os.makedirs(args.out, exist_ok=True)
    common = dict(
        base_steps=args.base_steps,
        num_base=args.num_base,
        steps=args.steps,
        num_train=args.num_train,
        num_eval=args.num_eval,
        seeds=args.seeds,
        compare_smoothing=EMBEDDED_DEFAULTS["compare_smoothing"],
        progress=False,
        answer_rows=args.num_eval,
        eval_every=max(args.base_steps, args.steps),
    )
    tokenizer = prepare(TrainConfig(**common)).tokenizer  # train.py's own: BPE on the base and train rows
    rows = []
    for hidden in args.hidden:
        for vocab in args.vocab:
            model = checkpoint(args.out, vocab, hidden, tokenizer)
            v = vocab or len(tokenizer)
            done = os.path.join(args.out, f"V{v}-D{hidden}.json")
            if not os.path.isfile(done):  # a finished cell is reused when the sweep is run again
                results = run(TrainConfig(model=model, output_dir=os.path.join(args.out, f"V{v}-D{hidden}"), **common))
                write_text(done, json.dumps([figures(r, v, hidden) for r in results], indent=2))  # whole, or not at all
            with open(done) as f:
                rows += json.load(f)
    means = stage_means(rows)
    print(table(means))
    write_text(os.path.join(args.out, "large_vocab.json"), json.dumps({"runs": rows, "means": means}, indent=2))
    plot(means, os.path.join(args.out, "large_vocab.png"))
    return means


if __name__ == "__main__":
    main()
