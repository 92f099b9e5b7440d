"""``python -m ls_jax.s3ft --model M --data train.jsonl --judge numeric --out s3ft.jsonl``.

Writes the S3FT training set (each row's source and the judge's verdicts), the rows left out
(``OUT.skipped.jsonl``) and ``OUT.meta.json``; prints the counts per source. Reuses OUT when it
was built from the same inputs (``--force`` rebuilds). The ``code`` judge runs model-written code
and needs ``--allow-code-execution``. Exit status 2 with an ``error:`` line on bad input.
"""

import argparse
import os
import sys
from collections.abc import Sequence

from ls_jax.data import DataError


def parse_args(argv):
    from ls_jax.s3ft.judges import NAMES
    from ls_jax.s3ft.pipeline import PARAPHRASE_TEMPLATE

    p = argparse.ArgumentParser(prog="python -m ls_jax.s3ft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory (with its tokenizer)")
    p.add_argument(
        "--data",
        required=True,
        help=".jsonl / .json / .parquet or save_to_disk dir "
        "(rows with 'prompt'/'response' or 'messages'; optional 'judge' and 'tests')",
    )
    p.add_argument("--out", required=True, help="where to write the new training set (.jsonl)")
    p.add_argument("--judge", default="exact", help=f"default judge of the rows: {', '.join(NAMES)}")
    p.add_argument("--split", default="train", help="split of a saved DatasetDict")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation limit per response")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    p.add_argument(
        "--paraphrase",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask the model to paraphrase the gold when its own response is wrong",
    )
    p.add_argument("--template", default=PARAPHRASE_TEMPLATE, help="paraphrase request, with {prompt} and {gold}")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per code-judge run")
    p.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="allow the code judge to run model-written Python code (with the rows' tests) on this "
        "machine, in a child process isolated and limited as far as the platform allows "
        "(not a sandbox for hostile code)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when OUT is current")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from ls_jax.s3ft.judges import NAMES, require_opt_in

    try:
        if args.judge not in NAMES:
            raise ValueError(f"unknown --judge {args.judge!r}; known: {', '.join(NAMES)}")
        require_opt_in(args.judge, args.allow_code_execution)
        if args.max_new_tokens < 1 or args.batch_size < 1 or args.timeout <= 0:
            raise ValueError("--max-new-tokens and --batch-size must be >= 1, --timeout > 0")
        if "{gold}" not in args.template:
            raise ValueError("--template must contain {gold} (and usually {prompt})")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise ValueError(f"--model {args.model}: not a checkpoint directory (no config.json)")
        from ls_jax.data import load_rows
        from ls_jax.tokenizer import load_tokenizer

        rows, where = load_rows(args.data, args.split)
        tokenizer = load_tokenizer(args.model)
        from ls_jax.models import check_pretrained, from_pretrained
        from ls_jax.s3ft.pipeline import build_cached, checkpoint_id

        check_pretrained(args.model)
        result = build_cached(
            args.out,
            lambda: from_pretrained(args.model),
            tokenizer,
            rows,
            checkpoint_id(args.model),
            force=args.force,
            where=where,
            allow_code_execution=args.allow_code_execution,
            judge=args.judge,
            paraphrase=args.paraphrase,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            template=args.template,
            timeout=args.timeout,
            progress=args.progress,
        )
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
