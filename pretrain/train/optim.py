"""Optimizers with weight decay on weight matrices only, and the learning-rate schedule."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

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


def grad_norm(module: nn.Module) -> torch.Tensor:
    """The global L2 norm of the module's gradients, a device tensor."""
    return nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])


def clip_in_step(optimizer: torch.optim.Optimizer, norm: torch.Tensor, clip: float) -> torch.Tensor:
    """Have the fused optimizer's next step clip at global norm ``clip`` (0: no clipping) and skip a non-finite
    update, both on the device; returns ``found_inf``, 1.0 where the norm is not finite.

    The fused kernels divide the gradients by ``grad_scale`` and skip the update where ``found_inf`` is set (the
    attributes torch.amp.GradScaler sets), so clipping costs no pass over the gradients of its own and the host
    never waits to decide. Dividing by max(1, (norm + 1e-6) / clip) is torch.nn.utils.clip_grad_norm_'s factor.
    """
    norm = norm.float()  # the kernels take fp32 scalars; ZeRO-3's norm is fp64
    found_inf = (~torch.isfinite(norm)).float()
    optimizer.found_inf = found_inf
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / clip, min=1.0) if clip > 0 else None
    return found_inf


def clip_and_flag(module: nn.Module, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients in place at global norm ``clip`` (0: no clipping); (norm, found_inf) as device tensors,
    for optimizers that take ``found_inf`` but no ``grad_scale`` (torch_xla's sync-free ones)."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    return norm, (~torch.isfinite(norm)).float()


@contextlib.contextmanager
def recipe_settings_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Loading a checkpoint's optimizer state restores the settings it was written with (weight decay, betas,
    momentum); the recipe's are put back, so that a change made on resume applies, as the run's note says (the
    learning rate is set every step)."""
    kept = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, kept):
        group.update(settings)


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
