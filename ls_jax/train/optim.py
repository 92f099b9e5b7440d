"""The optimizer: AdamW with linear warmup then cosine / linear / constant decay, and clipping."""

import jax
import optax

DECAYS = ("cosine", "linear", "constant")


def learning_rate(peak: float, steps: int, warmup_steps: int, decay: str, min_lr_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then decay to ``peak * min_lr_ratio`` at ``steps``."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    warmup_steps = min(warmup_steps, steps)
    rest = max(steps - warmup_steps, 1)
    end = peak * min_lr_ratio
    after = {
        "cosine": optax.cosine_decay_schedule(peak, rest, alpha=min_lr_ratio),
        "linear": optax.linear_schedule(peak, end, rest),
        "constant": optax.constant_schedule(peak),
    }[decay]
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def adamw(schedule: optax.Schedule, *, weight_decay: float, b1: float, b2: float, clip_norm: float):
    """Clip by global norm (``clip_norm > 0``), then AdamW; no weight decay on arrays with < 2 dims."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)
