"""Few-shot linear evaluation (Dosovitskiy et al., section 4.1): closed-form ridge regression on frozen features.

The representation is ``model.representation``: the [CLS] token after the pre-logits when the model has
them. For each shot count, ``shots`` training samples per class are drawn with a seeded RNG (one
permutation per class, so the 5-shot draw is part of the 10-shot draw) and a linear map to {-1, +1}
one-vs-all targets is fitted by regularised least squares in closed form; the prediction is the class of
the largest output. Features are used as they are, centred only: centring gives the bias, which is not
regularised (scikit-learn's ``Ridge(fit_intercept=True)``).

λ is chosen from ``LAMBDAS`` by cross-validation inside the few-shot draw, never on the eval set: with
k = min(shots, 5) folds, fold f holds out the drawn samples at positions f, f + k, ... of every class; the
λ with the most held-out hits wins (ties: the smaller held-out squared error). One shot leaves nothing to
hold out, so 1-shot uses ``ONE_SHOT_LAMBDA``. The paper's code (big_vision) uses one fixed λ instead.

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

LAMBDAS = tuple(2.0**k for k in range(-10, 11))
ONE_SHOT_LAMBDA = 1.0  # the grid's geometric middle
MAX_FOLDS = 5


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
    """(W (D, C), b (C,)) minimising |x W + b - y|^2 + lam |W|^2, in float64 (see ``ridge_path``)."""
    return ridge_path(x, y, (lam,))[0]


def ridge_path(x: torch.Tensor, y: torch.Tensor, lams: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``ridge_fit`` for every λ of ``lams``, sharing one eigendecomposition.

    Centring x and y removes the bias from the problem, so it is not regularised; W solves
    (Xc^T Xc + λI) W = Xc^T Yc, which with Xc^T Xc = Q diag(e) Q^T is Q diag(1 / (e + λ)) Q^T Xc^T Yc,
    and b = mean(y) - mean(x) W.
    """
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    e, q = torch.linalg.eigh(xc.T @ xc)
    r = q.T @ (xc.T @ yc)
    return [(w, my - mx @ w) for w in (q @ (r / (e + lam)[:, None]) for lam in lams)]


def fewshot_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                     test_labels: torch.Tensor, shots: int, seed: int) -> dict[str, float]:
    """{"top1", "lambda"}: accuracy on the test features of ridge regression fitted to ``shots`` samples of
    each class present in the training labels, with λ chosen by cross-validation inside the draw."""
    classes = train_labels.unique()
    if not fits(train_labels, shots):
        raise ValueError(f"a class has fewer than {shots} training samples")
    chosen = draw(train_labels, classes, shots, seed).flatten()
    x, y = train_feats[chosen], targets(train_labels[chosen], classes)
    lam = choose_lambda(x, y, shots) if shots > 1 else ONE_SHOT_LAMBDA
    w, b = ridge_fit(x, y, lam)
    predicted = classes[(test_feats.double() @ w + b).argmax(1)]
    return {"top1": (predicted == test_labels).double().mean().item(), "lambda": lam}


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


def choose_lambda(x: torch.Tensor, y: torch.Tensor, shots: int) -> float:
    """The λ of ``LAMBDAS`` with the most held-out hits over the folds (ties: the smaller squared error);
    x and y hold the draw class after class, ``shots`` rows each."""
    k = min(shots, MAX_FOLDS)
    fold = torch.arange(len(x)) % shots % k
    hits, error = torch.zeros(len(LAMBDAS)), torch.zeros(len(LAMBDAS), dtype=torch.float64)
    for f in range(k):
        held = fold == f
        for i, (w, b) in enumerate(ridge_path(x[~held], y[~held], LAMBDAS)):
            out = x[held].double() @ w + b
            hits[i] += (out.argmax(1) == y[held].argmax(1)).sum()
            error[i] += (out - y[held]).square().sum()
    return LAMBDAS[max(range(len(LAMBDAS)), key=lambda i: (hits[i], -error[i]))]


def fewshot_eval(model: nn.Module, train_spec: str, val_spec: str, image_size: int, device: torch.device | str,
                 shots: Sequence[int] = (1, 5, 10, 25), seed: int = 0, batch: int = 64,
                 workers: int = 0, sets: tuple[shards.ShardSet, shards.ShardSet] | None = None,
                 patience_s: float | None = None) -> dict[str, float]:
    """``fewshot_{n}shot_top1`` and the chosen ``fewshot_{n}shot_lambda`` for every shot count ``train_spec``
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
        r = fewshot_accuracy(train_feats, train_labels, test_feats, test_labels, n, seed)
        result[f"fewshot_{n}shot_top1"], result[f"fewshot_{n}shot_lambda"] = r["top1"], r["lambda"]
    return result
