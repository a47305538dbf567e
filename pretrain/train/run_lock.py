"""One trainer per run directory: the main process holds ``RUN_DIR/.lock`` (``flock``) for the run's life.

Two trainers in one run_dir (a command started twice, a job submitted by hand beside a queued one) would each
resume from the other's checkpoints, prune them and move them to ``abandoned/``. The kernel releases the lock when
its holder dies, however it dies; on NFS a node lost with the lock keeps it until its lease ends (about 90 s), so
a trainer waits ``checkpoint.lock_wait_s`` for it before it stops.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import UserError

LOCK = ".lock"
POLL_S = 2.0
UNLOCKABLE = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # a file system that does not lock files


class RunDirLock:
    """``run_dir`` (made if missing) locked by this process until it exits; waits ``wait_s`` for another holder."""

    def __init__(self, run_dir: Path, wait_s: float):
        self.run_dir, self.made = run_dir, not run_dir.exists()
        self.made_file = self.made or not (run_dir / LOCK).exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / LOCK, "a+b")  # held open: closing it releases the lock
        except OSError as e:
            raise UserError(f"run_dir {run_dir} cannot be made or written ({e.strerror or e}); give a folder this "
                            f"process can write") from None
        deadline, waiting = time.monotonic() + wait_s, False
        while not self._try():
            holder = self._holder()
            if time.monotonic() >= deadline:
                self.file.close()
                raise UserError(f"run_dir {run_dir} is in use by another trainer ({holder}); wait for it to end, or "
                                f"stop it, or give this run another run_dir")
            if not waiting:
                print(f"run_dir {run_dir} is in use by another trainer ({holder}); waiting up to {wait_s:g} s for it "
                      f"to end (checkpoint.lock_wait_s)", file=sys.stderr, flush=True)
                waiting = True
            time.sleep(POLL_S)
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
        self.file.flush()

    def _try(self) -> bool:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            if e.errno not in UNLOCKABLE:
                raise
            print(f"note: {self.run_dir}'s file system does not lock files ({os.strerror(e.errno)}), so a second "
                  f"trainer started in it would not be refused", file=sys.stderr, flush=True)
        return True

    def _holder(self) -> str:
        """What the holder wrote of itself: pid, host and start."""
        self.file.seek(0)
        return self.file.read().decode(errors="replace").strip() or "a process that has not said which yet"

    def release(self) -> None:
        """For another trainer, of this process too (one trainer after another, as benchmarks/throughput.py runs)."""
        self.file.close()

    def abandon(self) -> None:
        """A start refused before it wrote anything: the lock file goes if this made it, and run_dir with it."""
        if self.made_file:
            (self.run_dir / LOCK).unlink(missing_ok=True)
        self.release()
        if self.made:
            try:
                self.run_dir.rmdir()
            except OSError:  # something else was written there meanwhile
                pass
