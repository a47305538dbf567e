"""Where DataLoader workers come from: a fork server, started once per process, never the training process.

Forking a process whose other threads (gloo, NCCL, DeepSpeed, the autograd engine) may hold Python's thread-state
lock leaves the child deadlocked before its first line (seen resuming DeepSpeed ZeRO-3: 2 of 11 resumes hung).
The server forks from a fresh interpreter that has already imported the stream (torch, PIL, webdataset) and the
main module, so a worker starts in milliseconds. Nothing here imports torch: the trainer starts the server before
its own imports, which then overlap the server's (seconds each).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import signal

from data_tools.pool import exit_when_gone, signals_blocked

from ..train.preemption import SIGNALS


def worker_context() -> multiprocessing.context.BaseContext:
    """The fork server's context, the server started if it is not yet. It starts with SIGTERM and SIGUSR1 blocked, a
    mask that fork and exec keep, so that a signal sent to the whole process group (Slurm, a shell) leaves it and its
    workers alone while the training process checkpoints; one that reaches the training process meanwhile waits for
    its handler."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "pretrain.data.server_preload"])
    with signals_blocked(*SIGNALS):
        multiprocessing.forkserver.ensure_running()
    return ctx


def start_worker(trainer: int, worker_id: int) -> None:
    """A DataLoader worker leaves SIGTERM / SIGUSR1 to the training process, which checkpoints and then stops it, and
    exits when that process is gone (killed: its parent is the fork server, which PyTorch's own check watches)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    exit_when_gone(trainer)
