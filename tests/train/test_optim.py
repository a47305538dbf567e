"""The learning-rate schedule, the weight-decay groups and the optimizer they build."""

from __future__ import annotations

import copy
import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from pretrain.config import ModelConfig, OptimConfig, ScheduleConfig
from pretrain.models.zoo import build_model
from pretrain.train.optim import build_optimizer, clip_in_step, grad_norm, lr_at, param_groups

PEAK = 1e-3


def schedule(decay: str, warmup: int = 10, total: int = 110, final: float = 1e-5) -> ScheduleConfig:
    return ScheduleConfig(total_steps=total, warmup_steps=warmup, decay=decay, final_lr=final)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_warmup_is_linear_from_peak_over_warmup_to_peak(decay):
    """Step 0 trains with peak / warmup_steps, each warm-up step adds as much again, the last one reaches peak."""
    cfg = schedule(decay)
    for step in range(cfg.warmup_steps):
        assert lr_at(step, PEAK, cfg) == pytest.approx(PEAK * (step + 1) / cfg.warmup_steps)
    assert lr_at(cfg.warmup_steps - 1, PEAK, cfg) == pytest.approx(PEAK)
    assert lr_at(cfg.warmup_steps, PEAK, cfg) == pytest.approx(PEAK)


def test_no_warmup_starts_at_peak():
    assert lr_at(0, PEAK, schedule("cosine", warmup=0)) == pytest.approx(PEAK)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_reaches_final_lr_at_total_steps_and_stays(decay):
    cfg = schedule(decay)
    assert lr_at(cfg.total_steps, PEAK, cfg) == pytest.approx(cfg.final_lr)
    assert lr_at(cfg.total_steps + 50, PEAK, cfg) == pytest.approx(cfg.final_lr)
    assert lr_at(cfg.total_steps - 1, PEAK, cfg) > cfg.final_lr


def test_linear_decay_is_a_straight_line():
    cfg = schedule("linear")
    span = cfg.total_steps - cfg.warmup_steps
    for step in range(cfg.warmup_steps, cfg.total_steps + 1):
        fraction = (step - cfg.warmup_steps) / span
        assert lr_at(step, PEAK, cfg) == pytest.approx(PEAK + (cfg.final_lr - PEAK) * fraction)


def test_cosine_is_half_way_in_the_middle_of_the_decay():
    cfg = schedule("cosine")
    middle = (cfg.warmup_steps + cfg.total_steps) // 2
    assert lr_at(middle, PEAK, cfg) == pytest.approx((PEAK + cfg.final_lr) / 2)
    quarter = cfg.warmup_steps + (cfg.total_steps - cfg.warmup_steps) // 4
    assert lr_at(quarter, PEAK, cfg) > (PEAK + cfg.final_lr) * 3 / 4  # cosine lingers near the peak first


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedule_never_rises_after_warmup(decay):
    cfg = schedule(decay)
    lrs = [lr_at(step, PEAK, cfg) for step in range(cfg.warmup_steps, cfg.total_steps + 10)]
    assert all(later <= earlier for earlier, later in pairwise(lrs))


def small_vit() -> nn.Module:
    return build_model(ModelConfig(name="vit_mu8", image_size=32, num_classes=5))


def group_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters in the decayed group and in the undecayed group."""
    decay, keep = param_groups(model, weight_decay=0.1)
    assert (decay["weight_decay"], keep["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in decay["params"]], [names[id(p)] for p in keep["params"]]


def test_every_parameter_is_in_exactly_one_group():
    model = small_vit()
    decay, keep = group_names(model)
    assert sorted(decay + keep) == sorted(n for n, _ in model.named_parameters())


def test_weight_matrices_and_kernels_decay_and_nothing_else():
    """Linear and conv weights decay; biases, LayerNorm weights, the position embedding and [CLS] do not."""
    model = small_vit()
    decay, keep = group_names(model)
    modules = dict(model.named_modules())
    should_decay, should_keep = set(), set()
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if isinstance(modules[owner], (nn.Linear, nn.Conv2d)) and leaf == "weight":
            should_decay.add(name)
        else:
            is_norm = isinstance(modules[owner], nn.LayerNorm)
            assert leaf == "bias" or is_norm or name in ("pos_embed", "cls_token"), f"unexpected parameter {name}"
            should_keep.add(name)
    assert set(decay) == should_decay
    assert set(keep) == should_keep
    assert {"patch_embed.proj.weight", "head.weight", "blocks.0.attn.qkv.weight"} <= set(decay)
    assert {"pos_embed", "cls_token", "patch_embed.proj.bias", "blocks.0.norm1.weight", "norm.weight"} <= set(keep)


def test_adamw_decay_is_decoupled_and_multiplied_by_lr():
    """With zero gradients Adam's update is 0, so only decay moves a weight: w <- w (1 - lr wd); a bias stays."""
    layer = nn.Linear(4, 3)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    cfg = OptimConfig(name="adamw", lr=0.1, weight_decay=0.5)
    opt = build_optimizer(layer, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    layer.weight.grad, layer.bias.grad = torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), weight * (1 - cfg.lr * cfg.weight_decay))
    torch.testing.assert_close(layer.bias.detach(), bias, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("clip", [0.0, 0.05, 100.0])
def test_clipping_inside_the_fused_step_is_clip_grad_norm(name, clip):
    """The fused step divides by clip_in_step's factor: the same weights as clipping the gradients first."""
    torch.manual_seed(0)
    inside = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4))
    before = copy.deepcopy(inside)
    cfg = OptimConfig(name=name, lr=0.1, weight_decay=0.1)
    opt_inside, opt_before = build_optimizer(inside, cfg), build_optimizer(before, cfg)
    x = torch.randn(16, 8)
    for _ in range(3):
        for model in (inside, before):
            model.zero_grad()
            model(x).square().sum().backward()
        norm = grad_norm(inside)
        assert norm > 0.05 and torch.isfinite(norm)
        clip_in_step(opt_inside, norm, clip)
        opt_inside.step()
        torch.testing.assert_close(nn.utils.clip_grad_norm_(before.parameters(), clip or math.inf), norm)
        opt_before.step()
        for a, b in zip(inside.parameters(), before.parameters(), strict=True):
            torch.testing.assert_close(a, b)
