"""pretrain.submit slurm against a real two-node Slurm on loopback: a job trains with one process per node
(gloo), USR1 before the time limit makes it checkpoint, requeue and resume to the same weights, and
status / logs / cancel find the job from its run directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.errors import UserError
from pretrain.submit import main as submit_main

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
FINAL = "checkpoints/step_000000040/model.safetensors"


def submit_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.submit", *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def submit(slurm, shards: dict[str, str], run_dir: Path, steps: int = STEPS, backend: str = "torch") -> str:
    """Submit a tiny pre-training on both nodes (one CPU trainer each); the Slurm job id."""
    overrides = {"model.name": "vit_mu8", "data.train": shards["train"], "data.val": "", "data.batch_size": 16,
                 "data.workers": 1, "schedule.total_steps": steps, "schedule.warmup_steps": 5, "log.every": 1,
                 "log.eval_every": 0, "log.fewshot_every": 0, "checkpoint.every": 20, "run_dir": str(run_dir),
                 "backend": backend}
    result = submit_cli(["slurm", "recipes/demo.yaml", *(f"{k}={v}" for k, v in overrides.items()), "--nodes", "2",
                         "--gpus-per-node", "0"], slurm.env)
    assert result.returncode == 0, result.stderr
    return json.loads((run_dir / "job/job.json").read_text())["job_id"]


def job_fields(slurm, job_id: str) -> dict[str, str]:
    out = slurm.run(["scontrol", "--oneliner", "show", "job", job_id]).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(what: str, ready, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_state(slurm, job_id: str, state: str, timeout: float = 180) -> dict[str, str]:
    def reached():
        fields = job_fields(slurm, job_id)
        if fields.get("JobState") in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"} - {state}:
            raise AssertionError(f"job {job_id} is {fields['JobState']} ({fields.get('Reason')})\n{slurm.logs()}")
        return fields if fields.get("JobState") == state else None

    return wait_for(f"job {job_id} to be {state}", reached, timeout)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if '"train"' in line]


@pytest.fixture(scope="module")
def finished_run(slurm, small_shards, tmp_path_factory) -> Path:
    """A run that went through uninterrupted: its run directory."""
    run_dir = tmp_path_factory.mktemp("slurm_run")
    job_id = submit(slurm, small_shards, run_dir)
    fields = wait_for_state(slurm, job_id, "COMPLETED")
    assert fields["ExitCode"] == "0:0"
    return run_dir


def test_a_two_node_job_writes_checkpoints_and_tensorboard_events(finished_run):
    output = (finished_run / "job").glob("slurm-*.out")
    log = next(output).read_text()
    assert "start 1, on n[1-2]" in log and "trainers finished with exit status 0" in log
    assert "(cpu, 2 CPUs each)" in log  # the task's CPUs, which srun bound to the job step
    assert sorted(p.name for p in (finished_run / "checkpoints").glob("step_*")) == ["step_000000020", "step_000000040"]
    events = EventAccumulator(str(finished_run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert (finished_run / "job/recipe.yaml").is_file() and (finished_run / "job/train.sbatch").is_file()


def preempt_and_resume(slurm, shards: dict[str, str], run_dir: Path, backend: str = "torch",
                       to: str = "--batch", signal: str = "USR1", at_step: int = 8) -> int:
    """A job that gets ``signal`` at step ``at_step`` (0: as soon as its step runs, while torchrun starts) and is
    requeued; the step it stopped at. ``to`` "--batch": the batch script alone, as --signal=B:USR1@GRACE does at the
    time limit; "": the job's steps (scancel --signal=TERM JOBID, as a site's preemption does)."""
    job_id = submit(slurm, shards, run_dir, backend=backend)
    if at_step:
        wait_for(f"step {at_step}", lambda: max(logged_steps(run_dir), default=0) >= at_step, timeout=300)
    else:
        wait_for("the job's step", lambda: f"{job_id}.0" in slurm.run(["squeue", "-h", "-s", "-o", "%i"]).stdout)
    assert slurm.run(["scancel", *filter(None, [to]), f"--signal={signal}", job_id]).returncode == 0
    requeued = wait_for_state(slurm, job_id, "PENDING")
    assert requeued["Restarts"] == "1"
    # Skip the requeue delay (BeginTime) once the nodes are done with the first run, and a second later:
    # slurmd refuses a launch credential issued in the same whole second as the first run's revocation.
    wait_for("idle nodes", lambda: slurm.run(["sinfo", "-h", "-o", "%t"]).stdout.split() == ["idle"])
    time.sleep(1.5)
    slurm.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    wait_for_state(slurm, job_id, "COMPLETED", timeout=300)

    log = (run_dir / f"job/slurm-{job_id}.out").read_text()
    stopped = int(log.split("preempted: checkpoint written at step ")[1].split(";")[0])
    assert at_step <= stopped < STEPS
    assert "requeueing job" in log and "start 2, on n[1-2]" in log
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:09d} at step {stopped}" in log
    return stopped


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes_exactly(slurm, small_shards, finished_run,
                                                                            tmp_path):
    preempt_and_resume(slurm, small_shards, tmp_path)
    assert (tmp_path / FINAL).read_bytes() == (finished_run / FINAL).read_bytes(), "final weights differ"


def test_usr1_to_the_steps_while_torchrun_starts_checkpoints_requeues_and_resumes(slurm, small_shards, finished_run,
                                                                                 tmp_path):
    """The signal comes before the trainers exist to take it (torch's import alone takes seconds, a minute from
    shared storage): the shell around torchrun keeps it for them."""
    assert preempt_and_resume(slurm, small_shards, tmp_path, to="", at_step=0) <= 1
    assert (tmp_path / FINAL).read_bytes() == (finished_run / FINAL).read_bytes(), "final weights differ"


def test_the_deepspeed_backend_is_requeued_and_resumed_too(slurm, small_shards, finished_run, tmp_path):
    pytest.importorskip("deepspeed")
    # TERM to the steps reaches torchrun too, which exits 1 once its trainers have written their checkpoint
    preempt_and_resume(slurm, small_shards, tmp_path, backend="deepspeed", to="", signal="TERM")
    ours, reference = load_file(tmp_path / FINAL), load_file(finished_run / FINAL)
    for name, weight in reference.items():  # ZeRO reduces in another order: equal up to rounding
        assert torch.allclose(ours[name], weight, atol=1e-3), name


def test_status_logs_and_cancel_find_the_job_from_its_run_directory(slurm, small_shards, tmp_path, monkeypatch,
                                                                   capsys):
    job_id = submit(slurm, small_shards, tmp_path, steps=10_000)
    wait_for_state(slurm, job_id, "RUNNING")
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])

    def cli(args: list[str], code: int = 0) -> str:
        assert submit_main(args) == code
        out, err = capsys.readouterr()
        return out + err

    assert cli(["status", str(tmp_path)]).startswith(f"Slurm job {job_id}: RUNNING")
    again = cli(["slurm", "recipes/demo.yaml", f"run_dir={tmp_path}", "--gpus-per-node", "0"], code=2)
    assert "already has a job in the queue or running; cancel it first" in again
    wait_for("output", lambda: (tmp_path / f"job/slurm-{job_id}.out").exists())
    assert f"job {job_id}, start 1" in cli(["logs", str(tmp_path)])
    assert f"cancelled Slurm job {job_id}" in cli(["cancel", str(tmp_path)])
    wait_for_state(slurm, job_id, "CANCELLED", timeout=60)
    assert f"Slurm job {job_id}: CANCELLED" in cli(["status", str(tmp_path)])
    assert f"Slurm job {job_id} had already ended (CANCELLED); nothing to cancel" in cli(["cancel", str(tmp_path)])
    record = json.loads((tmp_path / "job/job.json").read_text())
    (tmp_path / "forgotten/job").mkdir(parents=True)  # a job that ended before the controller's MinJobAge
    (tmp_path / "forgotten/job/job.json").write_text(json.dumps({**record, "job_id": "999999"}))
    assert "Slurm job 999999 is no longer known to Slurm (it ended); nothing to cancel" in \
        cli(["cancel", str(tmp_path / "forgotten")])
    followed = submit_cli(["logs", str(tmp_path), "--follow"], slurm.env)  # ends with the job (times out if not)
    assert followed.returncode == 0 and f"job {job_id}, start 1" in followed.stdout
    gpus = cli(["slurm", "recipes/demo.yaml", f"run_dir={tmp_path}/gpu", f"data.train={small_shards['train']}",
                f"data.val={small_shards['val']}"], code=2)  # these nodes have no GPUs
    assert "; on nodes without GPUs pass --gpus-per-node 0" in gpus and not (tmp_path / "gpu/job").exists()
    cpus = cli(["slurm", "recipes/demo.yaml", f"run_dir={tmp_path}/cpu", f"data.train={small_shards['train']}",
                "data.val=", "log.fewshot_every=0", "data.workers=2", "--gpus-per-node", "0"], code=2)  # 3 CPUs, 2 here
    assert "; the job asks each node for 3 CPUs (1 trainer(s) x (1 + data.workers)) and 0 GPUs: pass --cpus-per-node" \
        in cpus
    failing = tmp_path / "failing"  # its validation shards name other classes: the trainers refuse them at start
    cli(["slurm", "recipes/demo.yaml", f"run_dir={failing}", f"data.train={small_shards['train']}", "model.name=vit_mu8",
         f"data.val={small_shards['val_reversed']}", "data.workers=1", "--gpus-per-node", "0"])
    failed = json.loads((failing / "job/job.json").read_text())["job_id"]
    wait_for_state(slurm, failed, "FAILED")
    assert f"its last error: {small_shards['val_reversed']} labels its samples by other classes" in \
        cli(["status", str(failing)])
    gone = json.loads((failing / "job/job.json").read_text()) | {"job_id": "999998"}  # once Slurm forgot it
    (tmp_path / "gone/job").mkdir(parents=True)
    (tmp_path / "gone/job/job.json").write_text(json.dumps(gone))
    said = cli(["status", str(tmp_path / "gone")])
    assert said.startswith("Slurm job 999998: no longer known to Slurm; its output ends: trainers finished with exit "
                           "status 1 at ") and f"\noutput: {gone['output']}\n" in said  # torchrun's status
    assert f"its last error: {small_shards['val_reversed']} labels its samples by other classes" in said


def test_errors_are_one_sentence(small_shards, pretrained_run, tmp_path, monkeypatch, capsys):
    def error(args: list[str]) -> str:
        assert submit_main(args) == 2
        err = capsys.readouterr().err  # after a warning (tmp_path, of two nodes, is under /tmp)
        lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
        assert len(lines) == 1, err
        return lines[0]

    assert error(["slurm", "recipes/demo.yaml", "optim.lrr=1", "--dry-run"]).startswith(
        "error: command line: unknown key 'optim.lrr'; did you mean 'optim.lr'?")
    assert error(["slurm", "recipes/demo.yaml", "backend=xla", "--dry-run"]).startswith(
        "error: backend xla runs on TPU VMs")
    assert error(["slurm", "recipes/demo.yaml", "--nodes", "3", "--dry-run"]).startswith(
        "error: data.batch_size 128 does not split over 24 ranks")
    short = ["slurm", "recipes/demo.yaml", "--time", "00:02:00", "--grace-seconds", "180", "--dry-run"]
    assert error(short).startswith("error: --time 00:02:00 is no longer than the 180 s warning before it (--grace-")
    assert error(["slurm", "recipes/demo.yaml", "--time", "2h", "--dry-run"]).startswith(
        "error: --time 2h is not a Slurm time limit")
    assert submit_main(["slurm", "recipes/demo.yaml", "--time", "UNLIMITED", "--dry-run"]) == 0
    assert "#SBATCH --time=UNLIMITED\n" in capsys.readouterr().out
    for odd in ("my run", "run#2", "run%j"):  # # starts a comment in an #SBATCH line, %j is the job id there
        assert error(["slurm", "recipes/demo.yaml", f"run_dir={tmp_path}/{odd}", "--dry-run"]).startswith(
            f"error: run_dir {tmp_path}/{odd} holds a space, quote, backslash, # or %")
    assert error(["status", str(tmp_path)]).startswith(f"error: {tmp_path} has no submitted job")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash"))  # bash for the syntax check, and no sbatch
    monkeypatch.setenv("PATH", str(bin_dir))
    data = [f"data.train={small_shards['train']}", f"data.val={small_shards['val']}"]
    assert error(["slurm", "recipes/demo.yaml", *data, f"run_dir={tmp_path}/run", "--gpus-per-node", "0"]).startswith(
        "error: sbatch not found; install the Slurm client tools")
    # Refused before sbatch: what the job would fail on in its first seconds, after its wait in the queue.
    assert error(["slurm", "recipes/demo_finetune.yaml", f"init_from={tmp_path}/nothing", f"run_dir={tmp_path}/ft",
                  "--gpus-per-node", "0"]).startswith(f"error: init_from={tmp_path}/nothing does not exist")
    assert error(["slurm", "recipes/demo.yaml", f"data.train={tmp_path}/nothing", f"run_dir={tmp_path}/run",
                  "--gpus-per-node", "0"]).startswith(f"error: data.train: {tmp_path}/nothing")
    assert error(["slurm", "recipes/demo.yaml", *data, f"run_dir={pretrained_run}", "model.name=vit_mu8", "--nodes",
                  "2", "--gpus-per-node", "0"]).startswith(f"error: {pretrained_run} resumes from step_000000100, but "
                                                           f"the checkpoint's data stream ran on 1 ranks x ")
    assert error(["slurm", "recipes/demo.yaml", *data, f"run_dir={pretrained_run}", "--gpus-per-node", "0"]).startswith(
        f"error: {pretrained_run} resumes from step_000000100, a pretrain run of vit_mu8, and this recipe is a pretrain "
        f"run of vit_mu4; give it a run_dir of its own")
    start = f"{pretrained_run}/checkpoints/step_000000100"  # checkpoint.resume=PATH: checked as the run's own are
    assert error(["slurm", "recipes/demo.yaml", *data, f"run_dir={tmp_path}/g", f"checkpoint.resume={start}",
                  "model.name=vit_mu8", "--nodes", "2", "--gpus-per-node", "0"]).startswith(
        f"error: checkpoint.resume is {start}, but the checkpoint's data stream ran on 1 ranks x ")
    for extra, said in ((["optim.name=sgd"], "holds the state of optim.name=adamw, which sgd cannot take over"),
                        (["schedule.total_steps=50"], "is at step 100, past schedule.total_steps=50")):
        assert error(["slurm", "recipes/demo.yaml", *data, f"run_dir={tmp_path}/g", f"checkpoint.resume={start}",
                      "model.name=vit_mu8", *extra, "--gpus-per-node", "0"]).startswith(f"error: checkpoint {start} {said}")
    assert error(["slurm", "recipes/demo.yaml", *data, f"run_dir={tmp_path}/g", f"checkpoint.resume={tmp_path}/none",
                  "--gpus-per-node", "0"]).startswith(f"error: checkpoint.resume={tmp_path}/none holds no complete")
    ft = ["slurm", "recipes/demo_finetune.yaml", *data, f"run_dir={tmp_path}/ft", "--gpus-per-node", "0"]
    assert error([*ft, f"init_from={pretrained_run}"]).startswith(  # init_from: ours, of the recipe's model
        f"error: init_from={pretrained_run} holds a vit_mu8 and the recipe builds vit_mu4; set model.name=vit_mu8")
    (tmp_path / "queued" / "job").mkdir(parents=True)  # a pre-training run submitted, still in the queue
    (tmp_path / "empty").mkdir()
    assert error([*ft, f"init_from={tmp_path}/queued"]).startswith(
        f"error: init_from={tmp_path}/queued is a run of ours with no complete checkpoint yet; wait for its first")
    assert error([*ft, f"init_from={tmp_path}/empty"]).startswith(
        f"error: {tmp_path}/empty is a folder without config.json; give a transformers model folder or a weights file")
    (tmp_path / "starting/checkpoints").mkdir(parents=True)
    assert error([*ft, f"init_from={tmp_path}/starting"]).startswith(
        f"error: init_from={tmp_path}/starting is a run of ours with no complete checkpoint yet")
    assert error(["slurm", "recipes/demo.yaml", *data, f"run_dir={pretrained_run}", "model.name=vit_mu8",
                  "schedule.total_steps=100", "--gpus-per-node", "0"]).startswith(
        f"error: {pretrained_run} is complete (its checkpoint is at step 100, schedule.total_steps is 100)")


def test_the_script_asks_for_the_warning_signal_and_requeue(capsys):
    assert submit_main(["slurm", "recipes/vit_b16_i21k.yaml", "--nodes", "4", "--partition", "gpu", "--time",
                        "24:00:00", "--grace-seconds", "300", "--dry-run"]) == 0
    script, note = capsys.readouterr()
    assert "dry run: nothing was written or submitted; without --dry-run, " in note
    assert not (ROOT / "runs/vit_b16_i21k/job").exists()
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=104", "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append"]:
        assert line + "\n" in script
    assert "--nproc-per-node=8" in script and "trap forward_usr1 USR1" in script


def test_a_job_is_named_after_the_start_of_its_run_directory():
    from pretrain.cluster.job import job_name

    assert job_name("runs/vit_l16_i21k") == "vit-l16-i21k"
    assert job_name("/ckpt/runs/2026_sweep/lr3e-4") == "ckpt-2026-sweep-lr3e-4"
    assert job_name("runs/2026/b16") == "vit-2026-b16"
    long = job_name("runs/x_20261201_vit_b16_i21k_lr0.001_wd0.03_seed1")
    assert long.startswith("x-20261201-vit-b16-i21k-lr0-001-") and len(long) == 40
    alike = "/scratch/alice/experiments/2026/imagenet21k/vit_{}16"
    assert job_name(alike.format("b")) != job_name(alike.format("l"))  # alike but for their ends



def test_a_partition_that_is_no_name_is_one_sentence_and_a_node_local_run_dir_a_warning(small_shards, tmp_path,
                                                                                         capsys):
    from pretrain import recipe
    from pretrain.cluster import job as jobs, slurm as slurm_jobs

    config = recipe.load("recipes/demo.yaml", [f"data.train={small_shards['train']}", f"run_dir={tmp_path}"])
    job = slurm_jobs.prepare(jobs.Job(config, "recipes/demo.yaml", gpus_per_node=0))
    with pytest.raises(UserError, match=r"--partition 'gpu #1' is not a partition name, or a list of them joined"):
        slurm_jobs.render(job, partition="gpu #1")
    assert "#SBATCH --partition=gpu,debug\n" in slurm_jobs.render(job, partition="gpu,debug")
    assert capsys.readouterr().err == ""
    local = recipe.load("recipes/demo.yaml", [f"data.train={small_shards['train']}", "run_dir=/dev/shm/vit-run"])
    slurm_jobs.prepare(jobs.Job(local, "recipes/demo.yaml", nodes=2, gpus_per_node=0))
    assert "warning: run_dir /dev/shm/vit-run is usually each node's own disk" in capsys.readouterr().err
