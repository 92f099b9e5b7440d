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
from typing import Dict, Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ls_jax.answer_calibration import answer_calibration
from ls_jax.atomic import atomic_path, write_text
from ls_jax.calibration import CalibrationReport, reliability_diagram
from ls_jax.data import Batches, eval_batches
from ls_jax.train import classification, sharding
from ls_jax.train.checkpoint import CheckpointStore
from ls_jax.train.distributed import is_main
from ls_jax.train.config import RESUME_FIELDS, ConfigError, TrainConfig
from ls_jax.train.export import export_hf
from ls_jax.train.lora import add_lora
from ls_jax.train.optim import adamw, learning_rate
from ls_jax.train.report import Diverged, MetricsLog, Progress
from ls_jax.train.setup import Prepared
from ls_jax.train.step import accumulate, make_eval_step, make_train_step


def check_resumable(meta: dict, config: TrainConfig) -> None:
    """Raise :class:`ConfigError` if ``config`` changes a field that would make resuming the
    checkpoint of ``meta`` inexact, or this run has another number of processes."""
    saved, processes = meta["config"], meta.get("processes", 1)
    if processes != jax.process_count():
        raise ConfigError(f"--resume: the checkpoint was written by {processes} processes, this run has "
                          f"{jax.process_count()}; resume with the same number of processes")
    now = config.to_json()
    changed = [k for k in RESUME_FIELDS if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError("--resume with changed settings: " + ", ".join(
            f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed))


def _evaluate(evaluate, params, frozen, batches, mesh) -> Dict:
    """Held-out metrics: loss (all response tokens, weighted as in training), token-level
    accuracy, confidence, NLL, Brier and ECE over the content tokens, the same accuracy /
    confidence over the special tokens (``special_``), teacher-forced answer accuracy; plus the
    content tokens' bins."""
    total = None
    for b in batches:
        total = accumulate(total, evaluate(params, frozen, sharding.put_batch(b, mesh)))
    total = jax.device_get(total)
    report = CalibrationReport.from_bins(total["bins"])
    special = CalibrationReport.from_bins(total["special_bins"])
    weight = float(total["weight"])
    metrics = {"loss": float(total["loss_sum"]) / (weight if weight > 0 else 1.0), "accuracy": report.accuracy,
               "nll": report.nll,
               "brier": report.brier, "ece": report.ece, "rms_calibration_error": report.rms_calibration_error,
               "max_calibration_error": report.max_calibration_error, "mean_confidence": report.mean_confidence,
               "content_tokens": report.count, "special_tokens": special.count,
               "special_accuracy": special.accuracy, "special_mean_confidence": special.mean_confidence,
               "answer_accuracy": int(total["answers_correct"]) / max(int(total["answers"]), 1),
               "tokens": int(total["tokens"])}
    return {"metrics": metrics, "bins": report.bins}


def _bins_json(bins) -> Dict[str, list]:
    """The per-bin sums of equal-width bins as JSON lists (``count``, ``confidence_sum``, ``correct_sum``)."""
    return {k: np.asarray(getattr(bins, k)).tolist() for k in ("count", "confidence_sum", "correct_sum")}


def _answer_level(config: TrainConfig, prep: Prepared, model, progress: Progress) -> Dict:
    """``answers`` (per kind of question: accuracy, confidence, ECE 15 / 10 bins, Brier, NLL,
    and after temperature scaling) and ``answer_bins`` of the first ``answer_rows`` held-out
    rows: the first half fits the temperatures, the second is scored. Empty when off."""
    rows = prep.held_rows[:config.answer_rows]
    if len(rows) < 2:
        return {}
    half = len(rows) // 2
    try:
        result = answer_calibration(model, prep.tokenizer, rows[half:], rows[:half], batch_size=config.eval_batch_size)
    except ValueError as e:  # e.g. option letters that are not single tokens of the tokenizer
        progress.note(f"answer-level scoring skipped: {str(e).splitlines()[0]}")
        return {}
    return {"answers": result.metrics(), "answer_bins": {k: _bins_json(v.bins()) for k, v in result.scores.items()}}


def train(config: TrainConfig, prep: Prepared, out_dir: str, *, stop_at: Optional[int] = None) -> Dict:
    """Train with ``config`` into ``out_dir``; returns the final held-out metrics.

    ``stop_at``: save a checkpoint and return after this step, as if the job were stopped
    (``--resume`` then continues exactly). Returns ``{"metrics": {...}, "losses": [...],
    "step": int}``: the held-out metrics at the last step (plus ``tokens_per_s``, the median
    training throughput in real tokens), and this session's training losses.
    """
    mesh = prep.mesh
    model = prep.build_model(config.seed)
    if config.lora_rank:
        model = add_lora(model, config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets,
                         seed=config.seed)
    trainable = nnx.LoRAParam if config.lora_rank else nnx.Param
    if config.lora_rank and config.task == "classification":  # the fresh score head trains too
        trainable = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains("score")))
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    del model
    param_sh = sharding.tree_shardings(params, mesh)
    frozen_sh = sharding.tree_shardings(frozen, mesh)
    params, frozen = jax.device_put(params, param_sh), jax.device_put(frozen, frozen_sh)
    schedule = learning_rate(config.lr, config.steps, config.warmup_steps, config.decay, config.min_lr_ratio)
    tx = adamw(schedule, weight_decay=config.weight_decay, b1=config.b1, b2=config.b2, clip_norm=config.clip_norm)
    opt_sh = sharding.tree_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)

    shardings = dict(param_shardings=param_sh, frozen_shardings=frozen_sh, mesh=mesh)
    if config.task == "classification":
        train_step = make_train_step(graphdef, tx, config, opt_shardings=opt_sh, loss_sum=classification.loss_sum,
                                     count=classification.count, total=classification.count, **shardings)
        evaluate = classification.make_eval_step(graphdef, config, **shardings)
        batches = classification.ClassificationBatches(prep.train, config.batch_size, seed=config.seed)
        held = classification.eval_batches(prep.held_out, config.eval_batch_size)
        run_eval = classification.evaluate
    else:
        train_step = make_train_step(graphdef, tx, config, opt_shardings=opt_sh, packed=config.packing, **shardings)
        evaluate = make_eval_step(graphdef, config, special_ids=prep.tokenizer.all_special_ids,
                                  packed=False, **shardings)  # eval_batches: one example a row
        pad = prep.tokenizer.pad_token_id
        batches = Batches(prep.train, config.batch_size, config.max_length, pad, seed=config.seed,
                          packing=config.packing, targets=prep.targets)
        held = eval_batches(prep.held_out, config.eval_batch_size, config.max_length, pad)
        run_eval = _evaluate

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
        store.save(step, (params, opt_state), {"step": step, "data_position": position, "config": config.to_json(),
                                               "processes": jax.process_count()})

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
                raise Diverged(f"training diverged at step {step + 1} (loss {loss:g}, gradient norm {grad_norm:g}"
                               f"{'' if bool(metrics['finite']) else ', non-finite parameters'}): stopped before "
                               f"saving it; the earlier checkpoints are kept (try a lower --lr)")
            rate = int(metrics["real_tokens"]) / seconds  # real (non-padding) tokens per second
            if losses:  # this session's first step includes compilation
                rates.append(rate)
            step, position = step + 1, position + config.grad_accum
            losses.append(loss)
            progress.update(loss, rate)
            if step % config.log_every == 0 or step == last:
                log.write("train", step, {"loss": loss, "grad_norm": grad_norm, "lr": float(schedule(step - 1)),
                                          "response_tokens": int(metrics["tokens"]), "tokens_per_s": rate,
                                          "step_time_s": seconds})
            # evaluate before saving: a run killed after the save never has to redo this step's lines
            if step % config.eval_every == 0 or step == config.steps:
                result, evaluated = run_eval(evaluate, params, frozen, held, mesh), step
                log.write("eval", step, result["metrics"])
                progress.note(f"step {step}: held-out " + ", ".join(
                    f"{k} {result['metrics'][k]:.4f}" for k in ("loss", "accuracy", "nll", "log_loss", "brier", "ece")
                    if k in result["metrics"]))
            if step % config.save_every == 0 or step == last:
                save()
    finally:
        progress.close()
        store.close()  # waits for the last save
    if evaluated != step:  # stopped between evaluations, or resumed at the end (its eval line is logged)
        result = run_eval(evaluate, params, frozen, held, mesh)
    throughput = float(np.median(rates)) if rates else float("nan")
    final = {"step": step, "label_smoothing": config.label_smoothing, "seed": config.seed, **result["metrics"],
             "tokens_per_s": throughput, "token_bins": _bins_json(result["bins"])}
    if prep.classes is not None:
        final.update(smoothing_convention=config.smoothing_convention, classes=prep.classes)
    if step == config.steps and jax.process_count() > 1:  # every process sends its shards to the host
        params, frozen = multihost_utils.process_allgather((params, frozen), tiled=True)
    if step == config.steps and main:  # each output appears complete or not at all; final.json, last, marks the end
        if config.task == "causal_lm":
            model = nnx.merge(graphdef, params, frozen)
            final["vocab_size"] = int(model.unembedding().shape[0])
            final.update(_answer_level(config, prep, model, progress))
        with atomic_path(os.path.join(out_dir, "hf")) as tmp:
            export_hf(graphdef, params, frozen, prep.tokenizer, tmp, lora_alpha=config.lora_alpha, classes=prep.classes)
        level = "content tokens" if prep.classes is None else f"{len(prep.classes)} classes"
        with atomic_path(os.path.join(out_dir, "reliability.png")) as tmp:
            reliability_diagram(result["bins"], tmp, title=f"smoothing {config.label_smoothing:g}, {level}")
        write_text(os.path.join(out_dir, "final.json"), json.dumps(final, indent=2))
    return {"metrics": final, "losses": losses, "step": step}
