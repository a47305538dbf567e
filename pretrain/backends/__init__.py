"""Backends: where and how the step runs. One small interface (``base.Backend``), one file each."""

from __future__ import annotations

from ..config import Config
from .base import Backend


def create(config: Config) -> Backend:
    if config.backend == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(config)
    raise ValueError(f"unknown backend {config.backend}")
