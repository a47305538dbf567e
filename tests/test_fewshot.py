"""Few-shot linear evaluation: the closed-form ridge against scikit-learn, and on a tiny pre-trained run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from pretrain import checkpoint, evaluate
from pretrain import run as pretrain_run
from pretrain.errors import UserError
from pretrain.fewshot import L2_REG, draw, extract_features, fewshot_accuracy, fewshot_eval, fits, ridge_fit, targets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(pretrained_run) -> Path:
    return pretrained_run


@pytest.fixture(scope="module")
def features(run, small_shards) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    model, config = checkpoint.load_model(run)
    size = config.model.image_size
    return tuple(extract_features(model, small_shards[split], size, 64, "cpu") for split in ("train", "val"))


@pytest.mark.parametrize("n, d", [(60, 16), (12, 16)])  # more samples than features, and fewer (1-shot-like)
@pytest.mark.parametrize("lam", [2.0**-10, 1.0, 2.0**10])
def test_ridge_fit_equals_sklearn_ridge(n, d, lam):
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g) * 2 + 0.5  # float32, like extracted features
    y = targets(torch.randint(0, 4, (n,), generator=g), torch.arange(4))
    w, b = ridge_fit(x, y, lam)
    ref = Ridge(alpha=lam, fit_intercept=True).fit(x.double().numpy(), y.numpy())
    assert w.dtype == b.dtype == torch.float64 and w.shape == (d, 4) and b.shape == (4,)
    torch.testing.assert_close(w, torch.from_numpy(ref.coef_.T), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b, torch.from_numpy(ref.intercept_), rtol=1e-6, atol=1e-8)
    new = torch.randn(7, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(new @ w + b, torch.from_numpy(ref.predict(new.numpy())), rtol=1e-6, atol=1e-8)


def test_draw_is_seeded_nested_and_takes_shots_of_every_class():
    labels = torch.arange(5).repeat_interleave(8)
    classes = labels.unique()
    five = draw(labels, classes, 5, seed=3)
    assert five.shape == (5, 5) and torch.equal(labels[five], classes[:, None].expand(5, 5))
    assert torch.equal(draw(labels, classes, 2, seed=3), five[:, :2])  # the 2-shot draw is part of the 5-shot one
    assert not torch.equal(draw(labels, classes, 5, seed=4), five)
    assert fits(labels, 8) and not fits(labels, 9)
    with pytest.raises(ValueError, match="fewer than 9"):
        fewshot_accuracy(torch.randn(40, 3), labels, torch.randn(4, 3), labels[:4], shots=9, seed=0)


def test_fewshot_on_a_pretrained_run_is_above_chance(features):
    (train_x, train_y), (test_x, test_y) = features
    assert train_x.shape == (400, 64) and test_x.shape == (100, 64) and test_y.shape == (100,)
    result = fewshot_accuracy(train_x, train_y, test_x, test_y, shots=10, seed=0)
    assert result > 0.15  # 10 classes: chance is 0.1
    assert fewshot_accuracy(train_x, train_y, test_x, test_y, shots=10, seed=0) == result


@pytest.mark.parametrize("shots", [1, 5])
def test_fewshot_is_big_visions_protocol_and_blind_to_each_features_scale(shots):
    """big_vision's fewshot_lsr, written out here: standardise by the draw, a constant feature of 100 for the bias,
    ridge with l2_reg 2^10 on {-1, +1} targets. Features of very uneven scales (as a network's can be) are the case
    where standardising decides: centred features alone let the largest dimensions decide."""
    g = torch.Generator().manual_seed(0)
    classes, dim = 6, 32
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    def sample(n):
        y = torch.arange(classes).repeat(n)
        return centres[y] + 0.7 * torch.randn(len(y), dim, generator=g, dtype=torch.float64), y
    (train_x, train_y), (test_x, test_y) = sample(8), sample(20)
    scales = torch.logspace(-3, 3, dim, dtype=torch.float64)
    ours = fewshot_accuracy(train_x * scales, train_y, test_x * scales, test_y, shots=shots, seed=1)
    assert ours == fewshot_accuracy(train_x, train_y, test_x, test_y, shots=shots, seed=1)

    chosen = draw(train_y, train_y.unique(), shots, seed=1).flatten()
    x = (train_x * scales)[chosen].numpy()
    mean, std = x.mean(0), x.std(0) + 1e-5
    def with_bias(v):
        return np.pad((v - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    y = 2.0 * np.eye(classes)[train_y[chosen].numpy()] - 1.0
    xb = with_bias(x)
    w = np.linalg.solve(xb.T @ xb + L2_REG * np.eye(dim + 1), xb.T @ y)
    theirs = (with_bias((test_x * scales).numpy()) @ w).argmax(1)
    assert abs(ours - (theirs == test_y.numpy()).mean()) <= 1 / len(test_y)  # their bias, regularised a hair, may tip one


def test_a_few_shots_read_a_prefix_of_the_shards_whatever_the_batch_and_workers(run, small_shards, features):
    """The 8 training shards are read 1, 2, 4 at a time until every class has 5 samples: not all 400."""
    model, config = checkpoint.load_model(run)
    (all_x, all_y), _ = features
    x, y = extract_features(model, small_shards["train"], config.model.image_size, 64, "cpu", enough=5)
    assert len(x) in (50, 150, 350) and torch.bincount(y, minlength=10).min() >= 5
    torch.testing.assert_close(x, all_x[:len(x)])
    assert torch.equal(y, all_y[:len(y)])
    x2, y2 = extract_features(model, small_shards["train"], config.model.image_size, 7, "cpu", workers=2, enough=5)
    torch.testing.assert_close(x2, x)
    assert torch.equal(y2, y)


def test_fewshot_eval_skips_shot_counts_beyond_the_smallest_class(run, small_shards, caplog):
    model, config = checkpoint.load_model(run)
    with caplog.at_level(logging.WARNING):
        result = fewshot_eval(model, small_shards["train"], small_shards["val"], config.model.image_size, "cpu",
                              shots=(10, 50))
    assert set(result) == {"fewshot_10shot_top1"}  # 40 training images per class
    assert "skipping [50] shots: 10 classes have fewer than 50 ('" in caplog.text  # named, with their counts
    with pytest.raises(UserError, match=r"too few samples of a class for any of the shot counts \(50,\): 10 classes"):
        fewshot_eval(model, small_shards["train"], small_shards["val"], config.model.image_size, "cpu", shots=(50,))


def test_evaluate_cli_adds_fewshot_accuracy(run, small_shards, capsys):
    assert evaluate.main([str(run), f"data={small_shards['val']}", "--fewshot-train", small_shards["train"]]) == 0
    said = capsys.readouterr()
    result = json.loads(said.out)
    assert {f"fewshot_{n}shot_top1" for n in (1, 5, 10, 25)} <= set(result) and "warning" not in said.err


def test_a_multi_label_set_is_no_few_shot_set(run, small_shards, tmp_path, monkeypatch, capsys):
    """Which of a sample's labels would be its class is arbitrary, so multi-label shards are refused in one sentence."""
    from data_tools import shard

    folders = sorted((Path(small_shards["train"]).parent / "images/train").iterdir())
    images = [image for folder in folders for image in sorted(folder.iterdir())[:2]]
    classes = sorted({p.parent.name for p in images})
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    (tmp_path / "list.csv").write_text("".join(f"{p}, {p.parent.name} {classes[0]}\n" for p in images))
    assert shard.main([str(tmp_path / "list.csv"), str(tmp_path / "jft"), "--classes", str(tmp_path / "classes.txt"),
                       "--workers", "1"]) == 0
    model, config = checkpoint.load_model(run)
    with pytest.raises(UserError, match=f"the few-shot probe fits one class per sample, and {tmp_path / 'jft'} is "
                                        "multi-label"):
        fewshot_eval(model, str(tmp_path / "jft"), small_shards["val"], config.model.image_size, "cpu")
    pattern = f"{tmp_path / 'jft'}/train-{{000000..000000}}.tar"  # no manifest to say so: its samples do
    with pytest.raises(UserError, match=f"the few-shot probe fits one class per sample, and {pattern} is multi-label"):
        fewshot_eval(model, pattern, small_shards["val"], config.model.image_size, "cpu")
    monkeypatch.chdir(ROOT)  # a run refuses it at its start, not at its first probe
    assert pretrain_run.main(["recipes/demo.yaml", f"data.train={small_shards['train']}", f"data.val={small_shards['val']}",
                              f"data.fewshot_train={pattern}", f"run_dir={tmp_path / 'run'}", "data.workers=0"]) == 2
    assert f"and data.fewshot_train {pattern} is multi-label" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
