"""Checkpoints: ``run_dir/checkpoints/step_000001000/`` plus a ``latest`` pointer, written atomically.

A checkpoint is written into ``.tmp-step_N``, its files fsynced, then renamed to ``step_N``; the
``latest`` pointer is replaced last. A crash at any moment leaves the previous checkpoint as latest
and whole. ``state.json`` (written last inside the folder) marks a folder as complete and holds the
step, the resolved recipe, every rank's data-stream position and RNG states; the backend writes the
model (safetensors) and optimizer. Nothing is unpickled on load beyond tensors (weights_only).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import recipe
from .backends.base import Backend
from .config import Config
from .errors import UserError
from .models.convert import check_weights_path, load_weights
from .models.vit import VisionTransformer
from .models.zoo import build_model
from .train.run_lock import LOCK

T = TypeVar("T")
STATE = "state.json"
LATEST = "latest"


def folder_name(step: int) -> str:
    return f"step_{step:09d}"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, backend: Backend, state: dict[str, Any], keep_last: int, keep_every: int,
         resumed_at: int | None = None) -> Path:
    """Write a checkpoint (collective: every rank calls it). ``state`` is rank 0's JSON-able state. The first of a run
    that resumed at step ``resumed_at`` sets aside the checkpoints after that step: of steps the run went back from."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / folder_name(step), root / f".tmp-{folder_name(step)}"
    if backend.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        with _writing(tmp):
            tmp.mkdir(parents=True)
    backend.barrier()
    with _writing(tmp):
        backend.save(tmp)
    rngs = backend.gather(rng_state())
    backend.barrier()
    if backend.is_main:
        with _writing(tmp):
            (tmp / STATE).write_text(json.dumps({**state, "step": step, "rng": rngs}))
            for f in tmp.rglob("*"):  # a backend may write sub-folders (DeepSpeed: one file per rank)
                _fsync(f)
        _set_aside_later(root, step if resumed_at is None else resumed_at)
        shutil.rmtree(final, ignore_errors=True)  # a leftover of a run killed after the rename, before `latest`
        os.replace(tmp, final)
        _fsync(root)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        _fsync(pointer)
        os.replace(pointer, root / LATEST)
        _fsync(root)
        _prune(root, step, keep_last, keep_every)
    backend.barrier()
    return final


FULL_BYTES = 64 << 20  # free space below which a failed write is taken for a full disk


@contextlib.contextmanager
def _writing(tmp: Path) -> Iterator[None]:
    """A checkpoint write that fails for its storage (a full disk, a quota, a read-only or failing file system) in one
    sentence, its partial folder removed. torch.save says a full disk only as 'unexpected pos', hence the free space."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < FULL_BYTES
        if not full and not isinstance(e, OSError):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        why = f"its disk is full ({free / 2**20:.1f} MiB free)" if full else (e.strerror or str(e))
        raise UserError(f"writing checkpoint {tmp.name.removeprefix('.tmp-')} into {tmp.parent} failed: {why}; make "
                        f"room (or move run_dir), then rerun the command: it resumes from the newest complete "
                        f"checkpoint") from None


ABANDONED = "abandoned"


def _set_aside_later(root: Path, step: int) -> None:
    """Move the checkpoints after ``step`` out of the run: they are of the steps a run went back from (resumed from
    an earlier checkpoint), and would be taken for its newest and kept by the pruning in place of its own."""
    later = sorted(p for p in root.glob("step_*") if int(p.name[5:]) > step)
    if not later:
        return
    aside = root / ABANDONED
    aside.mkdir(exist_ok=True)
    moved = []
    for p in later:
        target, n = aside / p.name, 2
        while target.exists():  # set aside by an earlier going back: both are kept
            target, n = aside / f"{p.name}.{n}", n + 1
        os.replace(p, target)
        moved.append(target.name)
    print(f"note: moved {', '.join(moved)}, of the steps this run went back from, to {aside}; delete them when they "
          f"are no longer needed", flush=True)


def _prune(root: Path, newest: int, keep_last: int, keep_every: int) -> None:
    steps = sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / STATE).is_file())
    keep = set(steps[-max(keep_last, 1) :]) | {newest}
    keep |= {s for s in steps if keep_every and s % keep_every == 0}
    for s in steps:
        if s not in keep:
            shutil.rmtree(root / folder_name(s))


def is_pointer(path: Path) -> bool:
    """Whether ``path`` is a run's ``checkpoints/latest``: a file naming a checkpoint folder beside it."""
    if path.name != LATEST or not path.is_file():
        return False
    try:
        return (path.parent / path.read_text().strip()).name.startswith("step_")
    except (OSError, UnicodeDecodeError):
        return False


def find(path: str | Path) -> Path | None:
    """The checkpoint at ``path``: a checkpoint folder, or the newest complete one of a run directory (or of the
    ``latest`` pointer of its checkpoints folder)."""
    path = Path(path)
    if is_pointer(path):
        path = path.absolute().parent.parent
    if (path / STATE).is_file():
        return path
    root = path / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / STATE).is_file():
            return named
    complete = sorted(p for p in root.glob("step_*") if (p / STATE).is_file())
    return complete[-1] if complete else None


DAMAGED = (OSError, json.JSONDecodeError, SafetensorError, EOFError, pickle.UnpicklingError)


def is_damage(e: BaseException) -> bool:
    """Whether ``e`` says a checkpoint's files cannot be read (missing, cut short, garbled), not that they do not fit:
    torch.load of a cut file raises RuntimeError, DeepSpeed's reader of a set of shards missing one ValueError."""
    return isinstance(e, DAMAGED) or (isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e)) or (
        isinstance(e, ValueError) and "_optim_states.pt" in str(e))


def damaged(folder: Path, e: Exception, setting: str | None = "checkpoint.resume") -> UserError:
    """One sentence for a checkpoint whose files cannot be read, naming the checkpoint before it as the value of
    ``setting`` (checkpoint.resume to resume from it, init_from to fine-tune from it), as the path to give a command
    that reads a checkpoint (``setting`` ""), or as the one to consolidate (None)."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    older = [p for p in sorted(folder.parent.glob("step_*")) if p.name < folder.name and (p / STATE).is_file()]
    if older:
        use = {None: f"consolidate the one before it, python -m pretrain.consolidate {older[-1]}",
               "": f"give the one before it, {older[-1]}"}.get(setting, f"use the one before it, {setting}={older[-1]}")
    else:
        use = {None: "the run has no other checkpoint to consolidate", "": "the run has no other checkpoint",
               "checkpoint.resume": "start fresh in a new run_dir"}.get(setting, f"give {setting} another checkpoint")
    return UserError(f"checkpoint {folder} is damaged ({type(e).__name__}: {reason}); {use}")


@contextlib.contextmanager
def readable(folder: Path, setting: str | None = "checkpoint.resume") -> Iterator[None]:
    """Reading the files of checkpoint ``folder``: a file that cannot be read becomes ``damaged``'s sentence."""
    try:
        yield
    except DAMAGED as e:
        raise damaged(folder, e, setting) from None


def check_resumable(folder: Path, backend: Backend, model_name: str) -> dict[str, Any]:
    """The checkpoint's state, once it is known to fit the model and the backend; before the backend's setup, which
    may take minutes (DeepSpeed's engine) to reach a refusal."""
    state = read_state(folder)
    saved = state.get("config", {}).get("model", {}).get("name")
    if saved != model_name:
        raise UserError(f"checkpoint {folder} is of model {saved}, the recipe builds {model_name}; set "
                        f"model.name={saved} to resume it, or {elsewhere(backend.config)}")
    check_fits(folder, state, backend.config, backend.world)
    backend.check_resumable(folder, state)
    return state


def elsewhere(config: Config) -> str:
    """How to leave a checkpoint that does not fit alone: the run's own, or one checkpoint.resume names."""
    return ("give this recipe a run_dir of its own" if config.checkpoint.resume in ("auto", "never") else
            "give checkpoint.resume another checkpoint")


def check_fits(folder: Path, state: dict[str, Any], config: Config, world: int) -> None:
    """What the recipe must agree on with a checkpoint to resume it, besides the model: its step within the
    schedule, its optimizer, its backend and DeepSpeed's ZeRO stage and (ZeRO 1-3) number of processes ``world`` (also
    checked when a job is submitted)."""
    total = config.schedule.total_steps
    if state["step"] > total:
        raise UserError(f"checkpoint {folder} is at step {state['step']}, past schedule.total_steps={total}; raise "
                        f"schedule.total_steps to train on from it, or evaluate it with python -m pretrain.evaluate "
                        f"{folder} data=SHARDS")
    saved_optim, optim = state["config"].get("optim", {}).get("name", "adamw"), config.optim.name
    if saved_optim != optim:
        raise UserError(f"checkpoint {folder} holds the state of optim.name={saved_optim}, which {optim} cannot take "
                        f"over; set optim.name={saved_optim} to resume it, or {elsewhere(config)}")
    written_by = state["config"].get("backend", "torch")  # the optimizer state's layout is the backend's own
    if written_by != config.backend:
        raise UserError(f"checkpoint {folder} was written by the {written_by} backend, which alone can resume it; "
                        f"set backend={written_by}, or {elsewhere(config)}")
    if written_by == "deepspeed":
        stage, written = state["config"]["deepspeed"]["zero_stage"], len(state["rng"])  # one RNG state a rank
        if stage != config.deepspeed.zero_stage:
            raise UserError(f"checkpoint {folder} was written with deepspeed.zero_stage={stage}; resume it with "
                            f"deepspeed.zero_stage={stage}, or {elsewhere(config)}")
        if stage and written != world:
            raise UserError(f"checkpoint {folder} was written by {written} processes and ZeRO-{stage} cannot re-shard "
                            f"its optimizer state for {world}; resume it with {written} processes, or "
                            f"{elsewhere(config)}")


def load(folder: Path, backend: Backend, state: dict[str, Any]) -> None:
    """Restore model, optimizer and this rank's RNG state from a checkpoint ``check_resumable`` passed (collective)."""
    try:
        backend.load(folder)
    except DAMAGED as e:
        raise damaged(folder, e) from None
    except (RuntimeError, KeyError, ValueError) as e:
        if is_damage(e):
            raise damaged(folder, e) from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        if len(lines) > 1 and lines[0].endswith(":"):  # "Error(s) in loading state_dict for ...:" then each
            lines = lines[1:]
        first = lines[0] + (f" and {len(lines) - 1} more" if len(lines) > 1 else "")
        raise UserError(f"checkpoint {folder} does not fit this recipe's model or optimizer ({first}); "
                        f"resume it with the recipe it was written with, or give this recipe a run_dir of its own") from None
    rngs = state["rng"]
    if backend.rank < len(rngs):
        set_rng_state(rngs[backend.rank])


def read_state(folder: Path, setting: str | None = "checkpoint.resume") -> dict[str, Any]:
    """A checkpoint's state.json (``setting``: as for ``damaged``)."""
    with readable(folder, setting):
        return json.loads((folder / STATE).read_text())


def saved_config(folder: Path, setting: str | None = "checkpoint.resume") -> Config:
    """The resolved recipe a checkpoint was trained with (``setting``: as for ``damaged``)."""
    return recipe.from_dict(read_state(folder, setting)["config"], str(folder / STATE))


def weights_file(folder: Path, config: Config) -> Path:
    """A checkpoint's full weights (``config``: its recipe); a ZeRO-3 checkpoint has them once consolidated."""
    path = folder / "model.safetensors"
    if not path.is_file() and config.backend == "deepspeed" and config.deepspeed.zero_stage == 3:
        raise UserError(f"checkpoint {folder} has no model.safetensors (ZeRO-3 keeps the weights sharded); "
                        f"write it with python -m pretrain.consolidate {folder}")
    return path  # else read: missing, it is damaged


def check_init_from(config: Config) -> None:
    """Refuse, before a run starts or is queued, a fine-tune without init_from, with one that is missing, or with a
    run of ours that has no checkpoint yet or holds another model."""
    if config.stage != "finetune":
        return
    if not config.init_from:
        raise UserError("stage: finetune needs init_from: a pre-training run directory, checkpoint, HF folder or "
                        "weights file")
    if "://" in config.init_from:
        raise UserError(f"init_from={config.init_from} is a URL; it is read from a file system: copy it, or mount "
                        f"the bucket (gcsfuse), and give its path")
    if not os.path.exists(config.init_from):
        raise UserError(f"init_from={config.init_from} does not exist; give a run directory, a checkpoint, an HF "
                        f"folder or a weights file")
    path = Path(config.init_from)
    if is_ours(path):  # and a ZeRO-3 run's weights consolidated
        read_newest(path, lambda: init_checkpoint(path),
                    lambda found: weights_file(found, init_config(path, found, config.model.name)))
    else:
        check_weights_path(path)


def init_weights(path: str | Path, model_name: str) -> dict[str, torch.Tensor]:
    """Weights to start fine-tuning ``model_name`` from: a run directory or checkpoint of ours, else any format
    ``models.convert.load_weights`` reads (HF folder, timm state dict, official .npz)."""
    path = Path(path)
    if not is_ours(path):
        return load_weights(path)

    def read(found: Path) -> dict[str, torch.Tensor]:
        config = init_config(path, found, model_name)
        with readable(found, "init_from"):
            return load_file(weights_file(found, config))

    return read_newest(path, lambda: init_checkpoint(path), read)


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a run directory or checkpoint of ours (rather than weights of another format)."""
    return is_pointer(path) or path.is_dir() and ((path / "checkpoints").is_dir() or (path / "config.yaml").is_file()
                                                  or path.name.startswith("step_") or (path / STATE).is_file()
                                                  or (path / LOCK).is_file() or (path / "job").is_dir())  # started


def init_checkpoint(path: Path) -> Path:
    """The checkpoint a fine-tune starts from, of our run directory or checkpoint ``path``, or one sentence."""
    if (found := find(path)) is None:
        raise UserError(f"init_from={path} is a run of ours with no complete checkpoint yet; wait for its first "
                        f"checkpoint, or give init_from a checkpoint that is complete (a step_* folder with {STATE})")
    return found


def init_config(path: Path, found: Path, model_name: str) -> Config:
    """The recipe of ``found`` (the checkpoint of init_from ``path``), which must have built ``model_name``."""
    config = saved_config(found, "init_from")
    if config.model.name != model_name:
        raise UserError(f"init_from={path} holds a {config.model.name} and the recipe builds {model_name}; set "
                        f"model.name={config.model.name}")
    return config


def find_given(path: str | Path) -> Path:
    """The checkpoint a command was given (a run directory's newest, or the checkpoint itself), or one sentence."""
    if not Path(path).exists():
        raise UserError(f"{path} does not exist; give a run directory or a checkpoints/step_* folder")
    found = find(path)
    if found is None:
        raise UserError(f"{path} holds no complete checkpoint; give a run directory or a checkpoints/step_* folder")
    return found


def read_newest(path: str | Path, locate: Callable[[], Path], read: Callable[[Path], T]) -> T:
    """``read`` of the checkpoint ``locate`` finds at ``path``. A run in progress that prunes that checkpoint
    meanwhile (checkpoint.keep_last) has a newer one: that is read instead."""
    for _ in range(5):
        found = locate()
        try:
            return read(found)
        except UserError as e:
            if find(path) not in (None, found):
                last = e
                continue
            if (found / STATE).is_file():
                raise  # damaged, or not what the command needs
            raise UserError(f"checkpoint {found} was removed while it was read (its run keeps only its newest "
                            f"checkpoint.keep_last); give the run directory, which reads the newest") from None
    raise last


def load_model(path: str | Path) -> tuple[VisionTransformer, Config]:
    """(model, config) of a run directory or checkpoint of ours, on the CPU, in eval mode."""
    model, config, _ = load_checkpoint(path)
    return model, config


def load_checkpoint(path: str | Path) -> tuple[VisionTransformer, Config, Path]:
    """``load_model``, and the checkpoint folder it read."""

    def read(found: Path) -> tuple[dict[str, torch.Tensor], Config, Path]:
        config = saved_config(found, "")
        with readable(found, ""):
            return load_file(weights_file(found, config)), config, found

    weights, config, found = read_newest(path, lambda: find_given(path), read)
    model = build_model(config.model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # strict: a key or shape that the saved recipe's model does not have
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UserError(f"{found}'s weights do not fit the {config.model.name} its config.yaml describes ({first}); "
                        f"the folder changed after training: use the checkpoint before it") from None
    return model.eval(), config, found
