"""python -m pretrain.submit {slurm,k8s} RECIPE [key=value ...] [options]; status | logs | cancel RUN_DIR

Renders the job from the templates in slurm/ or k8s/ with the resolved recipe, checks it (the recipe,
the batch split over the ranks, bash syntax or the Kubernetes schemas) and submits it with sbatch or
kubectl apply, or prints it with --dry-run. The submission is recorded in RUN_DIR/job/job.json, so
that status, logs and cancel take just the run directory.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from . import recipe
from .cluster import job as jobs
from .cluster import k8s, slurm
from .cli import OneLineParser, command, finish, whole
from .errors import UserError

SCHEDULERS = {"slurm": slurm, "k8s": k8s}


def parser() -> OneLineParser:
    top = OneLineParser(prog="python -m pretrain.submit", description=__doc__.split("\n\n")[1])
    sub = top.add_subparsers(dest="command", required=True)
    for name, text in [("slurm", "submit to Slurm with sbatch"), ("k8s", "apply to Kubernetes with kubectl")]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("recipe", help="YAML recipe, e.g. recipes/vit_b16_i21k.yaml")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run_dir=runs/b16 optim.lr=3e-4")
        p.add_argument("--nodes", type=int, default=1, help="nodes (TPU: TPU VM hosts of the slice)")
        p.add_argument("--gpus-per-node", type=int, default=8,
                       help="GPUs per node, one trainer each (default 8); 0: one CPU trainer")
        p.add_argument("--cpus-per-node", type=int, default=0,
                       help="CPU cores per node; default: one per trainer and per data worker (data.workers)")
        p.add_argument("--grace-seconds", type=int, default=0,
                       help="warning before a kill, to finish the step and write a checkpoint; default: estimated "
                            "from the model's checkpoint size")
        p.add_argument("--name", default="", help="job name; default: from run_dir (runs/vit_b16 -> vit-b16)")
        p.add_argument("--dry-run", action="store_true", help="print the rendered job instead of submitting it")
        if name == "slurm":
            p.add_argument("--partition", default="", help="Slurm partition; default: the cluster's default")
            p.add_argument("--time", default="", help="time limit, e.g. 24:00:00; default: the partition's")
        else:
            p.add_argument("--image", default="", help="container image with this repository installed (required)")
            p.add_argument("--namespace", default="default", help="Kubernetes namespace (default: default)")
            p.add_argument("--pvc", default="vit-runs", help="PersistentVolumeClaim holding the run directories (default: vit-runs)")
            p.add_argument("--memory", default="", help="memory per node, e.g. 256Gi; default: 32Gi per trainer")
            p.add_argument("--service-account", default="",
                           help="the pods' Kubernetes service account: on GKE, the one Workload Identity lets read the "
                                "gs:// data and the bucket of a GCS FUSE volume")
            p.add_argument("--gcsfuse", action="store_true",
                           help="the --pvc volume is a Cloud Storage bucket through GKE's GCS FUSE CSI driver: the "
                                "pods get its sidecar")
            p.add_argument("--rendezvous-timeout", type=whole(1), default=3600,
                           help="GPU jobs (torchrun): seconds the first pods wait for the others (default 3600) (Kubernetes starts "
                                "them one by one as GPUs free up): then torchrun gives up and the Job counts a failure "
                                "(torchrun's own default, 600, failed an 8-node job in about 30 minutes of waiting for "
                                "one node)")
            p.add_argument("--tpu-accelerator", default=k8s.TPU_DEFAULT[0],
                           help="backend=xla: GKE TPU accelerator (tpu-v4-podslice, tpu-v5p-slice, "
                                "tpu-v5-lite-podslice, tpu-v6e-slice)")
            p.add_argument("--tpu-topology", default=k8s.TPU_DEFAULT[1], help="backend=xla: TPU slice topology (2x2x4; v5e, v6e: 4x4)")
            p.add_argument("--tpu-chips-per-host", type=int, default=k8s.TPU_DEFAULT[2],
                           help="backend=xla: TPU chips per VM host; default: 4, or all of a v5e or v6e slice of 1, 4 "
                                "or 8 chips (one host)")
    for name, text in [("status", "the job's state"), ("logs", "the job's output"), ("cancel", "stop the job")]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("run_dir", help="the run directory the job was submitted with")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep printing as the job writes")
    return top


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting key=value overrides come after options too."""
    top = parser()
    args, extra = top.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and args.command not in SCHEDULERS):
        top.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides += extra
    return args


def submit(args: argparse.Namespace) -> int:
    scheduler = SCHEDULERS[args.command]
    config = recipe.load(args.recipe, args.overrides)
    job = jobs.Job(config, " ".join(shlex.quote(a) for a in [args.recipe, *args.overrides]), nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                   grace_seconds=args.grace_seconds, name=args.name)
    if scheduler is slurm:
        job = slurm.prepare(job)
        rendered = slurm.render(job, partition=args.partition, time=args.time)
    else:
        rendered = k8s.render(job, image=args.image, namespace=args.namespace, pvc=args.pvc, memory=args.memory,
                              tpu_accelerator=args.tpu_accelerator, tpu_topology=args.tpu_topology,
                              tpu_chips_per_host=args.tpu_chips_per_host, service_account=args.service_account,
                              rendezvous_timeout=args.rendezvous_timeout,
                              gcsfuse=args.gcsfuse)
        k8s.validate(rendered)
        for line in k8s.unreachable_data(job.config):
            print(f"warning: {line}", file=sys.stderr)
    if args.dry_run:
        print(rendered, end="")
        if scheduler is slurm:
            try:
                slurm.check_reachable(job)
            except UserError as e:
                print(f"warning: {e}", file=sys.stderr)
            print(f"dry run: nothing was written or submitted; without --dry-run, {jobs.job_dir(job.config.run_dir)} "
                  f"gets recipe.yaml (which the script trains) and this script, then sbatch runs it", file=sys.stderr)
        return 0
    run_dir = job.config.run_dir
    previous = jobs.find_record(run_dir)
    if previous and SCHEDULERS[previous["scheduler"]].is_active(previous):
        raise UserError(f"{run_dir} already has a job in the queue or running; cancel it first "
                        f"(python -m pretrain.submit cancel {run_dir}) or choose another run_dir")
    if scheduler is slurm:
        slurm.check_reachable(job)
    record = scheduler.submit(job, rendered)
    jobs.save_record(run_dir, record)
    print(f"submitted {record.get('job_id') or record['name']} ({args.command}): {job.nodes} node(s), run directory "
          f"{run_dir}\nfollow it with: python -m pretrain.submit status|logs|cancel {run_dir}")
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command in SCHEDULERS:
        return submit(args)
    record = jobs.load_record(args.run_dir)
    scheduler = SCHEDULERS[record["scheduler"]]
    if args.command == "status":
        print(scheduler.status(record))
    elif args.command == "logs":
        return scheduler.logs(record, args.follow)
    else:
        print(scheduler.cancel(record))
    return 0


if __name__ == "__main__":
    finish(main())
