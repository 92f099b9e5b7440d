"""The ``train.py`` command: validate, then train one run per label-smoothing value, then report.

Exit status 0 on success, 2 on bad input (one ``error: ...`` line on stderr; nothing written),
1 when training diverges (one ``error: ...`` line; the checkpoints before it are kept).
Several processes (``--coordinator`` ..., :mod:`ls_jax.train.distributed`) run the same command;
process 0 writes the files other than checkpoints and prints the report.
"""

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence

from ls_jax.atomic import atomic_path, check_output_dir, write_text
from ls_jax.data import DataError
from ls_jax.train import distributed
from ls_jax.train.config import ConfigError, TrainConfig, parse_args
from ls_jax.train.report import Diverged, stage_reliability
from ls_jax.train.setup import check_config, checkpoint_builder, prepare
from ls_jax.train.sharding import MeshError
from ls_jax.train.tasks import task_of

BAD_INPUT = (ConfigError, DataError, MeshError)


def _run_dirs(config: TrainConfig, out_dir: str) -> list[tuple]:
    """(config, directory) per run: one per --compare-smoothing value and per --seeds seed
    (``ls<a>``, ``ls<a>-seed<s>``, ``seed<s>``), or the single run; with --base-steps the base
    stage (``base``) comes first."""
    single = dict(compare_smoothing=[], seeds=[], base_steps=0)
    runs = []
    if config.base_steps:
        base = dataclasses.replace(config, steps=config.base_steps, label_smoothing=0.0, lora_rank=0, **single)
        runs.append((base, os.path.join(out_dir, "base")))
    for a in config.compare_smoothing or [None]:
        for seed in config.seeds or [None]:
            name = "-".join(
                part for part in (None if a is None else f"ls{a:g}", None if seed is None else f"seed{seed}") if part
            )
            run_config = dataclasses.replace(
                config,
                **single,
                **({} if a is None else {"label_smoothing": a}),
                **({} if seed is None else {"seed": seed}),
            )
            runs.append((run_config, os.path.join(out_dir, name) if name else out_dir))
    return runs


def _check_output(runs, resume: bool) -> None:
    """Refuse to overwrite checkpoints without --resume, a --resume with no run to continue,
    and a --resume that changes the run (checked against each run's latest checkpoint before
    anything is written)."""
    dirs = [d for _, d in runs]
    if len(set(dirs)) < len(dirs):
        raise ConfigError(f"--compare-smoothing repeats a value (runs into {', '.join(dirs)})")
    try:
        check_output_dir(runs[0][1])
    except ValueError as e:
        raise ConfigError(f"--output-dir {e}") from None
    if resume and not os.path.isfile(os.path.join(dirs[0], "config.json")):  # runs start in order
        raise ConfigError(
            f"--resume: no run to continue in {dirs[0]} (no config.json); leave out --resume to start one"
        )
    for run_config, d in runs:
        path = os.path.join(d, "checkpoints")
        if not os.path.isdir(path):
            continue
        if not resume:
            raise ConfigError(f"{d} already holds checkpoints: pass --resume to continue, or another --output-dir")
        from ls_jax.train.checkpoint import CheckpointStore
        from ls_jax.train.loop import check_resumable

        store = CheckpointStore(path)
        try:
            latest = store.latest_step()
            if latest is not None:
                check_resumable(store.meta(latest), run_config)
        finally:
            store.close()


def default_output_dir() -> str:
    """``runs/<UTC timestamp>`` (the directory is created only once the input is valid)."""
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))


def run(config: TrainConfig, *, stop_at: int | None = None) -> list[dict]:
    """Validate, then train every run of ``config``; returns each run's final metrics.

    Raises the :data:`BAD_INPUT` errors before anything is written.
    """
    out_dir = config.output_dir or default_output_dir()
    config = dataclasses.replace(config, output_dir=out_dir)
    check_config(config)
    distributed.initialize(config)  # before anything asks jax for its devices
    runs = _run_dirs(config, out_dir)
    _check_output(runs, config.resume)
    saved_tok = os.path.join(runs[0][1], "tokenizer")
    prep = prepare(config, saved_tok if config.resume and os.path.isdir(saved_tok) else None)

    from ls_jax.train.loop import train  # imports jax-heavy modules only once input is valid

    for line in prep.log:
        print(line, file=sys.stderr)
    main_process = distributed.is_main()
    results = []
    for i, (run_config, d) in enumerate(runs):
        os.makedirs(d, exist_ok=True)
        if main_process:
            with atomic_path(os.path.join(d, "tokenizer")) as tmp:
                prep.tokenizer.save_pretrained(tmp)
            write_text(os.path.join(d, "config.json"), json.dumps(run_config.to_json(), indent=2))
        stage = "sft"
        if config.base_steps and i == 0:  # pre-train on the plain-text corpus; the runs after fine-tune it
            stage, run_prep = "base", dataclasses.replace(prep, train=prep.base)
        elif config.base_steps:
            run_prep = dataclasses.replace(
                prep, build_model=checkpoint_builder(run_config, os.path.join(runs[0][1], "hf"))
            )
        else:
            run_prep = prep
        results.append({"stage": stage, **train(run_config, run_prep, d, stop_at=stop_at)["metrics"]})
        if stop_at is not None and results[-1]["step"] < run_config.steps:
            break  # stopped as if killed: the later stages wait for --resume
    if len(runs) > 1 and main_process:
        write_text(os.path.join(out_dir, "summary.json"), json.dumps(results, indent=2))
        if all(r["step"] == c.steps for r, (c, _) in zip(results, runs)):
            options = max((len(r["choices"]) for r in prep.held_rows if r.get("choices")), default=0)
            with atomic_path(os.path.join(out_dir, "reliability.png")) as tmp:
                stage_reliability(results, tmp, options)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python train.py [flags]``; returns the exit status."""
    start = time.perf_counter()
    try:
        config = parse_args(argv)
        resume_nowhere = config.resume and not config.output_dir
        config = dataclasses.replace(config, output_dir=config.output_dir or default_output_dir())
        if resume_nowhere:
            raise ConfigError("--resume needs the --output-dir of the run to continue")
        results = run(config)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not distributed.is_main():
        return 0
    print(f"\nheld-out results ({time.perf_counter() - start:.0f} s):", file=sys.stderr)
    task = task_of(config)
    print(task.summary(config, results))
    print(
        f"checkpoints, metrics.jsonl, reliability.png and hf/ (the final model as a Hugging Face "
        f"checkpoint: {task.usage}) under {config.output_dir}"
    )
    return 0
