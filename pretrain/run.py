"""python -m pretrain.run RECIPE [key=value ...] [--dry-run]

Resolves the recipe (its base: chain and the overrides) and trains it; --dry-run reports the model
and the compute instead. Under torchrun every process runs this same command.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # from the first line: the trainer's imports take seconds
    from pretrain.train.preemption import hold_signals

    hold_signals()

from data_tools.pool import exit_when_gone

from . import recipe
from .config import Config
from .cli import OneLineParser, command, finish
from .data.fork_server import worker_context
from .errors import UserError
from .train.preemption import release_signals


def summary(config: Config, slices: list[str] | None = None) -> str:
    """Parameters and FLOPs of the recipe's model, counted on the meta device (no memory)."""
    import torch

    from .models.zoo import build_model, count_params, forward_flops

    with torch.device("meta"):
        model = build_model(config.model)
    params = count_params(model)
    flops = forward_flops(model)
    tokens = model.num_prefix_tokens + model.grid[0] * model.grid[1]
    batch = config.data.batch_size
    step = 3 * flops * batch  # forward + backward (twice the forward)
    steps = config.schedule.total_steps
    lines = [
        f"model: {config.model.name}, {si(params)} parameters, {tokens} tokens "
        f"({model.grid[0]}x{model.grid[1]} grid + {model.num_prefix_tokens} [CLS]) at {config.model.image_size}px",
        f"forward: {si(flops)}FLOPs per image ({si(flops // 2)} multiply-adds, the \"GFLOPs\" of DeiT and most papers; "
        f"timm's model cards leave out attention's two matrix products); "
        f"training step at batch {batch}: {si(step)}FLOPs",
        f"schedule: {steps} steps, {si(steps * batch).rstrip()} images seen, {si(step * steps)}FLOPs in all",
    ]
    if config.backend == "xla":
        from .backends.xla_plan import plan  # no torch_xla needed

        lines += plan(config, model, params, slices)
    return "\n".join(lines)


def si(x: float) -> str:
    """1.23e9 -> '1.23 G'."""
    for unit, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


@command(interrupted="interrupted; the same command resumes from the newest checkpoint (stop with SIGTERM or "
                     "SIGUSR1 to have one written first)")
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pretrain.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("recipe", nargs="?", help="YAML recipe, e.g. recipes/vit_b16_i21k.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-4 run_dir=/tmp/x")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the model's size, then exit")
    parser.add_argument("--slice", action="append", metavar="NAME",
                        help="with --dry-run and backend=xla: a TPU slice to plan for, e.g. v5p-128, v5litepod-256, "
                             "v6e-64 (again for more; default: v4-256 and v5p-128)")
    parser.add_argument("--help-recipe", action="store_true", help="list every recipe key with its type, default and meaning")
    # The deepspeed launcher passes --local_rank; the backends read LOCAL_RANK from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)  # overrides before or after the flags
    if args.help_recipe or args.dry_run:
        release_signals()  # nothing to checkpoint: a SIGTERM ends these as it would any command

    if args.help_recipe:
        rows = recipe.describe()
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for key, tp, default, text in rows:
            print(f"{key:{widths[0]}}  {tp:{widths[1]}}  {default:{widths[2]}}  {text}")
        return 0
    if not args.recipe:
        parser.error("a recipe is required, e.g. python -m pretrain.run recipes/demo.yaml --dry-run")
    config = recipe.load(args.recipe, args.overrides)
    if args.slice and not (args.dry_run and config.backend == "xla"):
        raise UserError("--slice plans the memory of a TPU slice, which takes --dry-run and backend=xla")
    if args.dry_run:
        print(recipe.to_yaml(config), end="")
        print("\n".join("# " + line for line in summary(config, args.slice).splitlines()))
        for warning in recipe.warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
        if config.init_from or config.stage == "finetune":  # a warning: a recipe may be shown before its start exists
            from .checkpoint import check_init_from

            try:
                check_init_from(config)
            except UserError as e:
                print(f"warning: {e}", file=sys.stderr)
        return 0
    if config.data.workers:  # also for a run that turns out complete or refused: its imports end with this one's
        worker_context()  # the server imports what the workers need while this process imports the trainer
    from .train.loop import train

    if "LOCAL_RANK" in os.environ:  # started by torchrun or deepspeed: killed (SIGKILL), it cannot stop its workers
        launcher = os.getppid()  # which would train on beside a rerun in the same run_dir
        exit_when_gone(launcher, 1, f"error: the launcher (pid {launcher}) is gone, so this rank stops; its newest "
                                    f"checkpoint is kept, and rerunning the command resumes from it")
    train(config)
    return 0


if __name__ == "__main__":
    finish(main())
