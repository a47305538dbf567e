"""config.attention: which scaled_dot_product_attention kernels a GPU run uses.

PyTorch picks among flash, cuDNN and memory-efficient attention by a fixed priority, and the fastest depends on
the GPU and the shape: ViT's short sequences (197 tokens of ViT-B/16, 257 of ViT-H/14) are not what the long-context
kernels were tuned for. ``auto`` times the forward and backward of each on the model's own attention shape at start
(a second or so) and enables the fastest alone, with math as the fallback for a shape it cannot take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import UserError
from ..models.vit import VisionTransformer

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SWITCHES = {"flash": torch.backends.cuda.enable_flash_sdp, "cudnn": torch.backends.cuda.enable_cudnn_sdp,
            "efficient": torch.backends.cuda.enable_mem_efficient_sdp, "math": torch.backends.cuda.enable_math_sdp}


def time_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int = 5) -> float | None:
    """Milliseconds of one forward and backward with backend ``name`` alone; None where it does not take the shape."""
    grad = torch.randn_like(q)
    try:
        with sdpa_kernel(BACKENDS[name]):
            for i in range(2 + repeats):
                if i == 2:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                F.scaled_dot_product_attention(q, k, v).backward(grad)
            end.record()
            end.synchronize()
    except RuntimeError:  # "No available kernel", or a kernel that refuses this head size or GPU
        return None
    return start.elapsed_time(end) / repeats


def choose_attention(model: VisionTransformer, choice: str, micro: int, device: torch.device,
                     dtype: torch.dtype | None, announce: bool) -> None:
    """Enable the chosen SDPA kernels, process-wide and before compiling (a compiled graph keeps the kernel it
    traced); ``dtype``: the attention's inputs under autocast, None for fp32."""
    if device.type != "cuda":
        if choice not in ("auto", "math") and announce:
            print(f"warning: attention={choice} is a CUDA kernel; on {device.type} PyTorch picks its own", flush=True)
        return
    size = model.size
    shape = (micro, size.heads, model.num_prefix_tokens + model.grid[0] * model.grid[1], size.width // size.heads)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype or torch.float32, requires_grad=True) for _ in "qkv")
    if choice == "auto":
        times = {name: time_backend(name, q, k, v) for name in ("flash", "cudnn", "efficient")}
        runs = {name: ms for name, ms in times.items() if ms is not None}
        choice = min(runs, key=runs.get) if runs else "math"
        if announce:
            timed = ", ".join(f"{name} {ms:.2f} ms" for name, ms in runs.items()) or "none takes this shape"
            print(f"attention: {choice} (forward + backward of one layer: {timed})", flush=True)
    elif choice != "math" and time_backend(choice, q, k, v, repeats=1) is None:
        raise UserError(f"attention={choice}: this GPU or PyTorch build has no {choice} kernel for the model's "
                        f"attention ({dtype or torch.float32}, head size {shape[-1]}); use attention=auto")
    for name, switch in SWITCHES.items():
        switch(name in (choice, "math"))
