"""What a Slurm job and a Kubernetes Job share: the resolved recipe, the processes per node, the grace
period before a kill, the job's name, and the record of the submission kept in the run directory.

A submission leaves ``RUN_DIR/job/``: the rendered job (sbatch script or manifests), the resolved
recipe where the scheduler reads it, the scheduler's output, and ``job.json``, through which
``pretrain.submit status / logs / cancel RUN_DIR`` find the job again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import Config
from ..errors import UserError
from ..models.zoo import build_model, count_params
from ..train.loop import micro_batch

RECORD = "job.json"
SCHEDULERS = ("slurm", "k8s")
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights and two optimizer moments
WRITE_BYTES_PER_S = 100e6  # a network file system, conservatively
STEP_AND_EXIT_S = 120  # finishing the step in flight, agreeing to stop, exiting


@dataclass
class Job:
    """A recipe and what it asks of the cluster; 0 for cpus_per_node and grace_seconds means "estimate"."""

    config: Config
    recipe_source: str  # how the user named it: the recipe file and the overrides
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_node: int = 0
    grace_seconds: int = 0
    name: str = ""
    cpus_estimated: bool = False  # cpus_per_node came from data.workers, not from --cpus-per-node

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_node < 0 or self.grace_seconds < 0:
            raise UserError("--nodes must be at least 1, and --gpus-per-node, --cpus-per-node and --grace-seconds "
                            "cannot be negative")
        if self.config.checkpoint.resume == "never":
            raise UserError("checkpoint.resume=never: a job started again after preemption would refuse its own "
                            "checkpoints; use auto, which starts fresh in a run_dir without checkpoints")
        self.name = self.name or job_name(self.config.run_dir)
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", self.name):
            raise UserError(f"job name '{self.name}' is not a DNS label of at most 40 characters (a-z, 0-9, '-'; "
                            f"starting with a letter); pass another --name")
        self.cpus_estimated = not self.cpus_per_node
        self.cpus_per_node = self.cpus_per_node or self.nproc_per_node * (1 + self.config.data.workers)
        self.grace_seconds = self.grace_seconds or grace_seconds(self.config)

    @property
    def nproc_per_node(self) -> int:
        """Trainer processes per node: one per GPU, one on a CPU-only node, one per TPU VM host (xla)."""
        return 1 if self.config.backend == "xla" else max(self.gpus_per_node, 1)

    @property
    def final_checkpoint(self) -> str:
        """The name of the checkpoint folder a complete run ends with."""
        return checkpoint.folder_name(self.config.schedule.total_steps)

    def check_batch_split(self) -> None:
        """Refuse at submission, not hours later in the queue, a batch that does not split over the ranks
        (xla: SPMD splits the global batch over the chips itself)."""
        if self.config.backend != "xla":
            micro_batch(self.config, self.nodes * self.nproc_per_node)


def job_name(run_dir: str) -> str:
    """A DNS label naming the job after its run directory: runs/vit_l16_i21k -> vit-l16-i21k; one too long for 40
    characters keeps its start and ends in a hash of the whole, so that run directories alike but for their ends
    get jobs of their own."""
    parts = [p for p in Path(run_dir).parts if p not in ("/", "runs", ".", "..")]
    name = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"vit-{name}".strip("-")
    if len(name) <= 40:
        return name
    return f"{name[:31].strip('-')}-{hashlib.sha256(run_dir.encode()).hexdigest()[:8]}"


def grace_seconds(config: Config) -> int:
    """Seconds a trainer needs between the warning signal and a written checkpoint: the step in flight
    plus the checkpoint's bytes at a conservative write speed, rounded up to a whole minute."""
    with torch.device("meta"):
        params = count_params(build_model(config.model))
    seconds = STEP_AND_EXIT_S + params * CHECKPOINT_BYTES_PER_PARAM / WRITE_BYTES_PER_S
    return int(math.ceil(seconds / 60) * 60)


def job_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "job"


def write_local(path: Path, text: str) -> None:
    """Write a file of the job folder on this machine, whole or not at all (a full disk leaves the one before)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.part")
        part.write_text(text)
        os.replace(part, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}): the job folder, on this machine, keeps what status, "
                        f"logs and cancel read; submit from a folder where the run directory can be written, or "
                        f"give another run_dir") from None


def save_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    write_local(job_dir(run_dir) / RECORD, json.dumps(record, indent=2) + "\n")


def find_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The record of the last job submitted with this run directory, if any."""
    path = job_dir(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes())
    except ValueError:  # not JSON, or not UTF-8
        record = None
    if not isinstance(record, dict) or record.get("scheduler") not in SCHEDULERS:
        raise UserError(f"{path} is damaged (not the record pretrain.submit writes); if a job of this run is still "
                        f"queued, cancel it with scancel or kubectl delete job, then delete the file and submit again")
    return record


def load_record(run_dir: str | Path) -> dict[str, Any]:
    record = find_record(run_dir)
    if record is None:
        raise UserError(f"{run_dir} has no submitted job ({job_dir(run_dir) / RECORD} does not exist); submit one "
                        f"with python -m pretrain.submit slurm|k8s RECIPE run_dir={run_dir}")
    return record


def tool(args: list[str], what: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Run a scheduler's command-line tool; a missing tool or a failure is one sentence."""
    try:
        result = subprocess.run(args, check=False, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise UserError(f"{args[0]} not found; {what}") from None
    if check and result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}").splitlines()
        raise UserError(f"{' '.join(args[:2])} failed: {lines[-1]}")
    return result
