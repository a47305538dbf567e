"""The xla backend for real on the XLA CPU device: one process, SPMD over 4 virtual devices (PJRT_DEVICE=CPU,
CPU_NUM_DEVICES=4). dp and fsdpv2 against the torch backend, compilations and reads of the device per step,
SIGKILL / SIGTERM and resume, the checkpoint's full weights, and the TPU plan of the ViT-H/14 recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_training import losses, overrides, run

from pretrain import checkpoint
from pretrain.errors import UserError
from pretrain.run import main
from pretrain.train.skips import Skips

pytest.importorskip("torch_xla")

ROOT = Path(__file__).resolve().parents[2]
# XLA_FLAGS: LLVM's optimisation of the CPU device's code took half of each run here; a TPU compiles another way.
XLA = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4", "OMP_NUM_THREADS": "1",
       "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
# 11 steps logged every 2: windows of 2 steps and a last one of 1; checkpoints at 6 and at the end.
STEPS = {"schedule.total_steps": 11, "log.every": 2, "checkpoint.every": 6}
WARMUP = 1  # the first step compiles the graph every later one runs (xla_backend.XlaBackend.warmup)
FINAL = "checkpoints/step_000000011/model.safetensors"

SIGNAL_AFTER_LOG = """
import os, signal, sys
from pretrain import run
from pretrain.metrics import Metrics
log = Metrics.log
def log_then_signal(self, step, scalars, prefix="train"):
    log(self, step, scalars, prefix)
    if step == int(os.environ["SIGNAL_AT"]):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
Metrics.log = log_then_signal
sys.exit(run.main(sys.argv[1:]))
"""

BACKEND_CHECKS = """
import json, math, torch, torch_xla
from pretrain.backends.xla_backend import XlaBackend, count
from pretrain.config import Config
from pretrain.models.zoo import build_model

config = Config()
config.model.name, config.model.image_size, config.model.num_classes, config.data.batch_size = "vit_mu8", 32, 10, 8
backend = XlaBackend(config)
backend.setup(build_model(config.model))
images, labels = backend.to_device({"image": torch.zeros(8, 3, 32, 32, dtype=torch.uint8),
                                    "labels": torch.zeros(8, 3, dtype=torch.long)})
out = {"image_sharding": torch_xla._XLAC._get_xla_sharding_spec(images), "labels_shape": list(labels.shape)}
params = list(backend.module.parameters())
snapshots, updated, reads = [[p.detach().cpu() for p in params]], [], count("TransferFromDeviceTime")
for grad in (math.inf, 1.0):
    for p in params:
        p.grad = torch.full_like(p, grad)
    updated.append(backend.step(1e-2)[1])
    backend.mark_step()
    out.setdefault("reads_while_stepping", count("TransferFromDeviceTime") - reads)
    snapshots.append([p.detach().cpu() for p in params])
out["updated"] = [bool(u) for u in updated]
out["unchanged"] = [all(torch.equal(a, b) for a, b in zip(s, t)) for s, t in zip(snapshots, snapshots[1:])]
config.xla.sharding = "fsdpv2"
sharded = XlaBackend(config)
sharded.setup(build_model(config.model))
out["fsdp_sharding"] = torch_xla._XLAC._get_xla_sharding_spec(sharded.module.blocks[0].mlp.fc1.weight)
print(json.dumps(out))
"""


EVAL_CHECKS = """
import json, sys, torch
from pretrain.backends.torch_backend import TorchBackend
from pretrain.backends.xla_backend import XlaBackend, compiles
from pretrain.config import Config
from pretrain.evaluate import evaluate
from pretrain.models.zoo import build_model

config = Config()
config.model.name, config.model.image_size, config.model.num_classes = "vit_mu8", 32, 10
config.precision, config.data.workers, config.data.eval_batch_size = "fp32", 0, 6  # 6 does not split over 4 devices
torch.manual_seed(0)
model = build_model(config.model)
torch.nn.init.normal_(model.head.weight, std=1.0)  # a head of zeros ties every class
weights = {k: v.clone() for k, v in model.state_dict().items()}
out = {}
for name, backend in (("torch", TorchBackend(config)), ("xla", XlaBackend(config))):
    model = build_model(config.model)
    model.load_state_dict(weights)
    backend.setup(model)
    out[name] = evaluate(backend, config, sys.argv[1])
before = compiles()
out["again"], out["compiles_again"] = evaluate(backend, config, sys.argv[1]), compiles() - before
from pretrain.metrics import peak_flops
out["peak"] = peak_flops(backend.device)  # none on the XLA CPU device; SPMD's virtual device has no kind to ask
import torch_xla.runtime as xr
xr.process_count, config.log.fewshot_every = (lambda: 2), 100  # a slice of two hosts
try:
    XlaBackend(config)
except Exception as e:
    out["fewshot_on_two_hosts"] = str(e)
print(json.dumps(out))
"""


def args(shards: dict[str, str], run_dir: Path, name: str) -> list[str]:
    backend = {"backend": "torch"} if name == "torch" else {"backend": "xla", "xla.sharding": name}
    return overrides(shards, run_dir, **STEPS, **backend)


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def trained(small_shards, tmp_path_factory):
    """The same recipe run to the end once per backend: 'torch', 'dp' or 'fsdpv2' -> (run_dir, stderr)."""
    done = {}

    def get(name: str) -> tuple[Path, str]:
        if name not in done:
            run_dir = tmp_path_factory.mktemp(name)
            result = run(args(small_shards, run_dir, name), env=XLA)
            assert result.returncode == 0, result.stderr[-3000:]
            done[name] = run_dir, result.stderr
        return done[name]

    return get


@pytest.mark.parametrize("sharding", ["dp", "fsdpv2"])
def test_spmd_follows_the_torch_backends_loss_curve(trained, sharding):
    """One process feeds the global batch of 16 to 4 devices; the torch backend reads the same stream."""
    reference, xla = records(trained("torch")[0]), records(trained(sharding)[0])
    assert sorted(xla) == sorted(reference) == [2, 4, 6, 8, 10, 11]
    for step, ref in reference.items():
        assert xla[step]["loss"] == pytest.approx(ref["loss"], rel=1e-5), step
        assert xla[step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), step


@pytest.mark.parametrize("sharding", ["dp", "fsdpv2"])
def test_compilations_stop_after_warm_up(trained, sharding):
    run_dir, stderr = trained(sharding)
    compiles = {step: r["xla_compiles"] for step, r in records(run_dir).items()}
    after = [n for step, n in compiles.items() if step > WARMUP]
    assert after and len(set(after)) == 1, compiles  # a checkpoint (step 6) and the last, shorter window included
    assert "after warm-up" not in stderr and "Full backward hook" not in stderr


def test_the_device_is_read_at_log_steps_only(trained):
    """As many reads after a window of 2 steps as after the last window of 1: the steps read nothing."""
    reads = {step: r["xla_device_reads"] for step, r in records(trained("dp")[0]).items()}
    assert reads[4] - reads[2] == reads[11] - reads[10] > 0, reads


def test_a_checkpoint_holds_sharded_state_and_the_full_weights(trained):
    fsdp, dp = trained("fsdpv2")[0], trained("dp")[0]
    folder = checkpoint.find(fsdp)
    assert folder.name == "step_000000011" and (folder / "sharded/.metadata").is_file()
    model, config = checkpoint.load_model(fsdp)  # our parameter names, every tensor at its full shape
    assert config.xla.sharding == "fsdpv2"
    full, replicated = load_file(fsdp / FINAL), load_file(dp / FINAL)
    for name in model.state_dict():
        assert torch.allclose(full[name], replicated[name], atol=1e-4), name  # Adam after 11 steps


def test_a_tpu_run_is_evaluated_on_a_host_without_torch_xla(trained, small_shards, tmp_path):
    """A TPU pre-training run evaluated, like its fine-tune and export, on a GPU or CPU host."""
    stub = tmp_path / "torch_xla"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ModuleNotFoundError('No module named torch_xla', name='torch_xla')\n")
    result = subprocess.run([sys.executable, "-m", "pretrain.evaluate", str(trained("fsdpv2")[0]),
                             f"data={small_shards['val']}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["samples"] == 100


@pytest.mark.parametrize("sharding, signal, at", [("dp", "SIGKILL", 8), ("fsdpv2", "SIGTERM", 4)])
def test_killed_or_preempted_then_resumed_continues_the_same_losses(small_shards, tmp_path, trained, sharding,
                                                                  signal, at):
    """SIGKILL at step 8 resumes from the checkpoint of step 6; SIGTERM at step 4 finishes the step, writes a
    checkpoint and exits 0. Either way the resumed run repeats the uninterrupted run's losses and weights."""
    clean = trained(sharding)[0]
    killed = run(args(small_shards, tmp_path, sharding), launcher=(sys.executable, "-c", SIGNAL_AFTER_LOG),
                 env={**XLA, "SIGNAL": signal, "SIGNAL_AT": str(at)})
    if signal == "SIGTERM":
        assert killed.returncode == 0 and f"preempted: checkpoint written at step {at}" in killed.stdout
    else:
        assert killed.returncode == -9
    saved = 6 if signal == "SIGKILL" else at
    assert checkpoint.find(tmp_path).name == f"step_{saved:09d}" and max(losses(tmp_path)) == at
    resumed = run(args(small_shards, tmp_path, sharding), env=XLA)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved}" in resumed.stdout and "after warm-up" not in resumed.stderr
    assert losses(tmp_path) == losses(clean), "losses differ after resuming"
    assert (tmp_path / FINAL).read_bytes() == (clean / FINAL).read_bytes(), "final weights differ"


def subprocess_json(script: str, *argv: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=XLA, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_inputs_are_split_and_non_finite_steps_are_skipped_on_the_device():
    result = subprocess_json(BACKEND_CHECKS)
    assert "devices=[4,1,1,1]" in result["image_sharding"]  # the batch over the 4 devices
    assert result["labels_shape"] == [8, 4]  # 3 labels padded to a power of two
    assert result["updated"] == [False, True] and result["unchanged"] == [True, False]
    assert result["reads_while_stepping"] == 0
    assert "devices=[4" in result["fsdp_sharding"]  # fsdpv2: a weight over the 4 devices


def test_evaluation_pads_every_batch_to_one_shape_and_scores_as_the_torch_backend(small_shards):
    """Batches of 6 (100 samples: 16 and a remainder of 4) go to the device as 8 rows, the padding left out of the
    scores: the same top-1, top-5, loss and sample count as the torch backend's, and no new graph the next time."""
    result = subprocess_json(EVAL_CHECKS, small_shards["val"])
    expected, got = result["torch"], result["xla"]
    assert got["samples"] == expected["samples"] == 100 and got["bad_samples"] == 0
    assert got["top1"] == expected["top1"] and got["top5"] == expected["top5"] and 0.05 < got["top1"] < 0.9
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert result["again"] == got and result["compiles_again"] == 0 and result["peak"] is None
    assert result["fewshot_on_two_hosts"].startswith("log.fewshot_every probes the model on the first host alone")


LOCKSTEP = """
import json, sys, torch
from pathlib import Path
from pretrain.backends.torch_backend import TorchBackend
from pretrain.config import Config
from pretrain.evaluate import lockstep

backend = TorchBackend(Config())  # two processes, gloo: the hosts' agreement without torch_xla
rank = backend.rank
mine = [{"image": torch.full((n, 3, 2, 2), 1, dtype=torch.uint8), "labels": torch.full((n, 1), rank),
         "bad_samples": 1, "damaged_shards": []} for n in ([8, 8, 3] if rank == 0 else [5])]
fed = [(list(b["image"].shape), int(b["real"].sum()), int(b["image"].sum()), b["labels"][:, 0].tolist())
       for b in lockstep(mine, backend, 8, 2)]
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps({"fed": fed, "sums": backend.host_reduce([len(mine), rank])}))
backend.close()
"""


def test_hosts_with_uneven_parts_of_the_evaluation_set_feed_as_many_batches_of_one_shape(tmp_path):
    """SPMD runs each evaluation batch over every host's chips: a host whose part is done feeds padding (labels -1)
    until the host with the most is done. Two gloo processes stand in for two TPU VM hosts."""
    (tmp_path / "lockstep.py").write_text(LOCKSTEP)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(tmp_path / "lockstep.py"), str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]  # their stdout interleaves
    rows = 8 * 3 * 2 * 2
    assert ranks[0]["fed"] == [[[8, 3, 2, 2], 8, rows, [0] * 8], [[8, 3, 2, 2], 8, rows, [0] * 8],
                               [[8, 3, 2, 2], 3, 3 * 12, [0] * 3 + [-1] * 5]]
    assert ranks[1]["fed"] == [[[8, 3, 2, 2], 5, 5 * 12, [1] * 5 + [-1] * 3], [[8, 3, 2, 2], 0, 0, [-1] * 8],
                               [[8, 3, 2, 2], 0, 0, [-1] * 8]]
    assert ranks[0]["sums"] == ranks[1]["sums"] == [4.0, 1.0]


def test_skips_reported_on_the_device_are_checked_when_asked():
    def skips(total=0, limit=3, precision="bf16"):
        return Skips(total, limit, precision, counter=lambda value: torch.tensor([value]))

    counted = skips(total=2)
    for updated in (False, True, False, False, False):
        counted.add(torch.tensor(updated), step=0)  # no check yet, though the streak reached the limit
    with pytest.raises(UserError, match="3 steps in a row .*; lower optim.lr, raise schedule.warmup_steps or use "
                                        "precision=fp32"):
        counted.check(step=5)
    assert int(counted.total) == 6
    with pytest.raises(UserError, match="lower optim.lr or raise schedule.warmup_steps$"):  # fp32 already
        skips(limit=1, precision="fp32").add(False, step=1)
    counted = skips()
    for updated in (True, False, False, False, False, True, True):  # a streak of 4 that ended before the check
        counted.add(torch.tensor(updated), step=0)
    with pytest.raises(UserError, match=r"^4 steps in a row had a non-finite loss or gradient \(by step 7\)"):
        counted.check(step=7)
    counted = skips()
    for updated in (False, False, True, False, False, True):  # streaks of 2: under the limit, checked or not
        counted.add(torch.tensor(updated), step=0)
        assert counted.check(step=1) >= 0
    counted = skips()
    for updated in (False, False):
        counted.add(torch.tensor(updated), step=0)
    assert counted.check(step=2) == 2 and counted.check(step=2) == 2  # a log and a checkpoint at one step
    counted.add(torch.tensor(False), step=3)
    with pytest.raises(UserError, match=r"^3 steps in a row .* \(by step 3\)"):  # a streak going on over a check
        counted.check(step=3)


def test_vit_h14_jft_with_xla_plans_a_v4_and_a_v5p_slice(root, capsys):
    assert main([str(root / "recipes/vit_h14_jft.yaml"), "backend=xla", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "xla.sharding fsdpv2: a 1-D mesh (axis fsdp) of every chip" in out
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines() if line.startswith("# v")}
    assert rows["v4-256"][:3] == ["(128,)", "32", "32"] and rows["v5p-128"][:3] == ["(64,)", "16", "64"]
    for name, hbm in (("v4-256", 32), ("v5p-128", 95)):
        params, grads, optim, activations, total, device = map(float, rows[name][3:])
        assert params == grads and optim == 2 * params and activations > 10 * optim
        assert total == pytest.approx(params + grads + optim + activations, abs=0.1) and total < device == hbm
    assert main([str(root / "recipes/vit_h14_jft.yaml"), "backend=xla", "--dry-run", "--slice", "v6e-256", "--slice",
                 "v4-32"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("# v")}
    assert rows["v6e-256"].split()[2:5] == ["(256,)", "64", "16"] and "fit" not in rows["v6e-256"]
    assert rows["v4-32"].endswith("does not fit: a larger slice or a smaller batch")  # 256 images a chip
    assert main([str(root / "recipes/vit_h14_jft.yaml"), "backend=xla", "--dry-run", "--slice", "v4-32", "--slice",
                 "v5p-8", "log.fewshot_every=100", "data.val=v"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("# v")}
    assert rows["v4-32"].endswith("refuses log.fewshot_every (several hosts): set it to 0")  # 4 hosts
    assert "fewshot" not in rows["v5p-8"]  # one host
    assert main([str(root / "recipes/vit_h14_jft.yaml"), "backend=xla", "--dry-run", "--slice", "v5e-64"]) == 2
    assert "error: --slice v5e-64 is not a TPU slice name (v4-N, v5p-N, v5litepod-N, v6e-N" in capsys.readouterr().err


def test_multi_label_steps_and_steps_after_an_evaluation_compile_without_a_warning(tmp_path):
    """A label count the run has not had (padded to 2, 4, 8) and the first step after an evaluation compile a graph
    of their own, as expected: no 'compiled a new graph after warm-up' warning, which names real recompilation."""
    from data_tools.shard import main as shard
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    names = [f"c{i}" for i in range(6)]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    lines = []
    for i in range(96):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
        many = 5 if i % 96 == 70 else 3 if i % 48 == 20 else 1  # batches of widths 1, 4 (padded) and 8, in turn
        labels = rng.choice(names, size=many, replace=False)
        lines.append(f"images/{i}.jpg, {' '.join(labels)}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    assert shard([str(tmp_path / "list.csv"), str(tmp_path / "shards"), "--classes", str(tmp_path / "classes.txt"),
                  "--shard-samples", "24", "--workers", "1"]) == 0
    shards = {"train": str(tmp_path / "shards"), "val": str(tmp_path / "shards")}
    result = run(overrides(shards, tmp_path / "run", **{"backend": "xla", "loss.kind": "sigmoid", "data.workers": 0,
                                                       "model.num_classes": 6, "log.fewshot_every": 0,
                                                       "schedule.total_steps": 12, "log.every": 1,
                                                       "log.eval_every": 5, "checkpoint.every": 100}), env=XLA)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after warm-up" not in result.stderr + result.stdout
