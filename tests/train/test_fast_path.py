"""What makes the step fast must not change what is trained: compiled blocks, fused optimizers that skip a
non-finite step on the device, and a loop that reads nothing from the device between log steps."""

from __future__ import annotations

import math
import os

import pytest
import torch
from host_reads import HostReads
from safetensors.torch import load_file
from test_training import losses, overrides, run
from torch import nn

from pretrain import recipe
from pretrain.backends.torch_backend import TorchBackend
from pretrain.config import Config, ModelConfig
from pretrain.models.zoo import build_model
from pretrain.train.loop import Trainer, new_window


def test_compiled_blocks_train_the_same_losses_and_weights_as_eager(small_shards, tmp_path):
    steps = {"schedule.total_steps": 30, "checkpoint.every": 30, "precision": "fp32", "data.workers": 0}
    eager = run(overrides(small_shards, tmp_path / "eager", **steps))
    compiled = run(overrides(small_shards, tmp_path / "compiled", **steps, compile="true"))
    assert eager.returncode == 0, eager.stderr
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    plain, fast = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(plain) == sorted(fast) == list(range(1, 31))
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], rel=1e-4), step
    final = "checkpoints/step_000000030/model.safetensors"
    a, b = load_file(tmp_path / "eager" / final), load_file(tmp_path / "compiled" / final)
    assert a.keys() == b.keys(), "compiling renamed parameters"
    # All weights together rather than each: the key bias has a zero gradient up to rounding (softmax ignores a
    # shift shared by all keys), and Adam turns rounding noise into steps of full size there.
    difference = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt() / sum((a[k] ** 2).sum() for k in a).sqrt()
    assert difference < 1e-4


def backend_with_model(lr: float) -> TorchBackend:
    config = Config()
    config.optim.lr = lr
    backend = TorchBackend(config)
    torch.manual_seed(0)
    backend.setup(build_model(ModelConfig(name="vit_mu8", image_size=16, num_classes=4)))
    return backend


def gradients(backend: TorchBackend, value: float | None = None) -> None:
    x = torch.randn(4, 3, 16, 16)
    nn.functional.cross_entropy(backend.model(x), torch.tensor([0, 0, 0, 1])).backward()
    if value is not None:
        next(iter(backend.module.parameters())).grad.fill_(value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_gradient_skips_the_update_on_the_device(bad):
    backend = backend_with_model(lr=1e-2)
    before = {k: v.clone() for k, v in backend.module.state_dict().items()}
    gradients(backend, bad)
    norm, updated = backend.step(1e-2)
    assert isinstance(updated, torch.Tensor) and not updated and not torch.isfinite(norm)
    for k, v in backend.module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in a skipped step"
    assert all(float(s["step"]) == 0 for s in backend.optimizer.state.values()), "a skipped step was counted"
    gradients(backend)
    norm, updated = backend.step(1e-2)
    assert updated and torch.isfinite(norm)
    assert not torch.equal(backend.module.state_dict()["head.bias"], before["head.bias"])


def test_training_steps_never_wait_for_the_device(small_shards, tmp_path):
    """Between log steps (accumulated micro-batches, clipping, the update, the skip count) nothing reads a value
    from the device, so on a GPU the host runs ahead and the kernels queue back to back."""
    config = recipe.load("recipes/demo.yaml", overrides(small_shards, tmp_path, **{"optim.grad_accum": 2})[1:])
    trainer = Trainer(config)
    try:
        window = new_window(trainer.backend)
        trainer.train_step(window)  # the first builds the optimizer's state
        with HostReads() as reads:
            for _ in range(3):
                trainer.train_step(window)
    finally:
        trainer.close()
    assert reads.where == []


def test_a_run_whose_loss_diverges_stops_with_one_sentence(small_shards, tmp_path):
    """The skips are counted on the device and checked at log steps: the run stops at the first log step after
    max_nonfinite skipped steps in a row."""
    result = run(overrides(small_shards, tmp_path, **{"optim.lr": 1e30, "max_nonfinite": 3, "log.every": 5,
                                                    "schedule.warmup_steps": 1, "optim.clip_grad_norm": 0,
                                                    "data.workers": 0}))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "steps in a row had a non-finite loss or gradient" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_device_decode_trains_like_the_host_path_and_resumes_exactly(small_shards, tmp_path):
    steps = {"schedule.total_steps": 12, "checkpoint.every": 6}
    host = run(overrides(small_shards, tmp_path / "host", **steps))
    straight = run(overrides(small_shards, tmp_path / "device", **steps, **{"data.decode": "device"}))
    assert host.returncode == 0 and straight.returncode == 0, straight.stderr[-3000:]
    halfway = tmp_path / "device" / "checkpoints" / "step_000000006"
    resumed = run(overrides(small_shards, tmp_path / "resumed", **steps,
                            **{"data.decode": "device", "checkpoint.resume": halfway}))
    assert resumed.returncode == 0 and "at step 6" in resumed.stdout, resumed.stderr[-3000:]
    expected, got = losses(tmp_path / "host"), losses(tmp_path / "device")
    for step in expected:  # the same crops, resampled on the other side: the losses barely move
        assert got[step] == pytest.approx(expected[step], rel=1e-2), step
    assert losses(tmp_path / "resumed") == {step: loss for step, loss in got.items() if step > 6}
    final = "checkpoints/step_000000012/model.safetensors"
    assert (tmp_path / "resumed" / final).read_bytes() == (tmp_path / "device" / final).read_bytes()


def test_device_decode_under_xla_is_one_sentence(small_shards, tmp_path):
    result = run(overrides(small_shards, tmp_path, backend="xla", **{"data.decode": "device"}))
    assert result.returncode == 2 and result.stderr.startswith("error: data.decode=device decodes JPEGs on a GPU")


def test_a_step_starved_of_data_says_how_to_feed_it(tmp_path):
    """With data.workers=0 the training process decodes every image itself (256 px, for the 32 px model), on the
    one thread its step has: most of its time is waiting, however busy the machine."""
    from data_tools import shard, synthetic

    synthetic.main([str(tmp_path / "images"), "--train-per-class", "4", "--val-per-class", "1", "--size", "256"])
    shard.main([str(tmp_path / "images" / "train"), str(tmp_path / "train"), "--workers", "1"])
    result = run(overrides({"train": str(tmp_path / "train")}, tmp_path / "run",
                           **{"data.workers": 0, "schedule.total_steps": 6, "log.every": 2}),
                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    hints = [line for line in result.stdout.splitlines() if line.startswith("hint: ")]
    fix = "set data.decode=device" if torch.cuda.is_available() else "use more CPUs per process"  # a GPU decodes
    assert len(hints) == 1 and f"raise data.workers (now 0) or {fix}" in hints[0], result.stdout
