"""Evaluation: top-1 / top-5 (precision@1 for multi-label data) and the loss on a labelled shard set.

python -m pretrain.evaluate RUN_OR_CHECKPOINT data=SPEC [--fewshot-train SPEC] [--batch N] prints the top-1,
top-5 and loss of a run's newest checkpoint (and its few-shot linear accuracy, see pretrain.fewshot) as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from . import backends, checkpoint
from .backends.base import Backend
from .config import Config
from .data import shards
from .data.stream import EvalStream, loader
from .cli import OneLineParser, command, finish
from .errors import UserError
from .train.losses import check_labels, hits, loss_fn

log = logging.getLogger(__name__)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to floats in [-1, 1]: (x / 255 - 0.5) / 0.5."""
    return images.float().div_(127.5).sub_(1.0)


@torch.no_grad()
def evaluate(backend: Backend, config: Config, spec: str, shard_set: shards.ShardSet | None = None) -> dict[str, float]:
    """One pass over ``spec`` (every sample once across ranks), or ``shard_set``, resolved from it already; metrics
    summed over ranks."""
    shard_set = shard_set or shards.resolve(spec, "data.val")
    micro = config.data.eval_batch_size or max(config.data.batch_size // backend.world // config.optim.grad_accum, 1)
    if backend.spmd:
        micro = -(-micro // backend.local_devices) * backend.local_devices
    stream = EvalStream(shard_set, config.model.image_size, micro, backend.rank, backend.world,
                        config.data.storage_patience_s)
    workers = min(config.data.workers, max(len(shard_set.urls) // backend.world, 1))
    model = backend.model
    was_training = model.training
    model.eval()
    scores = torch.zeros(3, dtype=torch.float64, device=backend.device)  # top-1 hits, top-5 hits, loss sum
    samples = bad = 0
    batches = loader(stream, workers, backend.device.type == "cuda")
    lockstepped = backend.lockstep_eval
    for batch in lockstep(batches, backend, micro, config.model.image_size) if lockstepped else batches:
        for why in batch["damaged_shards"]:
            log.warning("%s; its missing samples are counted in bad_samples, not evaluated (%s)", why, check_hint(spec))
        bad += batch["bad_samples"]
        n = int(batch["real"].sum()) if lockstepped else len(batch["image"])
        samples += n
        if not n and not lockstepped:
            continue
        check_labels(batch["labels"], config.model.num_classes, spec)
        images, y = backend.to_device(batch)
        with backend.autocast():
            logits = model(normalise(images))
        losses = loss_fn(logits, y, config.loss, per_sample=True)
        if lockstepped:
            losses = losses.where(backend.put(batch["real"]), 0.0)
        scores += torch.stack([hits(logits, y, 1), hits(logits, y, 5), losses.sum()]).double()
        backend.mark_step()
    model.train(was_training)
    samples, bad = backend.host_reduce([samples, bad])
    top1, top5, loss = (scores if backend.spmd else backend.all_reduce_sum(scores)).tolist()
    if not samples:
        raise UserError(f"no sample of {spec} could be evaluated ({int(bad)} bad or missing); {check_hint(spec)}")
    return {"top1": top1 / samples, "top5": top5 / samples, "loss": loss / samples, "samples": int(samples),
            "bad_samples": int(bad)}


def lockstep(batches: Iterable[dict], backend: Backend, rows: int, size: int) -> Iterator[dict]:
    """Batches for a forward pass that is a collective (``Backend.lockstep_eval``): every rank feeds as many as the
    rank with the most, each of ``rows`` rows (``real`` marks those of samples; the rest are black images labelled
    -1), which SPMD needs besides: each batch is one program over every host's devices, in one shape."""
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if not backend.any(batch is not None):
            return
        batch = batch or {"image": torch.empty(0, 3, size, size, dtype=torch.uint8),
                          "labels": torch.empty(0, 1, dtype=torch.long), "bad_samples": 0, "damaged_shards": []}
        n = len(batch["image"])
        yield {**batch, "image": F.pad(batch["image"], (0, 0, 0, 0, 0, 0, 0, rows - n)),
               "labels": F.pad(batch["labels"], (0, 0, 0, rows - n), value=-1), "real": torch.arange(rows) < n}


def check_hint(spec: str) -> str:
    if "{" in spec:  # a brace pattern has no manifest for data_tools.verify to check against
        return f"check that the shards of {spec} exist and are complete tar files"
    return f"python -m data_tools.verify {spec} checks every shard"


def _data_spec(arg: str) -> str:
    if not arg.startswith("data="):
        raise argparse.ArgumentTypeError(f"expected data=SPEC, got '{arg}'")
    return arg.removeprefix("data=")


def same_files(urls: list[str]) -> set[str]:
    return {url if "://" in url else os.path.realpath(url) for url in urls}


def evaluate_checkpoint(path: str, spec: str, fewshot_train: str | None = None, batch: int | None = None) -> dict:
    """Top-1 / top-5 / loss of the checkpoint at ``path`` on ``spec`` in this one process (a GPU if there
    is one), and few-shot accuracy with training samples from ``fewshot_train``. On data of other classes than
    the model's head (a downstream set, as in the paper's few-shot transfer) only the few-shot accuracy."""
    model, config, found = checkpoint.load_checkpoint(path)  # a run in progress may write a newer one meanwhile
    mismatch = head_mismatch(model.num_classes, config.data.train, path, spec)
    if mismatch and not fewshot_train:
        raise UserError(f"{mismatch}; or give --fewshot-train SPEC for the few-shot linear accuracy on its classes")
    if fewshot_train:
        from .fewshot import few_shot_needs_single_label  # fewshot imports this module

        test, draw = shards.resolve(spec, "data"), shards.resolve(fewshot_train, "--fewshot-train")
        for shard_set, named in ((test, f"data={spec}"), (draw, f"--fewshot-train {fewshot_train}")):
            if shard_set.multi_label:
                raise UserError(few_shot_needs_single_label(named) + "; give single-label shards")
        shards.check_same_classes(draw, fewshot_train, test, spec)
        if same_files(test.urls) & same_files(draw.urls):
            print(f"warning: --fewshot-train {fewshot_train} shares shards with data={spec}: the few-shot probe is then "
                  f"tested on samples it was fitted to, which scores memory, not transfer; give a training split",
                  file=sys.stderr)
    if batch:
        config.data.eval_batch_size = batch
    # One process on this host's GPU or CPU: no DeepSpeed engine, no torch-xla (a run trained on TPUs is evaluated
    # anywhere).
    config.backend = "torch"
    backend = backends.create(config)
    backend.setup(model)
    result = {"checkpoint": str(found), "data": spec}
    if mismatch:
        log.warning("%s: only the few-shot accuracy is reported", mismatch.split(";")[0])
    else:
        result |= evaluate(backend, config, spec)
    if fewshot_train:
        from .fewshot import fewshot_eval  # fewshot imports this module

        result |= fewshot_eval(backend.module, fewshot_train, spec, config.model.image_size, backend.device,
                               batch=batch or 64, workers=config.data.workers,
                               patience_s=config.data.storage_patience_s)
    return result


def head_mismatch(num_classes: int, trained_on: str, path: str, spec: str) -> str:
    """Why the model's head cannot score ``spec`` (data of other classes than those of its training manifest where
    that can be read, else of another count), or ''."""
    if not num_classes:
        return f"{path} has no classifier (model.num_classes 0), so it has no top-1 to evaluate on {spec}"
    data = shards.resolve(spec, "data")
    if data.classes is not None and len(data.classes) != num_classes:
        return (f"{path} has {num_classes} classes but {spec} has {len(data.classes)}; evaluate it on data of the "
                f"classes it was trained on")
    try:
        trained = shards.resolve(trained_on)
    except UserError:  # moved, unreachable, or a path relative to where the run was started
        log.warning("the training shards %s cannot be read from here, so only the number of classes of %s is "
                    "checked, not their names and order", trained_on, spec)
        return ""
    try:
        shards.check_same_classes(trained, trained_on, data, spec)
    except UserError as e:
        return str(e)
    return ""


@command
def main(argv: list[str] | None = None) -> int:
    """python -m pretrain.evaluate RUN_OR_CHECKPOINT data=SPEC [--fewshot-train SPEC] [--batch N]: one JSON line."""
    parser = OneLineParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("data", metavar="data=SPEC", type=_data_spec,
                        help="labelled shards: a folder, a manifest.json or a brace pattern")
    parser.add_argument("--fewshot-train", metavar="SPEC",
                        help="also few-shot linear accuracy, drawing its training samples from SPEC")
    parser.add_argument("--batch", type=int, metavar="N", help="eval batch size (default: the run's)")
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    print(json.dumps(evaluate_checkpoint(args.run, args.data, args.fewshot_train, args.batch)))
    return 0


if __name__ == "__main__":
    finish(main())
