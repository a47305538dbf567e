"""Plain PyTorch: the CPU, one GPU, or DistributedDataParallel over torchrun's processes."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..train.optim import build_optimizer, clip_in_step, grad_norm, recipe_settings_kept, set_lr
from ..weights_file import save_weights
from .base import Backend, collective_timeout


class TorchBackend(Backend):
    def __init__(self, config):
        super().__init__(config)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            cuda = self.device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None,
                                    timeout=collective_timeout(config))

    def setup(self, model: nn.Module) -> None:
        self.module = model.to(self.device)
        self.model = DistributedDataParallel(self.module) if self.world > 1 else self.module
        self.optimizer = build_optimizer(self.module, self.config.optim)

    def close(self, finished: bool = True) -> None:
        if isinstance(getattr(self, "model", None), DistributedDataParallel):
            # DDP's reducer holds the process group. Dropped after the group is destroyed (when the trainer goes),
            # its last reference destroys the group, which joins gloo's threads while holding the GIL, as one of them
            # waits for the GIL to free a tensor: a hang at exit. Dropped here, those threads finish while this one
            # waits in the barrier, which releases the GIL; only when every rank finished, or it would wait for
            # ranks that wait for this one in a collective.
            self.model = self.module
            if finished:
                dist.barrier()
        super().close(finished)

    def micro_step(self, sync: bool):
        if self.world > 1 and not sync:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and update without waiting for the device: a non-finite norm skips the update there (DDP: the
        gradients are all-reduced, so every rank skips alike)."""
        norm = grad_norm(self.module)
        found_inf = clip_in_step(self.optimizer, norm, self.config.optim.clip_grad_norm)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, found_inf == 0

    def save(self, folder: Path) -> None:
        if self.is_main:
            save_weights({k: v.contiguous() for k, v in self.module.state_dict().items()}, folder / "model.safetensors")
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        self.module.load_state_dict(load_file(folder / "model.safetensors", device=str(self.device)))
        state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        with recipe_settings_kept(self.optimizer):
            self.optimizer.load_state_dict(state)

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t
