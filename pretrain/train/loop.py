"""The pre-training loop: stream -> micro-batches -> backend step, with logging, eval and checkpoints.

It can be killed at any moment and resumes exactly: a checkpoint holds the model, the optimizer,
the step, every rank's RNG state and every reader's position in the data stream. SIGTERM and
SIGUSR1 finish the current step, write a checkpoint and return.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, recipe
from ..backends import create as create_backend
from ..backends.base import Backend
from ..config import Config
from ..data import shards
from ..data.device_decode import DeviceDecoded
from ..data.stream import StreamState, StreamTracker, TrainStream, check_resumable, loader
from ..cli import plural
from ..errors import UserError
from ..evaluate import evaluate, normalise
from ..fewshot import few_shot_needs_single_label, fewshot_eval
from ..metrics import Metrics
from ..models.convert import Declared, declared, load_into
from ..models.vit import VisionTransformer
from ..models.zoo import build_model, count_params, forward_flops
from . import run_lock
from .attention import choose_attention
from .float8 import use_float8
from .losses import SIGMOID_HEAD_BIAS, check_labels, loss_fn
from .optim import lr_at
from .preemption import Preemption, WaitInterrupted, release_signals
from .resume import continue_checkpoint, finished, origin, resume_point
from .skips import Skips


class DataStopped(UserError):
    """The data stream of a one-process run stopped (storage that did not answer, no usable shard, a data worker
    that died) before the step began: the last finished step can still be checkpointed."""


def micro_batch(config: Config, world: int) -> int:
    per_step = world * config.optim.grad_accum
    if config.data.batch_size % per_step:
        raise UserError(f"data.batch_size {config.data.batch_size} does not split over {world} ranks x "
                        f"{config.optim.grad_accum} accumulation steps; make it a multiple of {per_step}")
    return config.data.batch_size // per_step


def start_from_pretrained(model: VisionTransformer, config: Config) -> str:
    """The paper's fine-tuning start: pre-trained encoder, pre-logits dropped, a zero-initialised linear
    head, position embeddings resampled to the new grid. Returns a line saying so."""
    checkpoint.check_init_from(config)
    if config.model.head != "linear":
        raise UserError("stage: finetune trains a zero-initialised linear head on the pre-logits-free encoder; set model.head=linear")
    weights = checkpoint.init_weights(config.init_from, config.model.name)
    said = Declared() if checkpoint.is_ours(Path(config.init_from)) else declared(config.init_from)
    tokens = weights["pos_embed"].shape[1] - model.num_prefix_tokens if "pos_embed" in weights else 0
    load_into(model, weights, interp=config.model.posemb_interp, align_corners=config.model.posemb_align_corners,
              drop_heads=True, source=f"init_from={config.init_from}")  # weights of another size name their model
    heads, ours = said.heads, model.blocks[0].attn.heads if len(model.blocks) else None
    if heads is not None and heads != ours:  # the weights' shapes agree: nothing else would tell
        raise UserError(f"init_from={config.init_from} splits attention into {plural(heads, 'head')} and "
                        f"{config.model.name} into {ours}, so its features would not carry over; start from a "
                        f"checkpoint of {config.model.name}'s size")
    line = (f"fine-tuning from {config.init_from}: its encoder, without its heads; a zero-initialised "
            f"{config.model.num_classes}-class head")
    side = math.isqrt(tokens)
    if tokens and (side, side) != model.grid:
        line += (f"; position embeddings resampled from its {side}x{side} grid to {model.grid[0]}x{model.grid[1]} "
                 f"({config.model.posemb_interp}, {'corners' if config.model.posemb_align_corners else 'cell centres'} "
                 f"aligned)")
    eps = said.norm_eps
    if eps is not None and eps != config.model.norm_eps:
        line += (f"; its LayerNorms were trained with eps {eps:g}, this model's is model.norm_eps={config.model.norm_eps:g}"
                 f" (set model.norm_eps={eps:g} to keep its features exactly)")
    return line


def compile_in_place(model: VisionTransformer, config: Config) -> None:
    """config.compile: each encoder block's ``forward`` through ``torch.compile``, so parameter names (checkpoints)
    stay. Not the block's ``__call__`` (``nn.Module.compile``): the hooks others set on a block, ZeRO-3's gathering of
    its weights, stay outside the graph, where dynamo broke the graph at them and recompiled them. The compiled
    forward is bound to its block: copy a model (``copy.deepcopy``) before compiling it, never after.

    Under autocast the compiled block keeps bf16 matmuls and fuses the fp32 LayerNorm, GELU, bias, residual and
    casts around them; attention stays scaled_dot_product_attention (flash or cuDNN on a GPU). The blocks are
    alike, so one compilation serves them all.
    """
    if not config.compile or config.backend == "xla":
        return
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


DATA_WAIT_HINT = 0.1  # share of the time a step may wait for data before the run says how to feed it


def new_window(backend: Backend, loss: float = 0.0, steps: int = 0) -> dict:
    """What the steps between two log steps add up: loss (on the device), steps, images, seconds of data wait."""
    return {"loss": backend.counter(loss), "steps": steps, "images": 0, "wait": 0.0, "start": time.perf_counter()}


def fewshot_keys(data) -> tuple[str, str]:
    """The data keys the few-shot probe draws from and is tested on: fewshot_train (or train), fewshot_val (or val)."""
    return "fewshot_train" if data.fewshot_train else "train", "fewshot_val" if data.fewshot_val else "val"


def aside(window: dict, work: Callable[[], Any]) -> Any:
    """``work()`` (an evaluation, a few-shot probe, a checkpoint) off the log window's clock, so that its img/s,
    MFU and data-wait share are the training steps' own. The steps a GPU still has queued are finished first: they
    are training time (under xla they run when the work first reads the device, a small error this accepts)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        return work()
    finally:
        window["start"] += time.perf_counter() - start


class Trainer:
    def __init__(self, config: Config, backend: Backend | None = None):
        self.config = config
        if config.data.decode == "device" and config.backend == "xla":
            raise UserError("data.decode=device decodes JPEGs on a GPU, and torch-xla devices do not decode them; "
                            "use data.decode=host")
        self.backend = backend or create_backend(config)
        recipe.anchor_paths(config)
        self.run_dir = Path(config.run_dir)
        self._check_settings()
        self.train_set = shards.resolve(config.data.train)
        self._check_classes()
        torch.manual_seed(config.seed)
        head_bias = SIGMOID_HEAD_BIAS if config.loss.kind == "sigmoid" else 0.0
        model = build_model(config.model, head_bias=head_bias)
        self.train_flops = 3 * forward_flops(model)  # forward + backward
        self.params = count_params(model)  # before the backend may shard it (ZeRO-3)
        # Held before the run's checkpoints are read: a second trainer would resume from them and prune them.
        self.lock, refusal = None, ""
        if self.backend.is_main:
            try:
                self.lock = run_lock.RunDirLock(self.run_dir, config.checkpoint.lock_wait_s)
            except UserError as e:
                refusal = str(e)
        if self.backend.host_gather(refusal)[0]:  # the other ranks wait here for the main process's lock
            if self.backend.is_main:
                raise UserError(refusal)
            raise SystemExit(2)  # the main process says why, once
        try:
            self._start(model)
        except UserError:
            if self.lock is not None:
                self.lock.abandon()
            raise

    def _start(self, model: VisionTransformer) -> None:
        """From the run's newest checkpoint, or ``init_from``, or new: the model on the backend, the data stream
        positioned, config.yaml written."""
        config = self.config
        found = resume_point(config)
        changed = continue_checkpoint(config, found) if found is not None else ""
        if origin(config) and found is not None and found != checkpoint.find(config.checkpoint.resume):
            changed += (f"; the run went on from checkpoint.resume={config.checkpoint.resume} before, so it goes on "
                        f"from its own newest (to go back there again, move the checkpoints after it out of "
                        f"{Path(config.run_dir) / 'checkpoints'})")
        state = checkpoint.check_resumable(found, self.backend, config.model.name) if found is not None else {}
        if found is None and config.stage == "finetune":
            started = start_from_pretrained(model, config)
            if self.backend.is_main:
                print(started, flush=True)
        self.micro = micro_batch(config, self.backend.world)
        use_float8(model, config, self.backend.device, self.micro)
        fp8_eager = config.precision == "float8" and not config.compile and self.backend.device.type == "cuda"
        if fp8_eager and self.backend.is_main:
            print("hint: precision=float8 without compile=true scales every matmul's operands in kernels of their own, "
                  "which can cost more than float8 saves; set compile=true", flush=True)
        choose_attention(model, config.attention, self.micro, self.backend.device, self.backend.autocast_dtype(),
                         self.backend.is_main)
        compile_in_place(model, config)
        self.backend.setup(model)
        self.step = self.images_seen = 0  # images: the batch size may change on resume
        self.preemption: Preemption | None = None  # train()'s
        skipped_steps = 0
        self.last_eval: dict[str, float] = {}
        self.resumed_window = {"mean_loss": 0.0, "steps": 0}
        self.origin = origin(config)  # written into every checkpoint of the run
        self.resumed_at: int | None = None  # until its first checkpoint: where the run resumed
        stream_state = None
        if found is not None:
            checkpoint.load(found, self.backend, state)
            self.origin, self.resumed_at = self.origin or state.get("origin"), state["step"]
            self.step, skipped_steps = state["step"], state.get("skipped_steps", 0)
            self.images_seen = state.get("images_seen", self.step * state["config"]["data"]["batch_size"])
            ranks = state["data"]  # a layout that differs is refused (or restarted) by check_resumable
            self.resumed_window = state.get("log_window", self.resumed_window)
            if "loss" in self.resumed_window:  # written before the mean: the sum over the checkpoint's ranks
                self.resumed_window["mean_loss"] = self.resumed_window.pop("loss") / len(ranks)
            saved = StreamState.from_dict(ranks[self.backend.rank] if self.backend.rank < len(ranks) else ranks[0])
            stream_state = check_resumable(saved, config.data.workers, self.backend.world, config.data.allow_resharding)
            if stream_state is not saved:
                changed += (f"; the data stream of {saved.world} ranks x {saved.workers} readers each restarts at "
                            f"epoch {stream_state.readers[0].epoch} on {self.backend.world} x {stream_state.workers}")
            if self.backend.is_main:
                print(f"resumed from {found} at step {self.step}{changed}", flush=True)
        self.skips = Skips(skipped_steps, config.max_nonfinite, config.precision, self.backend.counter)
        self.hinted = False
        self.tracker = StreamTracker(config.data.workers, self.backend.world, stream_state)
        stream = TrainStream(self.train_set.urls, config.model.image_size, self.micro, config.seed, self.backend.rank,
                             self.backend.world, config.data.crop_min_scale, stream_state, config.data.decode,
                             config.data.storage_patience_s, self.train_set.counts)
        self.batches = loader(stream, config.data.workers, self.backend.device.type == "cuda")
        if config.data.decode == "device":
            self.batches = DeviceDecoded(self.batches, config.model.image_size, self.backend.device)
        if self.backend.is_main:
            recipe.save(config, self.run_dir / "config.yaml")
        self.metrics = Metrics(self.run_dir, self.backend.is_main, self.step, config.schedule.total_steps,
                               self.train_flops, self.backend.device)

    def _check_settings(self) -> None:
        recipe.check_together(self.config, "the recipe")  # as recipe.load did, for a Config built otherwise
        for warning in recipe.warnings(self.config) if self.backend.is_main else []:
            print(f"warning: {warning}", flush=True)

    def _check_classes(self) -> None:
        data, classes = self.config.data, self.train_set.classes
        if classes is not None and len(classes) != self.config.model.num_classes:
            raise UserError(f"model.num_classes is {self.config.model.num_classes} but {data.train} has "
                            f"{len(classes)} classes; set model.num_classes={len(classes)}")
        # Resolved once: reading a manifest again at every evaluation would stop the run on any outage of its storage.
        self.eval_sets = {"train": self.train_set}
        if data.val:  # top-1 with the model's head
            self.eval_sets["val"] = shards.resolve(data.val, "data.val")
            shards.check_same_classes(self.train_set, data.train, self.eval_sets["val"], data.val)
        if self.config.log.fewshot_every:
            draw, test = fewshot_keys(data)
            for key in (draw, test):
                if key not in self.eval_sets:
                    self.eval_sets[key] = shards.resolve(getattr(data, key), f"data.{key}")
            sets = {key: self.eval_sets[key] for key in (draw, test)}
            for key, shard_set in sets.items():
                if shards.looks_multi_label(shard_set):
                    raise UserError(few_shot_needs_single_label(f"data.{key} {getattr(data, key)}") + "; set "
                                    "data.fewshot_train and data.fewshot_val to single-label shards (the paper probes "
                                    "ImageNet), or log.fewshot_every=0")
            # the split the probe is fitted on names the classes, as data.train does for data.val
            shards.check_same_classes(sets[draw], getattr(data, draw), sets[test], getattr(data, test))

    def train(self, preemption: Preemption | None = None) -> dict[str, float]:
        """The run from where it stands; ``preemption``: handlers installed before the trainer was built (the
        module's ``train``), so that a signal in the start-up stops the run at its first step."""
        cfg, backend = self.config, self.backend
        if backend.is_main:
            print(self._banner(), flush=True)
        preemption = self.preemption = preemption or Preemption(self.step)
        preemption.step = self.step
        # the log window a checkpoint cut through, on any number of ranks: each rank's share of the sum _log divides
        window = new_window(backend, self.resumed_window["mean_loss"], self.resumed_window["steps"])
        try:
            if cfg.log.eval_at_start and self.step == 0 and cfg.data.val:
                self._aside_or_stop(window, self._evaluate)
            while self.step < cfg.schedule.total_steps:
                try:
                    norm = self.train_step(window)
                except WaitInterrupted:  # the step had not begun: its checkpoint is the last finished step's
                    preemption.mark()  # with the step, which a signal in the start-up did not know yet
                    self._checkpoint_at_stop(window)
                    print(f"preempted: checkpoint written at step {self.step}; rerun the same command to resume",
                          flush=True)  # the same line as between steps: which of the two met it is timing
                    return {"step": self.step, "preempted": 1.0}
                except DataStopped as e:
                    if self.step:
                        self._checkpoint_at_stop(window)
                    raise UserError(f"{e}{f' (at step {self.step}, checkpointed)' if self.step else ''}") from None
                preemption.step = self.step
                if self.step % cfg.log.every == 0 or self.step == cfg.schedule.total_steps:
                    self._log(window, norm)
                if cfg.log.eval_every and self.step % cfg.log.eval_every == 0 and cfg.data.val:
                    self.last_eval = self._aside_or_stop(window, self._evaluate)
                if cfg.log.fewshot_every and (self.step % cfg.log.fewshot_every == 0 or self.step == cfg.schedule.total_steps):
                    self._aside_or_stop(window, self._fewshot)
                # A signal by the end of the last step's evaluation: the run is complete all the same, owed nothing.
                # (One that finds the final evaluation still to come stops: it may take longer than the grace.)
                complete = self.step == cfg.schedule.total_steps and (
                    not cfg.data.val or self.last_eval.get("step") == self.step)
                stop = backend.any(preemption.requested) and not complete
                if stop:
                    preemption.mark()  # also where the signal reached another rank
                if stop or self.step % cfg.checkpoint.every == 0 or self.step == cfg.schedule.total_steps:
                    aside(window, lambda: self._checkpoint(window))
                if stop:
                    if backend.is_main:
                        print(f"preempted: checkpoint written at step {self.step}; rerun the same command to resume", flush=True)
                    return {"step": self.step, "preempted": 1.0}
            if cfg.data.val and self.last_eval.get("step") != self.step:
                self.last_eval = self._aside_or_stop(window, self._evaluate)
            preemption.withdraw()
            return self.last_eval if cfg.data.val else {"step": self.step}
        finally:
            preemption.restore()
            self.close()

    def close(self) -> None:
        """Stop the data workers, close the TensorBoard and metrics files and let run_dir go (not the backend's
        processes)."""
        self.batches.close()
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()

    def train_step(self, window: dict) -> torch.Tensor:
        """One optimizer step: its micro-batches, forward, backward and update; the loss, image count and data wait
        accumulate in ``window``. Returns the gradient norm, a device tensor (nothing here waits for the device)."""
        loss, updated, norm = self._micro_batches(window)
        self.skips.add(updated, self.step)
        self.step += 1
        self.images_seen += self.config.data.batch_size
        window["loss"] += loss
        window["steps"] += 1
        self.backend.mark_step()
        return norm

    def _micro_batches(self, window: dict) -> tuple[torch.Tensor, bool | torch.Tensor, torch.Tensor]:
        cfg, backend = self.config, self.backend
        accum = cfg.optim.grad_accum
        total = torch.zeros((), device=backend.device)
        for i in range(accum):
            waited = time.perf_counter()
            # One process can stop here (several would have to agree, in a collective the others are not in).
            interruptible = self.preemption is not None and i == 0 and backend.world == 1
            if interruptible:
                if self.preemption.requested:  # after the last step's check: stop before waiting
                    raise WaitInterrupted
                self.preemption.interruptible = True
            try:
                batch = next(self.batches)
            except UserError as e:
                if interruptible:
                    raise DataStopped(str(e)) from None
                raise
            finally:
                if interruptible:
                    self.preemption.interruptible = False
            window["wait"] += time.perf_counter() - waited
            for why in self.tracker.consumed(batch):
                print(f"warning: {why}; its readable samples train, the rest are skipped (python -m "
                      f"data_tools.verify {cfg.data.train} checks every shard)", flush=True)
            for why, last in self.tracker.new_unread:
                print(f"warning: {why}; it is skipped and counted in bad_samples, each epoch"
                      + (f" (any further ones are counted without a line each; python -m data_tools.verify "
                         f"{cfg.data.train} --decode lists them all)" if last else ""), flush=True)
            if self.step == 0 and i == 0:
                self.metrics.images(0, batch["image"])
            check_labels(batch["labels"], cfg.model.num_classes, cfg.data.train)
            images, y = backend.to_device(batch)
            x = normalise(images)
            with backend.micro_step(sync=i == accum - 1):
                with backend.autocast():
                    loss = loss_fn(backend.model(x), y, cfg.loss) / accum
                backend.backward(loss)
            total += loss.detach()
            window["images"] += batch["image"].shape[0]  # this rank's (x is the global batch under xla SPMD)
        norm, updated = backend.step(lr_at(self.step, cfg.optim.lr, cfg.schedule))
        return total, updated, norm

    def _log(self, window: dict, norm: torch.Tensor) -> None:
        backend = self.backend
        # divided on the host: under xla a changing Python number (a last, shorter window) would compile a graph
        loss = backend.all_reduce_sum(window["loss"].clone()).item() / backend.world / window["steps"]
        seconds = time.perf_counter() - window["start"]
        images = window["images"] * backend.world
        counted = backend.host_gather((self.tracker.bad_samples, sorted(self.tracker.damaged_shards)))
        seen = self.train_set.num_samples
        epoch = {"epoch": self.images_seen / seen} if seen else {}  # unknown for brace patterns
        scalars = {**epoch, "loss": loss, "lr": lr_at(self.step - 1, self.config.optim.lr, self.config.schedule),
                   "grad_norm": norm.item(), **self.metrics.throughput(images, seconds, backend.devices),
                   "data_wait": window["wait"] / seconds, "skipped_steps": self.skips.check(self.step),
                   "bad_samples": sum(bad for bad, _ in counted),
                   "damaged_shards": len(set().union(*(shards for _, shards in counted))),
                   **backend.log_scalars()}
        self.metrics.log(self.step, scalars)
        self._hint_data_wait(scalars["data_wait"])
        window.update(new_window(backend))

    def _banner(self) -> str:
        """What the run trains, on what, how long: the first line of its output."""
        cfg, seen = self.config, self.train_set.num_samples
        data = f"{seen} samples" if seen else "samples"
        classes = f" of {len(self.train_set.classes)} classes" if self.train_set.classes else ""
        images = self.images_seen + (cfg.schedule.total_steps - self.step) * cfg.data.batch_size
        epochs = f" ({images / seen:.3g} epochs)" if seen else ""
        return (f"{cfg.stage}: {cfg.model.name} ({self.params / 1e6:.3g}M parameters) on {data}{classes} "
                f"({cfg.data.train}), {cfg.schedule.total_steps} steps of {cfg.data.batch_size}{epochs}, backend "
                f"{cfg.backend} on {self.backend.world} process(es) ({self.backend.device.type}, "
                f"{plural(len(os.sched_getaffinity(0)), 'CPU')} each)")

    def _hint_data_wait(self, share: float) -> None:
        """Once per run, past the first log window (which holds the workers' start): say how to feed the step."""
        data = self.config.data
        first_window = self.step <= self.metrics.start_step + self.config.log.every  # also after a resume
        if self.hinted or share < DATA_WAIT_HINT or first_window or not self.backend.is_main:
            return
        self.hinted = True
        gpu = self.backend.device.type == "cuda"
        fix = "set data.decode=device" if data.decode == "host" and gpu else "use more CPUs per process"
        print(f"hint: the step waits for data {share:.0%} of the time; raise data.workers (now {data.workers}) or {fix}",
              flush=True)

    def _evaluate(self) -> dict[str, float]:
        result = evaluate(self.backend, self.config, self.config.data.val, self.eval_sets["val"])
        self.metrics.log(self.step, result, prefix="eval")
        return {"step": self.step, **result}

    def _fewshot(self) -> None:
        """On rank 0 (a probe on a few thousand images); the other ranks wait."""
        if self.backend.is_main:
            data = self.config.data
            draw, test = fewshot_keys(data)
            result = fewshot_eval(self.backend.module, getattr(data, draw), getattr(data, test),
                                  self.config.model.image_size, self.backend.device, seed=self.config.seed,
                                  sets=(self.eval_sets[draw], self.eval_sets[test]),
                                  patience_s=data.storage_patience_s)
            self.metrics.log(self.step, result, prefix="fewshot")
        self.backend.barrier()

    def _aside_or_stop(self, window: dict, work: Callable[[], Any]) -> Any:
        """An evaluation or a few-shot probe (``aside``). One that stops a one-process run (its storage did not
        answer for data.storage_patience_s, no sample could be read) stops it as the training data does: with the last
        step checkpointed. Several processes stop as the failing one's torchrun ends the others."""
        try:
            return aside(window, work)
        except UserError as e:
            if self.backend.world > 1 or not self.step:
                raise
            self._checkpoint_at_stop(window)
            raise UserError(f"{e} (at step {self.step}, checkpointed)") from None

    def _checkpoint_at_stop(self, window: dict) -> None:
        """The last finished step's checkpoint, unless it has one (just resumed or written): rewriting it would only
        spend the time a preemption leaves."""
        if not (self.run_dir / "checkpoints" / checkpoint.folder_name(self.step) / checkpoint.STATE).is_file():
            self._checkpoint(window)

    def _checkpoint(self, window: dict) -> None:
        """Also the loss of the steps since the last log step, so that a resumed run logs the same means."""
        data = self.backend.gather(self.tracker.state.to_dict())
        log_window = {"mean_loss": 0.0, "steps": 0}
        if window["steps"]:  # not at a log step: there the window is new, and under xla reading it would compile
            total = self.backend.all_reduce_sum(window["loss"].clone()).item()
            log_window = {"mean_loss": total / self.backend.world, "steps": window["steps"]}
        state = {"config": recipe.to_dict(self.config), "data": data, "skipped_steps": self.skips.check(self.step),
                 "images_seen": self.images_seen,
                 "log_window": log_window, "origin": self.origin}
        c = self.config.checkpoint
        checkpoint.save(self.run_dir, self.step, self.backend, state, c.keep_last, c.keep_every, self.resumed_at)
        self.resumed_at = None


def train(config: Config) -> dict[str, float]:
    if why := finished(config):
        release_signals()
        if os.environ.get("RANK", "0") == "0":
            print(why, flush=True)
        return {"step": config.schedule.total_steps}
    preemption = Preemption(0)  # a signal in the start-up (loading, compiling) stops the run at its first step
    try:
        trainer = Trainer(config)
    except BaseException as e:
        preemption.restore()
        if isinstance(e, UserError):  # the recipe's error, not a peer's death: the launcher reports it
            preemption.withdraw()
        raise
    try:
        result = trainer.train(preemption)
    except BaseException:
        trainer.backend.close(finished=False)
        raise
    trainer.backend.close()
    return result
