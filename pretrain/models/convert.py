"""Weight interchange: Hugging Face transformers, timm and the paper's official JAX checkpoints, in and out.

Every format is read into a state dict in our parameter names (timm's) and loaded with ``load_into``:

- ``load_weights(path)``: any supported file or folder, detected by its form; ``declared(path)``: what the files
  say of the model that the weights' shapes do not (attention heads, LayerNorm epsilon).
- ``from_hf(folder)`` builds the model a transformers folder describes; ``to_hf(model, folder)`` writes one
  (``convert_hf``).
- ``from_jax_npz(path)``: google-research/vision_transformer ``.npz`` files (``convert_jax``).
- ``from_timm(state_dict)``: timm ``VisionTransformer`` state dicts; ``load_into`` loads any of these into a
  model, resampling position embeddings to its grid (``convert_timm``).

Typical fine-tuning start: ``load_into(zoo.build_model(cfg), load_weights(path), drop_heads=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import UserError
from .convert_hf import from_hf, hf_to_ours, is_hf, read_config, read_hf, read_json, to_hf
from .convert_jax import from_jax_npz, npz_heads
from .convert_timm import (check_weights_there, from_timm, is_timm_folder_config, load_into, model_name,
                           read_timm_folder, read_weights_file, timm_heads)

__all__ = ["Declared", "check_weights_path", "declared", "from_hf", "from_jax_npz", "from_timm", "load_into",
           "load_weights", "model_name", "to_hf"]

_FOLDER_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar")  # .pth.tar: what timm's train.py saves


def check_weights_path(path: Path) -> None:
    """That ``path`` is there and of a form ``load_weights`` reads, without reading it."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is a folder without config.json; give a transformers model folder or a "
                            f"weights file (.npz, .safetensors, {', '.join(_TORCH_SUFFIXES)})")
    elif not path.is_file():
        raise UserError(f"{path} does not exist")
    elif not path.name.endswith((".npz", ".safetensors", *_TORCH_SUFFIXES)):
        raise UserError(f"{path}: unknown weights format '{path.suffix}'; give a transformers model folder or a "
                        f".npz, .safetensors or {', '.join(_TORCH_SUFFIXES)} file")
    else:
        check_weights_there(path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights at ``path`` as a state dict in our names, whatever their format.

    A folder with config.json is a transformers folder, or timm's when its config names an ``architecture``;
    ``.npz`` is an official JAX checkpoint; ``.safetensors`` and ``.pth``/``.pt``/``.bin`` hold a transformers,
    timm or our own state dict, told apart by their key names (a transformers file's config.json beside it is
    checked as its folder's would be). Pickled files are read with ``weights_only=True``.
    """
    path = Path(path)
    check_weights_path(path)
    if path.is_dir():
        config = read_json(path / "config.json")
        return read_timm_folder(path, config) if is_timm_folder_config(config) else read_hf(path)[1]
    if path.suffix == ".npz":
        return from_jax_npz(path)
    state = read_weights_file(path)
    if not is_hf(state):
        return from_timm(state)
    if _in_its_folder(path):
        read_config(path.parent)
    return hf_to_ours(state)


def _in_its_folder(path: Path) -> bool:
    """Whether a weights file is a transformers or timm folder's own (that folder's config.json describes it)."""
    return bool(_FOLDER_WEIGHTS.fullmatch(path.name)) and (path.parent / "config.json").is_file()


class Declared(NamedTuple):
    """What the files of some weights say of the model that the weights' shapes cannot: ``heads`` (q, k and v
    are split into heads after the projection) and the LayerNorms' ``norm_eps``; None where they do not say."""

    heads: int | None = None
    norm_eps: float | None = None


def declared(path: str | Path) -> Declared:
    """``Declared`` of weights that ``load_weights`` reads: a transformers or timm folder's config.json (or the one
    beside such a folder's weights file), an official .npz's query kernels."""
    path = Path(path)
    if path.suffix == ".npz":
        return Declared(heads=npz_heads(path))
    if not path.is_dir() and not _in_its_folder(path):
        return Declared()
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    config = read_json(config_path)
    if is_timm_folder_config(config):
        return Declared(heads=timm_heads(config))
    if config.get("model_type") != "vit":
        return Declared()
    config = read_config(config_path.parent)
    return Declared(heads=config["num_attention_heads"], norm_eps=config["layer_norm_eps"])
