"""Where a run picks up: the checkpoint it resumes from, what changed since, and whether it is already complete."""

from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint, recipe
from ..config import Config
from ..errors import UserError


def resume_point(config: Config) -> Path | None:
    if config.checkpoint.resume == "never":
        existing = checkpoint.find(config.run_dir)
        if existing is not None:  # this run's checkpoints would replace and prune that run's
            raise UserError(f"checkpoint.resume=never starts fresh, but run_dir {config.run_dir} holds checkpoints "
                            f"(newest {existing.name}: of an earlier run, or of this one before a restart); to go on "
                            f"from them set checkpoint.resume=auto, to start fresh give a new run_dir or delete "
                            f"{Path(config.run_dir) / 'checkpoints'}")
        return None
    if config.checkpoint.resume == "auto":
        return checkpoint.find(config.run_dir)
    own = checkpoint.find(config.run_dir) if config.run_dir else None
    if own is not None and checkpoint.read_state(own).get("origin") == origin(config):
        return own  # this run went on from there already: run again (after a preemption), it goes on from its own
    found = checkpoint.find(config.checkpoint.resume)
    if found is None:
        raise UserError(f"checkpoint.resume={config.checkpoint.resume} holds no complete checkpoint; give a "
                        f"step_* folder or a run directory, or use auto / never")
    return found


def origin(config: Config) -> str | None:
    """Where a run that names its checkpoint.resume started from, as its checkpoints record it: the same command run
    again goes on from them, not from that start."""
    return None if config.checkpoint.resume in ("auto", "never") else str(Path(config.checkpoint.resume).resolve())


def continue_checkpoint(config: Config, found: Path) -> str:
    """A resumed run trains on from the checkpoint's weights, so its init_from stays the one the run started from
    (config.yaml says so); returns a note naming the settings changed since the checkpoint was written, or ''."""
    saved = checkpoint.saved_config(found)
    if saved.stage != config.stage:
        fix = ("give this run a run_dir of its own" if origin(config) is None else
               f"give checkpoint.resume a checkpoint of a {config.stage} run")
        raise UserError(f"{found} is a checkpoint of a {saved.stage} run and this recipe is stage: {config.stage}; "
                        f"{fix} (a fine-tune reads its pre-training run through init_from)")
    recipe.anchor_paths(saved)  # a checkpoint written before data paths were stored absolute
    changed = recipe.changes(saved, config)
    changed.pop("checkpoint.resume", None)
    if not changed:
        return ""
    if "init_from" in changed:
        config.init_from = saved.init_from
    listed = ", ".join(f"{key} {_shown(before)} -> {_shown(after)}" for key, (before, after) in changed.items())
    unused = " (init_from is not used: the weights come from the checkpoint)" if "init_from" in changed else ""
    return f"; settings changed since it was written: {listed}{unused}"


def _shown(value) -> str:
    """As a recipe writes it: true, null; 'text'."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def finished(config: Config) -> str:
    """Why rerunning the command of a run that reached schedule.total_steps does nothing, or '' if it did not."""
    found = resume_point(config) if config.checkpoint.resume != "never" and config.run_dir else None
    if found is not None and found.resolve().parent != (Path(config.run_dir) / "checkpoints").resolve():
        found = None  # resume=PATH of another run: this one starts from it
    step = int(found.name[len("step_"):]) if found is not None else 0
    if found is None or step < config.schedule.total_steps or (config.data.val and not evaluated_at(config, step)):
        return ""  # a run stopped after its last checkpoint and before its final evaluation goes on to that
    saved = checkpoint.saved_config(found)
    if (saved.stage, saved.model.name) != (config.stage, config.model.name):
        return ""  # not this recipe's run: resuming it refuses in one sentence
    return (f"{config.run_dir} is complete (its checkpoint is at step {step}, schedule.total_steps is "
            f"{config.schedule.total_steps}); nothing was changed. Raise schedule.total_steps to train on, evaluate it "
            f"with python -m pretrain.evaluate {config.run_dir} data=SHARDS, or give another run_dir to start over")


def evaluated_at(config: Config, step: int) -> bool:
    """Whether the run's metrics.jsonl holds an evaluation at ``step`` (a line cut short by a kill is not one)."""
    try:
        lines = (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == "eval" and row.get("step") == step:
            return True
    return False
