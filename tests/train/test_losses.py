"""Losses and top-k hits on labels given as (B, K) class ids padded with -1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import LossConfig
from pretrain.train.losses import SIGMOID_HEAD_BIAS, hits, loss_fn, multi_hot

SOFTMAX, SIGMOID = LossConfig(kind="softmax"), LossConfig(kind="sigmoid")


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(0))


def test_multi_hot_ignores_padding():
    labels = torch.tensor([[1, 3], [2, -1], [-1, -1], [0, 5]])
    expected = torch.tensor([
        [0, 1, 0, 1, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 1],
    ], dtype=torch.float)
    torch.testing.assert_close(multi_hot(labels, 6), expected, rtol=0, atol=0)


def test_softmax_single_label_is_cross_entropy(logits):
    labels = torch.tensor([[0], [5], [2], [2]])
    torch.testing.assert_close(loss_fn(logits, labels, SOFTMAX), F.cross_entropy(logits, labels[:, 0]))


def test_softmax_multi_label_spreads_the_target(logits):
    """A sample with two labels puts half of its target on each; padding carries none."""
    labels = torch.tensor([[0, 2], [5, -1], [1, 3], [4, -1]])
    log_p = logits.log_softmax(-1)
    per_sample = [
        -(log_p[0, 0] + log_p[0, 2]) / 2,
        -log_p[1, 5],
        -(log_p[2, 1] + log_p[2, 3]) / 2,
        -log_p[3, 4],
    ]
    torch.testing.assert_close(loss_fn(logits, labels, SOFTMAX), torch.stack(per_sample).mean())


def test_label_smoothing_is_honoured(logits):
    smooth = LossConfig(kind="softmax", label_smoothing=0.1)
    single = torch.tensor([[0], [5], [2], [2]])
    expected = F.cross_entropy(logits, single[:, 0], label_smoothing=0.1)
    torch.testing.assert_close(loss_fn(logits, single, smooth), expected)
    assert not torch.allclose(loss_fn(logits, single, smooth), loss_fn(logits, single, SOFTMAX))

    multi = torch.tensor([[0, 2], [5, -1], [1, 3], [4, -1]])
    target = multi_hot(multi, 6)
    target = 0.9 * target / target.sum(1, keepdim=True) + 0.1 / 6
    torch.testing.assert_close(loss_fn(logits, multi, smooth), -(target * logits.log_softmax(-1)).sum(1).mean())


def test_sigmoid_is_bce_summed_over_classes_averaged_over_batch(logits):
    labels = torch.tensor([[0, 2], [5, -1], [1, 3], [-1, -1]])
    target = multi_hot(labels, 6)
    per_element = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits))
    torch.testing.assert_close(loss_fn(logits, labels, SIGMOID), per_element.sum() / logits.shape[0])


def test_sigmoid_loss_at_the_head_bias_init_is_small_and_trainable():
    """Logits of -10 (the head bias at init): about 10 per positive label, not classes * log 2; finite gradient."""
    classes = 1000
    labels = torch.tensor([[3], [7], [999], [0]])
    logits = torch.full((4, classes), SIGMOID_HEAD_BIAS, requires_grad=True)
    loss = loss_fn(logits, labels, SIGMOID)
    expected = -SIGMOID_HEAD_BIAS + (classes - 1) * F.softplus(torch.tensor(SIGMOID_HEAD_BIAS))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=0)  # float32 log(1 + 4.5e-5) rounds
    assert loss < loss_fn(torch.zeros(4, classes), labels, SIGMOID) / 50
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[torch.arange(4), labels[:, 0]] < 0).all()  # the labelled classes are pushed up


def test_losses_compute_in_float32_for_bf16_logits(logits):
    labels = torch.tensor([[0], [5], [2], [2]])
    for cfg in (SOFTMAX, SIGMOID):
        assert loss_fn(logits.bfloat16(), labels, cfg).dtype == torch.float32


def test_hits_counts_a_sample_once_even_with_two_labels_in_the_top_k():
    logits = torch.tensor([
        [5.0, 4.0, 0.0, 0.0],  # top-2 {0, 1}: both labels -> one hit
        [5.0, 4.0, 0.0, 1.0],  # top-2 {0, 1}: label 3 is third -> no hit
        [0.0, 0.0, 1.0, 0.0],  # top-1 2: the label -> one hit
    ])
    labels = torch.tensor([[0, 1], [3, -1], [2, -1]])
    assert hits(logits, labels, k=2).item() == 2
    assert hits(logits, labels, k=1).item() == 2
    assert hits(logits, labels, k=10).item() == 3  # k beyond the classes: every sample is a hit


def test_hits_never_matches_padding():
    """-1 padding must not count as a label, even when a sample has fewer labels than others."""
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert hits(logits, torch.tensor([[-1, -1]]), k=3).item() == 0
