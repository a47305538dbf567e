"""DeepSpeed ZeRO (stages 0-3) over the processes of torchrun or of the deepspeed launcher.

The recipe states the batch split, gradient accumulation, clipping and ZeRO stage once; ``ds_config`` translates
them, and the run directory keeps the result (deepspeed_config.json). The optimizer is ours
(``train.optim.build_optimizer``), handed to the engine, and so is the learning-rate schedule: ``step`` sets the
lr the loop passes.

Precision: the engine runs in fp32 and bf16 comes from torch autocast (``Backend.autocast``: on CUDA, not on the
CPU), as in the torch backend, rather than from DeepSpeed's bf16 mode. DeepSpeed's bf16 mode stores the weights
themselves in bf16 and runs every op in bf16, LayerNorm and softmax included; autocast keeps fp32 weights and runs
the matmuls in bf16. So the two backends compute the same thing (loss curves and checkpoints agree), checkpoints
hold fp32 weights as trained, and the fp32 ZeRO path checks every step's gradient norm and skips a non-finite one.
The price is fp32 gradient reduction and fp32 weights in memory (ZeRO still shards them). The engine's forward
turns off an autocast it was not told of, so the config repeats ours in its ``torch_autocast`` section, with no
module whose gradients it would then reduce in bf16.

A checkpoint folder gets the engine's files in ``deepspeed/`` (each rank its own optimizer shard) and, below
ZeRO-3, ``model.safetensors`` from rank 0; a ZeRO-3 checkpoint gets it from ``python -m pretrain.consolidate``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..errors import UserError
from ..models.vit import Block
from ..train.loop import micro_batch
from ..train.optim import build_optimizer, clip_in_step, grad_norm, recipe_settings_kept, set_lr
from ..weights_file import save_weights
from .base import Backend, collective_timeout
from .torch_backend import TorchBackend

try:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
except ImportError:
    raise UserError("backend=deepspeed needs the deepspeed package; pip install vit-pretrain[gpu]") from None

TAG = "deepspeed"  # the engine's folder inside a checkpoint folder (its "tag")
CONFIG_FILE = "deepspeed_config.json"


def ds_config(config: Config, world: int, autocast: bool) -> dict:
    """The DeepSpeed config of a recipe; ``autocast``: the loop runs the forward under bf16 autocast."""
    stage = config.deepspeed.zero_stage
    return {
        "train_batch_size": config.data.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch(config, world),
        "gradient_accumulation_steps": config.optim.grad_accum,
        # Ours, inside the fused optimizer's step (DeepSpeedBackend.step): ZeRO-1/2's own clipping reads the norm
        # on the host once per parameter group, and stage 0 neither reports the norm nor skips a non-finite step.
        "gradient_clipping": 0.0,
        # ZeRO-1/2: the norm and the skip are ours too; its own norm waits for the device (a read, and a blocking
        # copy of a constant to the device per parameter group), after which the GPU idles while the host works.
        "zero_optimization": {"stage": stage, **({"compute_grad_norm": False} if stage in (1, 2) else {}),
                              # ZeRO-3 gathers an encoder block's weights at once, as FSDP's per-block wrapping does,
                              # rather than each Linear's and LayerNorm's: its hooks on those broke a compiled block
                              # into a graph per layer, and each new kind of layer recompiled the hooks themselves.
                              **({"leaf_module": {"classes": [f"{Block.__module__}.{Block.__qualname__}"]}}
                                 if stage == 3 else {})},
        "bf16": {"enabled": False},  # bf16 is torch autocast: see the module docstring
        "torch_autocast": {"enabled": autocast, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "zero_allow_untested_optimizer": True,  # SGD: ZeRO shards any element-wise torch optimizer
    }


class DeepSpeedBackend(TorchBackend):
    """The collectives (all_reduce_sum, any) are the torch backend's: DeepSpeed runs on
    torch.distributed's process group."""

    def __init__(self, config: Config):
        Backend.__init__(self, config)  # not TorchBackend's: DeepSpeed picks the device and the process group
        self.stage = config.deepspeed.zero_stage
        local_ranks = int(os.environ.get("LOCAL_SIZE", "1"))  # DeepSpeed's launcher's; torchrun sets OMP_NUM_THREADS
        if "OMP_NUM_THREADS" not in os.environ and local_ranks > 1:  # else each rank takes every core
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))  # the cores Slurm bound
        accelerator = get_accelerator()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        accelerator.set_device(local)
        self.device = torch.device(accelerator.device_name(local))
        if "RANK" not in os.environ and not dist.is_initialized():
            # One process without a launcher (one GPU, python -m pretrain.evaluate): a group of one, no rendezvous,
            # and the variable the engine asks of every launcher.
            dist.init_process_group(accelerator.communication_backend_name(), store=dist.HashStore(), rank=0,
                                    world_size=1)
            os.environ["LOCAL_RANK"] = "0"
        deepspeed.init_distributed(timeout=collective_timeout(config))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def lockstep_eval(self) -> bool:
        return self.stage == 3 and self.world > 1

    def setup(self, model: nn.Module) -> None:
        model.to(self.device)
        self.optimizer = build_optimizer(model, self.config.optim)
        config = self.ds_config = ds_config(self.config, self.world, self.autocast_dtype() is not None)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        self.model, self.module = self.engine, self.engine.module
        if self.stage == 3:
            self.optimizer.register_step_pre_hook(self._clip_in_step)

    def _clip_in_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """ZeRO-3 steps our optimizer on its flat fp32 partitions (once per parameter group) after computing the
        global gradient norm over all ranks and skipping a non-finite step; its norm clips in the fused step."""
        clip_in_step(optimizer, self.engine.optimizer._global_grad_norm, self.config.optim.clip_grad_norm)

    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm, on the device: stage 0 over the module's gradients; ZeRO-1/2 over the part of
        them this rank's optimizer steps (what ZeRO's own norm reads), summed over the ranks."""
        if self.stage == 0:
            return grad_norm(self.module)
        zero = self.engine.optimizer
        grads = [g for group in zero.averaged_gradients.values() for g in group or ()
                 if not getattr(g, "_zero_padding", False)]
        squares = nn.utils.get_total_norm(grads).square() if grads else torch.zeros((), device=self.device)
        dist.all_reduce(squares, group=zero.dp_process_group)
        return squares.sqrt()

    @contextlib.contextmanager
    def micro_step(self, sync: bool):
        self.engine.set_gradient_accumulation_boundary(sync)  # the loop's count of micro-batches, not the engine's
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop has divided the loss by grad_accum

    def step(self, lr: float) -> tuple[torch.Tensor, bool | torch.Tensor]:
        set_lr(self.optimizer, lr)  # the torch optimizer's groups, which ZeRO steps
        if self.stage < 3:  # as the torch backend: clip, and skip a non-finite update on the device
            norm = self._grad_norm()
            found_inf = clip_in_step(self.optimizer, norm, self.config.optim.clip_grad_norm)
            self.engine.step()
            return norm, found_inf == 0
        # ZeRO-3 computes the norm over all ranks and skips a non-finite step, reading the norm on the host once
        # before its update (_clip_in_step clips); the norm stays on the device (a float after a skip).
        self.engine.step()
        return torch.as_tensor(self.engine.get_global_grad_norm()), self.engine.was_step_applied()

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False)  # the `latest` pointer is ours
        if self.stage < 3 and self.is_main:
            save_weights(self.model_state(), folder / "model.safetensors")
        if self.is_main:  # written with a checkpoint, so that a resume refused (another stage) leaves it as it was
            (Path(self.config.run_dir) / CONFIG_FILE).write_text(json.dumps(self.ds_config, indent=2) + "\n")

    def check_resumable(self, folder: Path, state: dict) -> None:
        if not (folder / TAG).is_dir():
            raise UserError(f"checkpoint {folder} lacks the engine's files ({TAG}/); resume from another checkpoint, "
                            f"or give a new run_dir to start fresh")

    def load(self, folder: Path) -> None:
        with recipe_settings_kept(self.optimizer):
            self.engine.load_checkpoint(str(folder), tag=TAG)

    def model_state(self) -> dict[str, torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), enabled=self.stage == 3):
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
