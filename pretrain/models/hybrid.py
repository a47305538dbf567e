"""The ViT-Hybrid stem: a BiT ResNet (weight-standardised convolutions + GroupNorm) whose feature
map is tokenised with patch size 1 (Dosovitskiy et al., section 3.1, "Hybrid Architecture").

For R50+ViT-B/16 the ResNet-50 keeps stages 1-3 with stage 3 grown to 9 units, so its output has
stride 16 and 1024 channels: a 224px image gives 14x14 tokens, as ViT-B/16 does. Padding is
TensorFlow's 'SAME' (asymmetric for strided layers) and the bottlenecks are post-activation, as in
the paper's code; parameter names follow timm's ``vit_base_r50_s16_*``.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .vit import lecun_normal_

GROUPS = 32


def pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    """Pad like TensorFlow's 'SAME': output = ceil(input / stride), the extra pixel on the far side."""
    pads = []
    for size, k, s in zip(reversed(x.shape[-2:]), reversed(kernel), reversed(stride)):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class Conv2dSame(nn.Conv2d):
    """Convolution with TensorFlow's 'SAME' padding, no bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pad_same(x, self.kernel_size, self.stride), self.weight, None, self.stride)


class StdConv2dSame(Conv2dSame):
    """Convolution with weight standardisation (Qiao et al.; BiT) and 'SAME' padding, no bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(cin, cout, kernel, stride)
        self.eps = eps

    def standardised_weight(self) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=self.eps)
        return w.reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pad_same(x, self.kernel_size, self.stride), self.standardised_weight(), None, self.stride)


@torch.no_grad()
def fold_weight_standardisation(model: nn.Module) -> nn.Module:
    """For inference: a copy of ``model`` whose weight-standardised convolutions are plain ones holding the
    standardised weights (the same function), or ``model`` itself when it has none.

    ONNX's exporter otherwise stores each raw weight and, folded from the standardisation, a copy or two in other
    layouts: 97 MB for a 12M-parameter hybrid.
    """
    if not any(isinstance(m, StdConv2dSame) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, StdConv2dSame):
            plain = Conv2dSame(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
            plain.weight.copy_(m.standardised_weight())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    return model


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-5)


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = StdConv2dSame(cin, cout, 1, stride)
        self.norm = group_norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1, each followed by GroupNorm; ReLU after the residual sum."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.downsample = Downsample(cin, cout, stride) if stride != 1 or cin != cout else None
        self.conv1, self.norm1 = StdConv2dSame(cin, mid, 1), group_norm(mid)
        self.conv2, self.norm2 = StdConv2dSame(mid, mid, 3, stride), group_norm(mid)
        self.conv3, self.norm3 = StdConv2dSame(mid, cout, 1), group_norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return F.relu(self.norm3(self.conv3(x)) + shortcut)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, units: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(*(Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(units)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetBackbone(nn.Module):
    """BiT ResNet trunk: 7x7/2 stem + 3x3/2 max-pool, then stages of widths 256, 512, 1024, ..."""

    def __init__(self, layers: tuple[int, ...], in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(conv=StdConv2dSame(in_chans, 64, 7, 2), norm=group_norm(64)))
        widths = [256 * 2**i for i in range(len(layers))]
        self.stages = nn.Sequential(
            *(Stage(64 if i == 0 else widths[i - 1], widths[i], n, 1 if i == 0 else 2) for i, n in enumerate(layers))
        )
        self.out_channels = widths[-1]
        self.stride = 4 * 2 ** (len(layers) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.max_pool2d(pad_same(x, (3, 3), (2, 2), value=float("-inf")), 3, 2)
        return self.stages(x)


class HybridEmbed(nn.Module):
    """ResNet feature map, then a 1x1 projection to the transformer width (patch size 1)."""

    def __init__(self, layers: tuple[int, ...], width: int, in_chans: int = 3):
        super().__init__()
        self.backbone = ResNetBackbone(layers, in_chans)
        self.proj = nn.Conv2d(self.backbone.out_channels, width, 1)
        self.stride, self.in_chans = self.backbone.stride, in_chans

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # flax's default kernel init, as for the plain patch embedding
                lecun_normal_(m.weight)
        nn.init.zeros_(self.proj.bias)
        for m in self.backbone.modules():
            if isinstance(m, Bottleneck):  # each residual unit starts as the identity (BiT)
                nn.init.zeros_(m.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)
