"""Learning-rate schedules by name: warmup + cosine, constant (with warmup), warmup-stable-decay."""
from __future__ import annotations

import optax

SCHEDULES = ("cosine", "constant", "wsd")


def make_schedule(name: str, peak_lr: float, total_steps: int, warmup_steps: int,
                  min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> optax.Schedule:
    """lr(t) for t in [0, total_steps).

    cosine:   linear warmup 0 -> peak over ``warmup_steps``, then cosine to ``min_lr_ratio * peak``.
    constant: linear warmup, then ``peak``.
    wsd:      linear warmup, ``peak`` until the last ``decay_fraction`` of the steps, then linear to
              ``min_lr_ratio * peak`` (warmup-stable-decay).
    """
    if name not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={name!r} is not one of {SCHEDULES}")
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(f"optimizer.warmup_steps={warmup_steps} must be in [0, steps={total_steps})")
    if peak_lr <= 0:
        raise ValueError(f"optimizer.lr={peak_lr} must be positive")
    end_lr = min_lr_ratio * peak_lr
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    rest = max(total_steps - warmup_steps, 1)
    if name == "cosine":
        main = optax.cosine_decay_schedule(peak_lr, rest, alpha=min_lr_ratio)
    elif name == "constant":
        main = optax.constant_schedule(peak_lr)
    else:
        decay_steps = max(int(decay_fraction * total_steps), 1)
        main = optax.join_schedules(
            [optax.constant_schedule(peak_lr), optax.linear_schedule(peak_lr, end_lr, decay_steps)],
            [max(rest - decay_steps, 0)])
    return optax.join_schedules([warmup, main], [warmup_steps])
