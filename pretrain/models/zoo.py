"""The one table of model sizes, model names, and building a model from a recipe."""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UserError
from .hybrid import HybridEmbed
from .vit import PatchEmbed, Size, VisionTransformer

# Width D, depth L, heads, MLP size: Dosovitskiy et al. Table 1 (B, L, H), DeiT (Ti, S),
# Zhai et al. 2022 "Scaling Vision Transformers" (g). "mu" is ours: the CPU demo and the tests.
SIZES: dict[str, Size] = {
    "mu": Size(64, 4, 4, 256),
    "ti": Size(192, 12, 3, 768),
    "s": Size(384, 12, 6, 1536),
    "b": Size(768, 12, 12, 3072),
    "l": Size(1024, 24, 16, 4096),
    "h": Size(1280, 32, 16, 5120),
    "g": Size(1408, 40, 16, 6144),
}

# ResNet units per stage of the hybrid's stem; stride 16 (stage 4 dropped, stage 3 grown to 9).
BACKBONES: dict[str, tuple[int, ...]] = {"r50": (3, 4, 9)}

_NAME = re.compile(r"vit_(?:(?P<backbone>[a-z]+\d+)_)?(?P<size>[a-z]+)(?P<patch>\d+)")


class Arch(NamedTuple):
    size: Size
    patch_size: int
    backbone: tuple[int, ...] | None


def parse_name(name: str) -> Arch:
    """'vit_h14' -> ViT-H with 14x14 patches; 'vit_r50_b16' -> ResNet-50 stem + ViT-B, stride 16."""
    m = _NAME.fullmatch(name)
    sizes = "/".join(SIZES)
    if not m or m["size"] not in SIZES:
        raise UserError(f"model.name '{name}' is not in the zoo; use vit_{{{sizes}}}{{patch}} (e.g. vit_b16) or vit_r50_b16")
    if m["patch"].startswith("0") and int(m["patch"]):  # vit_mu04 would build vit_mu4 and then not match it on resume
        raise UserError(f"model.name '{name}': write the patch size without a leading zero, "
                        f"{name[: m.start('patch')]}{int(m['patch'])}")
    backbone = None
    patch = int(m["patch"])
    if m["backbone"]:
        if m["backbone"] not in BACKBONES:
            raise UserError(f"model.name '{name}': unknown hybrid stem '{m['backbone']}'; the zoo has {', '.join(BACKBONES)}")
        backbone = BACKBONES[m["backbone"]]
        stride = 4 * 2 ** (len(backbone) - 1)
        if patch != stride:
            raise UserError(f"model.name '{name}': the {m['backbone']} stem has stride {stride}; name it vit_{m['backbone']}_{m['size']}{stride}")
    elif patch < 1:
        raise UserError(f"model.name '{name}': the patch size must be at least 1")
    return Arch(SIZES[m["size"]], patch, backbone)


def build_model(cfg, num_classes: int | None = None, head_bias: float = 0.0) -> VisionTransformer:
    """The network a ``config.ModelConfig`` describes (``num_classes`` overrides the recipe's)."""
    arch = parse_name(cfg.name)
    if arch.backbone is None:
        embed = PatchEmbed(arch.patch_size, arch.size.width)
    else:
        embed = HybridEmbed(arch.backbone, arch.size.width)
    if cfg.image_size % embed.stride:
        raise UserError(f"model.image_size {cfg.image_size} is not a multiple of {cfg.name}'s patch stride {embed.stride}")
    return VisionTransformer(
        arch.size,
        embed,
        image_size=cfg.image_size,
        num_classes=cfg.num_classes if num_classes is None else num_classes,
        head=cfg.head,
        pool=cfg.pool,
        dropout=cfg.dropout,
        attn_dropout=cfg.attn_dropout,
        norm_eps=cfg.norm_eps,
        head_bias=head_bias,
        bf16_residual=cfg.bf16_residual,
    )


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: VisionTransformer) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass, counted by torch on the meta device.

    ``model`` may live on the meta device (``with torch.device("meta"): build_model(...)``), so even
    ViT-g is counted without allocating its weights. Attention runs as PyTorch's math kernel here, whose matmuls the
    counter sees (it has no formula for the CPU's fused attention, and would leave its FLOPs out).
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, model.image_size, model.image_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    return counter.get_total_flops()
