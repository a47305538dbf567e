"""Training throughput of our trainer's real step, beside timm and Hugging Face transformers on the same device.

    python benchmarks/throughput.py RECIPE [key=value ...] [--data synthetic shards] [--compare timm timm-compiled hf]
                                    [--shards PATH | --images N] [--steps 50] [--warmup 10] [--loss-check 200]
                                    [--profile DIR]

    python benchmarks/throughput.py recipes/vit_b16_i21k.yaml data.batch_size=256 compile=true data.workers=16

"ours" is ``Trainer.train_step``, the step the training loop runs: the recipe's model, loss, fused optimizer,
clipping, backend (torch or deepspeed), bf16 autocast and compile setting. ``--data synthetic`` repeats one batch
that came through the stream (the step alone); ``--data shards`` reads the stream itself, from ``--shards`` or,
without it, from ``--images`` ImageNet-like JPEGs (500x375, ~105 kB) sharded into a temporary folder. The
references train the same architecture (timm's VisionTransformer, transformers' ViTForImageClassification with
sdpa attention) with fused AdamW, the same autocast and clipping, on random tensors already on the device.

Each run prints one JSON line: img/s, TFLOP/s (3x forward FLOPs counted by torch), MFU against a dense matmul
measured in this process (bf16 on a GPU, fp32 on the CPU; bf16 under precision=float8 too, as torchtitan counts,
so float8's gain shows as MFU) and against the data sheet, peak memory, and for ours
the share of time spent waiting for data. ``--loss-check N`` trains N steps from the same start with the recipe
and with its plain path (compile=false, data.decode=host, bf16 for float8, an fp32 residual stream) and prints both
final losses.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import recipe  # noqa: E402
from pretrain.cli import OneLineParser, command  # noqa: E402
from pretrain.config import Config  # noqa: E402
from pretrain.data import shards  # noqa: E402
from pretrain.metrics import peak_flops  # noqa: E402
from pretrain.models.zoo import parse_name  # noqa: E402
from pretrain.train.loop import Trainer, new_window  # noqa: E402

REFERENCES = ("timm", "timm-compiled", "hf")


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_tflops(dev: torch.device) -> tuple[float, str]:
    """Dense matmul TFLOP/s of this device: bf16 8192^3 on a GPU, fp32 1024^3 on the CPU."""
    n, dtype, iters = (8192, torch.bfloat16, 50) if dev.type == "cuda" else (1024, torch.float32, 10)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(dev)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12, str(dtype).removeprefix("torch.")


def release(dev: torch.device) -> None:
    """Free what the last run left (its model and optimizer went out of scope) before the next one."""
    gc.collect()
    torch._dynamo.reset()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def significant(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures: a tiny CPU model's TFLOP/s must not print as 0.0."""
    return float(f"{x:.{digits}g}")


def figures(images: int, seconds: float, flops_per_image: float, peak: tuple[float, str], dev: torch.device) -> dict:
    tflops = images * flops_per_image / seconds / 1e12
    sheet = peak_flops(dev)
    return {"img_per_s": round(images / seconds, 2), "tflops": significant(tflops), "mfu": significant(tflops / peak[0]),
            "mfu_datasheet": significant(tflops * 1e12 / sheet) if sheet else None,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else None}


class Repeat:
    """One batch over and over, in place of the stream's batches (``--data synthetic``)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __next__(self) -> dict:
        return self.batch

    def close(self) -> None:
        pass


def profile_steps(trainer: Trainer, steps: int, path: Path) -> None:
    """Write the kernels of ``steps`` more steps, by their own device time (CPU time on the CPU), to ``path``."""
    dev = trainer.backend.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    window = new_window(trainer.backend)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            norm = trainer.train_step(window)
        norm.item()
        sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def ours(config: Config, data: str, steps: int, warmup: int, peak: tuple[float, str],
         profile: Path | None = None) -> dict:
    trainer = Trainer(config)
    dev = trainer.backend.device
    try:
        if data == "synthetic":
            batch = next(trainer.batches)
            trainer.batches.close()
            if dev.type == "cuda" and not batch["image"].is_cuda:
                batch["image"] = batch["image"].pin_memory()  # as the loader hands it over
            trainer.batches = Repeat(batch)
        window = new_window(trainer.backend)
        for _ in range(warmup):
            norm = trainer.train_step(window)
        norm.item()
        sync(dev)
        window = new_window(trainer.backend)
        start = time.perf_counter()
        for _ in range(steps):
            norm = trainer.train_step(window)
        norm.item()
        sync(dev)
        seconds = time.perf_counter() - start
        out = {"run": "ours", "data": data, "backend": config.backend, "compile": config.compile,
               **figures(window["images"], seconds, trainer.train_flops, peak, dev),
               "data_wait": round(window["wait"] / seconds, 4), "loss": round(window["loss"].item() / steps, 5)}
        if config.backend == "deepspeed":
            out["zero_stage"] = config.deepspeed.zero_stage
        if profile:
            profile_steps(trainer, 3, profile / f"ours-{data}.txt")
        return out
    finally:
        trainer.close()  # the backend's process group stays: DeepSpeed keeps using the first one in a process


def reference_model(kind: str, config: Config) -> tuple[torch.nn.Module, callable]:
    """(model, forward returning logits) of the recipe's architecture in timm or transformers."""
    arch, m = parse_name(config.model.name), config.model
    size, patch = arch.size, arch.patch_size
    if kind.startswith("timm"):
        import timm

        dims = {"img_size": m.image_size, "num_classes": m.num_classes, "embed_dim": size.width, "depth": size.depth,
                "num_heads": size.heads, "mlp_ratio": size.mlp_dim / size.width}
        if arch.backbone is not None:  # the zoo's one stem, BiT's ResNet-50 to stage 3, as timm's R50+ViT-B/16
            model = timm.create_model("vit_base_r50_s16_224", pretrained=False, **dims)
        else:
            model = timm.models.vision_transformer.VisionTransformer(patch_size=patch, **dims)
        return model, model
    from transformers import ViTConfig, ViTForImageClassification

    hf = ViTConfig(image_size=m.image_size, patch_size=patch, num_labels=m.num_classes, hidden_size=size.width,
                   num_hidden_layers=size.depth, num_attention_heads=size.heads, intermediate_size=size.mlp_dim)
    model = ViTForImageClassification._from_config(hf, attn_implementation="sdpa")
    return model, lambda x: model(pixel_values=x).logits


def reference(kind: str, config: Config, steps: int, warmup: int, peak: tuple[float, str]) -> dict:
    dev = device()
    model, forward = reference_model(kind, config)
    model.to(dev).train()
    # Counted as ours is (zoo.forward_flops): the math attention kernel's matmuls, which a fused kernel would hide.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        forward(torch.zeros(1, 3, config.model.image_size, config.model.image_size, device=dev))
    flops = 3 * counter.get_total_flops()
    if kind == "timm-compiled":
        forward = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    accum = config.optim.grad_accum
    micro = config.data.batch_size // accum
    x = torch.randn(micro, 3, config.model.image_size, config.model.image_size, device=dev)
    y = torch.randint(0, config.model.num_classes, (micro,), device=dev)
    bf16 = config.precision in ("bf16", "float8") and dev.type == "cuda"  # the references have no float8 path

    def step() -> None:
        for _ in range(accum):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(forward(x).float(), y) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    seconds = time.perf_counter() - start
    return {"run": kind, "data": "synthetic", **figures(steps * config.data.batch_size, seconds, flops, peak, dev)}


def loss_check(config: Config, steps: int) -> dict:
    """Final losses (mean of the last 10 steps) of N steps with the recipe and with its plain path (eager, decoded
    on the host, bf16 in place of float8, an fp32 residual stream), from the same start."""
    finals = {}
    plain = recipe.to_dict(config)
    plain["compile"], plain["data"]["decode"], plain["model"]["bf16_residual"] = False, "host", False
    if plain["precision"] == "float8":
        plain["precision"] = "bf16"
    for name, cfg in (("recipe", config), ("plain", recipe.from_dict(plain, "loss check"))):
        trainer = Trainer(cfg)
        try:
            losses = []
            for _ in range(steps):
                window = new_window(trainer.backend)
                trainer.train_step(window)
                losses.append(window["loss"])
            finals[name] = torch.stack(losses[-10:]).mean().item()
        finally:
            trainer.close()
        release(device())
    return {"run": "loss_check", "steps": steps, "loss": finals["recipe"], "loss_plain": finals["plain"],
            "relative_difference": abs(finals["recipe"] - finals["plain"]) / abs(finals["plain"])}


def make_shards(folder: Path, images: int, workers: int) -> str:
    from shard_throughput import make_tree

    from data_tools import shard

    make_tree(folder / "images", images)
    per_shard = max(1, min(256, images // max(2 * workers, 1)))  # every reader gets shards, and a few
    shard.main([str(folder / "images"), str(folder / "shards"), "--shard-samples", str(per_shard),
                "--workers", str(max(workers, 1))])
    return str(folder / "shards")


@command
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="benchmarks/throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value, as for python -m pretrain.run")
    parser.add_argument("--data", nargs="+", choices=["synthetic", "shards"], default=["synthetic", "shards"])
    parser.add_argument("--compare", nargs="*", choices=REFERENCES, default=list(REFERENCES),
                        help="references to measure beside ours (default: all that are installed); --compare alone: none")
    parser.add_argument("--shards", help="training shards to read (default: generate --images JPEGs)")
    parser.add_argument("--images", type=int, default=4096, help="ImageNet-like JPEGs to generate without --shards (one batch for --data synthetic "
                             "alone, without --loss-check)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps first (compilation, allocator, workers); at least 1")
    parser.add_argument("--loss-check", type=int, default=0, metavar="N",
                        help="also compare N-step losses with the plain path (eager, host decode, float8 as bf16, "
                             "fp32 residual)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="write the kernel table of 3 more steps of ours to DIR/ours-{synthetic,shards}.txt")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--steps and --warmup must be at least 1")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        config = recipe.load(args.recipe, args.overrides)
        reads = {}
        if not args.shards and "shards" not in args.data and not args.loss_check:  # one batch is all it reads
            reads = {"data.workers": 0}
            args.images = max(config.data.batch_size, 50)  # make_tree's 50 classes, as with more images
        train = args.shards or make_shards(Path(tmp), args.images, reads.get("data.workers", config.data.workers))
        classes = shards.resolve(train).classes
        fixed = {**reads, "data.train": train, "data.val": "", "log.every": 10**9, "log.fewshot_every": 0,
                 "log.eval_at_start": False, "checkpoint.every": 10**9, "checkpoint.resume": "never",
                 "run_dir": str(Path(tmp) / "run"), **({"model.num_classes": len(classes)} if classes else {})}
        config = recipe.from_dict({**recipe.to_dict(config), **fixed}, "benchmark")
        dev = device()
        peak = matmul_tflops(dev)
        head = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "model": config.model.name,
                "image_size": config.model.image_size, "classes": config.model.num_classes,
                "batch": config.data.batch_size, "precision": config.precision}
        print(json.dumps({"run": "matmul", **head, "tflops": significant(peak[0]), "dtype": peak[1]}), flush=True)
        results = {}
        for data in args.data:
            results[f"ours-{data}"] = ours(config, data, args.steps, args.warmup, peak, args.profile)
            release(dev)
            print(json.dumps({**head, **results[f"ours-{data}"]}), flush=True)
        hybrid = parse_name(config.model.name).backbone is not None
        for kind in args.compare:
            if hybrid and kind == "hf":
                print(json.dumps({"run": kind, **head, "skipped": "transformers 5 has no hybrid ViT"}), flush=True)
                continue
            results[kind] = reference(kind, config, args.steps, args.warmup, peak)
            release(dev)
            print(json.dumps({**head, **results[kind]}), flush=True)
        mine = results.get("ours-shards") or results.get("ours-synthetic")
        ratios = {f"vs_{k}": round(mine["img_per_s"] / results[k]["img_per_s"], 3) for k in REFERENCES if k in results}
        if ratios:
            print(json.dumps({"run": "summary", **head, "ours": mine["data"], **ratios}), flush=True)
        if args.loss_check:
            print(json.dumps({**head, **loss_check(config, args.loss_check)}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
