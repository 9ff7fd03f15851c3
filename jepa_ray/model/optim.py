"""Single-process training helpers: AdamW parameter groups, the schedules, one JEPA step.

The reference recipe: AdamW; learning rate warmed up linearly then cosine-decayed; weight decay
cosine 0.04 -> 0.4, none on biases and 1-D parameters (norms, embeddings vectors); EMA momentum
linear 0.996 -> 1.0. Used by tests and notebooks; distributed pretraining runs the same step
inside DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from jepa_ray.model.jepa import JEPA, momentum_at


@dataclass(frozen=True)
class Schedule:
    """Learning rate, weight decay and EMA momentum as functions of the step."""

    total_steps: int
    lr: float = 1e-3
    warmup_steps: int = 10
    final_lr: float = 1e-6
    weight_decay: tuple[float, float] = (0.04, 0.4)
    ema: tuple[float, float] = (0.996, 1.0)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.final_lr + 0.5 * (self.lr - self.final_lr) * (1 + math.cos(math.pi * t))

    def weight_decay_at(self, step: int) -> float:
        t = min(step / max(self.total_steps, 1), 1.0)
        lo, hi = self.weight_decay
        return hi + 0.5 * (lo - hi) * (1 + math.cos(math.pi * t))

    def momentum_at(self, step: int) -> float:
        return momentum_at(step, self.total_steps, self.ema)


def param_groups(model: JEPA) -> list[dict]:
    """Trainable parameters in two groups: decayed (matrices) and not (biases, 1-D, embeddings rows)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # the target encoder moves by EMA only
        # a learned position table is an embedding: not decayed (as ViT / timm do)
        (no_decay if p.ndim <= 1 or name.endswith((".bias", "image.pos")) else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def make_optimizer(model: JEPA, schedule: Schedule) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model), lr=schedule.lr, weight_decay=schedule.weight_decay[0])


def train_step(
    model: JEPA, optimizer: torch.optim.Optimizer, batch: dict, step: int, schedule: Schedule
) -> dict[str, float]:
    """One optimisation step: schedules, loss, backward, AdamW, EMA update. Returns the metrics."""
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr_at(step)
        if group.get("apply_wd"):
            group["weight_decay"] = schedule.weight_decay_at(step)
    model.train()
    out = model(batch)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    momentum = schedule.momentum_at(step)
    model.update_target(momentum)
    metrics = {k: float(v.detach()) for k, v in out.items()}
    metrics.update(lr=schedule.lr_at(step), momentum=momentum)
    return metrics
