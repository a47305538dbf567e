"""torch-xla: a TPU slice (or the XLA CPU device) under PJRT, as one SPMD program over every device.

Every TPU VM host runs the same ``python -m pretrain.run`` (PJRT_DEVICE=TPU), one process per host;
torch_xla's SPMD partitioner spreads each step over a 1-D mesh of all devices of the slice:

- ``xla.sharding: dp``: the batch is split over the mesh, model and optimizer state are replicated;
- ``xla.sharding: fsdpv2``: parameters, gradients and optimizer state are split too
  (``SpmdFullyShardedDataParallel``, every encoder block its own unit), for ViT-L/H.

For the data stream a host is a rank: it reads its part of the global batch, and ``to_device``
assembles the global batch from the hosts' parts (a ``minibatch`` ShardingSpec).

The loop never waits for the device: a non-finite gradient skips the update on the device (torch_xla's
sync-free optimizers take ``found_inf``), and the loss, the norm and the skip count are read at log
steps only. The graph is cut once per step (``mark_step``); the number of XLA compilations is logged
(``xla_compiles``), with a warning when a training step compiles again after warm-up.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dist_cp
import torch.nn.functional as F
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch_xla.amp import syncfree
from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner, SPMDSavePlanner
from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

from ..errors import UserError
from ..models.vit import Block
from ..train.optim import clip_and_flag, param_groups, recipe_settings_kept, set_lr
from ..weights_file import save_weights
from .base import Backend, collective_timeout
from .xla_plan import mesh_axis

WRAPPED = "._orig_module"  # what SpmdFullyShardedDataParallel adds to the names of a wrapped block's parameters


def count(metric: str) -> int:
    """How many times torch_xla recorded ``metric`` in this process."""
    data = met.metric_data(metric)
    return data[0] if data else 0


def compiles() -> int:
    return count("CompileTime")


@contextlib.contextmanager
def quiet_checkpointing():
    """Distributed checkpointing warns on every single-process call, and torch_xla's planners and sharded
    tensors about deprecated torch APIs they use: nothing a user can act on."""
    with warnings.catch_warnings():
        for text in ("torch.distributed is disabled", "The function definition for SavePlanner", "TypedStorage",
                     "Using a non-tuple sequence"):
            warnings.filterwarnings("ignore", message=text)
        yield


def pad_labels(labels: torch.Tensor, width: int) -> torch.Tensor:
    """(B, K) ids padded with -1 to ``width``: K rounded up to a power of two, so that a multi-label corpus compiles a
    handful of graphs instead of one per label count (K = 1, single-label, stays as it is)."""
    k = labels.shape[1]
    return labels if width == k else F.pad(labels, (0, width - k), value=-1)


class XlaBackend(Backend):
    spmd = True

    def __init__(self, config):
        super().__init__(config)
        xr.use_spmd()  # before any tensor reaches the device
        self.rank, self.world = xr.process_index(), xr.process_count()  # hosts
        if self.world > 1 and config.log.fewshot_every:
            raise UserError("log.fewshot_every probes the model on the first host alone, but SPMD runs it over every "
                            "host's chips; set log.fewshot_every=0 and probe a checkpoint with python -m "
                            "pretrain.evaluate --fewshot-train, on any machine (it holds the full weights)")
        self.device = torch_xla.device()
        n = xr.global_runtime_device_count()
        self.mesh = xs.Mesh(np.arange(n), (n,), (mesh_axis(config.xla.sharding),))
        xs.set_global_mesh(self.mesh)
        per_host = config.data.batch_size // config.optim.grad_accum // self.world
        if per_host % xr.addressable_runtime_device_count():
            raise UserError(f"data.batch_size {config.data.batch_size} / {config.optim.grad_accum} accumulation steps "
                            f"does not split over {n} XLA devices; make it a multiple of {n * config.optim.grad_accum}")
        if self.world > 1 and not dist.is_initialized():
            # host-side agreement and checkpoint planning
            dist.init_process_group("gloo", init_method="xla://", timeout=collective_timeout(config))
        # The first step compiles the step's graph, which every later one runs (setup compiled the optimizer's
        # state, and the loop's sums are data on the device from their start)
        self.warmup = 1
        self.steps = self.late_compiles = self.reported = 0
        self.stepped = False
        # Each label width (multi-label: 1, 2, 4, 8 ids) has graphs of its own, which its first steps compile as the
        # run's first steps do; so may the first step after an evaluation's graphs. Not counted as late compiles.
        self.expect_compile, self.width, self.steps_of_width = False, 1, Counter()

    @property
    def devices(self) -> int:
        return xr.global_runtime_device_count()

    def setup(self, model: nn.Module) -> None:
        model = model.to(self.device)
        self.module = model
        if self.config.xla.sharding == "fsdpv2":
            # Its wrapper's hooks fire on the blocks' outputs alone, as it means them to; torch warns of that once.
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                                      "respect to module outputs")
            policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block})
            self.model = SpmdFullyShardedDataParallel(model, mesh=self.mesh, auto_wrap_policy=policy)
        else:
            self.model = model  # parameters without a sharding annotation are replicated
        groups = param_groups(self.module, self.config.optim.weight_decay)
        cfg = self.config.optim
        if cfg.name == "adamw":
            self.optimizer = syncfree.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        else:
            self.optimizer = syncfree.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        self._create_optimizer_state()

    @property
    def local_devices(self) -> int:
        return xr.addressable_runtime_device_count()

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This host's images and labels as its part of the global batch, split over the mesh's devices."""
        labels = batch["labels"]
        width = 1 << (labels.shape[1] - 1).bit_length()
        if self.world > 1:  # the hosts' parts of a batch have one shape: the most labels of a sample on any host
            width = int(self.host_reduce([width], dist.ReduceOp.MAX)[0])
        self.width = width
        return self.put(batch["image"]), self.put(pad_labels(labels, width))

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """This host's rows (a multiple of its devices) as its part of the global batch."""
        spec = xs.ShardingSpec(self.mesh, (self.mesh.axis_names[0],) + (None,) * (t.dim() - 1), minibatch=True)
        return xm.send_cpu_data_to_device(t, self.device, spec)[0]

    def counter(self, value: float) -> torch.Tensor:
        """Replicated over the mesh, as a step's results are: one without the annotation is another graph."""
        t = super().counter(value)
        xs.mark_sharding(t, self.mesh, (None,))
        return t

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and update on the device; ``updated`` is a device tensor (a non-finite norm skips the update)."""
        norm, found_inf = clip_and_flag(self.module, self.config.optim.clip_grad_norm)
        set_lr(self.optimizer, lr)
        self.optimizer.step(found_inf=found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        self.stepped = True
        return norm, found_inf == 0

    def mark_step(self) -> None:
        before = compiles()
        torch_xla.sync()
        if not self.stepped:  # an evaluation's
            self.expect_compile = True
            return
        self.stepped = False
        self.steps += 1
        self.steps_of_width[self.width] += 1
        if self.steps_of_width[self.width] > self.warmup and not self.expect_compile:
            self.late_compiles += compiles() - before
        self.expect_compile = False

    def log_scalars(self) -> dict[str, float]:
        """XLA compilations and reads from the device in this process (the steps between two log steps read
        nothing); a warning when training steps compiled after warm-up."""
        if self.late_compiles > self.reported and self.is_main:
            print(f"warning: xla: {self.late_compiles - self.reported} training step(s) compiled a new graph after "
                  f"warm-up (step {self.steps} of this process): a shape or a Python value changes between steps; "
                  f"PT_XLA_DEBUG_LEVEL=2 shows why", file=sys.stderr, flush=True)
        self.reported = self.late_compiles
        return {"xla_compiles": compiles(), "xla_device_reads": count("TransferFromDeviceTime")}

    def _state(self) -> dict[str, Any]:
        """What distributed checkpointing writes: the model in our parameter names, and the optimizer."""
        model = {k.replace(WRAPPED, ""): v for k, v in self.module.state_dict().items()}
        return {"model": model, "optimizer": self.optimizer.state_dict()}

    def save(self, folder: Path) -> None:
        """Sharded model and optimizer state in ``sharded/`` (each host writes its shards), then the full
        weights for fine-tuning and export in ``model.safetensors``, assembled on the first host from those
        files: gathering sharded tensors on the device would compile one graph per parameter."""
        state = self._state()
        try:
            with quiet_checkpointing():
                dist_cp.save(state, storage_writer=dist_cp.FileSystemWriter(folder / "sharded"),
                             planner=SPMDSavePlanner())
                if not self.is_main:
                    return
                full = {"model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in state["model"].items()}}
                dist_cp.load(full, storage_reader=dist_cp.FileSystemReader(folder / "sharded"), no_dist=True)
        except CheckpointException as e:  # a BaseException wrapping each rank's (exception, traceback)
            if any(isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()):
                raise KeyboardInterrupt from None  # Ctrl-C while writing: the command's one line, as anywhere else
            raise RuntimeError(str(e)) from None
        save_weights(full["model"], folder / "model.safetensors")

    def load(self, folder: Path) -> None:
        state = self._state()
        try:
            with quiet_checkpointing():
                dist_cp.load(state, storage_reader=dist_cp.FileSystemReader(folder / "sharded"),
                             planner=SPMDLoadPlanner())
        except CheckpointException as e:  # a BaseException: make it the error checkpoint.load explains
            raise RuntimeError(str(e)) from None
        names = {k.replace(WRAPPED, ""): k for k in self.module.state_dict()}
        self.module.load_state_dict({names[k]: v for k, v in state["model"].items()})
        with recipe_settings_kept(self.optimizer):
            self.optimizer.load_state_dict(state["optimizer"])
        torch_xla.sync()

    def _create_optimizer_state(self) -> None:
        """The optimizer state, created by one update of a zero gradient, skipped (``found_inf``): the first
        training step is then one like every other (a graph of its own otherwise), and distributed checkpointing
        has the tensors it loads into, in the sync-free optimizers' own layout."""
        for p in self.module.parameters():
            p.grad = torch.zeros_like(p)
        self.optimizer.step(found_inf=torch.ones((), device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        torch_xla.sync()

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full weights on the CPU: SPMD tensors are global, ``cpu()`` gathers their shards."""
        return {k.replace(WRAPPED, ""): v.detach().cpu() for k, v in self.module.state_dict().items()}

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """SPMD values are global already and the same on every host: their sum over the hosts."""
        return t if self.world == 1 else t * self.world
