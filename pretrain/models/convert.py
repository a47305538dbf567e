"""Weight interchange: Hugging Face transformers, timm and the paper's official JAX checkpoints, in and out.

Every format is read into a state dict in our parameter names (timm's) and loaded with ``load_into``:

- ``load_weights(path)``: any supported file or folder, detected by its form.
- ``from_hf(folder)`` builds the model a transformers folder describes; ``to_hf(model, folder)`` writes one
  (``convert_hf``).
- ``from_jax_npz(path)``: google-research/vision_transformer ``.npz`` files (``convert_jax``).
- ``from_timm(state_dict)``: timm ``VisionTransformer`` state dicts; ``load_into`` loads any of these into a
  model, resampling position embeddings to its grid (``convert_timm``).

Typical fine-tuning start: ``load_into(zoo.build_model(cfg), load_weights(path), drop_heads=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .convert_hf import from_hf, hf_to_ours, is_hf, read_hf, to_hf
from .convert_jax import from_jax_npz
from .convert_timm import check_weights_there, from_timm, load_into, model_name, read_weights_file

__all__ = ["check_weights_path", "from_hf", "from_jax_npz", "from_timm", "load_into", "load_weights", "model_name",
           "to_hf"]

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

    A folder with config.json is a transformers folder; ``.npz`` is an official JAX checkpoint;
    ``.safetensors`` and ``.pth``/``.pt``/``.bin`` hold a transformers, timm or our own state dict,
    told apart by their key names. Pickled files are read with ``weights_only=True``.
    """
    path = Path(path)
    check_weights_path(path)
    if path.is_dir():
        return read_hf(path)[1]
    if path.suffix == ".npz":
        return from_jax_npz(path)
    state = read_weights_file(path)
    return hf_to_ours(state) if is_hf(state) else from_timm(state)
