"""The process pool of the command-line tools: spawned, and stopped by Ctrl-C in the main process alone."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor


@contextlib.contextmanager
def signals_ignored(*signals: signal.Signals) -> Iterator[None]:
    """Processes started meanwhile ignore ``signals`` from their first instruction (exec keeps an ignored signal),
    so that one sent to every process of a group (Ctrl-C's SIGINT from a terminal, Slurm's SIGUSR1) reaches this
    process alone, which then handles it as before."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may change handlers
        yield
        return
    handlers = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


class ProcessPool(ProcessPoolExecutor):
    """Spawned workers (fork does not mix with fsspec's event loops); a pool of futures, unlike multiprocessing.Pool,
    fails instead of hanging when a worker dies (say in an image decoder).

    The workers start at the first submits, which ignore SIGINT meanwhile. When Ctrl-C (or anything but an
    error) leaves the ``with`` block, the tasks the workers are on finish and the rest are not started.
    """

    def __init__(self, workers: int, initializer=None, initargs: tuple = ()):
        super().__init__(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
                         initargs=initargs)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with signals_ignored(signal.SIGINT):
            return super().submit(fn, *args, **kwargs)

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None and not issubclass(exc_type, Exception):  # KeyboardInterrupt, GeneratorExit
            self.shutdown(cancel_futures=True)
        return super().__exit__(exc_type, exc, traceback)
