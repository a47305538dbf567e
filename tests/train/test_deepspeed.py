"""The deepspeed backend for real: 2 processes on the CPU (gloo), ZeRO stages 1-3 against the torch backend,
SIGKILL and resume, a ZeRO-3 checkpoint consolidated, fine-tuned with the torch backend and exported to HF."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port
from safetensors.torch import load_file
from test_training import losses, overrides, run

from pretrain import checkpoint, export, recipe
from pretrain.errors import UserError

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
STEPS, EVERY, KILL_AT = 8, 4, 6

KILL_AFTER_STEP = f"""
import os, signal, sys
from pretrain import run
from pretrain.metrics import Metrics
log = Metrics.log
def log_then_die(self, step, scalars, prefix="train"):
    log(self, step, scalars, prefix)
    if step == {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)
Metrics.log = log_then_die
if __name__ == "__main__":  # the data workers' fork server imports this file
    sys.exit(run.main(sys.argv[1:]))
"""

NONFINITE = """
import json, math, sys, torch
from torch import nn
from pretrain.backends.deepspeed_backend import DeepSpeedBackend
from pretrain.config import Config

config = Config(run_dir=sys.argv[1])
config.data.batch_size = 2
config.data.storage_patience_s = 3000  # the process group waits longer than that: checked in the report
report = {}
for stage in range(4):
    config.deepspeed.zero_stage = stage
    backend = DeepSpeedBackend(config)
    torch.manual_seed(0)
    backend.setup(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)))
    seen = []
    for poisoned in (True, False):  # rank 1's loss is NaN, then every rank's is finite
        before = backend.model_state()
        with backend.micro_step(sync=True):
            loss = backend.model(torch.ones(1, 4)).sum()
            backend.backward(loss * math.nan if poisoned and backend.rank == 1 else loss)
        norm, updated = backend.step(1e-2)
        changed = any(not torch.equal(before[k], v) for k, v in backend.model_state().items())
        seen.append([math.isfinite(norm.item()), bool(updated), changed])
    report[stage] = backend.gather(seen)
report["timeout_s"] = torch.distributed.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()
if backend.is_main:
    print("REPORT", json.dumps(report))
backend.close()  # gloo's threads left to the interpreter's exit abort it now and then ("terminate called ...")
"""

HOST_READS = """
import json, sys, torch
from torch import nn
sys.path.insert(0, sys.argv[2])
from host_reads import HostReads
from pretrain.backends.deepspeed_backend import DeepSpeedBackend
from pretrain.config import Config

config = Config(run_dir=sys.argv[1])
config.data.batch_size = 2
config.optim.clip_grad_norm = 0.1  # the steps clip
report = {}
for stage in range(4):
    config.deepspeed.zero_stage = stage
    backend = DeepSpeedBackend(config)
    torch.manual_seed(0)
    backend.setup(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)))  # two parameter groups
    norms = []
    for i in range(4):  # the last counted: the first builds the optimizer's state, ZeRO-3 traces the next two
        with HostReads() if i == 3 else contextlib.nullcontext() as reads:
            with backend.micro_step(sync=True):
                backend.backward(backend.model(torch.randn(1, 4)).square().sum())
            norm, updated = backend.step(1e-2)
        norms.append(norm.item())
    report[stage] = {"norms_above_clip": min(norms) > 0.1, "reads": reads.where}
if backend.is_main:
    print("REPORT", json.dumps(report))
backend.close()
""".replace("import json,", "import contextlib, json,")


def args(shards: dict[str, str], run_dir: Path, **extra) -> list[str]:
    """Global batch 16 = 2 ranks x 2 accumulated micro-batches of 4, read by the ranks themselves (data workers:
    tests/train/test_training.py; with DeepSpeed, tests/submit/test_slurm.py)."""
    values = {"data.workers": 0, "optim.grad_accum": 2, "schedule.total_steps": STEPS, "checkpoint.every": EVERY,
              **extra}
    return overrides(shards, run_dir, **values)


def ds_args(shards: dict[str, str], run_dir: Path, stage: int, **extra) -> list[str]:
    """ZeRO-3 runs with compiled blocks (which ZeRO-3's parameter gathering leaves to eager code)."""
    return args(shards, run_dir, backend="deepspeed", **{"deepspeed.zero_stage": stage},
                **({"compile": "true"} if stage == 3 else {}), **extra)


def reported(stdout: str):
    """The JSON a script printed last, after 'REPORT ': gloo's own lines ('[Gloo] Rank 1 is connected ...', from
    another rank, on the same stdout, written in parts) may come after it or around it."""
    found = re.findall(r"REPORT (.*)", stdout)
    assert found, f"no REPORT line in the script's output:\n{stdout}"
    return json.loads(found[-1])


def torchrun(argv: list[str], script: tuple[str, ...] = ("-m", "pretrain.run"), env: dict[str, str] = ENV):
    result = run(argv, launcher=(*TORCHRUN, *script), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.find(run_dir) / "model.safetensors")


def grad_norms(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in records if r["split"] == "train"}


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def reference(small_shards, tmp_path_factory) -> Path:
    """The torch backend (DDP) over 2 processes."""
    run_dir = tmp_path_factory.mktemp("torch")
    torchrun(args(small_shards, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def zero(small_shards, tmp_path_factory) -> dict[int, Path]:
    """The same run with ZeRO stages 1, 2 and 3; stage 1 under the deepspeed launcher, the others under torchrun."""
    runs = {stage: tmp_path_factory.mktemp(f"zero{stage}") for stage in (1, 2, 3)}
    launcher = (str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                "--module", "pretrain.run")
    result = run(ds_args(small_shards, runs[1], 1), launcher=launcher, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    torchrun(ds_args(small_shards, runs[2], 2))
    compiled = torchrun(ds_args(small_shards, runs[3], 3), env={**ENV, "TORCH_LOGS": "recompiles"})
    assert "Recompiling" not in compiled.stderr  # ZeRO-3's hooks stay out of the compiled blocks
    return runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_the_torch_backend(stage, zero, reference):
    expected, got = losses(reference), losses(zero[stage])
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5 if stage < 3 else 1e-4), step
    norms = grad_norms(zero[stage])  # ZeRO's own norm, handed back as a tensor
    for step, norm in grad_norms(reference).items():
        assert norms[step] == pytest.approx(norm, rel=1e-3), step
    assert max(norms.values()) > 1.0  # so the losses agree with clipping at work (ours, in the fused step)
    config = json.loads((zero[stage] / "deepspeed_config.json").read_text())
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.0 and config["zero_optimization"]["stage"] == stage
    root = zero[stage] / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000004", "step_000000008"]
    if stage < 3:
        for name, w in weights(reference).items():
            torch.testing.assert_close(weights(zero[stage])[name], w, atol=1e-4, rtol=0)
    else:
        assert not (root / "step_000000008/model.safetensors").exists()



def test_zero3_ranks_evaluate_as_many_batches_when_one_has_no_shard(small_shards, tmp_path):
    """ZeRO-3's forward gathers the parameters from every rank (vit_ti8's are above the size it keeps whole on each),
    so a rank without evaluation data feeds padding until the others are done; it waited for them for ever before."""
    one_shard = f"{small_shards['val']}/val-{{000000..000000}}.tar"  # 50 samples: one rank reads it, the other none
    argv = args(small_shards, tmp_path, backend="deepspeed", **{"deepspeed.zero_stage": 3, "model.name": "vit_ti8",
                                                                "schedule.total_steps": 1, "data.val": one_shard})
    torchrun(argv)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [(r["step"], r["samples"]) for r in evals] == [(1, 50)]

@pytest.mark.parametrize("stage", [3])  # ZeRO-3 with compiled blocks: the most that a resume has to restore
def test_sigkill_then_resume_continues_the_same_losses(stage, zero, small_shards, tmp_path):
    script = tmp_path / "kill_after_step.py"
    script.write_text(KILL_AFTER_STEP)
    argv = ds_args(small_shards, tmp_path / "run", stage)
    died = run(argv, launcher=(*TORCHRUN, str(script)), env=ENV)
    assert died.returncode != 0 and max(losses(tmp_path / "run")) == KILL_AT
    assert checkpoint.find(tmp_path / "run").name == "step_000000004"
    resumed = torchrun(argv)
    assert "at step 4" in resumed.stdout
    assert losses(tmp_path / "run") == losses(zero[stage])


def test_zero3_checkpoint_consolidated_finetuned_with_torch_and_exported(zero, reference, small_shards, tmp_path):
    from transformers import ViTForImageClassification

    with pytest.raises(UserError, match="python -m pretrain.consolidate"):
        checkpoint.init_weights(zero[3], "vit_mu8")
    finetune_recipe = recipe.load("recipes/demo_finetune.yaml", [f"init_from={zero[3]}", "model.name=vit_mu8"])
    with pytest.raises(UserError, match="python -m pretrain.consolidate"):  # as --dry-run and pretrain.submit check it
        checkpoint.check_init_from(finetune_recipe)
    damaged = tmp_path / "damaged"
    shutil.copytree(zero[3], damaged)
    newest = checkpoint.find(damaged)
    next(newest.glob("deepspeed/*rank_1*optim_states.pt")).unlink()
    consolidate = run([str(damaged)], launcher=(sys.executable, "-m", "pretrain.consolidate"), env=ENV)
    assert consolidate.returncode == 2, consolidate.stderr[-3000:]
    assert consolidate.stderr.splitlines()[-1].startswith(f"error: checkpoint {newest} is damaged (ValueError: ")
    assert "consolidate the one before it, python -m pretrain.consolidate " in consolidate.stderr
    consolidate = run([str(zero[3])], launcher=(sys.executable, "-m", "pretrain.consolidate"), env=ENV)
    assert consolidate.returncode == 0 and "model.safetensors" in consolidate.stdout, consolidate.stderr[-3000:]
    newest = checkpoint.find(zero[3])
    assert (newest / "model.safetensors").stat().st_mode == (newest / "state.json").stat().st_mode  # not 0600
    for name, w in weights(reference).items():
        torch.testing.assert_close(weights(zero[3])[name], w, atol=1e-4, rtol=0)

    finetune = tmp_path / "finetune"
    result = run(["recipes/demo_finetune.yaml", f"data.train={small_shards['train']}", "data.val=",
                  f"init_from={zero[3]}", f"run_dir={finetune}", "model.name=vit_mu8", "schedule.total_steps=4",
                  "schedule.warmup_steps=2", "data.workers=1"], env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert export.main([str(finetune), "--format", "hf", str(tmp_path / "hf")]) == 0
    model, _ = checkpoint.load_model(finetune)
    hf = ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), atol=1e-4, rtol=0)


def test_a_nonfinite_gradient_is_skipped_on_every_rank(tmp_path):
    script = tmp_path / "nonfinite.py"
    script.write_text(NONFINITE)
    report = reported(torchrun([str(tmp_path)], script=(str(script),)).stdout)
    skipped_then_updated = [[False, False, False], [True, True, True]]  # [finite norm, updated, weights changed]
    assert report == {**{str(stage): [skipped_then_updated] * 2 for stage in range(4)}, "timeout_s": 3600.0}


def test_a_zero_1_or_2_step_never_reads_the_device_and_zero_3_once(tmp_path):
    """Below ZeRO-3 the norm, the clipping and the skip of a non-finite step are ours, on the device (ZeRO-1/2's
    own norm reads it once a step and its clipping once more per parameter group); ZeRO-3 decides on the host
    whether to skip, one read of its norm."""
    script = tmp_path / "host_reads.py"
    script.write_text(HOST_READS)
    report = reported(torchrun([str(tmp_path), str(ROOT / "tests")], script=(str(script),)).stdout)
    assert all(r["norms_above_clip"] for r in report.values())
    for stage in "012":
        assert report[stage]["reads"] == [], (stage, report[stage]["reads"])
    reads = report["3"]["reads"]
    assert len(reads) == 1 and "deepspeed/runtime/" in reads[0], reads


AUTOCAST = """
import json, sys, torch
from torch import nn
from pretrain.backends.deepspeed_backend import DeepSpeedBackend
from pretrain.config import Config

config = Config(run_dir=sys.argv[1])
config.data.batch_size = 2
config.deepspeed.zero_stage = 1
backend = DeepSpeedBackend(config)
backend.autocast_dtype = lambda: torch.bfloat16  # as on a GPU: the loop's forward runs under bf16 autocast
backend.setup(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
seen = []
backend.module[0].register_forward_hook(lambda module, args, out: seen.append(str(out.dtype)))
with backend.micro_step(sync=True), backend.autocast():
    backend.backward(backend.model(torch.ones(2, 4)).float().sum())
comm = sorted({str(getattr(p, "comm_dtype", None)) for p in backend.module.parameters()})
print("REPORT", json.dumps({"linear_output": seen, "comm_dtypes": comm}))
backend.close()
"""


def test_the_engine_keeps_the_loops_autocast_and_reduces_gradients_in_fp32(tmp_path):
    """DeepSpeed's forward turns off an autocast its config does not name: the linear layers would run in fp32."""
    script = tmp_path / "autocast.py"
    script.write_text(AUTOCAST)
    result = run([str(tmp_path)], launcher=(sys.executable, str(script)), env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert reported(result.stdout) == {"linear_output": ["torch.bfloat16"], "comm_dtypes": ["None"]}


def test_resuming_under_another_backend_stage_or_world_size_is_one_sentence(zero, small_shards, tmp_path):
    folder = checkpoint.find(zero[3])
    cases = [({}, "was written by the deepspeed backend, which alone can resume it; set backend=deepspeed"),
             ({"backend": "deepspeed", "deepspeed.zero_stage": 2},
              "resume it with deepspeed.zero_stage=3, or give checkpoint.resume another checkpoint"),
             ({"backend": "deepspeed", "deepspeed.zero_stage": 3}, "resume it with 2 processes")]
    for extra, says in cases:
        result = run(args(small_shards, tmp_path, **{"checkpoint.resume": folder}, **extra), env=ENV)
        assert says in one_error_line(result)
    assert not (tmp_path / "deepspeed_config.json").exists()  # a refused resume writes nothing


def test_a_job_that_would_resume_on_another_zero_layout_is_refused_at_submission(zero, small_shards):
    """Before the wait in the queue: the trainer would refuse it only once started."""
    from pretrain.cluster import slurm
    from pretrain.cluster.job import Job

    more = {"schedule.total_steps": STEPS + 8}
    for stage, gpus, says in [(2, 2, f"checkpoint {checkpoint.find(zero[1])} was written with deepspeed.zero_stage=1; "
                                     f"resume it with deepspeed.zero_stage=1, or give this recipe a run_dir of its own"),
                              (1, 4, "ZeRO-1 cannot re-shard its optimizer state for 4; resume it with 2 processes")]:
        recipe_file, *settings = ds_args(small_shards, zero[1], stage, **more)
        config = recipe.load(recipe_file, settings)
        with pytest.raises(UserError, match=re.escape(says)):
            slurm.check_reachable(Job(config, "recipes/demo.yaml", gpus_per_node=gpus))
    recipe_file, *settings = ds_args(small_shards, zero[1], 1, **more)
    slurm.check_reachable(Job(recipe.load(recipe_file, settings), recipe_file, gpus_per_node=2))  # as it was written


def test_ranks_that_deepspeeds_launcher_starts_share_the_cores():
    """Its launcher sets no OMP_NUM_THREADS (torchrun sets 1): 2 ranks on a host, each took every core."""
    code = ("import os, torch; from pretrain.config import Config; from pretrain.backends.deepspeed_backend import "
            "DeepSpeedBackend; DeepSpeedBackend(Config(backend='deepspeed')); print(torch.get_num_threads(), "
            "os.cpu_count())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**env, "LOCAL_SIZE": "2"})
    threads, cores = map(int, result.stdout.split()[-2:])
    assert threads == max(1, cores // 2), result.stderr[-2000:]


def test_deepspeed_missing_names_the_extra(small_shards, tmp_path):
    code = "import sys; sys.modules['deepspeed'] = None; from pretrain import run; sys.exit(run.main(sys.argv[1:]))"
    result = run(args(small_shards, tmp_path, backend="deepspeed"), launcher=(sys.executable, "-c", code), env=ENV)
    assert "pip install vit-pretrain[gpu]" in one_error_line(result)


TIMEOUTS = """
import json, sys, torch, torch.distributed as dist
from pretrain.backends.torch_backend import TorchBackend
from pretrain.config import Config

config = Config(run_dir=sys.argv[1])
config.data.storage_patience_s = 3000
backend = TorchBackend(config)
if backend.is_main:
    print("REPORT", json.dumps(dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()))
backend.close()
"""


def test_collectives_wait_longer_than_a_rank_waits_for_storage(tmp_path):
    """A rank asking storage again for data.storage_patience_s must not be taken for hung by the others (NCCL's
    watchdog ends a collective after 10 minutes by default). The deepspeed backend's: in the non-finite test."""
    script = tmp_path / "timeouts.py"
    script.write_text(TIMEOUTS)
    assert reported(torchrun([str(tmp_path)], script=(str(script),)).stdout) == 3600.0
