"""Writing ``model.safetensors`` files that others may read as they may read the folder holding them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then the mode a file created in ``path``'s folder would get.

    safetensors (0.8) writes through a private temporary file, so the result is 0600 whatever the umask: on a
    shared file system the team could not read the weights beside a readable optimizer state and state.json.
    The folder's mode, without execute bits, is the file mode its umask gives.
    """
    save_file(tensors, path, metadata=metadata)
    readable_as_its_folder(path)


def readable_as_its_folder(path: Path) -> None:
    """Give a file written by safetensors the mode its folder's umask would have given it (see save_weights)."""
    os.chmod(path, stat.S_IMODE(os.stat(path.parent).st_mode) & 0o666)
