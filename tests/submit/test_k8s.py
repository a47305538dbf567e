"""pretrain.submit k8s: every rendered manifest passes `kubernetes-validate --strict` for the oldest and the
newest Kubernetes it knows, a broken value fails it, and the pods' entry point (launch.sh) turns SIGTERM
into a checkpoint and a restart, run here with real processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes_validate.utils import all_versions
from ports import free_port

from pretrain import recipe, submit
from pretrain.cluster import k8s
from pretrain.cluster.job import Job
from pretrain.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = str(Path(sys.executable).parent / "kubernetes-validate")
VERSIONS = [all_versions()[0], all_versions()[-1]]
IMAGE = "ghcr.io/acme/vit-pretrain:1.0"
VARIANTS = {
    "gpu": ["recipes/vit_b16_i21k.yaml", "--nodes", "4"],
    "deepspeed": ["recipes/vit_l16_i21k.yaml", "backend=deepspeed", "deepspeed.zero_stage=3", "--nodes", "2"],
    "cpu": ["recipes/demo.yaml", "--gpus-per-node", "0", "--nodes", "2", "--namespace", "research"],
    "tpu": ["recipes/vit_h14_jft.yaml", "backend=xla", "--nodes", "4", "--tpu-accelerator", "tpu-v5p-slice",
            "--tpu-topology", "2x2x4", "--service-account", "trainer", "--gcsfuse"],
}


def dry_run(capsys, args: list[str]) -> str:
    code = submit.main(["k8s", *args, "--image", IMAGE, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def by_kind(manifests: str) -> dict[str, dict]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(manifests)}


def kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess:
    return subprocess.run([VALIDATOR, "--strict", "--kubernetes-version", version, str(path)], check=False,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """Each variant's manifests, rendered by the command line into a file."""
    folder = tmp_path_factory.mktemp("manifests")
    paths = {}
    for name, args in VARIANTS.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert submit.main(["k8s", *args, "--image", IMAGE, "--dry-run"]) == 0
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(out.getvalue())
    return paths


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_passes_strict_validation(rendered, variant, version):
    result = kubernetes_validate(rendered[variant], version)
    objects = len(by_kind(rendered[variant].read_text()))
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("passed for resource") == objects == 5 and "WARN" not in result.stdout


def test_a_broken_value_fails_the_validator(tmp_path, capsys):
    job = Job(recipe.load("recipes/vit_b16_i21k.yaml"), "recipes/vit_b16_i21k.yaml", nodes=2)
    broken = k8s.render(job, IMAGE, memory="64Gi").replace("memory: 64Gi", "memory: {size: 64Gi}")  # not a quantity
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    result = kubernetes_validate(path, VERSIONS[-1])
    assert result.returncode == 1 and "did not validate for resource job/vit-b16-i21k" in result.stdout
    with pytest.raises(UserError, match=r"Job/vit-b16-i21k does not validate .*resources\.(requests|limits)\.memory"):
        k8s.validate(broken)
    misspelled = k8s.render(job, IMAGE).replace("terminationGracePeriodSeconds", "terminationGracePeriodSecond")
    with pytest.raises(UserError, match="terminationGracePeriodSecond"):
        k8s.validate(misspelled)
    code = submit.main(["k8s", "recipes/vit_b16_i21k.yaml", "--image", IMAGE, "--namespace", "[prod]", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --namespace '[prod]' is not a Kubernetes namespace name")


def test_the_gpu_job_is_an_indexed_job_with_rendezvous_on_pod_zero(capsys):
    objects = by_kind(dry_run(capsys, VARIANTS["gpu"]))
    service, job = objects["Service/vit-b16-i21k"], objects["Job/vit-b16-i21k"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": "vit-b16-i21k"}
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "vit-b16-i21k" and pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 180  # ViT-B/16: 2 minutes + 1 GB at 100 MB/s, whole minutes
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"  # no chown of every file per start
    trainer = pod["containers"][0]
    assert trainer["command"] == ["bash", "/etc/pretrain/launch.sh"]
    assert trainer["args"][:8] == ["torchrun", "--nnodes=4", "--node-rank=$(NODE_RANK)", "--nproc-per-node=8",
                                   "--master-addr=vit-b16-i21k-0.vit-b16-i21k.default.svc", "--master-port=29500",
                                   "--rdzv-conf=timeout=3600", "-m"]  # the first pods wait an hour for the rest
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 8
    # 8 x (1 + 12 data workers) = 104 would never be placed on the 96-vCPU nodes of 8 A100s; no CPU limit is set
    assert trainer["resources"]["requests"]["cpu"] == "80" and "cpu" not in trainer["resources"]["limits"]
    assert trainer["securityContext"]["allowPrivilegeEscalation"] is False
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[1]["onExitCodes"]["values"] == [75] and rules[0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    config = objects["ConfigMap/vit-b16-i21k"]["data"]
    shipped = recipe.from_dict(yaml.safe_load(config["recipe.yaml"]), "configmap")
    assert shipped == recipe.load("recipes/vit_b16_i21k.yaml")
    assert config["launch.sh"].strip() == (ROOT / "k8s/launch.sh").read_text().strip()
    tensorboard = objects["Deployment/vit-b16-i21k-tensorboard"]["spec"]["template"]["spec"]["containers"][0]
    assert "--logdir=/workspace/runs/vit_b16_i21k" in tensorboard["command"]
    assert objects["Service/vit-b16-i21k-tensorboard"]["spec"]["ports"][0]["port"] == 6006


def test_cpus_per_node_asks_for_what_it_is_given(capsys):
    pod = by_kind(dry_run(capsys, [*VARIANTS["gpu"], "--cpus-per-node", "200"]))["Job/vit-b16-i21k"]
    assert pod["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "200"


def test_data_the_pods_cannot_see_is_named(capsys):
    """The recipes' shards/... paths are relative: in a pod they are in the image, not on the runs volume."""
    assert submit.main(["k8s", *VARIANTS["gpu"], "--image", IMAGE, "--dry-run"]) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == ["warning: data.train shards/imagenet21k is read in the pods as /workspace/shards/imagenet21k, "
                        "which is not on the runs volume (mounted at /workspace/runs); unless the image holds it, give "
                        "a bucket URL (gs://...) or a path under runs/"]
    assert submit.main(["k8s", *VARIANTS["gpu"], "data.train=gs://bucket/i21k", "data.val=runs/shards/val",
                        "--image", IMAGE, "--dry-run"]) == 0
    assert capsys.readouterr().err == ""


def test_a_run_dir_that_reads_as_yaml_syntax_stays_one_string(capsys):
    objects = by_kind(dry_run(capsys, [*VARIANTS["gpu"], "run_dir=runs/a #1: b"]))
    assert objects["Job/a-1-b"]["metadata"]["annotations"][k8s.OWNER] == "runs/a #1: b"
    tensorboard = objects["Deployment/a-1-b-tensorboard"]["spec"]["template"]["spec"]["containers"][0]
    assert tensorboard["command"][1] == "--logdir=/workspace/runs/a #1: b"


def test_the_tpu_variant_runs_one_xla_trainer_per_host(capsys):
    objects = by_kind(dry_run(capsys, VARIANTS["tpu"]))
    pod = objects["Job/vit-h14-jft"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x4"}
    trainer = pod["containers"][0]
    assert trainer["args"] == ["python", "-m", "pretrain.run", "/etc/pretrain/recipe.yaml"]
    assert {"name": "PJRT_DEVICE", "value": "TPU"} in trainer["env"]
    assert trainer["resources"]["limits"]["google.com/tpu"] == 4
    assert yaml.safe_load(objects["ConfigMap/vit-h14-jft"]["data"]["recipe.yaml"])["backend"] == "xla"
    for template in (objects["Job/vit-h14-jft"], objects["Deployment/vit-h14-jft-tensorboard"]):
        assert template["spec"]["template"]["spec"]["serviceAccountName"] == "trainer"
        assert template["spec"]["template"]["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    assert objects["Job/vit-h14-jft"]["metadata"]["annotations"] == {k8s.OWNER: "runs/vit_h14_jft"}


@pytest.mark.parametrize("args, message", [
    (["run_dir=/ckpt/demo", "--image", IMAGE], "run_dir '/ckpt/demo' is not a folder on the runs volume"),
    (["backend=xla", "--nodes", "3", "--image", IMAGE], "a 2x2x2 slice has 2 TPU VM hosts"),
    (["--name", "Demo_1", "--image", IMAGE], "job name 'Demo_1' is not a DNS label"),
    ([], "k8s needs --image"),
    (["run_dir=runs/../demo", "--image", IMAGE], "run_dir 'runs/../demo' is not a folder on the runs volume"),
    (["run_dir=runs", "--image", IMAGE], "run_dir 'runs' is not a folder on the runs volume"),
    (["--namespace", "Bad NS", "--image", IMAGE], "--namespace 'Bad NS' is not a Kubernetes namespace name"),
    (["--pvc", "", "--image", IMAGE], "--pvc '' is not a PersistentVolumeClaim name"),
    (["--memory", "256GB", "--image", IMAGE], "--memory '256GB' is not a Kubernetes quantity like 256Gi; 256Gi is"),
    (["--memory", "0Gi", "--image", IMAGE], "--memory '0Gi' is not a Kubernetes quantity like 256Gi"),
    (["--tpu-topology", "2x2x4", "--image", IMAGE], "--tpu-accelerator, --tpu-topology and --tpu-chips-per-host "
                                                    "describe the TPU slice of a backend=xla job, and this one is"),
    (["--image", "bad image:1"], "--image 'bad image:1' is not an image reference"),
    (["--image", "ghcr.io/You/vit:1"], "--image 'ghcr.io/You/vit:1' is not an image reference"),
    (["--image", "*x"], "--image '*x' is not an image reference"),
    (["checkpoint.resume=never", "--image", IMAGE], "checkpoint.resume=never: a job started again after preemption"),
    (["backend=xla", "--tpu-accelerator", "tpu-v5e", "--image", IMAGE], "--tpu-accelerator 'tpu-v5e' is not one of"),
    (["backend=xla", "--tpu-accelerator", "tpu-v5-lite-podslice", "--tpu-topology", "2x2x4", "--image", IMAGE],
     "--tpu-topology 2x2x4 is not a tpu-v5-lite-podslice topology: its slices are 2-D, such as 4x4"),
])
def test_mistakes_are_one_sentence(capsys, args, message):
    assert submit.main(["k8s", "recipes/demo.yaml", *args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("accelerator, topology, hosts, chips", [
    ("tpu-v5p-slice", "2x2x4", 4, 4), ("tpu-v4-podslice", "2x2x1", 1, 4), ("tpu-v5-lite-podslice", "1x1", 1, 1),
    ("tpu-v5-lite-podslice", "2x4", 1, 8), ("tpu-v5-lite-podslice", "4x4", 4, 4), ("tpu-v6e-slice", "16x16", 64, 4),
])
def test_tpu_slices_have_the_hosts_gke_gives_them(accelerator, topology, hosts, chips):
    assert k8s.tpu_slice(accelerator, topology) == (hosts, chips)
    with pytest.raises(UserError, match="check --tpu-chips-per-host"):
        k8s.tpu_slice(accelerator, topology, -4)  # refused before today's default of 0 (the usual), and again


def test_launch_sh_started_again_after_a_sigterm_in_the_trainers_start_up(tmp_path):
    """A SIGTERM before the trainer's first line (the interpreter's own start) ends it (143), which is no failure."""
    starting = [sys.executable, "-c", "import time; print('importing', flush=True); time.sleep(60)"]
    pod = subprocess.Popen(["bash", "k8s/launch.sh", *starting], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    assert pod.stdout.readline() == "importing\n"
    pod.send_signal(signal.SIGTERM)
    out = pod.communicate(timeout=30)[0]
    assert pod.returncode == 75 and "exiting 75 to be started again" in out, out


def test_launch_sh_started_again_after_a_sigterm_in_a_torchrun_workers_start_up(tmp_path):
    """torchrun reports a worker that the SIGTERM ended before its first line as failed (1): no failure either."""
    (tmp_path / "starting.py").write_text("import time; print('importing', flush=True); time.sleep(60)")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    pod = subprocess.Popen(["bash", "k8s/launch.sh", torchrun, "--standalone", "--nproc-per-node=1",
                            str(tmp_path / "starting.py")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    while (line := pod.stdout.readline()) != "importing\n":
        assert line, pod.communicate()[0]
    pod.send_signal(signal.SIGTERM)
    out = pod.communicate(timeout=60)[0]
    assert pod.returncode == 75 and "(exit status 1); exiting 75 to be started again" in out, out


def test_launch_sh_joins_the_rendezvous_again_when_the_first_pod_is_stopped_in_it(tmp_path):
    """Three pods: the first two wait for the third in torchrun's rendezvous, held by the first, which is preempted.
    The second joins again (it failed before: a failure counted against the Job); the run starts when all three are up."""
    (tmp_path / "worker.py").write_text("import os; print('worker', os.environ['RANK'], 'started', flush=True)")
    port = free_port()
    env = {**os.environ, "LOGLEVEL": "INFO"}

    def pod(index: int) -> subprocess.Popen:
        torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nnodes=3", f"--node-rank={index}",
                    "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                    "--rdzv-conf=timeout=120", str(tmp_path / "worker.py")]
        return subprocess.Popen(["bash", "k8s/launch.sh", *torchrun], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def read_until(p: subprocess.Popen, text: str) -> None:
        while text not in (line := p.stdout.readline()):
            assert line, f"no '{text}' from the pod"

    first, second = pod(0), pod(1)
    for p in (first, second):
        read_until(p, "Rendezvous'ing worker group")
    time.sleep(2)
    first.send_signal(signal.SIGTERM)
    assert "exiting 75" in first.communicate(timeout=60)[0] and first.returncode == 75
    read_until(second, "the rendezvous was lost, as when the first pod is stopped; joining it again")
    first, third = pod(0), pod(2)
    outs = [p.communicate(timeout=120)[0] for p in (first, second, third)]
    assert [p.returncode for p in (first, second, third)] == [0, 0, 0], outs
    assert "worker 1 started" in outs[1]

    (tmp_path / "worker.py").write_text("raise SystemExit(3)")  # fails before launch.sh sees it started
    alone = subprocess.run(["bash", "k8s/launch.sh", str(Path(sys.executable).parent / "torchrun"), "--nnodes=1",
                            "--node-rank=0", "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                            "--rdzv-conf=timeout=120", str(tmp_path / "worker.py")], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert alone.returncode == 1 and "joining it again" not in alone.stderr, alone.stderr  # the first pod's own failure


SIGNAL_IN_START_UP = """
import os, signal, sys
from pretrain.train import preemption
preemption.hold_signals()
os.kill(os.getpid(), signal.SIGTERM)
from pretrain import run
sys.exit(run.main(sys.argv[1:]))
"""


def test_launch_sh_reports_a_trainer_that_fails_after_a_sigterm_as_failed(tmp_path):
    """A recipe error found after the SIGTERM came: the pod fails with the trainer's error, not started again."""
    (tmp_path / "signal_first.py").write_text(SIGNAL_IN_START_UP)
    (tmp_path / "empty").mkdir()
    command = ["bash", "k8s/launch.sh", sys.executable, str(tmp_path / "signal_first.py"), "recipes/demo.yaml",
               "model.name=vit_mu8", f"data.train={tmp_path / 'empty'}", "data.val=", f"run_dir={tmp_path / 'run'}"]
    failed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "error: " in failed.stderr and "exiting 75" not in failed.stderr


def test_launch_sh_turns_sigterm_into_a_checkpoint_and_exit_75_then_resumes(small_shards, tmp_path):
    """The pod's entry point with torchrun and two trainers, as Kubernetes runs it: SIGTERM to it alone."""
    overrides = {"model.name": "vit_mu8", "data.train": small_shards["train"], "data.val": "", "data.batch_size": 16,
                 "data.workers": 1, "schedule.total_steps": 30, "schedule.warmup_steps": 5, "log.every": 1,
                 "log.eval_every": 0, "log.fewshot_every": 0, "checkpoint.every": 100, "run_dir": str(tmp_path)}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = ["bash", "k8s/launch.sh", torchrun, "--standalone", "--nproc-per-node=2", "-m", "pretrain.run",
               "recipes/demo.yaml", *(f"{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pod = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.time() < deadline and pod.poll() is None, pod.communicate()[0]
        time.sleep(0.1)
    pod.send_signal(signal.SIGTERM)
    out = pod.communicate(timeout=120)[0]
    assert pod.returncode == 75, out
    assert "preempted: checkpoint written at step" in out and "exiting 75 to be started again" in out
    stopped = int(out.split("preempted: checkpoint written at step ")[1].split(";")[0])
    assert (tmp_path / f"checkpoints/step_{stopped:09d}/state.json").is_file() and stopped < 30

    restarted = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert f"at step {stopped}" in restarted.stdout
    assert (tmp_path / "checkpoints/step_000000030/state.json").is_file()

    # Submitted again with fewer steps, the run is complete: the pod succeeds, not restarted for ever.
    shorter = [*command, "schedule.total_steps=20"]
    again = subprocess.run(shorter, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr


SIGNAL_AT_STEP = """
import os, signal, sys
from pretrain import run
from pretrain.metrics import Metrics
log = Metrics.log
def log_then_signal(self, step, scalars, prefix="train"):
    log(self, step, scalars, prefix)
    if step == int(os.environ.get("SIGNAL_AT", "0")):
        os.kill(os.getpid(), signal.SIGTERM)
Metrics.log = log_then_signal
sys.exit(run.main(sys.argv[1:]))
"""


def test_launch_sh_starts_a_run_preempted_in_its_last_step_again_for_its_final_evaluation(small_shards, tmp_path):
    """The last step's checkpoint is no sign that the run is complete: its final evaluation is owed too. And a run
    started from another run's last checkpoint, with nothing to train, is complete without a checkpoint of its own."""
    (tmp_path / "signal_at.py").write_text(SIGNAL_AT_STEP)
    overrides = {"model.name": "vit_mu8", "data.train": small_shards["train"], "data.val": small_shards["val"],
                 "data.batch_size": 16, "data.workers": 0, "schedule.total_steps": 4, "schedule.warmup_steps": 1,
                 "log.every": 1, "log.fewshot_every": 0, "checkpoint.every": 100, "run_dir": str(tmp_path / "a")}
    command = ["bash", "k8s/launch.sh", sys.executable, str(tmp_path / "signal_at.py"), "recipes/demo.yaml",
               *(f"{k}={v}" for k, v in overrides.items())]
    stopped = subprocess.run(command, cwd=ROOT, env={**os.environ, "SIGNAL_AT": "4"}, capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    assert "preempted: checkpoint written at step 4" in stopped.stdout
    assert "a signal stopped the trainer at step 4 before the end of the run (exit status 0); exiting 75" in stopped.stderr
    evals = lambda run: [r["step"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                         if r["split"] == "eval"]
    assert evals("a") == []
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert evals("a") == [4]
    elsewhere = [*command, f"run_dir={tmp_path / 'b'}", f"checkpoint.resume={tmp_path / 'a/checkpoints/step_000000004'}"]
    once = subprocess.run(elsewhere, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert once.returncode == 0, once.stdout + once.stderr
    assert evals("b") == [4]

def pod(index: int, created: str, phase: str, exit_code: int | None = None, message: str = "",
        conditions: list[dict] | None = None) -> dict:
    """A pod of an Indexed Job as `kubectl get pods -o yaml` shows it (the fields pretrain.submit reads)."""
    state = {"terminated": {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed",
                            "message": message}} if exit_code is not None else {"running": {}}
    return {"metadata": {"name": f"b16-{index}-{created[11:13]}", "creationTimestamp": created,
                         "annotations": {k8s.INDEX: str(index)}},
            "status": {"phase": phase, "conditions": conditions or [],
                       "containerStatuses": [{"name": "trainer", "state": state}]}}


def test_status_tells_waiting_restarted_and_failed_pods_apart():
    """No API server runs here: the Job's and pods' objects are written as the API returns them."""
    running = {"status": {"active": 2}, "metadata": {"annotations": {k8s.OWNER: "runs/b16"}}}
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
    pending = [pod(0, "2026-12-01T10:00:00Z", "Pending", conditions=[unschedulable]),
               pod(1, "2026-12-01T10:00:00Z", "Pending", conditions=[unschedulable])]
    assert k8s.describe(running, pending, 2) == ("Pending: 0 of 2 pod(s) running; waiting: not scheduled (0/3 nodes "
                                                 "are available: 3 Insufficient nvidia.com/gpu.)")
    preempted = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    history = [pod(0, "2026-12-01T10:00:00Z", "Failed", 75), pod(1, "2026-12-01T10:00:01Z", "Failed", 143,
                                                                   conditions=[preempted]),
               pod(0, "2026-12-01T11:00:00Z", "Running"), pod(1, "2026-12-01T11:00:01Z", "Running")]
    assert k8s.describe(running, history, 2) == "Running: 2 of 2 pod(s) running; started again 1 time(s)"
    crash = ("Traceback ...\nerror: data.val shards name 5 classes, the model 10; shard the validation split with "
             "--classes\nE1201 12:00:00 torchrun ChildFailedError\n")
    failed = {"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}}
    ended = [*history[:2], pod(0, "2026-12-01T11:00:00Z", "Failed", 1, crash),
             pod(1, "2026-12-01T11:00:01Z", "Failed", 1, "")]
    said = "error: data.val shards name 5 classes, the model 10; shard the validation split with --classes"
    assert k8s.describe(failed, ended, 2) == (  # the pod that says why, not its peer that failed after it
        f"Failed: 0 of 2 pod(s) running; started again 1 time(s); 2 failed; the last error: {said}")
    assert k8s.describe(failed, [*ended[:2], ended[3]], 2).endswith("; 1 failed; the last error: exit status 1 (Error)")
    assert [p["metadata"]["name"] for p in k8s.current(ended)] == ["b16-0-11", "b16-1-11"]
    record = {"run_dir": "runs/b16"}  # runs/b16_384 and runs/b16-384 both make the Job name b16-384
    assert k8s._ours(running, record) and not k8s._ours(running, {"run_dir": "runs/b16-384"})
    assert k8s._ours(running, {"run_dir": "./runs/b16/"}) and k8s._ours({"metadata": {}}, record)  # one predating it


def claim(*modes: str) -> dict:
    """A PersistentVolumeClaim as `kubectl get pvc -o yaml` shows it (the fields pretrain.submit reads)."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "vit-runs", "namespace": "ml"},
            "spec": {"accessModes": list(modes), "resources": {"requests": {"storage": "1Ti"}}},
            "status": {"phase": "Bound", "accessModes": list(modes)}}


def test_a_runs_volume_the_pods_would_wait_on_for_ever_is_refused_before_apply(rendered):
    assert k8s.claim_name(rendered["cpu"].read_text()) == "vit-runs"
    assert k8s.check_claim(claim("ReadWriteMany"), "vit-runs", "ml", 4) == []
    with pytest.raises(UserError, match=r"^PersistentVolumeClaim vit-runs does not exist in namespace ml, so the pods"):
        k8s.check_claim(None, "vit-runs", "ml", 1)
    with pytest.raises(UserError, match=r"^PersistentVolumeClaim ml/vit-runs is ReadWriteOnce, which one node at a "
                                        r"time can mount, but the job's 2 pods run on 2 nodes; give a ReadWriteMany"):
        k8s.check_claim(claim("ReadWriteOnce"), "vit-runs", "ml", 2)
    with pytest.raises(UserError, match=r"^PersistentVolumeClaim ml/vit-runs is ReadWriteOncePod, which the training "):
        k8s.check_claim(claim("ReadWriteOncePod"), "vit-runs", "ml", 1)
    assert k8s.check_claim(claim("ReadWriteOnce"), "vit-runs", "ml", 1) == [
        "PersistentVolumeClaim ml/vit-runs is ReadWriteOnce: TensorBoard's pod can start only on the training pod's node"]


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A kubectl on PATH that answers from tmp_path/cluster.json (tests/submit/kubectl.py); returns a function that
    writes the cluster and then reads back the calls made."""
    (tmp_path / "kubectl").write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests/submit/kubectl.py'} \"$@\"\n")
    (tmp_path / "kubectl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("KUBECTL_STATE", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def describe(**objects) -> Path:
        (tmp_path / "cluster.json").write_text(json.dumps(objects))
        return tmp_path / "calls.txt"
    return describe


FORBIDDEN = 'Error from server (Forbidden): persistentvolumeclaims "vit-runs" is forbidden: User "alice" cannot get'


@pytest.mark.parametrize("answer, submitted", [(None, False), (FORBIDDEN, True)])
def test_submit_checks_the_claim_before_it_applies_anything(cluster, capsys, answer, submitted):
    calls = cluster(pvc=answer)
    code = submit.main(["k8s", str(ROOT / "recipes/demo.yaml"), "run_dir=runs/demo", "--image", IMAGE,
                        "--gpus-per-node", "0"])
    err = capsys.readouterr().err
    assert calls.read_text().startswith("get persistentvolumeclaim vit-runs --namespace default")
    if submitted:
        assert code == 0 and "apply --filename runs/demo/job/manifests.yaml" in calls.read_text()
        assert err.startswith("warning: not allowed to read PersistentVolumeClaim default/vit-runs, so it is not")
    else:
        assert code == 2 and "apply" not in calls.read_text() and not Path("runs").exists()
        assert err.startswith("error: PersistentVolumeClaim vit-runs does not exist in namespace default")


def test_a_submission_refused_for_another_runs_job_leaves_nothing_that_cancel_would_delete(cluster, capsys):
    """The Job's name is taken by another run's Job: manifests naming it would have cancel delete that run's objects."""
    calls = cluster(pvc=claim("ReadWriteMany"),
                    job={"metadata": {"annotations": {k8s.OWNER: "runs/x"}}, "status": {"active": 1}})
    code = submit.main(["k8s", str(ROOT / "recipes/demo.yaml"), "run_dir=runs/y", "--name", "x", "--image", IMAGE,
                        "--gpus-per-node", "0"])
    assert code == 2 and "belongs to run directory runs/x" in capsys.readouterr().err
    assert "apply" not in calls.read_text() and not Path("runs/y/job/manifests.yaml").exists()


def test_a_job_folder_this_machine_cannot_write_is_one_sentence(cluster, capsys):
    cluster(pvc=claim("ReadWriteMany"))
    Path("runs").write_text("")  # a file where the run directories would go
    assert submit.main(["k8s", str(ROOT / "recipes/demo.yaml"), "run_dir=runs/y", "--image", IMAGE,
                        "--gpus-per-node", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write runs/y/job/manifests.yaml (Not a directory): the "
                                              "job folder, on this machine, keeps what status, logs and cancel read")


@pytest.mark.parametrize("record", [b"", b"[1]", b'{"scheduler": "pbs"}', b"\xff"])
def test_a_damaged_job_record_is_one_sentence(cluster, capsys, record):
    Path("runs/y/job").mkdir(parents=True)
    Path("runs/y/job/job.json").write_bytes(record)
    for argv in (["status", "runs/y"], ["k8s", str(ROOT / "recipes/demo.yaml"), "run_dir=runs/y", "--image", IMAGE,
                                        "--gpus-per-node", "0"]):
        assert submit.main(argv) == 2
        assert capsys.readouterr().err.startswith("error: runs/y/job/job.json is damaged (not the record")


def test_logs_follow_goes_on_to_the_pods_of_the_jobs_next_start_until_it_ends(cluster, capfd, monkeypatch):
    monkeypatch.setattr(k8s, "FOLLOW_POLL_S", 0.05)
    owned = {"metadata": {"annotations": {k8s.OWNER: "runs/b16"}}}
    running, complete = {**owned, "status": {"active": 1}}, {**owned, "status": {
        "conditions": [{"type": "Complete", "status": "True"}]}}
    first, again = pod(0, "2026-12-01T10:00:00Z", "Running"), pod(0, "2026-12-01T11:00:00Z", "Running")
    calls = cluster(job=[running, running, complete],
                    pods=[[first], [{**first, "status": {**first["status"], "phase": "Failed"}}, again]])
    record = {"scheduler": "k8s", "name": "b16", "namespace": "ml", "run_dir": "runs/b16", "nodes": 1}
    assert k8s.logs(record, follow=True) == 0
    out = capfd.readouterr().out
    assert out.splitlines() == ["[pod/b16-0-10/trainer] step 10 loss 2.30", "[pod/b16-0-11/trainer] step 10 loss 2.30"]
    followed = [line for line in calls.read_text().splitlines() if line.startswith("logs")]
    assert followed == [f"logs --namespace ml pod/{name} --prefix --tail=-1 --follow" for name in ("b16-0-10", "b16-0-11")]
