"""Optimizers with weight decay on weight matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig, ScheduleConfig

NO_DECAY = ("pos_embed", "cls_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and kernels; never biases, norms, position embeddings or the class token."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith(NO_DECAY) else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """A fused optimizer (CUDA and CPU): a few kernels for all parameters, and it takes ``found_inf``."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":  # PyTorch AdamW: decoupled decay, multiplied by the lr
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)


def clip_and_flag(module: nn.Module, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients at global norm ``clip`` (0: no clipping); (norm, found_inf) as device tensors.

    ``found_inf`` is 1.0 where the norm is not finite: handed to the optimizer's step, the update is skipped on
    the device, so the host never waits to decide.
    """
    params = [p for p in module.parameters() if p.grad is not None]
    norm = nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    return norm, (~torch.isfinite(norm)).float()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(step: int, peak: float, cfg: ScheduleConfig) -> float:
    """Linear warm-up from 0 to ``peak``, then linear or cosine decay to ``final_lr`` at total_steps.

    ``step`` counts optimizer steps from 0: step 0 trains with peak / warmup_steps.
    """
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    shape = 1.0 - t if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.final_lr + (peak - cfg.final_lr) * shape
