"""Slurm: the sbatch script rendered from slurm/train.sbatch, sent with sbatch, followed with scontrol.

The job runs the recipe as resolved at submission (``RUN_DIR/job/recipe.yaml``), so a requeued job
trains exactly what was submitted; its output goes to ``RUN_DIR/job/slurm-JOBID.out``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import checkpoint, recipe
from ..data import shards
from ..data.stream import StreamState, check_resumable
from ..errors import UserError
from ..train.resume import finished, resume_point
from . import templates
from .job import Job, job_dir, tool, write_local

TEMPLATE = "slurm/train.sbatch"
SIGNAL_EARLY_S = 60  # sbatch --signal: "the signal may be sent up to 60 seconds earlier than specified"
FOLLOW_POLL_S = 5  # logs --follow asks Slurm this often whether the job is still queued or running
MISSING = "install the Slurm client tools (Debian: apt-get install slurm-client) or submit from a login node"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
          "RESIZING", "STAGE_OUT", "SIGNALING"}


def prepare(job: Job) -> Job:
    """The job with an absolute run directory: the script, its output and the trainers agree on one path."""
    if job.config.backend == "xla":
        raise UserError("backend xla runs on TPU VMs, which Slurm does not schedule here; submit it with "
                        "python -m pretrain.submit k8s (a GKE TPU slice)")
    job.check_batch_split()
    config = dataclasses.replace(job.config, run_dir=str(Path(job.config.run_dir).resolve()))
    for what, path in (("run_dir", config.run_dir), ("the directory you submit from", str(Path.cwd()))):
        if re.search(r"[\s'\"\\#%]", path):  # #SBATCH lines (--output, --chdir) take a path as one bare word
            raise UserError(f"{what} {path} holds a space, quote, backslash, # or %, which sbatch's #SBATCH lines "
                            f"cannot take (# starts a comment there, % a pattern like %j); use a path without them")
    if job.nodes > 1 and config.run_dir.startswith(("/tmp/", "/dev/shm/", "/var/tmp/")):
        print(f"warning: run_dir {config.run_dir} is usually each node's own disk, but the job's {job.nodes} nodes "
              f"must write one run directory (and a requeued job may start on other nodes); give a path on a shared "
              f"file system", file=sys.stderr)
    return dataclasses.replace(job, config=config)


def check_reachable(job: Job) -> None:
    """What would fail in the job's first seconds, after its wait in the queue, and the login node sees as well
    (a shared file system): init_from or local data that is missing, a checkpoint to resume (of the run, or
    checkpoint.resume=PATH) that is missing, of another model or on another layout, and a run already complete."""
    config = job.config
    latest = resume_point(config)
    if latest is None:
        checkpoint.check_init_from(config)  # a run that resumes does not read it
    for key in recipe.DATA_KEYS:
        value = getattr(config.data, key)
        if value and "://" not in value:
            shards.resolve(value, f"data.{key}")
    if latest is None:
        return
    own = latest.resolve().parent == (Path(config.run_dir) / "checkpoints").resolve()
    where = f"{config.run_dir} resumes from {latest.name}" if own else f"checkpoint.resume is {latest}"
    saved = checkpoint.saved_config(latest)
    if (saved.stage, saved.model.name) != (config.stage, config.model.name):
        raise UserError(f"{where}, a {saved.stage} run of {saved.model.name}, and this recipe is a {config.stage} run "
                        f"of {config.model.name}; " + ("give it a run_dir of its own" if own else
                                                        f"resume from a {config.stage} run of {config.model.name}"))
    if why := finished(config):
        raise UserError(why)
    state = checkpoint.read_state(latest)
    checkpoint.check_fits(latest, state, config, job.nodes * job.nproc_per_node)
    if latest.name == job.final_checkpoint:
        return
    ranks = state["data"]
    try:
        check_resumable(StreamState.from_dict(ranks[0]), config.data.workers, job.nodes * job.nproc_per_node,
                        config.data.allow_resharding)
    except UserError as e:
        raise UserError(f"{where}, but {e} (--nodes, --gpus-per-node and data.workers set this run's)") from None


def time_limit_seconds(text: str) -> int:
    """sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]; 0 for no
    limit (0, UNLIMITED, INFINITE)."""
    if text.strip().upper() in ("UNLIMITED", "INFINITE"):
        return 0
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise UserError(f"--time {text} is not a Slurm time limit; give minutes, HH:MM:SS, D-HH[:MM[:SS]] or UNLIMITED")
    days, a, b, c = (int(g) if g else 0 for g in m.groups())
    if m[1]:  # days-hours[:minutes[:seconds]]
        return ((days * 24 + a) * 60 + b) * 60 + c
    if m[4]:  # hours:minutes:seconds
        return (a * 60 + b) * 60 + c
    return a * 60 + b  # minutes[:seconds]


def render(job: Job, partition: str = "", time: str = "") -> str:
    """The sbatch script for ``job`` (prepared)."""
    if partition and not re.fullmatch(r"[\w.-]+(,[\w.-]+)*", partition):  # #SBATCH takes one bare word
        raise UserError(f"--partition '{partition}' is not a partition name, or a list of them joined by commas; "
                        f"sinfo --summarize lists the partitions you may use")
    if time and time_limit_seconds(time) and time_limit_seconds(time) <= job.grace_seconds + SIGNAL_EARLY_S:
        raise UserError(f"--time {time} is no longer than the {job.grace_seconds} s warning before it "
                        f"(--grace-seconds) and the {SIGNAL_EARLY_S} s Slurm may send it early, so the job would be "
                        f"told to stop before it trained; give a longer --time or a shorter --grace-seconds")
    run_dir = Path(job.config.run_dir)
    values = {
        "job_name": job.name, "nodes": job.nodes, "nproc_per_node": job.nproc_per_node,
        "gpus_per_node": job.gpus_per_node, "cpus_per_node": job.cpus_per_node, "partition": partition,
        "time": time, "grace_seconds": job.grace_seconds, "backend": job.config.backend,
        "recipe_source": job.recipe_source, "recipe": job_dir(run_dir) / "recipe.yaml", "run_dir": run_dir,
        "job_dir": job_dir(run_dir), "workdir": Path.cwd(), "python": sys.executable,
    }
    script = templates.render(TEMPLATE, values)
    syntax = tool(["bash", "-n"], "the sbatch script is a bash script", check=False, input=script)
    if syntax.returncode != 0:
        raise UserError(f"the rendered {TEMPLATE} is not a valid bash script: {syntax.stderr.strip().splitlines()[-1]}")
    return script


def submit(job: Job, script: str) -> dict[str, Any]:
    """Write the script and the resolved recipe into the run's job folder, sbatch it; the job record."""
    folder = job_dir(job.config.run_dir)
    first = not folder.exists()
    path = folder / "train.sbatch"
    try:
        write_local(path, script)
        write_local(folder / "recipe.yaml", recipe.to_yaml(job.config))
    except UserError:
        if first:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        job_id = tool(["sbatch", "--parsable", str(path)], MISSING).stdout.strip().split(";")[0]
    except UserError as e:
        if first:  # nothing was queued: leave no job folder that looks like one
            shutil.rmtree(folder)
        said = str(e).lower()
        if "gres" in said and job.gpus_per_node:
            raise UserError(f"{e}; on nodes without GPUs pass --gpus-per-node 0") from None
        if "partition" in said:
            raise UserError(f"{e}; sinfo --summarize lists the partitions you may use") from None
        if "node configuration is not available" in said:
            raise UserError(f"{e}; the job asks each node for {job.cpus_per_node} CPUs ({job.nproc_per_node} trainer(s) "
                            f"x (1 + data.workers)) and {job.gpus_per_node} GPUs: pass --cpus-per-node or lower "
                            f"data.workers (sinfo --Node --long lists what the nodes have)") from None
        raise
    return {"scheduler": "slurm", "job_id": job_id, "script": str(path),
            "output": str(folder / f"slurm-{job_id}.out"), "run_dir": job.config.run_dir}


def fields(record: dict[str, Any]) -> dict[str, str]:
    """scontrol's view of the job (kept by slurmctld for MinJobAge after the end), else sacct's; {} if neither."""
    shown = tool(["scontrol", "--oneliner", "show", "job", record["job_id"]], MISSING, check=False)
    if shown.returncode == 0:
        return dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
    if "invalid job id" not in shown.stderr.lower():  # not "forgotten": the controller did not answer
        said = (shown.stderr.strip() or f"exit status {shown.returncode}").splitlines()[-1]
        raise UserError(f"scontrol show job {record['job_id']} failed: {said}; is slurmctld up, and SLURM_CONF this "
                        f"cluster's?")
    accounted = tool(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", record["job_id"],
                      "--format", "State,ExitCode,Elapsed,NodeList"], MISSING, check=False)
    lines = accounted.stdout.strip().splitlines() if accounted.returncode == 0 else []
    if not lines:
        return {}
    state, exit_code, elapsed, nodes = lines[0].split("|")
    return {"JobState": state.split()[0], "ExitCode": exit_code, "RunTime": elapsed, "NodeList": nodes}


def is_active(record: dict[str, Any]) -> bool:
    return fields(record).get("JobState") in ACTIVE


def status(record: dict[str, Any]) -> str:
    job, output = fields(record), Path(record["output"])
    text = output.read_text(errors="replace").splitlines() if output.is_file() else []
    said = [line.removeprefix("error: ") for line in text if line.startswith("error: ")]  # the trainers' one sentence
    ended = [line for line in text if line.startswith("trainers finished with exit status ")]
    if not job:  # forgotten after MinJobAge, on a cluster without accounting: its output still tells
        lines = [f"Slurm job {record['job_id']}: no longer known to Slurm"
                 + (f"; its output ends: {ended[-1]}" if ended else ""), f"output: {output}"]
        failed = not ended or not ended[-1].startswith("trainers finished with exit status 0 ")
    else:
        lines = [f"Slurm job {record['job_id']}: {job['JobState']}"
                 + (f" ({job['Reason']})" if job.get("Reason", "None") != "None" else "")
                 + f", run time {job.get('RunTime', '?')}, nodes {job.get('NodeList', '?')}"
                 + (f", restarts {job['Restarts']}" if job.get("Restarts", "0") != "0" else "")
                 + (f", exit code {job['ExitCode']}" if job["JobState"] not in ACTIVE else ""),
                 f"output: {output}"]
        failed = job["JobState"] not in ACTIVE | {"COMPLETED"}
    if failed and said:
        lines.append(f"its last error: {said[-1]}")
    latest = checkpoint.find(record["run_dir"])
    if latest is not None:
        lines.append(f"latest checkpoint: {latest}")
    return "\n".join(lines)


def logs(record: dict[str, Any], follow: bool) -> int:
    """The job's output file (every start of a requeued job appends to it); with ``follow``, as it grows, until the
    job has left the queue (ended, failed or cancelled; a requeued job stays)."""
    output = Path(record["output"])
    if follow:
        tail = subprocess.Popen(["tail", "-n", "+1", "-F", str(output)])
        try:
            while tail.poll() is None and _still_queued(record):
                time.sleep(FOLLOW_POLL_S)
            time.sleep(1)  # tail reads the file each second: let it print the last lines
        finally:
            tail.terminate()
            tail.wait()
        return 0
    if not output.is_file():
        raise UserError(f"Slurm job {record['job_id']} has written no output yet ({output}); see its state with "
                        f"python -m pretrain.submit status {record['run_dir']}")
    sys.stdout.write(output.read_text())
    return 0


def _still_queued(record: dict[str, Any]) -> bool:
    """``is_active``, asked once more after a pause when it says no: the controller can miss a job for a moment."""
    if is_active(record):
        return True
    time.sleep(FOLLOW_POLL_S)
    return is_active(record)


def cancel(record: dict[str, Any]) -> str:
    state = fields(record).get("JobState")
    if state is None:  # scancel would exit 0 all the same
        return f"Slurm job {record['job_id']} is no longer known to Slurm (it ended); nothing to cancel"
    if state not in ACTIVE:
        return f"Slurm job {record['job_id']} had already ended ({state}); nothing to cancel"
    tool(["scancel", record["job_id"]], MISSING)
    return (f"cancelled Slurm job {record['job_id']}; its checkpoints stay in {record['run_dir']}, and submitting the "
            f"same recipe again resumes from the latest")
