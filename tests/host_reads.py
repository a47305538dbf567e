"""Counting the operations that make the host wait for the device, on any device (the CPU included)."""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SKIP = (str(Path(torch.__file__).parent), __file__)  # report the first caller outside torch and this file

# Reading a value (.item(), bool(), float(), a Python-scalar comparison) or a shape that depends on one.
WAITS = ("aten._local_scalar_dense", "aten.nonzero")


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads:`` lists in ``reads.where`` each waiting operation with the line that asked."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in WAITS:
            caller = next(f for f in reversed(traceback.extract_stack()) if not f.filename.startswith(SKIP))
            self.where.append(f"{func.overloadpacket} at {caller.filename}:{caller.lineno}")
        return func(*args, **(kwargs or {}))
