"""The seam between the training loop and a backend (torch / DDP, DeepSpeed, torch-xla).

The loop owns the data, the loss, the schedule and the checkpoint directory; a backend owns the
devices and processes, the wrapped model, the optimizer, gradient accumulation and clipping, and
how model and optimizer state are written to and read from a checkpoint directory.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config


def collective_timeout(config: Config) -> timedelta:
    """How long a collective waits for the slowest rank before the run is taken for hung: longer than a rank may
    wait by design, for storage that does not answer (``data.storage_patience_s``) or for rank 0 alone probing
    few-shot or writing a checkpoint. NCCL's default, 10 minutes, ended such runs with a watchdog abort."""
    return timedelta(seconds=max(1800.0, config.data.storage_patience_s + 600.0))


class Backend(ABC):
    rank: int
    world: int
    device: torch.device
    model: nn.Module  # what the loop calls forward on (maybe wrapped: DDP, an engine)
    module: nn.Module  # the model itself, unwrapped
    # One program over every host's devices (xla): a device tensor holds the global value, the same on every host,
    # and every host runs each program, with its part of the batch in the same shape.
    spmd = False

    @property
    def lockstep_eval(self) -> bool:
        """Whether a forward pass is a collective (SPMD; ZeRO-3 gathers the parameters), so that every rank must
        evaluate as many batches as the rank with the most."""
        return self.spmd

    def __init__(self, config: Config):
        self.config = config

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def devices(self) -> int:
        """Accelerators one step runs on, for TFLOP/s per device (xla: every device of the SPMD mesh)."""
        return self.world

    @abstractmethod
    def setup(self, model: nn.Module) -> None:
        """Move ``model`` to the device(s), wrap it, and build the optimizer from config.optim."""

    def micro_step(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; ``sync`` on the last of an accumulation."""
        return contextlib.nullcontext()

    @property
    def local_devices(self) -> int:
        """Devices that this process feeds its part of a batch to (xla: the host's chips)."""
        return 1

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch (a CPU tensor) on the device."""
        return t.to(self.device, non_blocking=True)

    def counter(self, value: float) -> torch.Tensor:
        """``value`` in a one-element tensor on the device, for a sum that the steps add to. Copied from the host:
        under xla a tensor made on the device (``torch.zeros``), or a 0-d one of 0 or 1 copied there, is a constant
        of the graph that reads it, so that a step adding to a fresh one would compile a graph of its own."""
        return torch.tensor([value]).to(self.device, non_blocking=True)

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (images, labels) of a CPU batch from the data stream, on the device."""
        return self.put(batch["image"]), self.put(batch["labels"])

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (already divided by the accumulation count)."""

    @abstractmethod
    def step(self, lr: float) -> tuple[torch.Tensor, bool | torch.Tensor]:
        """Clip, then update with ``lr`` unless the gradient is non-finite; (grad norm, updated).

        ``updated`` may be a bool tensor on the device (xla), so as not to wait for the device every step:
        the loop then counts skipped steps on the device and checks them at log and checkpoint steps.
        """

    def mark_step(self) -> None:
        """The end of one unit of device work (a training step, an eval batch): xla cuts and runs its lazy graph."""

    def log_scalars(self) -> dict[str, float]:
        """The backend's own scalars for the log steps (xla: its compilation count)."""
        return {}

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write model and optimizer state into ``folder`` (called on every rank)."""

    def check_resumable(self, folder: Path, state: dict) -> None:
        """Refuse, before ``setup``, a checkpoint (its ``state``) this backend's setup cannot load."""

    @abstractmethod
    def load(self, folder: Path) -> None:
        """Read what ``save`` wrote (called on every rank)."""

    @abstractmethod
    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's full weights in our parameter names, on the CPU (for export and fine-tuning)."""

    def autocast_dtype(self) -> torch.dtype | None:
        """What the forward's matmuls run in under autocast: bf16 on GPUs and TPUs, None (no autocast) on the CPU."""
        bf16 = self.config.precision in ("bf16", "float8") and self.device.type in ("cuda", "xla")
        return torch.bfloat16 if bf16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype()
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any; reduced on the hosts' CPUs (gloo), so asking every step
        never waits for the devices."""
        return bool(self.host_reduce([float(flag)], dist.ReduceOp.MAX)[0])

    def host_reduce(self, values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
        """``values`` of every rank reduced elementwise (default: summed) on the hosts' CPUs (gloo)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=self.host_group())
        return t.tolist()

    def host_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, gathered over the hosts' CPUs: for what each rank counts on its host."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.host_group())
        return out

    def host_group(self) -> dist.ProcessGroup | None:
        """A gloo group of every rank (None: the default one is gloo), which never waits for the devices."""
        if not hasattr(self, "_host_group"):  # the first call is on every rank at once, as new_group needs
            timeout = collective_timeout(self.config)
            self._host_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        return self._host_group

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self, finished: bool = True) -> None:
        """Leave the process group; ``finished``: every rank got here alike (not on the way out of an error)."""
        if dist.is_initialized():
            dist.destroy_process_group()
