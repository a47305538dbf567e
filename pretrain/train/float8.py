"""precision=float8: the encoder's dense layers run their matmuls in float8 (torchao's ``Float8Linear``).

torchao's tensorwise recipe with dynamic scaling: every matmul (output, input gradient, weight gradient)
scales its operands by their absolute maxima of this step, e4m3 forward and e5m2 for output gradients. The
layers keep no state, and their weights stay fp32 parameters under the same names, so checkpoints, resume,
fine-tuning and export are as with bf16. The patch embedding (a convolution), pre-logits and classifier keep
bf16, as torchtitan keeps its output layer: a small share of the FLOPs, and the layers nearest the loss.
Everything else runs under bf16 autocast, as with precision=bf16.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import UserError
from ..models.vit import VisionTransformer

MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with float8 tensor cores
ALIGN = 16  # torch._scaled_mm: the inner size of every matmul is a multiple of 16


def use_float8(model: VisionTransformer, config: Config, device: torch.device, micro: int) -> None:
    """Under precision=float8, swap the encoder blocks' ``nn.Linear`` for ``Float8Linear`` in place (before
    compiling); ``micro`` is the micro-batch per rank."""
    if config.precision != "float8":
        return
    if config.backend == "xla":
        raise UserError("precision=float8 runs float8 matmuls on a GPU (torchao), which torch-xla does not; "
                        "use precision=bf16 on TPUs")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"precision=float8 needs float8 tensor cores (compute capability 8.9 or newer: L4, L40, H100, "
                        f"H200, B200); {torch.cuda.get_device_name(device)} has {major}.{minor}; use precision=bf16")
    if device.type == "cpu" and config.compile:
        raise UserError("precision=float8 with compile=true crashes torch's CPU compiler (inductor) in the backward; "
                        "on the CPU use compile=false (on a GPU, torchao's float8 is meant to be compiled)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError("precision=float8 needs torchao; install it with pip install -e '.[gpu]'") from None
    tokens = model.num_prefix_tokens + model.grid[0] * model.grid[1]
    # The weight gradient's matmul runs over the micro-batch's tokens; pad them only where they do not align.
    settings = Float8LinearConfig(pad_inner_dim=(micro * tokens) % ALIGN != 0)
    convert_to_float8_training(model.blocks, config=settings)  # every zoo width and MLP size is a multiple of 16
