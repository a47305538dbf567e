"""Bytes one compiled encoder block moves, forward and backward, as torch.compile's inductor counts them.

    python benchmarks/block_bytes.py [--model vit_b16] [--batch 32]

The elementwise kernels (LayerNorm, GELU, residual adds, casts) run at the memory bandwidth on a GPU, so the
bytes their fused kernels read and write are what they cost; the count needs no GPU, and it is the same for
every step. This compiles one block of the model (as ``compile: true`` does) under bf16 autocast, with the
residual stream entering it in fp32 (the default) and in bf16 (``model.bf16_residual``), and prints a JSON line
for each: bytes per token of the fused kernels, of the external ones (matmuls, attention), and in all. On the
CPU, inductor fuses into C++ loops rather than Triton kernels, so the figures are close to, not equal to, a GPU's.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
import torch._inductor.compile_fx
import torch._inductor.metrics as inductor_metrics
from torch._inductor.scheduler import ExternKernelSchedulerNode

from pretrain.models.vit import Block
from pretrain.models.zoo import parse_name


def block_bytes(model: str, batch: int, residual: torch.dtype) -> dict:
    arch = parse_name(model)
    tokens = (224 // arch.patch_size) ** 2 + 1
    block = Block(arch.size, dropout=0.0, attn_dropout=0.0, norm_eps=1e-6)
    torch._dynamo.reset()
    inductor_metrics.reset()
    x = torch.randn(batch, tokens, arch.size.width, dtype=residual, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = torch.compile(block)(x)
    y.float().sum().backward()
    fused = extern = 0
    for node, words in inductor_metrics.nodes_num_elem:  # inductor records bytes // 4 for each kernel
        if isinstance(node, ExternKernelSchedulerNode):
            extern += 4 * words
        else:
            fused += 4 * words
    per_token = batch * tokens
    return {"model": model, "batch": batch, "residual": str(residual).removeprefix("torch."),
            "fused_bytes_per_token": round(fused / per_token), "extern_bytes_per_token": round(extern / per_token),
            "total_bytes_per_token": round((fused + extern) / per_token)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    # Inductor counts the bytes when it generates the kernels (not for a graph its cache holds), and only while
    # its metrics log is on: here a log that is on and prints nowhere.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    quiet = logging.getLogger("block_bytes.inductor_metrics")
    quiet.setLevel(logging.INFO)
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    torch._inductor.compile_fx.inductor_metrics_log = quiet
    for residual in (torch.float32, torch.bfloat16):
        print(json.dumps(block_bytes(args.model, args.batch, residual)), flush=True)


if __name__ == "__main__":
    main()
