"""S3FT vs SFT on a tiny model, offline on a CPU: ``python -m ls_jax.s3ft.demo``.

1. A base model (the built-in tiny Llama, tokenizer trained here) learns a mix of general
   tasks whose answers are bare: ``Q: 7+5\\nA: `` -> ``12``; ``Q: max 3 8 1`` -> ``8``;
   ``Q: rev abc`` -> ``cba``; ``Q: next 17`` -> ``18``.
2. The new task is the maximum of 4 or 5 digits (the base saw 3), with gold responses written
   in another style: ``Q: max 3 8 1 5\nA: `` -> ``Of these numbers the largest is 8.``
3. From the base, SFT trains on the gold responses and S3FT (numeric judge) on the targets
   :mod:`ls_jax.s3ft` builds, with the same steps, learning rate and label smoothing, once
   per seed.
4. Greedy answers on held-out rows: new-task accuracy (numeric judge: the final number) and
   general-task accuracy (exact match of the bare answer on add, rev and next, the tasks other
   than max), for the base and each run.

Prints the table docs/s3ft.md quotes; everything goes under ``--out``.
"""

import argparse
import json
import os
import random
import string
import sys
import time


def _general(rng: random.Random, kinds=("add", "max", "rev", "next")) -> dict[str, str]:
    kind = rng.choice(kinds)
    if kind == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return {"task": kind, "prompt": f"Q: {a}+{b}\nA: ", "response": str(a + b)}
    if kind == "max":
        xs = [rng.randint(0, 9) for _ in range(3)]
        return {"task": kind, "prompt": f"Q: max {' '.join(map(str, xs))}\nA: ", "response": str(max(xs))}
    if kind == "rev":
        w = "".join(rng.choice(string.ascii_lowercase[:8]) for _ in range(3))
        return {"task": kind, "prompt": f"Q: rev {w}\nA: ", "response": w[::-1]}
    n = rng.randint(0, 98)
    return {"task": kind, "prompt": f"Q: next {n}\nA: ", "response": str(n + 1)}


def _new(rng: random.Random) -> dict[str, str]:
    xs = [rng.randint(0, 9) for _ in range(rng.choice((4, 5)))]
    return {
        "task": "new",
        "prompt": f"Q: max {' '.join(map(str, xs))}\nA: ",
        "response": f"Of these numbers the largest is {max(xs)}.",
    }


def make_data(out: str, seed: int, n_base: int, n_new: int, n_eval: int) -> dict[str, str]:
    """Write the base / new-task train and held-out files (no held-out prompt in any train file)."""
    rng = random.Random(seed)
    seen, sets = set(), {}
    held_out_general = lambda r: _general(r, ("add", "rev", "next"))  # max is the new task's skill
    for name, draw, n in (
        ("general_eval", held_out_general, n_eval),
        ("new_eval", _new, n_eval),
        ("base_train", _general, n_base),
        ("new_train", _new, n_new),
    ):
        rows = []
        while len(rows) < n:
            row = draw(rng)
            if row["prompt"] not in seen or name.endswith("train") and row["prompt"] not in sets.get("held", ()):
                seen.add(row["prompt"])
                rows.append(row)
        sets[name] = rows
        if name.endswith("eval"):
            sets.setdefault("held", set()).update(r["prompt"] for r in rows)
    paths = {}
    for name in ("base_train", "general_eval", "new_train", "new_eval"):
        paths[name] = os.path.join(out, "data", name + ".jsonl")
        os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in sets[name])
    return paths


def accuracy(model_dir: str, path: str, judge: str) -> dict[str, float]:
    """Greedy accuracy of the model in ``model_dir`` on the rows of ``path``, per task and overall."""
    from ls_jax.data import read_jsonl
    from ls_jax.generation import generate
    from ls_jax.models import from_pretrained
    from ls_jax.s3ft.judges import JUDGES
    from ls_jax.tokenizer import load_tokenizer

    rows = [r for _, r in read_jsonl(path)]
    model, tok = from_pretrained(model_dir), load_tokenizer(model_dir)
    gens = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=32, batch_size=128)
    hits: dict[str, list[bool]] = {}
    for r, g in zip(rows, gens):
        hits.setdefault(r["task"], []).append(JUDGES[judge](r["prompt"], r["response"], g.text))
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["all"] = sum(sum(v) for v in hits.values()) / len(rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ls_jax.s3ft.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/s3ft-demo")
    p.add_argument("--seeds", default="0,1", help="comma-separated fine-tuning seeds")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps (SFT and S3FT alike)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    args = p.parse_args(argv)
    from ls_jax.train import TrainConfig, run

    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    paths = make_data(args.out, 0, n_base=3000, n_new=600, n_eval=200)
    common = dict(
        batch_size=32,
        eval_batch_size=64,
        progress=False,
        compare_smoothing=[],
        label_smoothing=args.label_smoothing,
        save_every=10**6,
        eval_every=10**6,
        log_every=50,
    )
    base = os.path.join(args.out, "base")
    if not os.path.isdir(os.path.join(base, "hf")):
        run(
            TrainConfig(
                model="tiny",
                data=paths["base_train"],
                eval_data=paths["general_eval"],
                steps=args.base_steps,
                lr=3e-3,
                max_length=32,
                output_dir=base,
                **common,
            )
        )
    base_hf = os.path.join(base, "hf")
    results = [
        (
            "base",
            "-",
            accuracy(base_hf, paths["new_eval"], "numeric"),
            accuracy(base_hf, paths["general_eval"], "exact"),
        )
    ]
    for seed in seeds:
        for method in ("sft", "s3ft"):
            d = os.path.join(args.out, f"{method}-seed{seed}")
            if not os.path.isdir(os.path.join(d, "hf")):
                run(
                    TrainConfig(
                        model=base_hf,
                        data=paths["new_train"],
                        eval_data=paths["new_eval"],
                        steps=args.steps,
                        lr=args.lr,
                        max_length=64,
                        warmup_steps=10,
                        seed=seed,
                        output_dir=d,
                        s3ft=method == "s3ft",
                        judge="numeric",
                        s3ft_out=os.path.join(args.out, "s3ft.jsonl"),
                        **common,
                    )
                )
            hf = os.path.join(d, "hf")
            results.append(
                (
                    method,
                    str(seed),
                    accuracy(hf, paths["new_eval"], "numeric"),
                    accuracy(hf, paths["general_eval"], "exact"),
                )
            )
    base_general = results[0][3]["all"]
    lines = [
        f"{'model':<6}{'seed':>5}{'new task':>10}{'general':>9}{'change':>8}   general per task",
        *(
            f"{m:<6}{s:>5}{new['all']:>10.3f}{gen['all']:>9.3f}{gen['all'] - base_general:>+8.3f}   "
            + " ".join(f"{k} {v:.2f}" for k, v in gen.items() if k != "all")
            for m, s, new, gen in results
        ),
    ]
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump([{"model": m, "seed": s, "new_task": n, "general": g} for m, s, n, g in results], f, indent=2)
    print(
        f"\nnew task: accuracy of the final number (numeric judge); general: exact match of the bare answer "
        f"({time.perf_counter() - start:.0f} s)\n{table}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
