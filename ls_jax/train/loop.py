"""One training run: place the state on the mesh, train, evaluate, checkpoint, resume.

Run directory layout (``out_dir``): ``config.json``, ``tokenizer/``, ``checkpoints/<step>/``
(orbax), ``metrics.jsonl`` (train lines every ``log_every`` steps, eval lines every
``eval_every`` steps and at the end), ``reliability.png`` and ``final.json`` (the last eval),
``hf/`` (the final model, LoRA merged, and tokenizer as a Hugging Face checkpoint directory).

Crash safety: a step's train and eval lines are logged before its checkpoint is saved, and
``--resume`` drops the lines after the restored checkpoint, so a run killed at any moment and
resumed writes the same ``metrics.jsonl`` as an uninterrupted one (timings aside). The final
outputs are written under temporary names and renamed (``final.json`` last). A non-finite loss,
gradient norm or parameter stops the run (:class:`Diverged`) before that step is saved.
"""

import json
import math
import os
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ls_jax.atomic import atomic_path, write_text
from ls_jax.calibration import reliability_diagram
from ls_jax.train import sharding
from ls_jax.train.checkpoint import CheckpointStore
from ls_jax.train.config import RESUME_FIELDS, ConfigError, TrainConfig
from ls_jax.train.distributed import is_main
from ls_jax.train.export import export_hf
from ls_jax.train.lora import add_lora
from ls_jax.train.optim import adamw, learning_rate
from ls_jax.train.report import Diverged, MetricsLog, Progress, bins_json
from ls_jax.train.tasks import Prepared, task_of


def check_resumable(meta: dict, config: TrainConfig) -> None:
    """Raise :class:`ConfigError` if ``config`` changes a field that would make resuming the
    checkpoint of ``meta`` inexact, or this run has another number of processes."""
    saved, processes = meta["config"], meta.get("processes", 1)
    if processes != jax.process_count():
        raise ConfigError(
            f"--resume: the checkpoint was written by {processes} processes, this run has "
            f"{jax.process_count()}; resume with the same number of processes"
        )
    now = config.to_json()
    changed = [k for k in RESUME_FIELDS if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(
            "--resume with changed settings: " + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed)
        )


def train(config: TrainConfig, prep: Prepared, out_dir: str, *, stop_at: int | None = None) -> dict:
    """Train with ``config`` into ``out_dir``; returns the final held-out metrics.

    ``stop_at``: save a checkpoint and return after this step, as if the job were stopped
    (``--resume`` then continues exactly). Returns ``{"metrics": {...}, "losses": [...],
    "step": int}``: the held-out metrics at the last step (plus ``tokens_per_s``, the median
    training throughput in real tokens), and this session's training losses.
    """
    mesh = prep.mesh
    model = prep.build_model(config.seed)
    if config.lora_rank:
        model = add_lora(
            model, config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets, seed=config.seed
        )
    task = task_of(config)
    graphdef, params, frozen = nnx.split(model, task.trainable(bool(config.lora_rank)), ...)
    del model
    param_sh = sharding.tree_shardings(params, mesh)
    frozen_sh = sharding.tree_shardings(frozen, mesh)
    params, frozen = jax.device_put(params, param_sh), jax.device_put(frozen, frozen_sh)
    schedule = learning_rate(config.lr, config.steps, config.warmup_steps, config.decay, config.min_lr_ratio)
    tx = adamw(schedule, weight_decay=config.weight_decay, b1=config.b1, b2=config.b2, clip_norm=config.clip_norm)
    opt_sh = sharding.tree_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)

    train_step, batches, evaluate = task.steps(
        config,
        prep,
        graphdef,
        tx,
        param_shardings=param_sh,
        frozen_shardings=frozen_sh,
        opt_shardings=opt_sh,
        mesh=mesh,
    )

    main = is_main()
    store = CheckpointStore(os.path.join(out_dir, "checkpoints"), keep=config.keep_checkpoints)
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), enabled=main)
    step, position = 0, 0
    latest = store.latest_step() if config.resume else None
    if latest is not None:
        (params, opt_state), meta = store.restore(latest, (params, opt_state))
        check_resumable(meta, config)
        step, position = meta["step"], meta["data_position"]
    if config.resume:  # drop lines logged after the last checkpoint (all of them when there is none)
        log.truncate_after(step)

    def save():
        store.save(
            step,
            (params, opt_state),
            {"step": step, "data_position": position, "config": config.to_json(), "processes": jax.process_count()},
        )

    progress = Progress(config.steps, step, f"train a={config.label_smoothing:g}", config.progress and main)
    if latest is not None:
        progress.note(f"resumed from step {step} (data position {position})")
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    losses, rates, result, evaluated = [], [], None, None
    last = config.steps if stop_at is None else min(stop_at, config.steps)
    try:
        while step < last:

            def rows(r, start=position):  # this process's rows of each micro-batch, stacked [grad_accum, rows, T]
                micro = [batches.batch(start + i, r) for i in range(config.grad_accum)]
                return {k: np.stack([m[k] for m in micro]) for k in micro[0]}

            t0 = time.perf_counter()
            batch = sharding.put_rows(rows, config.batch_size, batch_sh, axis=1)
            params, opt_state, metrics = train_step(params, frozen, opt_state, batch)
            metrics = jax.device_get(metrics)  # one transfer (and the step's end) per step
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            seconds = time.perf_counter() - t0
            if not (math.isfinite(loss) and math.isfinite(grad_norm) and bool(metrics["finite"])):
                raise Diverged(
                    f"training diverged at step {step + 1} (loss {loss:g}, gradient norm {grad_norm:g}"
                    f"{'' if bool(metrics['finite']) else ', non-finite parameters'}): stopped before "
                    f"saving it; the earlier checkpoints are kept (try a lower --lr)"
                )
            rate = int(metrics["real_tokens"]) / seconds  # real (non-padding) tokens per second
            if losses:  # this session's first step includes compilation
                rates.append(rate)
            step, position = step + 1, position + config.grad_accum
            losses.append(loss)
            progress.update(loss, rate)
            if step % config.log_every == 0 or step == last:
                log.write(
                    "train",
                    step,
                    {
                        "loss": loss,
                        "grad_norm": grad_norm,
                        "lr": float(schedule(step - 1)),
                        "response_tokens": int(metrics["tokens"]),
                        "tokens_per_s": rate,
                        "step_time_s": seconds,
                    },
                )
            # evaluate before saving: a run killed after the save never has to redo this step's lines
            if step % config.eval_every == 0 or step == config.steps:
                result, evaluated = evaluate(params, frozen), step
                log.write("eval", step, result["metrics"])
                progress.note(
                    f"step {step}: held-out "
                    + ", ".join(
                        f"{k} {result['metrics'][k]:.4f}"
                        for k in ("loss", "accuracy", "nll", "log_loss", "brier", "ece")
                        if k in result["metrics"]
                    )
                )
            if step % config.save_every == 0 or step == last:
                save()
    finally:
        progress.close()
        store.close()  # waits for the last save
    if evaluated != step:  # stopped between evaluations, or resumed at the end (its eval line is logged)
        result = evaluate(params, frozen)
    throughput = float(np.median(rates)) if rates else float("nan")
    final = {
        "step": step,
        "label_smoothing": config.label_smoothing,
        "seed": config.seed,
        **result["metrics"],
        "tokens_per_s": throughput,
        "token_bins": bins_json(result["bins"]),
    }
    if prep.classes is not None:
        final.update(smoothing_convention=config.smoothing_convention, classes=prep.classes)
    if step == config.steps and jax.process_count() > 1:  # every process sends its shards to the host
        params, frozen = multihost_utils.process_allgather((params, frozen), tiled=True)
    if step == config.steps and main:  # each output appears complete or not at all; final.json, last, marks the end
        final.update(task.final(config, prep, lambda: nnx.merge(graphdef, params, frozen), progress))
        with atomic_path(os.path.join(out_dir, "hf")) as tmp:
            export_hf(graphdef, params, frozen, prep.tokenizer, tmp, lora_alpha=config.lora_alpha, classes=prep.classes)
        level = "content tokens" if prep.classes is None else f"{len(prep.classes)} classes"
        with atomic_path(os.path.join(out_dir, "reliability.png")) as tmp:
            reliability_diagram(result["bins"], tmp, title=f"smoothing {config.label_smoothing:g}, {level}")
        write_text(os.path.join(out_dir, "final.json"), json.dumps(final, indent=2))
    return {"metrics": final, "losses": losses, "step": step}
