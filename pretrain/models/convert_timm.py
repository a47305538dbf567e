"""PyTorch state dicts in our parameter names, which are timm's: reading, timm's own, loading into a model.

Every import path (HF, official JAX, timm, our checkpoints) ends in ``load_into``: it resamples the
position embeddings when the token grid differs and turns any other mismatch into a ``UserError``
that names the first offending key, instead of ``load_state_dict``'s wall of text.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import Interpolation
from ..errors import UserError
from .hybrid import HybridEmbed
from .posemb import resample_posemb
from .vit import VisionTransformer
from .zoo import BACKBONES, SIZES

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("pre_logits.", "head.")
LFS_POINTER = b"version https://git-lfs"  # what a clone without git-lfs holds in place of a large file

# timm ViT variants whose extra parameters have no counterpart in the paper's architecture.
_TIMM_UNSUPPORTED = (
    (r"^fc_norm\.", "a LayerNorm after average pooling (timm's GAP variant, where ours averages normalised tokens)"),
    (r"^reg_token$", "register tokens"),
    (r"^(dist_token|head_dist\.)", "DeiT's distillation token"),
    (r"^norm_pre\.", "a LayerNorm before the encoder (CLIP style)"),
    (r"^attn_pool\.", "an attention-pooling head"),
    (r"\.ls[12]\.", "LayerScale"),
    (r"\.attn\.(q_norm|k_norm|norm)\.|\.mlp\.norm\.", "normalisation inside attention or the MLP"),
)


def check_weights_there(path: Path) -> None:
    """A weights file that is missing, or a Git LFS pointer in its place, in one sentence."""
    try:
        with open(path, "rb") as f:
            start = f.read(len(LFS_POINTER))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    if start == LFS_POINTER:
        raise UserError(f"{path} is a Git LFS pointer, not the weights (a clone made without git-lfs); fetch them with "
                        f"git lfs pull in that repository")


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``torch.save`` file; one that is missing, cut short, of another format or
    a Git LFS pointer is one sentence."""
    check_weights_there(path)
    try:
        state = load_file(path) if path.suffix == ".safetensors" else read_torch_file(path)
    except (SafetensorError, OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} cannot be read as a {path.suffix} weights file ({e}); is it complete and of "
                        f"that format?") from None
    # Saved from a DistributedDataParallel ('module.') or torch.compile ('_orig_mod.') wrapper.
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def read_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file, never unpickling anything else (``weights_only=True``).

    A dict that wraps the state dict under 'model' or 'state_dict' is unwrapped (a timm train.py checkpoint,
    whose training arguments are let through; its EMA weights, 'state_dict_ema' or 'model_ema', are taken first, as
    timm's ``load_checkpoint`` takes them).
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the args in timm's train.py checkpoints
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError:  # "PytorchStreamReader failed reading zip archive"
        raise UserError(f"{path} is not a readable torch.save file; is it complete and of that format?") from None
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of objects at all
            raise UserError(f"{path} is not a readable torch.save file; is it complete and of that format?") from None
        raise UserError(f"{path} holds Python objects besides tensors, which are not unpickled since that could run "
                        "arbitrary code; save a plain state dict (or safetensors) instead") from e
    ema = next((k for k in ("state_dict_ema", "model_ema") if isinstance(obj, dict) and isinstance(obj.get(k), dict)),
               None)
    if ema is not None:
        print(f"note: {path} holds EMA weights ({ema}) beside the trained ones; the EMA weights are read, as timm "
              f"reads them", file=sys.stderr, flush=True)
        obj = obj[ema]
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict (a dict of tensors, maybe under 'model' or 'state_dict')")
    return obj


def from_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict (plain ``vit_*`` or the ``vit_base_r50_s16_*`` hybrid) in our names.

    The names are the same; this only refuses the variants we cannot represent. Build the receiving
    model yourself (``zoo.build_model`` with the matching name, head and pool) and call ``load_into``.
    """
    for key in state_dict:
        for pattern, what in _TIMM_UNSUPPORTED:
            if re.search(pattern, key):
                raise UserError(f"the timm state dict has {key}, i.e. {what}, which this ViT does not have; "
                                "export a plain timm ViT (class token, final norm before pooling) instead")
    return dict(state_dict)


# timm's size words in its architecture names ("vit_base_patch16_224") -> the zoo's sizes.
_TIMM_SIZE_WORDS = {"tiny": "ti", "small": "s", "base": "b", "large": "l", "huge": "h", "giant": "g"}


def is_timm_folder_config(config: dict) -> bool:
    """Whether a config.json is that of a timm model folder (timm/vit_* on the Hugging Face Hub, or timm's
    ``save_for_hf``): it names timm's ``architecture`` where transformers' names a ``model_type``."""
    return isinstance(config.get("architecture"), str) and "model_type" not in config


def read_timm_folder(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """The weights of a timm model folder, in our names; one whose pooling this ViT cannot represent is refused."""
    arch = config["architecture"]
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise UserError(f"{folder} is a timm model folder ({arch}) without model.safetensors or pytorch_model.bin; "
                        f"copy the whole folder")
    state = from_timm(read_weights_file(weights))
    pool = (config.get("model_args") or {}).get("global_pool", config.get("global_pool", "token"))
    if pool == "avg" and "cls_token" in state:  # with fc_norm, from_timm has refused it already
        raise UserError(f"{folder}: timm's {arch} here averages the tokens beside its class token (global_pool='avg'), "
                        f"which this ViT cannot represent: pool 'cls' reads the class token and 'gap' has none")
    return state


def timm_heads(config: dict) -> int | None:
    """The attention heads a timm model folder's config.json declares, by its model_args or its architecture name."""
    args = config.get("model_args") or {}
    if isinstance(args.get("num_heads"), int):
        return args["num_heads"]
    m = re.match(r"(?:vit|deit)_([a-z]+)_patch", config["architecture"])
    size = _TIMM_SIZE_WORDS.get(m[1]) if m else None
    return SIZES[size].heads if size else None


def model_name(model: VisionTransformer) -> str:
    """The zoo name of ``model`` (e.g. 'vit_b16', 'vit_r50_b16'), or its dimensions when it has none."""
    size = next((name for name, s in SIZES.items() if s == model.size), None)
    stem = ""
    if isinstance(model.patch_embed, HybridEmbed):
        layers = tuple(len(stage.blocks) for stage in model.patch_embed.backbone.stages)
        stem = next((f"{name}_" for name, units in BACKBONES.items() if units == layers), None)
    if size is None or stem is None:
        w, d, h, m = model.size
        return f"the model (width {w}, depth {d}, {h} heads, MLP {m}, patch {model.patch_size})"
    return f"vit_{stem}{size}{model.patch_size}"


def load_into(
    model: VisionTransformer,
    state_dict: Mapping[str, torch.Tensor],
    interp: Interpolation = "bilinear",
    align_corners: bool = True,
    drop_heads: bool = False,
    source: str = "the checkpoint",
) -> None:
    """Load ``state_dict`` (our names) into ``model``, strictly; ``source`` names it in messages.

    A position-embedding grid other than the model's is resampled (``posemb.resample_posemb``, the
    [CLS] entry kept; ``interp`` and ``align_corners`` as there). ``drop_heads`` ignores the
    pre-logits and classifier on both sides, leaving the model's own: the start of a fine-tune.
    Any other missing, unexpected or misshapen key is a ``UserError`` naming the first one.
    """
    name = model_name(model)
    expected = model.state_dict()
    state = dict(state_dict)
    if drop_heads:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
        expected = {k: v for k, v in expected.items() if not k.startswith(HEAD_PREFIXES)}
    if "pos_embed" not in state and not any(k.startswith("blocks.") for k in state):
        first = ", ".join(list(state)[:3]) or "nothing"
        nested = sorted(k.removesuffix("pos_embed") for k in state if k.endswith(".pos_embed"))
        if nested:  # a ViT inside a module of the user's (Lightning's self.model, a distillation's student)
            raise UserError(f"{source} holds a ViT under the prefix '{nested[0]}' ({nested[0]}pos_embed), not at the top; "
                            f"save that module's own state_dict ({{k.removeprefix('{nested[0]}'): v ...}})")
        raise UserError(f"{source} holds no ViT weights (no pos_embed, no blocks.*; it holds {first}); give the "
                        f"weights of a ViT: a run of ours, an HF folder, a timm state dict or an official .npz")
    if ("cls_token" in state) != ("cls_token" in expected):
        has, lacks = ("has", "lacks") if "cls_token" in state else ("lacks", "has")
        pool = "cls" if "cls_token" in state else "gap"
        raise UserError(f"{source} {has} a class token and {name} {lacks} one; set model.pool={pool} ('cls' "
                        f"reads the class token, 'gap' averages tokens without one)")
    for key, want in expected.items():
        if key not in state:
            raise UserError(f"{source} lacks {key}, which {name} has{_hint(key, state, name, missing=True)}")
        if key == "pos_embed":
            state[key] = _fit_posemb(state[key], model, name, interp, align_corners)
        if state[key].shape != want.shape:
            raise UserError(
                f"{source} has {key} of shape {tuple(state[key].shape)} but {name} expects "
                f"{tuple(want.shape)}{_hint(key, state, name)}"
            )
    extra = next((k for k in state if k not in expected), None)
    if extra is not None:
        raise UserError(f"{source} has {extra}, which {name} does not have{_hint(extra, state, name)}")
    model.load_state_dict(state, strict=not drop_heads)


def _hint(key: str, state: Mapping[str, torch.Tensor], ours: str, missing: bool = False) -> str:
    if not key.startswith(HEAD_PREFIXES):
        named, shown = _zoo_name(state), _width_depth_patch(state)
        if named and named != ours:
            return f"; its weights are those of {named}: set model.name={named}"
        units = _stem_units(state)
        if units and units not in BACKBONES.values():
            zoo = "; ".join(f"{name}: {', '.join(map(str, u))}" for name, u in BACKBONES.items())
            return (f"; its ResNet stem has {', '.join(map(str, units))} units in its stages, which no hybrid of the "
                    f"zoo has ({zoo}, stride 16)")
        if shown and not named:
            return (f"; no size in the zoo has its width {shown[0]} and depth {shown[1]}: add one to SIZES in "
                    f"pretrain/models/zoo.py to load it")
        if missing and key.endswith(".bias") and key.removesuffix("bias") + "weight" in state:
            return (f"; its {key.removesuffix('.bias')} has no bias (timm's qkv_bias=False or proj_bias=False), "
                    f"which this ViT cannot represent")
        if missing and key.startswith("norm."):
            return "; it has no LayerNorm after the encoder (timm's final_norm=False), which this ViT cannot represent"
        return "; is it a checkpoint of another model?"
    if missing and key.startswith("pre_logits."):
        return "; a fine-tuned checkpoint goes into a model with head 'linear', or pass drop_heads=True"
    return "; to fine-tune from it with a new head, pass drop_heads=True"


def _width_depth_patch(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """What a plain ViT's weights show of its size, or None for other weights."""
    patch = state.get("patch_embed.proj.weight")
    if patch is None or patch.ndim != 4:
        return None
    return patch.shape[0], len({k.split(".")[1] for k in state if k.startswith("blocks.")}), patch.shape[-1]


def _zoo_name(state: Mapping[str, torch.Tensor]) -> str:
    """The zoo's name for a ViT's weights (width, depth, and patch size or ResNet stem), or "" if the zoo has none."""
    if (shown := _width_depth_patch(state)) is None:
        return ""
    width, depth, patch = shown
    size = next((n for n, s in SIZES.items() if (s.width, s.depth) == (width, depth)), None)
    if size and (units := _stem_units(state)):
        stem = next((name for name, u in BACKBONES.items() if u == units), None)
        return f"vit_{stem}_{size}16" if stem else ""
    return f"vit_{size}{patch}" if size else ""


def _stem_units(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """A hybrid's ResNet units per stage, () for a plain ViT."""
    stages: dict[int, int] = {}
    for key in state:
        if m := re.match(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.", key):
            stages[int(m[1])] = max(stages.get(int(m[1]), 0), int(m[2]) + 1)
    return tuple(stages[i] for i in sorted(stages))


def _fit_posemb(
    posemb: torch.Tensor, model: VisionTransformer, name: str, interp: Interpolation, align_corners: bool
) -> torch.Tensor:
    """The checkpoint's position embeddings on the model's grid; other widths are left to the shape check."""
    want = model.pos_embed.shape
    if posemb.shape == want or posemb.ndim != 3 or posemb.shape[-1] != want[-1]:
        return posemb
    n = posemb.shape[1]
    if model.num_prefix_tokens == 1 and math.isqrt(n) ** 2 == n:
        # timm's no_embed_class (FlexiViT): the class token gets no position embedding, which a zero one matches.
        posemb = torch.cat([posemb.new_zeros(1, 1, posemb.shape[-1]), posemb], dim=1)
        if posemb.shape == want:
            return posemb
    try:
        resampled = resample_posemb(
            posemb, model.grid, model.num_prefix_tokens, mode=interp, align_corners=align_corners
        )
    except ValueError as e:  # the grid part is not square
        raise UserError(
            f"the checkpoint's pos_embed of shape {tuple(posemb.shape)} holds no square grid of position embeddings, "
            f"so it cannot be resampled to the {model.grid[0]}x{model.grid[1]} grid of {name}"
        ) from e
    log.info("resampled position embeddings from %d to %dx%d tokens (%s, align_corners=%s)",
             posemb.shape[1] - model.num_prefix_tokens, *model.grid, interp, align_corners)
    return resampled
