"""The paper's official checkpoints: google-research/vision_transformer ``.npz`` files, in our names.

Flax stores dense kernels as (in, out), convolution kernels as (kh, kw, in, out), and attention
projections per head: query/key/value kernels (D, heads, head_dim) with biases (heads, head_dim),
the output kernel (heads, head_dim, D). The ResNet hybrid's stem sits beside them as ``conv_root``,
``gn_root`` and ``block{stage}/unit{unit}/...``, counted from 1.

The weights carry over exactly; the arithmetic differs slightly, as it does in timm and transformers,
which read these files the same way: the paper's code uses flax's tanh-approximate GELU (ours is
exact), and its ResNet uses GroupNorm eps 1e-6 and weight standardisation w / (std + 1e-5) (ours:
timm's 1e-5 and w / sqrt(var + 1e-8)).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..errors import UserError

_EXACT = {"cls": "cls_token", "Transformer/posembed_input/pos_embedding": "pos_embed"}

_BLOCK = r"Transformer/encoderblock_(\d+)/"
_UNIT = r"block(\d+)/unit(\d+)/"
_STAGE_UNIT = "patch_embed.backbone.stages.{}.blocks.{}."

# npz module path -> our module; the parameter (kernel, scale, bias) follows after the last '/'.
_MODULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"embedding", lambda m: "patch_embed.proj"),
    (_BLOCK + r"LayerNorm_0", lambda m: f"blocks.{m[1]}.norm1"),
    (_BLOCK + r"MultiHeadDotProductAttention_1/out", lambda m: f"blocks.{m[1]}.attn.proj"),
    (_BLOCK + r"LayerNorm_2", lambda m: f"blocks.{m[1]}.norm2"),
    (_BLOCK + r"MlpBlock_3/Dense_0", lambda m: f"blocks.{m[1]}.mlp.fc1"),
    (_BLOCK + r"MlpBlock_3/Dense_1", lambda m: f"blocks.{m[1]}.mlp.fc2"),
    (r"Transformer/encoder_norm", lambda m: "norm"),
    (r"pre_logits", lambda m: "pre_logits.fc"),
    (r"head", lambda m: "head"),
    (r"conv_root", lambda m: "patch_embed.backbone.stem.conv"),
    (r"gn_root", lambda m: "patch_embed.backbone.stem.norm"),
    (_UNIT + r"conv([123])", lambda m: _STAGE_UNIT.format(int(m[1]) - 1, int(m[2]) - 1) + f"conv{m[3]}"),
    (_UNIT + r"gn([123])", lambda m: _STAGE_UNIT.format(int(m[1]) - 1, int(m[2]) - 1) + f"norm{m[3]}"),
    (_UNIT + r"conv_proj", lambda m: _STAGE_UNIT.format(int(m[1]) - 1, int(m[2]) - 1) + "downsample.conv"),
    (_UNIT + r"gn_proj", lambda m: _STAGE_UNIT.format(int(m[1]) - 1, int(m[2]) - 1) + "downsample.norm"),
]
_QKV = re.compile(_BLOCK + r"MultiHeadDotProductAttention_1/(query|key|value)")
_FIRST_QUERY = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query"
_QKV_ORDER = ("query", "key", "value")
_PARAMS = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def from_jax_npz(path_or_file: str | Path | BinaryIO) -> dict[str, torch.Tensor]:
    """An official ViT or R50+ViT ``.npz`` checkpoint as a state dict in our names.

    q, k and v are fused into ``attn.qkv``. A checkpoint without ``pre_logits`` was saved with
    ``representation_size=None`` (the fine-tuned ones): it fits a model with head 'linear'.
    """
    try:
        with np.load(path_or_file, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path_or_file} is not a readable .npz archive of arrays ({e}); is it complete and of that "
                        f"format?") from None
    prefix = "opt/target/" if "opt/target/embedding/kernel" in arrays else ""
    arrays = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
    if "embedding/kernel" not in arrays:
        raise UserError(f"{path_or_file} has no embedding/kernel; it is not a google-research/vision_transformer "
                        "checkpoint (big_vision checkpoints name their parameters differently)")
    state, qkv = {}, {}
    for key, array in arrays.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        module, _, param = key.rpartition("/")
        if key in _EXACT:
            state[_EXACT[key]] = tensor
        elif m := _QKV.fullmatch(module):
            qkv.setdefault((m[1], param), {})[m[2]] = tensor
        else:
            state[f"{_our_module(module, key)}.{_PARAMS.get(param, param)}"] = _to_torch_layout(tensor, module, param)
    for (block, param), parts in qkv.items():
        if set(parts) != set(_QKV_ORDER):
            raise UserError(f"{path_or_file} has only {sorted(parts)} of query, key and value in encoderblock_{block}")
        state[f"blocks.{block}.attn.qkv.{_PARAMS[param]}"] = torch.cat(
            [_qkv_part(parts[name], param) for name in _QKV_ORDER]
        )
    return state


def npz_heads(path: str | Path) -> int | None:
    """The attention heads of an official ``.npz`` checkpoint (its query kernels are (D, heads, head_dim)), which a
    state dict in our names no longer shows; None if it has no encoder block. Reads that one array."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            key = next((k for k in npz.files if k.endswith(f"{_FIRST_QUERY}/kernel")), None)
            kernel = npz[key] if key else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # from_jax_npz has said why
    return int(kernel.shape[1]) if kernel is not None and kernel.ndim == 3 else None


def _our_module(module: str, key: str) -> str:
    for pattern, ours in _MODULES:
        if m := re.fullmatch(pattern, module):
            return ours(m)
    raise UserError(f"the npz has {key}, which is not a parameter of the paper's ViT or R50+ViT")


def _to_torch_layout(tensor: torch.Tensor, module: str, param: str) -> torch.Tensor:
    if param != "kernel":
        return tensor
    if tensor.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
        return tensor.permute(3, 2, 0, 1).contiguous()
    if module.endswith("MultiHeadDotProductAttention_1/out"):  # (heads, head_dim, D) -> (D, heads * head_dim)
        return tensor.reshape(-1, tensor.shape[-1]).T.contiguous()
    return tensor.T.contiguous()


def _qkv_part(tensor: torch.Tensor, param: str) -> torch.Tensor:
    """query/key/value kernel (D, heads, head_dim) -> (heads * head_dim, D); bias (heads, head_dim) -> flat."""
    if param == "kernel":
        return tensor.reshape(tensor.shape[0], -1).T
    return tensor.reshape(-1)
