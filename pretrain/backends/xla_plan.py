"""What a recipe needs on a TPU slice under the xla backend: the mesh, the batch per device and the memory
per device, printed by ``python -m pretrain.run RECIPE backend=xla --dry-run`` (no TPU needed).

Chip figures are Google Cloud's (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e: "HBM capacity per chip",
"TensorCores per chip", 4 chips per TPU VM host). v4 and v5p slice names count TensorCores (v4-256 is 128
chips), v5e and v6e names count chips. PJRT shows one device per chip (v4 and v5p: a megacore).
"""

from __future__ import annotations

from typing import NamedTuple

from ..config import Config
from ..errors import UserError
from ..models.vit import VisionTransformer

GIB = 2**30


class Chip(NamedTuple):
    hbm_gib: float
    cores_per_chip: int  # what the slice name counts per chip
    chips_per_host: int = 4


CHIPS = {"v4": Chip(32, 2), "v5p": Chip(95, 2), "v5litepod": Chip(16, 1), "v6e": Chip(32, 1)}
SLICES = ("v4-256", "v5p-128")  # what the dry-run plans for unless asked for others


def mesh_axis(sharding: str) -> str:
    """FSDPv2 needs its mesh axis named ``fsdp``; plain data parallelism calls it ``data``."""
    return "fsdp" if sharding == "fsdpv2" else "data"


def chips(slice_name: str) -> tuple[Chip, int]:
    """'v4-256' -> (the v4 chip, 128 chips)."""
    kind, _, size = slice_name.rpartition("-")
    chip = CHIPS.get(kind)
    if chip is None or not size.isdigit() or int(size) % chip.cores_per_chip or int(size) == 0:
        names = ", ".join(f"{k}-N" for k in CHIPS)
        raise UserError(f"--slice {slice_name} is not a TPU slice name ({names}; v4 and v5p count TensorCores, two "
                        f"a chip: v4-256 is 128 chips)")
    return chip, int(size) // chip.cores_per_chip


def activation_bytes(model: VisionTransformer, batch: int) -> int:
    """Activations kept for the backward pass, bf16, no recomputation: per encoder layer
    s * b * (18 h + 4 m + 5 a s) bytes (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", eq. 2 with the MLP width m written out; 34 s b h + 5 a s^2 b when m = 4h)."""
    s = model.num_prefix_tokens + model.grid[0] * model.grid[1]
    h, layers, heads, m = model.size
    return layers * s * batch * (18 * h + 4 * m + 5 * heads * s)


def plan(config: Config, model: VisionTransformer, params: int, slices: list[str] | None = None) -> list[str]:
    """Lines for the dry-run: one per slice (default ``SLICES``)."""
    sharded = config.xla.sharding == "fsdpv2"
    moments = 2 if config.optim.name == "adamw" else 1
    micro = config.data.batch_size // config.optim.grad_accum
    lines = [(f"xla.sharding {config.xla.sharding}: a 1-D mesh (axis {mesh_axis(config.xla.sharding)}) of every "
              f"chip; GiB per device: fp32 params, grads, {config.optim.name} state, bf16 activations, before XLA's "
              f"buffers"),
             (f"{'slice':9} {'mesh':7} {'hosts':>5} {'batch/dev':>9} {'params':>7} {'grads':>6} {'optim':>6} "
              f"{'activ':>6} {'total':>6} {'HBM':>4} GiB")]
    for name in slices or SLICES:
        chip, n = chips(name)
        if micro % n:
            lines.append(f"{name:9} data.batch_size / optim.grad_accum = {micro} does not split over {n} chips")
            continue
        share = n if sharded else 1
        weights = 4 * params / share / GIB
        states = [weights, weights, moments * weights, activation_bytes(model, micro // n) / GIB]
        fix = "a larger slice or a smaller batch" if sharded else "xla.sharding=fsdpv2 or a smaller batch"
        fits = "" if sum(states) < chip.hbm_gib else f"  does not fit: {fix}"
        hosts = max(n // chip.chips_per_host, 1)
        if hosts > 1 and config.log.fewshot_every:  # the probe runs on one host: the trainer refuses it
            fits += "  refuses log.fewshot_every (several hosts): set it to 0"
        lines.append(f"{name:9} {f'({n},)':7} {hosts:5} {micro // n:9} "
                     + " ".join(f"{v:{w}.2f}" for v, w in zip(states, (7, 6, 6, 6)))
                     + f" {sum(states):6.1f} {chip.hbm_gib:4.0f}{fits}")
    return lines
