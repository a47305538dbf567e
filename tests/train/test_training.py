"""The training loop as a user runs it: real processes, real shards, signals, torchrun, TensorBoard files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from procs import alive, living
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain import checkpoint

ROOT = Path(__file__).resolve().parents[2]


def overrides(shards: dict[str, str], run_dir: Path, **extra) -> list[str]:
    values = {"model.name": "vit_mu8", "data.train": shards["train"], "data.val": "", "data.batch_size": 16,
              "data.workers": 2, "schedule.total_steps": 40, "schedule.warmup_steps": 5, "log.every": 1,
              "log.eval_every": 0, "log.fewshot_every": 0, "checkpoint.every": 20, "run_dir": str(run_dir), **extra}
    return ["recipes/demo.yaml", *(f"{k}={v}" for k, v in values.items())]


def run(args: list[str], launcher: tuple[str, ...] = (sys.executable, "-m", "pretrain.run"), cwd: Path = ROOT, **kw):
    return subprocess.run([*launcher, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step (a row cut short by a kill is not read)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True):
        record = json.loads(line) if line.endswith("\n") else {"split": "cut short"}
        if record["split"] == "train":
            out[record["step"]] = record["loss"]
    return out


def logged_steps(run_dir: Path, split: str = "train") -> tuple[list[int], list[int]]:
    """The steps of a split's rows in metrics.jsonl, and of its loss in TensorBoard as the UI shows it."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [r["step"] for r in rows if r["split"] == split], [e.step for e in events.Scalars(f"{split}/loss")]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run did not reach step {step}: {proc.poll()=}")


def test_sigkill_mid_epoch_then_resume_is_exact(small_shards, tmp_path):
    clean = run(overrides(small_shards, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.run", *overrides(small_shards, killed_dir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(killed_dir, 23, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reached = max(losses(killed_dir))
    assert 23 <= reached < 40 and checkpoint.find(killed_dir).name == "step_000000020", reached
    resumed = run(overrides(small_shards, killed_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 20" in resumed.stdout
    assert losses(killed_dir) == losses(clean_dir := tmp_path / "clean"), "losses differ after resuming"
    final = "checkpoints/step_000000040/model.safetensors"
    assert (killed_dir / final).read_bytes() == (clean_dir / final).read_bytes(), "final weights differ"
    # the steps logged between the checkpoint and the kill are logged once, not again after them
    assert logged_steps(killed_dir) == (list(range(1, 41)), list(range(1, 41)))

    written = {name: (killed_dir / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    again = run(overrides(small_shards, killed_dir, **{"optim.lr": 1e-3}))
    assert again.returncode == 0, again.stderr
    assert f"{killed_dir} is complete (its checkpoint is at step 40" in again.stdout
    assert written == {name: (killed_dir / name).read_bytes() for name in written}, "a finished run was changed"


KILL_IN_FINAL_EVAL = """
import os, signal, sys
from pretrain import run
from pretrain.train.loop import Trainer
def die(self):
    os.kill(os.getpid(), signal.SIGKILL)
Trainer._evaluate = die
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_run_killed_in_its_final_evaluation_evaluates_when_run_again(small_shards, tmp_path):
    """Its last checkpoint is written, its final evaluation is not: run again, it evaluates and trains nothing."""
    args = overrides(small_shards, tmp_path, **{"schedule.total_steps": 4, "data.val": small_shards["val"],
                                                 "data.workers": 0})
    assert run(args, launcher=(sys.executable, "-c", KILL_IN_FINAL_EVAL)).returncode == -signal.SIGKILL
    weights = (checkpoint.find(tmp_path) / "model.safetensors").read_bytes()
    again = run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "eval step 4/4 | top1" in again.stdout and "train step" not in again.stdout
    assert (checkpoint.find(tmp_path) / "model.safetensors").read_bytes() == weights
    assert "is complete" in run(args).stdout


KILL_IN_CHECKPOINT = """
import os, signal, sys
from pretrain import checkpoint, run
real = checkpoint._fsync
def fsync_then_die(path):
    if "step_000000010" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    real(path)
checkpoint._fsync = fsync_then_die
sys.exit(run.main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(small_shards, tmp_path):
    args = overrides(small_shards, tmp_path, **{"checkpoint.every": 5, "schedule.total_steps": 12, "data.workers": 0})
    died = run(args, launcher=(sys.executable, "-c", KILL_IN_CHECKPOINT))
    assert died.returncode == -signal.SIGKILL
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step_000000010").is_dir() and not (root / "step_000000010").exists()
    assert (root / "latest").read_text().strip() == "step_000000005"
    assert checkpoint.find(tmp_path).name == "step_000000005"
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 5" in resumed.stdout and max(losses(tmp_path)) == 12


KILL_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from pretrain import run
from pretrain.train.loop import Trainer
save = Trainer._checkpoint
def save_then_die(self, window):
    save(self, window)
    os.kill(os.getpid(), signal.SIGKILL)
Trainer._checkpoint = save_then_die
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_checkpoint_inside_a_log_window_resumes_to_the_same_logged_means(small_shards, tmp_path):
    """Steps 5-8 are one log window; the run dies after the checkpoint at step 6 and logs step 8's mean as if not.
    With dropout, as the ImageNet-21k recipes: its random numbers continue as if the run had not stopped."""
    steps = {"schedule.total_steps": 12, "log.every": 4, "checkpoint.every": 6, "model.dropout": 0.1,
             "data.workers": 0}
    clean = run(overrides(small_shards, tmp_path / "clean", **steps))
    assert clean.returncode == 0, clean.stderr
    args = overrides(small_shards, tmp_path / "killed", **steps)
    assert run(args, launcher=(sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT)).returncode != 0
    assert checkpoint.find(tmp_path / "killed").name == "step_000000006"
    assert run(args).returncode == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "clean")


SLOW_ASIDES = """
import sys, time
from pretrain import run
from pretrain.train.loop import Trainer
for name in ("_evaluate", "_checkpoint"):
    def slow(self, *args, work=getattr(Trainer, name)):
        time.sleep(4)
        return work(self, *args)
    setattr(Trainer, name, slow)
sys.exit(run.main(sys.argv[1:]))
"""


def test_evaluations_and_checkpoints_are_not_counted_as_training_time(small_shards, tmp_path):
    """Each evaluation and checkpoint takes 4 s more here; the window after them must not show it in img/s."""
    every = {"schedule.total_steps": 4, "log.every": 2, "log.eval_every": 2, "checkpoint.every": 2,
             "data.val": small_shards["val"]}
    result = run(overrides(small_shards, tmp_path, **every), launcher=(sys.executable, "-c", SLOW_ASIDES))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seconds = {r["step"]: 32 / r["img_per_s"] for r in rows if r["split"] == "train"}  # 2 steps of 16 images
    assert seconds[4] < 4, seconds  # steps 3-4, after the evaluation and the checkpoint at step 2: 8 s aside


def test_a_log_window_cut_on_two_ranks_and_finished_on_one_logs_its_mean(small_shards, tmp_path):
    """The checkpoint at step 6 cuts the log window 5-8 of a 2-rank run; the run resumes on one rank (the stream
    restarts at the next epoch). Its step-8 row must be the mean of the two ranks' steps 5-6 and its own 7-8, which
    runs logging every 2 steps give: the same start without a cut window, then the same resumed steps. The 2-rank
    runs read in the training processes and evaluate at the end, which hung one DDP exit in three."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "pretrain.run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mean = {}
    for every in (2, 4):
        cut = {"schedule.total_steps": 8, "checkpoint.every": 6, "log.every": every, "data.workers": 0,
               "data.val": small_shards["val"]}
        started = run(overrides(small_shards, tmp_path / f"two-{every}", **cut), launcher=torchrun, env=env)
        assert started.returncode == 0, started.stderr[-3000:]
        resumed = run(overrides(small_shards, tmp_path / f"one-{every}", **{
            **cut, "data.allow_resharding": "true",
            "checkpoint.resume": str(tmp_path / f"two-{every}" / "checkpoints" / "step_000000006")}))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "the data stream of 2 ranks x 1 readers each restarts at epoch 1 on 1 x 1" in resumed.stdout
        mean[every] = losses(tmp_path / f"one-{every}")[8]
    steps_5_6 = losses(tmp_path / "two-2")[6]
    assert mean[4] == pytest.approx((steps_5_6 + mean[2]) / 2, rel=1e-5)


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(small_shards, tmp_path):
    """Two readers either way: one process with 2 workers and 2 accumulation steps reads what
    2 ranks with 1 worker each read, so every optimizer step sees the same 16 samples; two shards are gone, and
    both runs count their samples (the 2-rank run's counts are both ranks')."""
    shutil.copytree(small_shards["train"], tmp_path / "train")
    shards = sorted((tmp_path / "train").glob("*.tar"))
    for first in np.random.default_rng([0, 0]).permutation(len(shards))[:2]:  # each reader's first (seed 0, epoch 0)
        shards[first].unlink()
    small_shards = {**small_shards, "train": str(tmp_path / "train")}
    steps = {"schedule.total_steps": 10, "checkpoint.every": 100}
    single = run(overrides(small_shards, tmp_path / "one", **steps, **{"optim.grad_accum": 2}))
    assert single.returncode == 0, single.stderr
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pretrain.run")
    ddp = run(overrides(small_shards, tmp_path / "ddp", **steps, **{"data.workers": 1}), launcher=launcher,
              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    counted = [[(r["bad_samples"], r["damaged_shards"]) for r in map(json.loads, (tmp_path / name / "metrics.jsonl")
               .read_text().splitlines()) if r["split"] == "train"][-1] for name in ("one", "ddp")]
    assert counted[0] == counted[1] == (100, 2), counted


def test_the_ranks_end_with_a_launcher_that_is_killed(small_shards, tmp_path):
    """torchrun starts each rank in a session of its own: SIGKILLed, it left them training beside the rerun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "pretrain.run"]
    args = overrides(small_shards, tmp_path, **{"schedule.total_steps": 2000, "data.workers": 0})
    proc = subprocess.Popen([*launcher, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_step(tmp_path, 2, proc)
    ranks = living(parent=proc.pid)
    assert len(ranks) == 2, ranks
    try:
        proc.kill()
        proc.wait()
        deadline = time.time() + 30
        while any(map(alive, ranks)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, ranks)), "the ranks outlived torchrun"
    finally:
        for pid in ranks:  # not left training when the test fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_second_trainer_in_a_run_dir_in_use_is_refused_or_waits_for_the_first(small_shards, tmp_path):
    """Two trainers in one run_dir would resume from and prune each other's checkpoints. A second one is refused
    (on every rank: none is left waiting for the others), or waits for the first to end and resumes from its last
    checkpoint."""
    args = overrides(small_shards, tmp_path, **{"schedule.total_steps": 2000, "data.workers": 0, "checkpoint.every": 5})
    first = subprocess.Popen([sys.executable, "-m", "pretrain.run", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    second = None
    try:
        wait_for_step(tmp_path, 6, first)
        torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "pretrain.run")
        refused = run([*args, "checkpoint.lock_wait_s=0"], launcher=torchrun, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert refused.returncode != 0 and first.poll() is None
        said = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
        assert said == [f"error: run_dir {tmp_path} is in use by another trainer (pid {first.pid} on {os.uname().nodename}"
                        f" since {said[0].split(' since ')[-1]}"] and "[rank1]" not in refused.stderr, refused.stderr
        assert said[0].endswith("); wait for it to end, or stop it, or give this run another run_dir")
        with open(tmp_path / "second.out", "w") as out, open(tmp_path / "second.err", "w") as err:
            second = subprocess.Popen([sys.executable, "-m", "pretrain.run", *args, "checkpoint.lock_wait_s=120"],
                                      cwd=ROOT, stdout=out, stderr=err)
        deadline = time.time() + 120
        while "waiting up to 120 s for it to end" not in (tmp_path / "second.err").read_text():
            assert time.time() < deadline and second.poll() is None, (tmp_path / "second.err").read_text()
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
        last = checkpoint.find(tmp_path)
        step = int(last.name.removeprefix("step_"))
        wait_for_step(tmp_path, step + 2, second)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=120) == 0
        assert f"resumed from {last} at step {step}" in (tmp_path / "second.out").read_text()
        assert not (tmp_path / "checkpoints" / "abandoned").exists()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_run_dir_that_cannot_be_made_is_one_sentence(small_shards, tmp_path):
    (tmp_path / "file").write_text("")
    for run_dir in (tmp_path / "file", tmp_path / "file" / "run"):
        refused = run(overrides(small_shards, run_dir, **{"data.workers": 0}))
        assert refused.returncode == 2 and refused.stderr.startswith(f"error: run_dir {run_dir} cannot be made or "
                                                                       f"written ("), refused.stderr
        assert refused.stderr.endswith("); give a folder this process can write\n")


def test_a_checkpoint_that_fills_the_disk_is_one_sentence(small_shards, tmp_path):
    """On a 1.2 MB file system the run's logs fit and its first checkpoint (2.6 MB) does not: torch.save says only
    'unexpected pos'. The partial checkpoint is removed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    try:
        full = run(overrides(small_shards, disk / "run", **{"data.workers": 0, "log.every": 5}))
        assert full.returncode == 2 and full.stderr.startswith(
            f"error: writing checkpoint step_000000020 into {disk / 'run' / 'checkpoints'} failed: its disk is full ("
        ) and len(full.stderr.splitlines()) == 1, full.stderr[-3000:]
        assert full.stderr.endswith("then rerun the command: it resumes from the newest complete checkpoint\n")
        assert not list((disk / "run" / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_run_started_in_another_directory_is_evaluated_from_here(small_shards, tmp_path):
    """Relative data paths are stored absolute, so evaluate reads the training manifest (and checks its class
    names) from any directory."""
    args = overrides({"train": "train"}, tmp_path / "run", **{"data.val": "val", "schedule.total_steps": 2,
                                                                         "data.workers": 0})
    started = run([str(ROOT / args[0]), *args[1:]], cwd=Path(small_shards["train"]).parent)
    assert started.returncode == 0, started.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (saved["train"], saved["val"]) == (small_shards["train"], small_shards["val"])
    evaluated = run([str(tmp_path / "run"), f"data={small_shards['val']}"],
                    launcher=(sys.executable, "-m", "pretrain.evaluate"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "cannot be read from here" not in evaluated.stderr


def test_tensorboard_events_hold_the_scalars(small_shards, tmp_path):
    result = run(overrides(small_shards, tmp_path, **{"schedule.total_steps": 6, "data.val": small_shards["val"],
                                                   "data.fewshot_train": small_shards["train"], "log.fewshot_every": 3,
                                                   "data.workers": 0}))
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ["loss", "lr", "grad_norm", "img_per_s", "data_wait", "skipped_steps", "bad_samples"]:
        assert f"train/{tag}" in scalars
        assert [e.step for e in events.Scalars(f"train/{tag}")] == [1, 2, 3, 4, 5, 6]
    assert {"eval/top1", "eval/top5", "eval/loss"} <= scalars
    assert [e.step for e in events.Scalars("fewshot/fewshot_10shot_top1")] == [3, 6]
    assert "train/inputs" in events.Tags()["images"]
    assert events.Scalars("train/lr")[0].value == pytest.approx(2e-3 / 5)
    assert (tmp_path / "config.yaml").is_file()


def test_the_few_shot_probe_has_sets_of_its_own(small_shards, tmp_path):
    """As a JFT run probes ImageNet: data.fewshot_train and data.fewshot_val, with no data.val to evaluate on."""
    result = run(overrides(small_shards, tmp_path, **{"schedule.total_steps": 3, "data.val": "",
                                                   "data.fewshot_train": small_shards["train"],
                                                   "data.fewshot_val": small_shards["val"], "log.fewshot_every": 3,
                                                   "data.workers": 0}))
    assert result.returncode == 0, result.stderr[-2000:]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["split"] == "fewshot" and "fewshot_10shot_top1" in r] == [3]


@pytest.mark.parametrize("key", ["data.val", "data.fewshot_train"])
def test_data_labelled_by_other_classes_is_one_sentence(small_shards, tmp_path, key):
    extra = {"data.val": small_shards["val"], key: small_shards["val_reversed"], "log.fewshot_every": 2,
             "data.workers": 0}
    wrong = run(overrides(small_shards, tmp_path, **extra))
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr[-2000:]
    # The split the labels follow is the training split, whose classes a fix can label the other by (a validation
    # set may hold fewer of them).
    named, by = ((small_shards["val_reversed"], small_shards["train"]) if key == "data.val" else
                 (small_shards["val"], small_shards["val_reversed"]))
    assert wrong.stderr.startswith(f"error: {named} labels its samples by other classes than {by} ")
    assert f"--classes {by}" in wrong.stderr and not (tmp_path / "config.yaml").exists()


def test_labels_beyond_the_models_classes_are_one_sentence(small_shards, tmp_path):
    """Shards given by a brace pattern have no manifest to check their classes against before the first batch."""
    braces = f"{small_shards['train']}/train-{{000000..000007}}.tar"
    wrong = run(overrides({"train": braces}, tmp_path, **{"model.num_classes": 5, "data.workers": 0}))
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr[-2000:]
    assert wrong.stderr.startswith(f"error: {braces} labels a sample ")
    assert "but the model has 5 classes (labels 0-4); give shards of the model's classes" in wrong.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_without_a_readable_sample_stop_the_run_in_one_sentence(small_shards, tmp_path, workers):
    """Rather than a reader that reads on forever and a training process that waits for it."""
    broken = tmp_path / "broken"
    shutil.copytree(small_shards["train"], broken)
    for tar in broken.glob("*.tar"):
        tar.write_bytes(b"not a tar" * 100)
    result = run(overrides({"train": str(broken)}, tmp_path / "run", **{"data.workers": workers}))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert result.stderr.startswith("error: none of the ") and "python -m data_tools.verify" in result.stderr


def test_the_demo_recipe_learns(pretrained_run):
    """The demo recipe's settings and loop learn, here with vit_mu8, batch 64 and 100 steps (the shared pre-trained
    run); `make demo` trains its own vit_mu4 at batch 128 for 500 steps."""
    evals = [json.loads(line) for line in (pretrained_run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["step"] == 100 and evals[-1]["top1"] > 0.3, evals  # chance is 0.1


def test_settings_changed_on_resume_apply_or_are_refused(small_shards, tmp_path):
    """The optimizer's settings come from the recipe, not the checkpoint (its state restored them: a changed weight
    decay was said to apply and did not); another optimizer is one sentence; the epoch counts the images seen when
    the batch size changes."""
    base = {"data.workers": 0, "schedule.total_steps": 4, "checkpoint.every": 4, "log.every": 2}
    first = run(overrides(small_shards, tmp_path / "a", **base))
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    more = {**base, "schedule.total_steps": 6, "data.batch_size": 32}
    for run_dir, decay in (("a", 0.1), ("b", 5.0)):
        resumed = run(overrides(small_shards, tmp_path / run_dir, **more, **{"optim.weight_decay": decay}))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "6 steps of 32 (0.32 epochs)" in resumed.stdout  # 4 x 16 + 2 x 32 images of 400
    groups = {run_dir: torch.load(tmp_path / run_dir / "checkpoints/step_000000006/optimizer.pt")["param_groups"]
              for run_dir in "ab"}
    assert [g["weight_decay"] for g in groups["b"]] == [5.0, 0.0]  # the decayed weights, then the rest
    assert [g["weight_decay"] for g in groups["a"]] == [0.1, 0.0]
    weights = [load_file(tmp_path / d / "checkpoints/step_000000006/model.safetensors") for d in "ab"]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [r["epoch"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"] == pytest.approx([0.08, 0.16, 0.32])
    sgd = run(overrides(small_shards, tmp_path / "a", **{**more, "schedule.total_steps": 8, "optim.name": "sgd"}))
    assert sgd.returncode == 2 and sgd.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {tmp_path / 'a' / 'checkpoints' / 'step_000000006'} holds the state of optim.name=adamw, which sgd "
        f"cannot take over; set optim.name=adamw to resume it, or give this recipe a run_dir of its own"), sgd.stderr
    seed = run(overrides(small_shards, tmp_path / "c", seed=-1))
    assert seed.returncode == 2 and "seed" in seed.stderr and not (tmp_path / "c").exists(), seed.stderr
