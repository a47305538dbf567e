"""Few-shot linear evaluation (Dosovitskiy et al., section 4.1): closed-form ridge regression on frozen features.

The representation is ``model.representation``: the [CLS] token after the pre-logits when the model has
them. For each shot count, ``shots`` training samples per class are drawn with a seeded RNG (one
permutation per class, so the 5-shot draw is part of the 10-shot draw) and a linear map to {-1, +1}
one-vs-all targets is fitted by regularised least squares in closed form; the prediction is the class of
the largest output. This is big_vision's protocol (``evaluators/fewshot_lsr.py`` with the l2_reg 2^10 of its
configs), by which the published few-shot figures were measured: each feature is standardised by the draw's mean
and standard deviation (+1e-5), the bias is not regularised (big_vision's constant feature of 100 nearly so), and
λ = ``L2_REG``. big_vision reports three seeds; this is its first.

Single-process by design: it runs on the few thousand samples a few-shot evaluation needs, and reads no more of
the training set than a prefix of shards that holds ``max(shots)`` samples of every class (``extract_features``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .data import shards
from .data.stream import EvalStream, loader
from .errors import UserError
from .evaluate import normalise

log = logging.getLogger(__name__)

L2_REG = 2.0**10


def few_shot_needs_single_label(what: str) -> str:
    return (f"the few-shot probe fits one class per sample, and {what} is multi-label (which of a sample's labels "
            f"would be its class is arbitrary)")


@torch.no_grad()
def extract_features(model: nn.Module, spec: str, image_size: int, batch: int, device: torch.device | str,
                     workers: int = 0, enough: int = 0, shard_set: shards.ShardSet | None = None,
                     patience_s: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on the CPU, labels (N,)) of the samples of single-label ``spec`` (a brace pattern,
    which has no manifest to say so, is refused at its first multi-label sample), samples without a label left out.
    ``model`` is moved to ``device``.

    With ``enough`` and a manifest, only a prefix of the shards is read: 1, 2, 4, ... shards at a time, until every
    class has ``enough`` samples or all it has (data_tools.shard shuffles samples across shards, so a prefix is a
    random draw). The samples come in shard order, so the result depends on the shard set alone, not on ``batch``
    or ``workers``. ``shard_set``: ``spec`` resolved already; ``patience_s``: how long storage may not answer."""
    device = torch.device(device)
    shard_set = shard_set or shards.resolve(spec, "few-shot data")
    if shard_set.multi_label:
        raise UserError(few_shot_needs_single_label(spec) + "; give single-label shards (the paper probes ImageNet)")
    need = None
    if enough and shard_set.class_counts is not None and shard_set.counts is not None:
        need = torch.tensor(shard_set.class_counts).clamp(max=enough)
    was_training = model.training
    model.to(device).eval()
    feats, labels, order = [], [], []
    start, size = 0, len(shard_set.urls) if need is None else 1
    while start < len(shard_set.urls):
        part = dataclasses.replace(shard_set, urls=shard_set.urls[start:start + size],
                                   counts=shard_set.counts and shard_set.counts[start:start + size])
        stream = EvalStream(part, image_size, batch, 0, 1, patience_s)
        for b in loader(stream, min(workers, len(part.urls)), device.type == "cuda"):
            for why in b["damaged_shards"]:
                log.warning("%s; the few-shot probe goes on without its missing samples", why)
            if b["labels"].shape[1] > 1 and (b["labels"][:, 1] >= 0).any():
                raise UserError(few_shot_needs_single_label(spec) + "; give single-label shards")
            if len(b["image"]):
                feats.append(model.representation(normalise(b["image"].to(device))).float().cpu())
                labels.append(b["labels"][:, 0])
                order.append(b["order"] + (start << 32))
        start, size = start + size, 2 * size
        if need is not None and labels:
            first = torch.cat(labels)
            if (torch.bincount(first[first >= 0], minlength=len(need)) >= need).all():
                break
    model.train(was_training)
    if not feats:
        raise UserError(f"{spec} holds no readable samples; check it with python -m data_tools.verify")
    at = torch.cat(order).argsort()  # shard order, whichever worker read a sample
    feats, labels = torch.cat(feats)[at], torch.cat(labels)[at]
    keep = labels >= 0
    return feats[keep], labels[keep]


def ridge_fit(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (D, C), b (C,)) minimising |x W + b - y|^2 + lam |W|^2, in float64.

    Centring x and y removes the bias from the problem, so it is not regularised; W solves
    (Xc^T Xc + λI) W = Xc^T Yc, and b = mean(y) - mean(x) W.
    """
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)
    return w, my - mx @ w


def fewshot_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                     test_labels: torch.Tensor, shots: int, seed: int) -> float:
    """Accuracy on the test features of ridge regression fitted to ``shots`` samples of each class present in the
    training labels, on features standardised by the draw's statistics."""
    classes = train_labels.unique()
    if not fits(train_labels, shots):
        raise ValueError(f"a class has fewer than {shots} training samples")
    chosen = draw(train_labels, classes, shots, seed).flatten()
    x, y = train_feats[chosen].double(), targets(train_labels[chosen], classes)
    mean, std = x.mean(0), x.std(0, correction=0) + 1e-5
    w, b = ridge_fit((x - mean) / std, y, L2_REG)
    predicted = classes[(((test_feats.double() - mean) / std) @ w + b).argmax(1)]
    return (predicted == test_labels).double().mean().item()


def fits(labels: torch.Tensor, shots: int) -> bool:
    """Whether every class in ``labels`` has at least ``shots`` samples."""
    return bool(labels.unique(return_counts=True)[1].min() >= shots)


def short_classes(labels: torch.Tensor, shots: int, spec: str) -> str:
    """Which classes have fewer than ``shots`` samples, by name where the shard set has a manifest."""
    names = shards.resolve(spec).classes
    ids, counts = labels.unique(return_counts=True)
    short = sorted((int(n), int(c)) for c, n in zip(ids, counts) if n < shots)
    shown = ", ".join(f"'{names[c]}' {n}" if names else f"{c} {n}" for n, c in short[:5])
    return (f"{len(short)} {'class has' if len(short) == 1 else 'classes have'} fewer than {shots} ({shown}"
            f"{', ...' if len(short) > 5 else ''})")


def draw(labels: torch.Tensor, classes: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """(classes, shots) sample indices: the first ``shots`` of a seeded permutation of each class's samples."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(torch.nonzero(labels == c).flatten().numpy())[:shots] for c in classes]
    return torch.from_numpy(np.stack(rows))


def targets(labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """One-vs-all targets in {-1, +1}, float64, one column per class."""
    return (labels[:, None] == classes[None, :]).double() * 2 - 1


def fewshot_eval(model: nn.Module, train_spec: str, val_spec: str, image_size: int, device: torch.device | str,
                 shots: Sequence[int] = (1, 5, 10, 25), seed: int = 0, batch: int = 64,
                 workers: int = 0, sets: tuple[shards.ShardSet, shards.ShardSet] | None = None,
                 patience_s: float | None = None) -> dict[str, float]:
    """``fewshot_{n}shot_top1`` for every shot count ``train_spec``
    has enough samples of each class for; the others are skipped with a warning. ``sets``: the two specs resolved
    already."""
    train_set, val_set = sets or (None, None)
    train_feats, train_labels = extract_features(model, train_spec, image_size, batch, device, workers, max(shots),
                                                 train_set, patience_s)
    test_feats, test_labels = extract_features(model, val_spec, image_size, batch, device, workers,
                                               shard_set=val_set, patience_s=patience_s)
    usable = [n for n in shots if fits(train_labels, n)]
    if not usable:
        raise UserError(f"{train_spec} has too few samples of a class for any of the shot counts {tuple(shots)}: "
                        f"{short_classes(train_labels, min(shots), train_spec)}")
    if len(usable) < len(shots):
        skipped = sorted(set(shots) - set(usable))
        log.warning("%s: skipping %s shots: %s", train_spec, skipped,
                    short_classes(train_labels, max(skipped), train_spec))
    result = {}
    for n in usable:
        result[f"fewshot_{n}shot_top1"] = fewshot_accuracy(train_feats, train_labels, test_feats, test_labels, n, seed)
    return result
