"""The recipe schema: typed dataclasses, one documented field each.

A recipe is a YAML file whose keys mirror these dataclasses (``optim.lr`` is ``optim: {lr: ...}``).
It may name a ``base:`` recipe (a path relative to itself) whose values it overrides, and the
command line overrides both with ``key.sub=value``. Loading is in ``pretrain.recipe``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Head = Literal["prelogits", "linear"]
Pool = Literal["cls", "gap"]
Interpolation = Literal["bilinear", "bicubic"]


def doc(default: Any, text: str, low: float | None = None, high: float | None = None, *, above: float | None = None,
        below: float | None = None) -> Any:
    """A field with an immutable default, its documentation (shown by ``--help-recipe``) and, for a number (or each
    number of a tuple), the range a recipe's value must lie in: ``low``/``high`` inclusive, ``above``/``below`` not."""
    return field(default=default, metadata={"doc": text, "range": (low, high), "open": (above, below)})


def section(cls: type, text: str) -> Any:
    """A nested group of fields, e.g. ``optim``."""
    return field(default_factory=cls, metadata={"doc": text})


@dataclass
class ModelConfig:
    name: str = doc("vit_b16", "Zoo name: vit_{mu,ti,s,b,l,h,g}{patch size}, e.g. vit_h14; vit_r50_b16 is the hybrid.")
    image_size: int = doc(224, "Input resolution in pixels (square); the token grid is image_size / patch size.", low=1)
    num_classes: int = doc(1000, "Classifier outputs (21843 for ImageNet-21k); 0 leaves the classifier out.", low=0)
    head: Head = doc("prelogits", "prelogits: Linear(D, D) + tanh before the classifier (pre-training); linear: classifier only (fine-tuning).")
    pool: Pool = doc("cls", "Representation: cls reads the [CLS] token; gap averages all tokens (no [CLS] token).")
    dropout: float = doc(0.0, "Dropout after the position embedding and after every dense layer but q, k, v (0.1 for ImageNet-21k).", low=0, below=1)
    attn_dropout: float = doc(0.0, "Dropout on the attention probabilities.", low=0, below=1)
    norm_eps: float = doc(1e-6, "LayerNorm epsilon.", above=0)
    bf16_residual: bool = doc(False, "Under bf16 autocast (precision bf16 or float8), carry the residual stream between the blocks in bf16, as Megatron-LM and torchtitan do, instead of the fp32 the fp32 position embeddings promote it to: a fifth fewer bytes through a compiled block's memory-bound elementwise kernels (benchmarks/block_bytes.py), 3-5% faster on an H100 with the same 200-step loss; each residual add is rounded to bf16.")
    posemb_interp: Interpolation = doc("bilinear", "How position embeddings are resampled to a new grid: bilinear (the paper) or bicubic.")
    posemb_align_corners: bool = doc(True, "Resampling maps corner embeddings onto corners (the paper's scipy zoom); false: cell centres (timm, big_vision).")


@dataclass
class DataConfig:
    train: str = doc("", "Training shards: a manifest.json (path or fsspec URL), a folder holding one, or a brace pattern.")
    val: str = doc("", "Evaluation shards, given like train; empty: no evaluation.")
    batch_size: int = doc(4096, "Global batch size: all devices together, counting gradient accumulation.", low=1)
    workers: int = doc(4, "DataLoader worker processes per rank (0: read in the training process).", low=0)
    decode: Literal["host", "device"] = doc("host", "Where training JPEGs are decoded and augmented: host, in the data workers; device, on the GPU (nvJPEG, then crop, resize and flip there) when the CPUs cannot keep up. The same crops either way.")
    crop_min_scale: float = doc(0.05, "Inception crop: smallest fraction of the image area a training crop covers (0.05: the paper's code and big_vision's inception_crop; torchvision's RandomResizedCrop takes 0.08).", low=0, high=1)
    eval_batch_size: int = doc(0, "Eval batch per rank; 0: the training micro-batch.", low=0)
    fewshot_train: str = doc("", "Single-label shards the few-shot linear probe draws its 1/5/10/25 shots from; empty: data.train.")
    fewshot_val: str = doc("", "Single-label shards the few-shot probe is tested on, of fewshot_train's classes (a JFT run probes ImageNet); empty: data.val.")
    storage_patience_s: float = doc(600.0, "Seconds a shard's storage that does not answer (no connection, a 5xx) is asked again, with a warning each time, before the run stops; a missing or forbidden shard is skipped and counted at once. The storage client's own retries come first (gcsfs: about 30 s), so the first warning comes after them.", low=0)
    allow_resharding: bool = doc(False, "On resume with another ranks x workers layout, restart the stream at the next epoch instead of refusing.")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = doc("adamw", "adamw (pre-training) or sgd with momentum (fine-tuning).")
    lr: float = doc(1e-3, "Peak learning rate, reached at the end of warm-up.", low=0)
    betas: tuple[float, float] = doc((0.9, 0.999), "Adam b1, b2.", low=0, below=1)
    momentum: float = doc(0.9, "SGD momentum.", low=0, high=1)
    weight_decay: float = doc(0.1, "Decoupled weight decay (PyTorch AdamW: multiplied by the lr), on weight matrices only.", low=0)
    clip_grad_norm: float = doc(1.0, "Clip gradients at this global L2 norm; 0 turns clipping off.", low=0)
    grad_accum: int = doc(1, "Micro-batches accumulated per optimizer step; data.batch_size is split across them.", low=1)


@dataclass
class ScheduleConfig:
    total_steps: int = doc(100_000, "Optimizer steps in the whole run, warm-up included.", low=1)
    warmup_steps: int = doc(10_000, "Linear warm-up from 0 to optim.lr over this many steps.", low=0)
    decay: Literal["linear", "cosine"] = doc("linear", "Decay after warm-up, down to final_lr at total_steps.")
    final_lr: float = doc(0.0, "Learning rate the decay ends at, at step total_steps (the last step trained, total_steps - 1 from 0, is one step of decay above it); at most optim.lr.", low=0)


@dataclass
class LossConfig:
    kind: Literal["softmax", "sigmoid"] = doc("softmax", "softmax cross-entropy, or sigmoid cross-entropy for multi-label corpora (head bias starts at -10).")
    label_smoothing: float = doc(0.0, "Label smoothing for softmax cross-entropy.", low=0, below=1)


@dataclass
class CheckpointConfig:
    every: int = doc(1000, "Write a checkpoint every this many steps (and always at the end and on SIGTERM / SIGUSR1).", low=1)
    keep_last: int = doc(3, "Keep the newest this many checkpoints.", low=1)
    keep_every: int = doc(0, "Also keep every checkpoint whose step is a multiple of this; 0: none.", low=0)
    lock_wait_s: float = doc(180.0, "Seconds a trainer waits for another one that holds run_dir (RUN_DIR/.lock) to end before it stops: two trainers in one run_dir would prune and move each other's checkpoints. A node lost while it held the lock keeps it on NFS until its lease ends (about 90 s).", low=0)
    resume: str = doc("auto", "auto: continue from the newest complete checkpoint in run_dir; never: start fresh (refused if run_dir holds checkpoints); or a checkpoint path (a step_* folder or a run directory) to start from, once: when run_dir holds checkpoints that went on from it, the run goes on from its own newest.")


@dataclass
class LogConfig:
    every: int = doc(50, "Log scalars (TensorBoard, metrics.jsonl, console) every this many steps.", low=1)
    eval_every: int = doc(0, "Evaluate on data.val every this many steps; 0: at the end only.", low=0)
    fewshot_every: int = doc(0, "Few-shot linear eval (data.fewshot_train -> data.fewshot_val) every this many steps and at the end; 0: never.", low=0)
    eval_at_start: bool = doc(False, "Also evaluate before the first step (a fine-tune's zero head: the pre-trained starting point).")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = doc(1, "ZeRO stage: 0 plain data parallel; 1 shards optimizer state; 2 also gradients; 3 also parameters.")


@dataclass
class XlaConfig:
    sharding: Literal["dp", "fsdpv2"] = doc("dp", "SPMD over every device: dp replicates the model; fsdpv2 shards parameters (ViT-L/H).")


@dataclass
class Config:
    stage: Literal["pretrain", "finetune"] = doc("pretrain", "pretrain, or finetune from init_from (pre-logits dropped, zero-init head, position embeddings resampled).")
    init_from: str = doc("", "Fine-tuning start: a run directory or checkpoint of ours, an HF folder, a timm state dict or an official .npz.")
    run_dir: str = doc("runs/default", "Where the run writes everything: resolved recipe, checkpoints, TensorBoard events, metrics.")
    seed: int = doc(0, "Seed of every random choice: init, shard order, shuffling, augmentation.", low=0, high=2**63 - 1)
    precision: Literal["fp32", "bf16", "float8"] = doc("bf16", "bf16 autocast where the device supports it, else fp32; float8: bf16 plus float8 matmuls in the encoder blocks (torchao, Ada/Hopper GPUs; the CPU emulates them).")
    compile: bool = doc(False, "torch.compile each encoder block, in place (parameter names unchanged): one compilation serves every block, and DDP / ZeRO still overlap gradient reduction with the backward. The xla backend always compiles and ignores this.")
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = doc("auto", "The scaled_dot_product_attention kernels on a GPU: auto times flash, cuDNN and memory-efficient attention on the model's shape at start and keeps the fastest; or name one (math: plain PyTorch).")
    backend: Literal["torch", "deepspeed", "xla"] = doc("torch", "torch: CPU, one GPU or DDP under torchrun; deepspeed: ZeRO (GPU clusters); xla: TPU (PJRT, SPMD).")
    max_nonfinite: int = doc(10, "Stop the run after this many consecutive steps with a non-finite loss or gradient (each is skipped); told at the next log or checkpoint step, as the loop does not wait for the device between them.", low=1)
    model: ModelConfig = section(ModelConfig, "The network.")
    data: DataConfig = section(DataConfig, "The data stream.")
    optim: OptimConfig = section(OptimConfig, "The optimizer.")
    schedule: ScheduleConfig = section(ScheduleConfig, "The learning-rate schedule.")
    loss: LossConfig = section(LossConfig, "The training loss.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints and resuming.")
    log: LogConfig = section(LogConfig, "Logging and periodic evaluation.")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "The deepspeed backend.")
    xla: XlaConfig = section(XlaConfig, "The xla backend.")
