"""Evaluation: top-1 / top-5 (precision@1 for multi-label data) and the loss on a labelled shard set."""

from __future__ import annotations

import torch

from .backends.base import Backend
from .config import Config
from .data import shards
from .data.stream import EvalStream, loader
from .train.losses import hits, loss_fn


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to floats in [-1, 1]: (x / 255 - 0.5) / 0.5."""
    return images.float().div_(127.5).sub_(1.0)


@torch.no_grad()
def evaluate(backend: Backend, config: Config, spec: str) -> dict[str, float]:
    """One pass over ``spec`` (every sample once across ranks); metrics summed over ranks."""
    shard_set = shards.resolve(spec, "data.val")
    micro = config.data.eval_batch_size or max(config.data.batch_size // backend.world // config.optim.grad_accum, 1)
    stream = EvalStream(shard_set.urls, config.model.image_size, micro, backend.rank, backend.world)
    workers = min(config.data.workers, max(len(shard_set.urls) // backend.world, 1))
    model = backend.model
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=backend.device)  # samples, top1, top5, loss sum, bad
    for batch in loader(stream, workers, backend.device.type == "cuda"):
        x = normalise(batch["image"].to(backend.device, non_blocking=True))
        y = batch["labels"].to(backend.device, non_blocking=True)
        with backend.autocast():
            logits = model(x)
        n = x.shape[0]
        totals += torch.stack([torch.tensor(n, device=totals.device), hits(logits, y, 1), hits(logits, y, 5),
                               loss_fn(logits, y, config.loss) * n, torch.tensor(batch["bad_samples"], device=totals.device)]).double()
    model.train(was_training)
    samples, top1, top5, loss, bad = backend.all_reduce_sum(totals).tolist()
    samples = max(samples, 1)
    return {"top1": top1 / samples, "top5": top5 / samples, "loss": loss / samples, "samples": samples, "bad_samples": bad}
