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
import time
from collections import Counter
from pathlib import PurePosixPath
from typing import Any

import yaml

from .. import recipe
from ..errors import UserError
from . import templates
from .job import Job, job_dir, tool, write_local

WORKDIR = PurePosixPath("/workspace")
RUNS_MOUNT = WORKDIR / "runs"
RENDEZVOUS_PORT = 29500
MISSING = "install kubectl and point it at the cluster (kubectl config use-context ...)"
SCHEDULABLE_CPUS_PER_TRAINER = 10  # 8-GPU nodes of 96 vCPUs (A100 a2/p4d/ND96) allocate about 93
RESTARTS_PER_NODE = 2  # backoffLimit: real failures tolerated per node before the Job fails


# GKE's TPU accelerators: the dimensions of their topologies, and the chips of one host by the slice's chips (a
# slice of 1, 4 or 8 v5e or v6e chips is one host of that many; larger ones are hosts of 4).
TPU_ACCELERATORS = {"tpu-v4-podslice": 3, "tpu-v5p-slice": 3, "tpu-v5-lite-podslice": 2, "tpu-v6e-slice": 2}
SINGLE_HOST_2D = (1, 4, 8)
TPU_DEFAULT = ("tpu-v5p-slice", "2x2x2", 0)  # --tpu-accelerator, --tpu-topology, --tpu-chips-per-host
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"  # a component of an image's name, as the registries take it
_REGISTRY = r"(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*:\d+)/"
_DIGEST = r"@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE = re.compile(rf"(?:{_REGISTRY})?{_PATH}(?:/{_PATH})*(?::\w[\w.-]{{0,127}})?(?:{_DIGEST})?", re.ASCII)
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
    if memory and (not re.fullmatch(QUANTITY, memory) or not float(re.match(r"[\d.]+", memory).group())):
        hint = f"; {memory[:-1]}i is {memory}'s binary unit" if re.fullmatch(r"\d+[KMGTPE]B", memory) else ""
        raise UserError(f"--memory '{memory}' is not a Kubernetes quantity like 256Gi{hint}")
    if not image:
        raise UserError("k8s needs --image: a container image with this repository installed "
                        "(pip install '.[gpu]' for GPUs, '.[tpu]' for TPUs)")
    if not re.fullmatch(IMAGE, image):
        raise UserError(f"--image '{image}' is not an image reference (a lower-case name, a registry before it, a "
                        f":tag or @sha256:digest after it); give one like ghcr.io/you/vit-pretrain:1.0, or the pods "
                        f"would wait for ever in InvalidImageName")


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
    if chips_per_host < 0 or chips % chips_per_host:
        raise UserError(f"--tpu-topology {topology} has {chips} chips, which hosts of {chips_per_host} chips do not "
                        f"make up; check --tpu-chips-per-host")
    return chips // chips_per_host, chips_per_host


def render(job: Job, image: str, namespace: str = "default", pvc: str = "vit-runs", memory: str = "",
           tpu_accelerator: str = TPU_DEFAULT[0], tpu_topology: str = TPU_DEFAULT[1],
           tpu_chips_per_host: int = 0, service_account: str = "", gcsfuse: bool = False,
           rendezvous_timeout: int = 3600) -> str:
    """The manifests for ``job``, one YAML stream: ConfigMap, training Service and Job, TensorBoard."""
    check_names(namespace, pvc, memory, image)
    if service_account and not re.fullmatch(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?", service_account):
        raise UserError(f"--service-account '{service_account}' is not a Kubernetes service account name")
    run_dir = pod_run_dir(job.config.run_dir)
    tpu = job.config.backend == "xla"
    if not tpu and (tpu_accelerator, tpu_topology, tpu_chips_per_host) != TPU_DEFAULT:
        raise UserError(f"--tpu-accelerator, --tpu-topology and --tpu-chips-per-host describe the TPU slice of a "
                        f"backend=xla job, and this one is backend={job.config.backend}; set backend=xla or drop them")
    hosts, tpu_chips_per_host = tpu_slice(tpu_accelerator, tpu_topology, tpu_chips_per_host) if tpu else (job.nodes, 0)
    if job.nodes != hosts:
        raise UserError(f"a {tpu_topology} slice has {hosts} TPU VM hosts ({tpu_chips_per_host} chips each) but "
                        f"--nodes is {job.nodes}; pass --nodes {hosts}")
    job.check_batch_split()
    nproc = job.nproc_per_node
    # The pod has no CPU limit, so its request only places it: an estimate beyond what 8-GPU nodes of 96 vCPUs
    # allocate (12 workers a GPU ask for 104) would leave it pending for ever; idle cores serve the workers anyway.
    cpus = min(job.cpus_per_node, SCHEDULABLE_CPUS_PER_TRAINER * nproc) if job.cpus_estimated else job.cpus_per_node
    values = {
        "name": job.name, "namespace": namespace, "image": image, "pvc": pvc, "runs_mount": RUNS_MOUNT,
        "nodes": job.nodes, "nproc_per_node": nproc, "gpus_per_node": job.gpus_per_node,
        "cpus_per_node": cpus, "memory": memory or f"{32 * nproc}Gi", "backend": job.config.backend,
        "grace_seconds": job.grace_seconds, "backoff_limit": RESTARTS_PER_NODE * job.nodes,
        "rendezvous_port": RENDEZVOUS_PORT, "rendezvous_timeout": rendezvous_timeout,
        "tpu_accelerator": tpu_accelerator, "tpu_topology": tpu_topology, "tpu_chips_per_host": tpu_chips_per_host,
        "run_dir": posixpath.normpath(job.config.run_dir), "tb_logdir": run_dir, "service_account": service_account, "gcsfuse": gcsfuse, "recipe_yaml": recipe.to_yaml(job.config), "launch_sh": templates.source("k8s/launch.sh"),
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
    namespace = objects(manifests)[0]["metadata"]["namespace"]
    pvc = claim_name(manifests)
    args = ["kubectl", "get", "persistentvolumeclaim", pvc, "--namespace", namespace, "--output", "yaml",
            "--ignore-not-found"]
    got = tool(args, MISSING, check=False)
    if got.returncode == 0:
        for line in check_claim(yaml.safe_load(got.stdout) if got.stdout.strip() else None, pvc, namespace, job.nodes):
            print(f"warning: {line}", file=sys.stderr)
    elif "forbidden" in got.stderr.lower():  # allowed to create Jobs but not to read claims: the pods will tell
        print(f"warning: not allowed to read PersistentVolumeClaim {namespace}/{pvc}, so it is not checked",
              file=sys.stderr)
    else:
        last = (got.stderr.strip() or f"exit status {got.returncode}").splitlines()[-1]
        raise UserError(f"kubectl get persistentvolumeclaim failed: {last}")
    existing = _job({"name": job.name, "namespace": namespace})
    if existing is not None and not _ours(existing, {"run_dir": job.config.run_dir}):
        raise UserError(f"a Job named {job.name} in namespace {namespace} belongs to run directory "
                        f"{_owner(existing)}; pass --name to name this one otherwise")
    if existing is not None and not _finished(existing):
        raise UserError(f"a Job named {job.name} is running in namespace {namespace} (another run's?); cancel it, or "
                        f"pass --name to name this one otherwise")
    path = job_dir(job.config.run_dir) / "manifests.yaml"  # only now: cancel deletes what it names
    write_local(path, manifests)
    if existing is not None:  # ended: a Job's pod template cannot be applied over, so it goes first
        tool(["kubectl", "delete", "job", job.name, "--namespace", namespace, "--cascade=foreground", "--wait=true",
              "--timeout=300s"], MISSING)
    tool(["kubectl", "apply", "--filename", str(path)], MISSING)
    return {"scheduler": "k8s", "name": job.name, "namespace": namespace, "nodes": job.nodes,
            "manifests": str(path), "run_dir": job.config.run_dir, "grace": job.grace_seconds}


def claim_name(manifests: str) -> str:
    """The PersistentVolumeClaim of the runs volume, as the training Job mounts it."""
    job = next(o for o in objects(manifests) if o.get("kind") == "Job")
    volumes = job["spec"]["template"]["spec"]["volumes"]
    return next(v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v)


def check_claim(claim: dict[str, Any] | None, pvc: str, namespace: str, nodes: int) -> list[str]:
    """Refuse a runs volume the pods would wait on for ever: a claim that does not exist, or one that the pods of
    several nodes cannot all mount; warn of one TensorBoard's pod can mount only beside the trainer."""
    if claim is None:
        raise UserError(f"PersistentVolumeClaim {pvc} does not exist in namespace {namespace}, so the pods would "
                        f"wait for it for ever; create it (ReadWriteMany, for the run directories) or pass --pvc "
                        f"with one of kubectl get pvc -n {namespace}")
    modes = (claim.get("spec") or {}).get("accessModes") or []
    if "ReadWriteMany" in modes:
        return []
    what = f"PersistentVolumeClaim {namespace}/{pvc} is {' and '.join(modes) or 'without an access mode'}"
    if "ReadWriteOnce" not in modes:  # ReadOnlyMany, or ReadWriteOncePod: no pod writes, or one pod alone
        raise UserError(f"{what}, which the training pods cannot write and TensorBoard read at once; give a "
                        f"ReadWriteMany claim (Filestore, NFS, CephFS, a bucket through --gcsfuse)")
    if nodes > 1:
        raise UserError(f"{what}, which one node at a time can mount, but the job's {nodes} pods run on {nodes} "
                        f"nodes; give a ReadWriteMany claim (Filestore, NFS, CephFS, a bucket through --gcsfuse)")
    return [f"{what}: TensorBoard's pod can start only on the training pod's node"]


OWNER = "vit-pretrain/run-dir"  # the Job's annotation naming its run directory


def _job(record: dict[str, Any], own: bool = False) -> dict[str, Any] | None:
    """The Job named in ``record``; with ``own``, None if it now belongs to another run directory."""
    got = tool(["kubectl", "get", "job", record["name"], "--namespace", record["namespace"], "--output", "yaml",
                "--ignore-not-found"], MISSING)
    job = yaml.safe_load(got.stdout) if got.stdout.strip() else None
    return None if own and not _ours(job, record) else job


def _owner(job: dict[str, Any] | None) -> str | None:
    return ((job or {}).get("metadata") or {}).get("annotations", {}).get(OWNER)


def _ours(job: dict[str, Any] | None, record: dict[str, Any]) -> bool:
    """Whether the Job is the one ``record`` submitted (one without the annotation predates it: taken as ours)."""
    return job is not None and _owner(job) in (posixpath.normpath(record["run_dir"]), None)


def _pods(record: dict[str, Any]) -> list[dict[str, Any]]:
    got = tool(["kubectl", "get", "pods", "--namespace", record["namespace"], "--selector",
                f"job-name={record['name']}", "--output", "yaml"], MISSING)
    return (yaml.safe_load(got.stdout) or {}).get("items") or []


def is_active(record: dict[str, Any]) -> bool:
    job = _job(record, own=True)
    return job is not None and not _finished(job)


def _finished(job: dict[str, Any]) -> str:
    done = [c["type"] for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"]
    return next((c for c in done if c in ("Complete", "Failed")), "")


def status(record: dict[str, Any]) -> str:
    where = f"Kubernetes Job {record['namespace']}/{record['name']}"
    job = _job(record)
    if job is None:
        return f"{where}: not found (cancelled, or the cluster is another one)"
    if not _ours(job, record):
        return f"{where}: now the Job of run directory {_owner(job)}; this run's Job was replaced"
    return (f"{where}: {describe(job, _pods(record), record['nodes'])}\n"
            f"TensorBoard: kubectl port-forward -n {record['namespace']} service/{record['name']}-tensorboard "
            f"6006:6006, then http://localhost:6006")


def describe(job: dict[str, Any], pods: list[dict[str, Any]], nodes: int) -> str:
    """The Job's state from its pods: how many run, why any waits, how often it started again, its last error."""
    phases = Counter(p.get("status", {}).get("phase", "Pending") for p in current(pods))
    state = _finished(job) or ("Running" if phases["Running"] else "Pending")
    parts = [f"{state}: {phases['Running']} of {nodes} pod(s) running"]
    waiting = [_why_waiting(p) for p in current(pods) if p.get("status", {}).get("phase") == "Pending"]
    if any(waiting):
        parts.append(f"waiting: {next(w for w in waiting if w)}")
    starts = Counter(p["metadata"].get("annotations", {}).get(INDEX, p["metadata"]["name"]) for p in pods)
    restarts = max(starts.values(), default=1) - 1  # each start of the Job makes a pod of every index
    if restarts:
        parts.append(f"started again {restarts} time(s)")
    failed = sorted((p for p in pods if _exit_code(p) not in (None, 0, 75) and not _stopped_early(p)),
                    key=lambda p: (_said_error(p), p["metadata"].get("creationTimestamp", "")))
    if failed:  # the newest that says why: its peers fail after it, killed by torchrun or the lost rendezvous
        parts.append(f"{len(failed)} failed; the last error: {_last_error(failed[-1])}")
    return "; ".join(parts)


def current(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest pod of each completion index: the Job's present attempt (earlier ones stay, ended)."""
    newest: dict[str, dict[str, Any]] = {}
    for p in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", "")):
        newest[p["metadata"].get("annotations", {}).get(INDEX, p["metadata"]["name"])] = p
    return [newest[i] for i in sorted(newest)]


INDEX = "batch.kubernetes.io/job-completion-index"


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return (statuses[0].get("state") or {}).get("terminated") or {}


def _exit_code(pod: dict[str, Any]) -> int | None:
    return _terminated(pod).get("exitCode")


def _stopped_early(pod: dict[str, Any]) -> bool:
    """Ended by a preemption or eviction, or by launch.sh after a checkpoint (75): the Job starts it again."""
    disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                    for c in pod.get("status", {}).get("conditions") or [])
    return disrupted or _exit_code(pod) == 75


def _why_waiting(pod: dict[str, Any]) -> str:
    for c in pod.get("status", {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return f"not scheduled ({c.get('message') or c.get('reason')})"
    for s in pod.get("status", {}).get("containerStatuses") or []:
        waiting = (s.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in (None, "ContainerCreating"):
            return f"{waiting['reason']} ({waiting.get('message', '')})"
    return ""


def _said_error(pod: dict[str, Any]) -> bool:
    return any(line.strip().startswith("error: ") for line in (_terminated(pod).get("message") or "").splitlines())


def _last_error(pod: dict[str, Any]) -> str:
    """The trainer's one-sentence error from the end of its output (terminationMessagePolicy: FallbackToLogsOnError)."""
    lines = [line.strip() for line in (_terminated(pod).get("message") or "").splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("error: ")]
    return (said or lines or [f"exit status {_exit_code(pod)} ({_terminated(pod).get('reason', 'no output')})"])[-1]


def logs(record: dict[str, Any], follow: bool) -> int:
    """Every training pod's output, each line prefixed with its pod; with ``follow``, the present pods' as they
    write, then those of the Job's next start, until the Job has ended."""
    if _job(record, own=True) is None:
        raise UserError(f"Job {record['namespace']}/{record['name']} of {record['run_dir']} is not in the cluster "
                        f"(cancelled, replaced, or the cluster is another one)")
    if not follow:
        pods = [p["metadata"]["name"] for p in _pods(record)]
        return max((_kubectl_logs(record, name, follow=False).wait() for name in pods), default=0)
    followed: dict[str, subprocess.Popen] = {}
    while True:
        for pod in current(_pods(record)):
            name = pod["metadata"]["name"]
            if name not in followed and pod.get("status", {}).get("phase") in ("Running", "Succeeded", "Failed"):
                followed[name] = _kubectl_logs(record, name, follow=True)
        if all(p.poll() is not None for p in followed.values()):
            job = _job(record, own=True)
            if job is None or _finished(job):
                return 0
        time.sleep(FOLLOW_POLL_S)


FOLLOW_POLL_S = 5.0


def _kubectl_logs(record: dict[str, Any], pod: str, follow: bool) -> subprocess.Popen:
    args = ["kubectl", "logs", "--namespace", record["namespace"], f"pod/{pod}", "--prefix", "--tail=-1",
            *(["--follow"] if follow else [])]
    try:
        return subprocess.Popen(args)
    except FileNotFoundError:
        raise UserError(f"kubectl not found; {MISSING}") from None


def cancel(record: dict[str, Any]) -> str:
    """Delete the job's objects, waiting until its pods are gone: SIGTERM has them write a checkpoint first, and a
    job submitted again before then would resume from the one before it."""
    job = _job(record)
    if job is not None and not _ours(job, record):
        raise UserError(f"the Job {record['namespace']}/{record['name']} is now run directory {_owner(job)}'s: this "
                        f"run's Job was replaced, and that one is left alone")
    print(f"deleting Job {record['namespace']}/{record['name']}; its pods write a checkpoint and stop first",
          file=sys.stderr, flush=True)
    tool(["kubectl", "delete", "--namespace", record["namespace"], "--filename", record["manifests"],
          "--ignore-not-found", "--cascade=foreground", "--wait=true", f"--timeout={record.get('grace', 600) + 120}s"],
         MISSING)
    return (f"deleted Job {record['namespace']}/{record['name']} and its Service, ConfigMap and TensorBoard; the "
            f"checkpoints stay on the runs volume, and submitting the same recipe again resumes from the latest")
