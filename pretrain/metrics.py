"""What a run shows: TensorBoard events, metrics.jsonl (the same scalars, a JSON line per log step) and a
console line with ETA. Throughput: img/s, TFLOP/s and MFU against a per-device bf16 peak table.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity).
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "V100": 125e12,  # fp16 tensor cores
    "MI300X": 1307e12,
    "TPU v4": 275e12,
    "TPU v5p": 459e12,
    "TPU v5e": 197e12,
    "TPU v6e": 918e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The table's peak for this device, None where unknown (the CPU)."""
    if device.type == "xla":  # SPMD's virtual device has no kind to ask: the TPU VM's accelerator type names it
        import torch_xla.runtime as xr

        if xr.device_type() != "TPU":
            return None
        from torch_xla._internal import tpu

        try:
            return PEAK_BF16.get(tpu_generation(tpu.get_tpu_type()))
        except (OSError, KeyError, ValueError):  # no TPU metadata to read
            return None
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def tpu_generation(accelerator: str) -> str:
    """The table's name for a TPU VM's accelerator type ("v4", "v5litepod", "v5p", "v6e"; with or without its "-N"
    chips), or ''."""
    kind = accelerator.lower().split("-")[0]
    names = {"v4": "TPU v4", "v5litepod": "TPU v5e", "v5e": "TPU v5e", "v5p": "TPU v5p", "v6e": "TPU v6e"}
    return names.get(kind, "")


SHARES = {"data_wait"}  # fractions of the step time, shown on the console as percentages (kept as fractions in the logs)


def shown(value: float) -> str:
    """A figure for the console line: whole numbers as such, large ones without an exponent (27760, not 2.776e+04)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def keep_rows_through(path: Path, step: int) -> None:
    """Rewrites metrics.jsonl (atomically) without the rows logged after ``step`` (all of them for step 0, a run
    that starts over); a line cut short by a kill goes too."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if step and line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class Metrics:
    """Written by rank 0 only; other ranks get a Metrics whose methods do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int, train_flops_per_image: float,
                 device: torch.device):
        self.enabled, self.start_step, self.total_steps = enabled, start_step, total_steps
        self.flops, self.peak = train_flops_per_image, peak_flops(device)
        self.device = device
        self.started = time.perf_counter()
        if enabled:
            # A resumed run logs again what came after its checkpoint (all of it when the run starts over): the
            # rows past the start go, and TensorBoard hides the events past it (purge_step).
            keep_rows_through(Path(run_dir) / "metrics.jsonl", start_step)
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else 0)
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")

    def throughput(self, images: int, seconds: float, devices: int) -> dict[str, float]:
        out = {"img_per_s": images / seconds}
        if self.flops and self.device.type != "cpu":  # a CPU has no meaningful peak: img/s only
            tflops = images * self.flops / seconds / devices / 1e12
            out["tflops_per_device"] = tflops
            if self.peak:
                out["mfu"] = tflops * 1e12 / self.peak
        if self.device.type == "cuda":
            out["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return out

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
        self.jsonl.flush()
        self.tb.flush()
        print(self._line(step, scalars, prefix), flush=True)

    def _line(self, step: int, scalars: dict[str, float], prefix: str) -> str:
        parts = [f"{prefix} step {step}/{self.total_steps}"]
        parts += [f"{k} {v:.1%}" if k in SHARES else f"{k} {shown(v)}" for k, v in scalars.items()]
        elapsed = time.perf_counter() - self.started
        if prefix == "train" and step > self.start_step:
            left = elapsed / (step - self.start_step) * (self.total_steps - step)
            parts.append(f"eta {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}")
        return " | ".join(parts)

    def images(self, step: int, batch: torch.Tensor) -> None:
        """A grid of input images (uint8, as the model receives them before normalisation)."""
        if self.enabled:
            self.tb.add_images("train/inputs", batch[:64].cpu(), step)  # TensorBoard tiles them in a square grid

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
