"""SIGTERM / SIGUSR1 during training: a flag the loop reads between steps, and a note for the launcher that
starts a run again after a preemption (slurm/train.sbatch, k8s/launch.sh)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


class WaitInterrupted(BaseException):
    """SIGTERM / SIGUSR1 while a one-process run waits for the first batch of a step (storage that does not answer):
    a BaseException, so that the DataLoader's own ``except Exception`` lets it through."""


class Preemption:
    """Turns SIGTERM / SIGUSR1 into a flag the loop reads between steps; while ``interruptible`` (waiting for data,
    nothing of the step done yet) into ``WaitInterrupted`` at once.

    A signal, to this process or (agreed at the step's end) to another rank, also leaves the launcher's note
    (the file ``PRETRAIN_PREEMPTED_FILE`` names; slurm/train.sbatch and k8s/launch.sh set it) that the run is owed
    the rest, its final evaluation included, so that the launcher starts it again. Its exit status cannot say so:
    torchrun, signalled too under Slurm, exits 1 whatever its workers did, and kills one still busy 30 s later. A
    run that completes after all (a signal during its final evaluation) takes the note back, and so does one whose
    start-up finds a recipe error after the signal came: the launcher then reports the error, not a preemption. A
    failure once training has begun keeps the note (a peer killed in the checkpoint breaks the others' collectives:
    still a preemption, resumed from the checkpoint before).
    """

    def __init__(self, step: int):
        self.interruptible = False
        self.step = step  # the last finished step, for the note
        self.previous = {s: signal.signal(s, self._handler) for s in SIGNALS} | _before
        _before.clear()
        self.requested = bool(_held)
        _held.clear()
        if self.requested:  # now, not at the first step: a launcher may kill the trainer before it
            self.mark()

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.mark()
        if self.interruptible:
            self.interruptible = False
            raise WaitInterrupted

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def mark(self) -> None:
        if path := os.environ.get(PREEMPTED_FILE):
            try:
                Path(path).write_text(f"step {self.step}\n")
            except OSError as e:  # the checkpoint still comes first
                print(f"warning: cannot write {path} ({e.strerror}), which asks the launcher to start the run again",
                      file=sys.stderr, flush=True)

    @staticmethod
    def withdraw() -> None:
        if path := os.environ.get(PREEMPTED_FILE):
            Path(path).unlink(missing_ok=True)


PREEMPTED_FILE = "PRETRAIN_PREEMPTED_FILE"
# A file that stands for a SIGUSR1 sent before this process could take it: slurm/train.sbatch writes it when the
# signal reaches the job while torchrun starts, before the trainers exist.
STOP_FILE = "PRETRAIN_STOP_FILE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_held: list[int] = []  # signals that came while held, for the Preemption
_before: dict = {}  # the handlers hold_signals replaced, which the Preemption restores


def release_signals() -> None:
    """For a command that trains nothing (--dry-run, a complete run): the handlers as they were, and a signal that
    came while held delivered again, to act as it would have."""
    for s, handler in _before.items():
        signal.signal(s, handler)
    _before.clear()
    for signum in dict.fromkeys(_held):
        os.kill(os.getpid(), signum)
    _held.clear()


def hold_signals() -> None:
    """From a trainer process's first line until its Preemption is set (importing torch, reading the recipe: seconds),
    SIGTERM / SIGUSR1 are kept for the Preemption rather than ending the process (TERM) or being lost (USR1, which
    slurm/train.sbatch has the trainers ignore until they handle it); so is the USR1 that ``STOP_FILE`` stands for."""
    for s in SIGNALS:
        _before[s] = signal.signal(s, lambda signum, frame: _held.append(signum))
    if (path := os.environ.get(STOP_FILE)) and Path(path).exists():
        _held.append(signal.SIGUSR1)
