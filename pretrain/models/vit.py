"""The Vision Transformer of Dosovitskiy et al. (2021), with the heads of its two stages.

Module and parameter names follow timm's (``blocks.0.attn.qkv``, ``patch_embed.proj``, ...), the
de-facto naming of the PyTorch ecosystem, so that interchange code maps names rather than shapes.
Initialisation follows the paper's code (google-research/vision_transformer): Xavier-uniform
dense layers, LeCun-normal patch embedding and pre-logits, N(0, 0.02) position embeddings, a zero
class token and a zero classifier.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Head, Pool


class Size(NamedTuple):
    """Transformer dimensions: width D, depth L, heads, MLP hidden size."""

    width: int
    depth: int
    heads: int
    mlp_dim: int


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, size: Size, dropout: float, attn_dropout: float, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(size.width, eps=norm_eps)
        self.attn = Attention(size.width, size.heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(size.width, eps=norm_eps)
        self.mlp = Mlp(size.width, size.mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, linearly projected.

    The weights are a strided convolution's (``proj``, as in timm, HF and the JAX checkpoints), applied as one matmul
    over the flattened patches: the same function, without cuDNN's convolution of a 3-channel NCHW image (4.7 ms of
    a 76 ms ViT-B/16 step on an H100, its layout conversions included).
    """

    def __init__(self, patch_size: int, width: int, in_chans: int = 3):
        super().__init__()
        self.stride, self.in_chans = patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, width, patch_size, stride=patch_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.stride
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class VisionTransformer(nn.Module):
    """ViT encoder with a pre-training head (pre-logits + classifier) or a fine-tuning head.

    ``patch_embed`` is a ``PatchEmbed`` or, for the hybrid, a ``hybrid.HybridEmbed``; both map an
    image to a sequence of tokens over a grid of ``image_size // patch_embed.stride`` per side.
    ``num_classes=0`` leaves out the classifier: the model then returns its representation.
    """

    def __init__(
        self,
        size: Size,
        patch_embed: nn.Module,
        image_size: int,
        num_classes: int,
        head: Head = "prelogits",
        pool: Pool = "cls",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_eps: float = 1e-6,
        head_bias: float = 0.0,
        bf16_residual: bool = False,
    ):
        super().__init__()
        stride = patch_embed.stride
        if image_size % stride:
            raise ValueError(f"image size {image_size} is not a multiple of the patch stride {stride}")
        self.size, self.image_size, self.head_type, self.pool = size, image_size, head, pool
        self.num_classes, self.norm_eps, self.bf16_residual = num_classes, norm_eps, bf16_residual
        self.grid = (image_size // stride, image_size // stride)
        self.num_prefix_tokens = 1 if pool == "cls" else 0
        d = size.width

        self.patch_embed = patch_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.grid[0] * self.grid[1], d))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(size, dropout, attn_dropout, norm_eps) for _ in range(size.depth))
        self.norm = nn.LayerNorm(d, eps=norm_eps)
        self.pre_logits = (
            nn.Sequential(OrderedDict(fc=nn.Linear(d, d), act=nn.Tanh())) if head == "prelogits" else nn.Identity()
        )
        self.head = nn.Linear(d, num_classes) if num_classes else nn.Identity()
        self.reset_parameters(head_bias)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.stride

    @torch.no_grad()
    def reset_parameters(self, head_bias: float = 0.0) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("blocks."):
                if name.endswith("attn.qkv"):  # three D x D projections, each Xavier like q, k, v in JAX
                    for w in m.weight.chunk(3):
                        nn.init.xavier_uniform_(w)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if name.endswith(("mlp.fc1", "mlp.fc2")):
                    nn.init.normal_(m.bias, std=1e-6)
                else:
                    nn.init.zeros_(m.bias)
        self.patch_embed.reset_parameters()
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        if self.head_type == "prelogits":
            lecun_normal_(self.pre_logits.fc.weight)
            nn.init.zeros_(self.pre_logits.fc.bias)
        if self.num_classes:
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, head_bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch (B, C, H, W) to normalised tokens (B, prefix + grid, D)."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if (h, w) != self.grid:
            raise ValueError(
                f"input of {x.shape[-2]}x{x.shape[-1]} pixels makes a {h}x{w} token grid, but the position "
                f"embeddings cover {self.grid[0]}x{self.grid[1]} (image_size {self.image_size}); resample them "
                f"to the new grid (pretrain.models.posemb) or feed {self.image_size}px images"
            )
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        device = x.device.type
        if self.bf16_residual and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))  # the blocks' adds then keep it
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """The image representation the classifier reads: [CLS] (or mean token), after pre-logits."""
        tokens = self.forward_features(x)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)
        return self.pre_logits(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.representation(x))


def lecun_normal_(w: torch.Tensor) -> None:
    """flax's lecun_normal: truncated normal (2 std) with variance 1 / fan_in."""
    fan_in = w[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated at +-2
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
