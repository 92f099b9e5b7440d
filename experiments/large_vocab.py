"""Does label smoothing lose its effect as the vocabulary grows relative to the hidden size?

The label-smoothing paper (arXiv 2508.00264) argues it does. Here: the same task (train.py's
generated questions, trained from scratch with train.py's own trainer) with the built-in tiny
Llama at several vocabulary sizes V (the tokenizer's own, then padded with tokens that never
occur, which the smoothing target still covers with a / V each) and hidden sizes D, each with
label smoothing 0 and 0.1. Prints a table of held-out confidence and ECE (content tokens, and
multiple-choice answers) and writes ``large_vocab.png`` and ``large_vocab.json`` to ``--out``.

    python experiments/large_vocab.py --out runs/large_vocab        # the README's table (slow on a CPU)
    python experiments/large_vocab.py --vocab 0,512 --hidden 16 --steps 2 --num-train 64 --out /tmp/lv  # smoke
"""

import argparse
import json
import os
import sys
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def checkpoint(out: str, vocab: int, hidden: int, tokenizer, seed: int) -> str:
    """A freshly initialised tiny Llama with ``vocab`` rows (0: the tokenizer's size) and hidden
    size ``hidden``, saved with the tokenizer as a local checkpoint directory; returns it."""
    from ls_jax.models import from_config, save_pretrained, tiny_llama_config

    v = vocab or len(tokenizer)
    path = os.path.join(out, f"init-V{v}-D{hidden}")
    model = from_config(tiny_llama_config(vocab_size=v, hidden_size=hidden, num_hidden_layers=2), seed=seed)
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    return path


def plot(rows: List[dict], path: str) -> None:
    """ECE and mean confidence against V (log scale), one line per (D, smoothing), two levels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, (key, title) in zip(axes, (("token", "content tokens"), ("mc", "multiple-choice answers"))):
        for d in sorted({r["D"] for r in rows}):
            for a, style in ((0.0, "--"), (0.1, "-")):
                sel = sorted((r for r in rows if r["D"] == d and r["a"] == a), key=lambda r: r["V"])
                ax.plot([r["V"] for r in sel], [r[f"{key}_ece"] for r in sel], style, marker="o", label=f"D={d}, a={a:g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel("ECE")
        ax.set_title(f"held-out ECE, {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=_ints, default=[0, 2048, 32768], help="vocabulary sizes (0: the tokenizer's own)")
    p.add_argument("--hidden", type=_ints, default=[32, 128], help="hidden sizes")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-eval", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from ls_jax.tokenizer import train_bpe_tokenizer
    from ls_jax.train import TrainConfig, run, synthetic

    os.makedirs(args.out, exist_ok=True)
    train_rows, _ = synthetic.generate(args.num_train, args.num_eval, seed=args.seed)
    tokenizer = train_bpe_tokenizer([r["prompt"] + r["response"] for r in train_rows])  # as train.py trains it
    rows = []
    for hidden in args.hidden:
        for vocab in args.vocab:
            model = checkpoint(args.out, vocab, hidden, tokenizer, args.seed)
            name = os.path.basename(model)[len("init-"):]
            config = TrainConfig(model=model, output_dir=os.path.join(args.out, name), steps=args.steps,
                                 num_train=args.num_train, num_eval=args.num_eval, batch_size=args.batch_size,
                                 seed=args.seed, compare_smoothing=[0.0, 0.1], progress=False,
                                 eval_every=args.steps, save_every=args.steps, answer_rows=args.num_eval)
            for r in run(config):
                mc = r.get("answers", {}).get("multiple_choice", {})
                rows.append({"V": r["vocab_size"], "D": hidden, "a": r["label_smoothing"],
                             "token_accuracy": r["accuracy"], "token_confidence": r["mean_confidence"],
                             "token_ece": r["ece"], "mc_accuracy": mc.get("accuracy"),
                             "mc_confidence": mc.get("confidence"), "mc_ece": mc.get("ece")})
    header = ("V", "D", "a", "token acc", "token conf", "token ECE", "MC acc", "MC conf", "MC ECE")
    keys = ("V", "D", "a", "token_accuracy", "token_confidence", "token_ece", "mc_accuracy", "mc_confidence", "mc_ece")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        lines.append(" | ".join(f"{r[k]:g}" if k in ("V", "D", "a") else f"{r[k]:.3f}" for k in keys))
    print("\n".join(lines))
    with open(os.path.join(args.out, "large_vocab.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, os.path.join(args.out, "large_vocab.png"))
    return rows


if __name__ == "__main__":
    main()
