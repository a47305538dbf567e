"""Kubernetes: core objects only, so that every manifest can be schema-checked offline.

- k8s/job-config.yaml: a ConfigMap with the resolved recipe and launch.sh (the pods' entry point)
- k8s/train-gpu.yaml: a headless Service and an Indexed Job, torchrun on every node (torch, deepspeed)
- k8s/train-tpu.yaml: the same for a GKE TPU slice, one trainer per TPU VM host (xla)
- k8s/tensorboard.yaml: a TensorBoard Deployment and Service reading the run directory

The pods run in /workspace and mount the runs volume (a PersistentVolumeClaim) at /workspace/runs, so
a recipe's run_dir=runs/NAME means the same folder in every pod and in TensorBoard.
"""

from __future__ import annotations

import math
import posixpath
import re
import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any

import yaml

from .. import recipe
from ..errors import UserError
from . import templates
from .job import Job, job_dir, tool

WORKDIR = PurePosixPath("/workspace")
RUNS_MOUNT = WORKDIR / "runs"
RENDEZVOUS_PORT = 29500
MISSING = "install kubectl and point it at the cluster (kubectl config use-context ...)"
RESTARTS_PER_NODE = 2  # backoffLimit: real failures tolerated per node before the Job fails


# GKE's TPU accelerators: the dimensions of their topologies, and the chips of one host by the slice's chips (a
# slice of 1, 4 or 8 v5e or v6e chips is one host of that many; larger ones are hosts of 4).
TPU_ACCELERATORS = {"tpu-v4-podslice": 3, "tpu-v5p-slice": 3, "tpu-v5-lite-podslice": 2, "tpu-v6e-slice": 2}
SINGLE_HOST_2D = (1, 4, 8)
QUANTITY = r"\d+(\.\d+)?([KMGTPE]i?|k)?"  # Kubernetes' memory quantities: 256Gi, 512G, 1.5Ti


def pod_run_dir(run_dir: str) -> PurePosixPath:
    """Where the pods see the run directory; it must lie in a folder of the runs volume."""
    path = PurePosixPath(posixpath.normpath(WORKDIR / run_dir))
    if RUNS_MOUNT not in path.parents:
        raise UserError(f"run_dir '{run_dir}' is not a folder on the runs volume, which the pods mount at "
                        f"{RUNS_MOUNT} (anywhere else they write to their own disk, lost when they restart); use "
                        f"run_dir=runs/NAME")
    return path


def check_names(namespace: str, pvc: str, memory: str, image: str) -> None:
    """What the API server would refuse at apply, or a pod would wait on for ever, in one sentence here."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace):
        raise UserError(f"--namespace '{namespace}' is not a Kubernetes namespace name (a-z, 0-9, '-', at most 63)")
    if not re.fullmatch(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?", pvc):
        raise UserError(f"--pvc '{pvc}' is not a PersistentVolumeClaim name (a-z, 0-9, '-', '.'): give the claim "
                        f"that holds the run directories (kubectl get pvc -n {namespace})")
    if memory and not re.fullmatch(QUANTITY, memory):
        hint = f"; {memory[:-1]}i is {memory}'s binary unit" if re.fullmatch(r"\d+[KMGTPE]B", memory) else ""
        raise UserError(f"--memory '{memory}' is not a Kubernetes quantity like 256Gi{hint}")
    if not image or re.search(r"\s", image):
        raise UserError("k8s needs --image: a container image with this repository installed "
                        "(pip install '.[gpu]' for GPUs, '.[tpu]' for TPUs)" if not image else
                        f"--image '{image}' holds a space; give an image reference like ghcr.io/you/vit-pretrain:1.0")


def unreachable_data(config) -> list[str]:
    """Warnings for the recipe's local data paths (and init_from) that are not on the runs volume: the pods would read them from
    the image, where shards are rarely put."""
    lines = []
    named = {f"data.{key}": getattr(config.data, key) for key in recipe.DATA_KEYS}
    for key, value in {**named, "init_from": config.init_from if config.stage == "finetune" else ""}.items():
        path = WORKDIR / value
        if value and "://" not in value and path != RUNS_MOUNT and RUNS_MOUNT not in path.parents:
            instead = "a path under runs/" if key == "init_from" else "a bucket URL (gs://...) or a path under runs/"
            lines.append(f"{key} {value} is read in the pods as {path}, which is not on the runs volume "
                         f"(mounted at {RUNS_MOUNT}); unless the image holds it, give {instead}")
    return lines


def tpu_slice(accelerator: str, topology: str, chips_per_host: int = 0) -> tuple[int, int]:
    """(TPU VM hosts, chips a host) of a GKE slice: tpu-v5p-slice 2x2x4 is 4 hosts of 4 chips; 0 chips a host means
    the usual machine type's."""
    dims = TPU_ACCELERATORS.get(accelerator)
    if dims is None:
        raise UserError(f"--tpu-accelerator '{accelerator}' is not one of GKE's TPU accelerators "
                        f"({', '.join(TPU_ACCELERATORS)})")
    example = "2x2x4" if dims == 3 else "4x4"
    if not re.fullmatch(r"\d+(x\d+)+", topology):
        raise UserError(f"--tpu-topology '{topology}' is not of the form {example}")
    if topology.count("x") + 1 != dims:
        raise UserError(f"--tpu-topology {topology} is not a {accelerator} topology: its slices are {dims}-D, "
                        f"such as {example}")
    chips = math.prod(int(d) for d in topology.split("x"))
    chips_per_host = chips_per_host or (chips if dims == 2 and chips in SINGLE_HOST_2D else 4)
    if chips % chips_per_host:
        raise UserError(f"--tpu-topology {topology} has {chips} chips, which hosts of {chips_per_host} chips do not "
                        f"make up; check --tpu-chips-per-host")
    return chips // chips_per_host, chips_per_host


def render(job: Job, image: str, namespace: str = "default", pvc: str = "vit-runs", memory: str = "",
           tpu_accelerator: str = "tpu-v5p-slice", tpu_topology: str = "2x2x2",
           tpu_chips_per_host: int = 0) -> str:
    """The manifests for ``job``, one YAML stream: ConfigMap, training Service and Job, TensorBoard."""
    check_names(namespace, pvc, memory, image)
    run_dir = pod_run_dir(job.config.run_dir)
    tpu = job.config.backend == "xla"
    hosts, tpu_chips_per_host = tpu_slice(tpu_accelerator, tpu_topology, tpu_chips_per_host) if tpu else (job.nodes, 0)
    if job.nodes != hosts:
        raise UserError(f"a {tpu_topology} slice has {hosts} TPU VM hosts ({tpu_chips_per_host} chips each) but "
                        f"--nodes is {job.nodes}; pass --nodes {hosts}")
    job.check_batch_split()
    nproc = job.nproc_per_node
    values = {
        "name": job.name, "namespace": namespace, "image": image, "pvc": pvc, "runs_mount": RUNS_MOUNT,
        "nodes": job.nodes, "nproc_per_node": nproc, "gpus_per_node": job.gpus_per_node,
        "cpus_per_node": job.cpus_per_node, "memory": memory or f"{32 * nproc}Gi", "backend": job.config.backend,
        "grace_seconds": job.grace_seconds, "backoff_limit": RESTARTS_PER_NODE * job.nodes,
        "rendezvous_port": RENDEZVOUS_PORT, "final_checkpoint": run_dir / "checkpoints" / job.final_checkpoint,
        "tpu_accelerator": tpu_accelerator, "tpu_topology": tpu_topology, "tpu_chips_per_host": tpu_chips_per_host,
        "tb_logdir": run_dir, "recipe_yaml": recipe.to_yaml(job.config), "launch_sh": templates.source("k8s/launch.sh"),
    }
    names = ["k8s/job-config.yaml", "k8s/train-tpu.yaml" if tpu else "k8s/train-gpu.yaml", "k8s/tensorboard.yaml"]
    return "---\n".join(templates.render(name, values) for name in names)


def objects(manifests: str) -> list[dict[str, Any]]:
    try:
        return [doc for doc in yaml.safe_load_all(manifests) if doc]
    except yaml.YAMLError as e:
        raise UserError(f"the rendered manifests are not valid YAML: {e}") from None


def validate(manifests: str, version: str = "") -> None:
    """Check every object against the Kubernetes schema of ``version`` (default: the newest known), strictly:
    a misspelled or misplaced field fails too."""
    try:
        import kubernetes_validate
    except ImportError:
        raise UserError("kubernetes-validate, which checks the manifests before they are applied, is not "
                        "installed; pip install 'vit-pretrain[k8s]' (or kubernetes-validate)") from None
    version = version or kubernetes_validate.latest_version()
    for obj in objects(manifests):
        what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top level)"
            raise UserError(f"{what} does not validate against Kubernetes {e.version}: {where}: {e.message}") from None
        except kubernetes_validate.SchemaNotFoundError as e:
            raise UserError(f"{what}: {e.message}") from None


def submit(job: Job, manifests: str) -> dict[str, Any]:
    """Write the manifests into the run's job folder (here, on this machine) and kubectl apply them."""
    folder = job_dir(job.config.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifests.yaml"
    path.write_text(manifests)
    namespace = objects(manifests)[0]["metadata"]["namespace"]
    existing = _job({"name": job.name, "namespace": namespace})
    if existing is not None and not _finished(existing):
        raise UserError(f"a Job named {job.name} is running in namespace {namespace} (another run's?); cancel it, or "
                        f"pass --name to name this one otherwise")
    if existing is not None:  # ended: a Job's pod template cannot be applied over, so it goes first
        tool(["kubectl", "delete", "job", job.name, "--namespace", namespace, "--cascade=foreground", "--wait=true",
              "--timeout=300s"], MISSING)
    tool(["kubectl", "apply", "--filename", str(path)], MISSING)
    return {"scheduler": "k8s", "name": job.name, "namespace": namespace, "nodes": job.nodes,
            "manifests": str(path), "run_dir": job.config.run_dir, "grace": job.grace_seconds}


def _job(record: dict[str, Any]) -> dict[str, Any] | None:
    got = tool(["kubectl", "get", "job", record["name"], "--namespace", record["namespace"], "--output", "yaml",
                "--ignore-not-found"], MISSING)
    return yaml.safe_load(got.stdout) if got.stdout.strip() else None


def is_active(record: dict[str, Any]) -> bool:
    job = _job(record)
    return job is not None and not _finished(job)


def _finished(job: dict[str, Any]) -> str:
    done = [c["type"] for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"]
    return next((c for c in done if c in ("Complete", "Failed")), "")


def status(record: dict[str, Any]) -> str:
    job = _job(record)
    where = f"Kubernetes Job {record['namespace']}/{record['name']}"
    if job is None:
        return f"{where}: not found (cancelled, or the cluster is another one)"
    s = job.get("status", {})
    state = _finished(job) or ("Running" if s.get("active") else "Pending")
    return (f"{where}: {state}, {s.get('active', 0)} pod(s) active, {s.get('succeeded', 0)} of {record['nodes']} "
            f"succeeded, {s.get('failed', 0)} failed\n"
            f"TensorBoard: kubectl port-forward -n {record['namespace']} service/{record['name']}-tensorboard "
            f"6006:6006, then http://localhost:6006")


def logs(record: dict[str, Any], follow: bool) -> int:
    """Every training pod's output, each line prefixed with its pod; kubectl's exit status."""
    args = ["kubectl", "logs", "--namespace", record["namespace"], "--selector", f"job-name={record['name']}",
            "--prefix", "--tail=-1", f"--max-log-requests={record['nodes']}", *(["--follow"] if follow else [])]
    try:
        return subprocess.run(args, check=False).returncode
    except FileNotFoundError:
        raise UserError(f"kubectl not found; {MISSING}") from None


def cancel(record: dict[str, Any]) -> str:
    """Delete the job's objects, waiting until its pods are gone: SIGTERM has them write a checkpoint first, and a
    job submitted again before then would resume from the one before it."""
    print(f"deleting Job {record['namespace']}/{record['name']}; its pods write a checkpoint and stop first",
          file=sys.stderr, flush=True)
    tool(["kubectl", "delete", "--namespace", record["namespace"], "--filename", record["manifests"],
          "--ignore-not-found", "--cascade=foreground", "--wait=true", f"--timeout={record.get('grace', 600) + 120}s"],
         MISSING)
    return (f"deleted Job {record['namespace']}/{record['name']} and its Service, ConfigMap and TensorBoard; the "
            f"checkpoints stay on the runs volume, and submitting the same recipe again resumes from the latest")
