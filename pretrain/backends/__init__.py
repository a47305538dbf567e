"""Backends: where and how the step runs. One small interface (``base.Backend``), one file each.

Each backend's framework is imported only when a recipe picks it (deepspeed and torch-xla are
optional extras).
"""

from __future__ import annotations

from ..config import Config
from .base import Backend


def create(config: Config) -> Backend:
    if config.backend == "deepspeed":
        from .deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(config)
    if config.backend == "xla":
        from .xla_backend import XlaBackend

        return XlaBackend(config)
    from .torch_backend import TorchBackend

    return TorchBackend(config)
