"""The process pool of the command-line tools: spawned, stopped by Ctrl-C or SIGTERM in the main process alone, and
gone with that process however it ends."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker

from pretrain.cli import Terminated
from pretrain.errors import UserError


@contextlib.contextmanager
def signals_blocked(*signals: signal.Signals) -> Iterator[None]:
    """Processes started meanwhile never receive ``signals``: they start with them blocked (fork and exec keep a
    thread's signal mask, and Python never unblocks it), so that one sent to every process of a group (Ctrl-C's
    SIGINT from a terminal, Slurm's SIGTERM or SIGUSR1) reaches this process alone. This process keeps its handlers:
    a signal that arrives meanwhile is handled when the block ends, or at once if another thread takes it; it is
    never dropped, as it was when the handlers were set to ignore."""
    resource_tracker.ensure_running()  # its start unblocks SIGINT and SIGTERM (bpo-33613): not inside the block
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def exit_when_gone(pid: int, code: int = 0, why: str = "") -> None:
    """Start a thread that ends this process (exit status ``code``, ``why`` on stderr) once process ``pid`` has ended,
    however it ended (SIGKILL too): a worker whose parent is gone would otherwise wait for work forever."""
    threading.Thread(target=_exit_after, args=(pid, code, why), name=f"exit-with-{pid}", daemon=True).start()


def _exit_after(pid: int, code: int = 0, why: str = "") -> None:
    try:
        select.select([os.pidfd_open(pid)], [], [])  # readable once the process has ended
    except ProcessLookupError:
        pass
    except OSError:  # no pidfd (Linux before 5.3): ask every second
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1)
    if why:
        os.write(2, f"{why}\n".encode())
    os._exit(code)


def _start_worker(parent: int, initializer, initargs: tuple) -> None:
    exit_when_gone(parent)
    if initializer is not None:
        initializer(*initargs)


class ProcessPool(ProcessPoolExecutor):
    """Spawned workers (fork does not mix with fsspec's event loops); a pool of futures, unlike multiprocessing.Pool,
    fails instead of hanging when a worker dies (say in an image decoder).

    The workers start at the first submits with SIGINT blocked (not SIGTERM, which the executor sends to stop them
    when one has died), and end when this process does. When Ctrl-C or an error leaves the ``with`` block, the tasks
    the workers are on finish and the rest are not started.

    Inside the ``with`` block, Ctrl-C and SIGTERM are held and raised (``KeyboardInterrupt``, ``Terminated``) by
    :meth:`wait` and the iterators built on it, at most ``POLL`` seconds later, or when the block ends (before any
    other error, such as the workers' death that a SIGTERM to the whole process group causes). Raised where they
    arrive, they could strike inside ``concurrent.futures.wait``, between the locks it takes on each future: the lock
    it held then was never released, and the executor's shutdown waited for it forever. Once one is raised, the
    running tasks are waited for; a second one ends the process at once.
    """

    POLL = 0.2

    def __init__(self, workers: int, initializer=None, initargs: tuple = ()):
        super().__init__(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                         initargs=(os.getpid(), initializer, initargs))
        self._held: int | None = None
        self._stopping = False
        self._handlers: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set a handler
            self._handlers = {s: signal.signal(s, self._hold) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _hold(self, signum, frame) -> None:
        if self._stopping:
            os.write(2, b"\nstopped at once, without waiting for the tasks being run\n")
            os._exit(128 + signum)
        self._held = self._held or signum

    def _raise_held(self) -> None:
        held, self._held = self._held, None
        if held:
            self._stopping = True
            raise Terminated if held == signal.SIGTERM else KeyboardInterrupt

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with signals_blocked(signal.SIGINT):
            return super().submit(fn, *args, **kwargs)

    def wait(self, futures: set[Future]) -> tuple[set[Future], set[Future]]:
        """``concurrent.futures.wait`` for the first of ``futures`` to finish, or ``POLL`` seconds: (done, pending)."""
        done, pending = wait(futures, timeout=self.POLL, return_when=FIRST_COMPLETED)
        self._raise_held()
        return done, pending

    def completed(self, futures: list[Future], every: Callable[[], None] | None = None) -> Iterator[Future]:
        """``futures`` as they finish, as ``concurrent.futures.as_completed``; ``every`` is called at least every
        ``POLL`` seconds while none finishes (each wait takes every pending future's lock: not once per future)."""
        pending = set(futures)
        while pending:
            try:
                for future in as_completed(pending, timeout=self.POLL):
                    pending.discard(future)
                    self._raise_held()
                    yield future
            except TimeoutError:
                pass
            self._raise_held()
            if every is not None:
                every()

    def results(self, futures: list[Future]) -> Iterator:
        """The results of ``futures`` in their order, as ``Executor.map``."""
        for future in futures:
            while not future.done():
                self.wait({future})
            self._raise_held()
            yield future.result()

    def __exit__(self, exc_type, exc, traceback):
        try:
            if exc_type is not None or self._held:  # the tasks not begun are not started
                self._stopping = True
                self.shutdown(cancel_futures=True)
            super().__exit__(exc_type, exc, traceback)
        finally:
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)
        if self._held:  # not raised yet: it goes before what it may have caused
            try:
                self._raise_held()
            except KeyboardInterrupt as interrupt:
                raise interrupt from exc
        if isinstance(exc, BrokenProcessPool):
            raise UserError("a worker process died (killed for memory? dmesg says; or a crash in an image decoder), so "
                            "the command stopped; run it again, with fewer --workers if memory ran out") from None
        return False


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM to this process (``kill``, a scheduler's notice to it alone) stops a command as Ctrl-C does: the
    workers' current tasks finish and the command says what is kept, instead of dying with its temporary files and
    workers left. A SIGTERM to the whole process group ends the workers too; the finished shards are kept."""

    def interrupt(signum, frame):
        raise Terminated

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield
        return
    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
