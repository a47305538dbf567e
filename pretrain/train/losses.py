"""Losses and accuracy on labels given as (B, K) class ids padded with -1 (see data.transforms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LossConfig
from ..errors import UserError

SIGMOID_HEAD_BIAS = -10.0  # sigmoid cross-entropy starts with every class near probability 0


def multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K) ids padded with -1 -> (B, C) float 0/1."""
    # Padding lands in an extra column; XLA's scatter also wants the target at least as wide as the ids (8 ids, padded,
    # for a 6-class set).
    target = torch.zeros(labels.shape[0], max(num_classes + 1, labels.shape[1]), device=labels.device)
    target.scatter_(1, labels.where(labels >= 0, num_classes), 1.0)
    return target[:, :num_classes]


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig, per_sample: bool = False) -> torch.Tensor:
    """The batch's mean loss; with ``per_sample``, each sample's (a padding row, labels -1 alone, gets a number to
    leave out: 0, or NaN for a multi-label softmax)."""
    logits = logits.float()
    num_classes = logits.shape[-1]
    if cfg.kind == "sigmoid":  # summed over classes, averaged over the batch (the paper's code)
        target = multi_hot(labels, num_classes)
        if per_sample:
            return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]
    reduction = "none" if per_sample else "mean"
    if labels.shape[1] == 1:
        return F.cross_entropy(logits, labels[:, 0], label_smoothing=cfg.label_smoothing, reduction=reduction,
                               **({"ignore_index": -1} if per_sample else {}))
    target = multi_hot(labels, num_classes)  # several labels: spread the target mass over them
    return F.cross_entropy(logits, target / target.sum(1, keepdim=True), label_smoothing=cfg.label_smoothing,
                           reduction=reduction)


def hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many samples have one of their labels among the top-k logits (precision@1 for k=1)."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # (B, k)
    return (top[:, :, None] == labels[:, None, :]).any(-1).any(-1).sum()


def check_labels(labels: torch.Tensor, num_classes: int, spec: str) -> None:
    """Refuse labels (a CPU batch's) beyond the model's classes, which the loss would fail on in a traceback: shards
    given by a brace pattern have no manifest for their classes to be checked against before."""
    top = int(labels.numpy().max()) if labels.numel() else -1  # on the host: numpy, not item(), which reads a device
    if top >= num_classes:
        raise UserError(f"{spec} labels a sample {top}, but the model has {num_classes} classes (labels 0-"
                        f"{num_classes - 1}); give shards of the model's classes, or set model.num_classes")
