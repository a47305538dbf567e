"""The tools' process pool holds Ctrl-C and SIGTERM until it waits, so that neither strikes inside
concurrent.futures' locks (a SIGTERM that did once left the shard command hanging on its shutdown)."""

import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from data_tools.pool import ProcessPool
from pretrain.cli import Terminated

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("signum, raised", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_is_raised_by_the_pools_wait_and_every_lock_is_free(signum, raised):
    before = signal.getsignal(signum)
    futures = []
    with pytest.raises(raised) as caught:
        with ProcessPool(1) as pool:
            futures = [pool.submit(time.sleep, 0.5), *(pool.submit(time.sleep, 0) for _ in range(20))]
            os.kill(os.getpid(), signum)
            arrived = time.monotonic()  # reached: the signal is held, not raised here
            for _ in pool.completed(futures):
                pass
    assert traceback.extract_tb(caught.value.__traceback__)[-1].name == "_raise_held"
    assert time.monotonic() - arrived < 5  # the running task finished, those not begun were cancelled
    assert futures[0].done() and any(f.cancelled() for f in futures)
    for future in futures:
        assert future._condition.acquire(blocking=False)
        future._condition.release()
    assert signal.getsignal(signum) is before


def test_a_signal_after_the_last_wait_is_raised_when_the_block_ends():
    with pytest.raises(Terminated):
        with ProcessPool(1) as pool:
            assert list(pool.results([pool.submit(divmod, 7, 2), pool.submit(divmod, 9, 4)])) == [(3, 1), (2, 1)]
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_that_killed_the_workers_too_is_raised_rather_than_their_death():
    """A SIGTERM to the whole process group ends the workers as well: the command says it was stopped, not that a
    worker died for memory."""
    with pytest.raises(Terminated):
        with ProcessPool(1) as pool:
            futures = [pool.submit(divmod, 7, 2), pool.submit(divmod, 9, 4), pool.submit(time.sleep, 30)]
            while not all(f.done() for f in futures[:2]):
                time.sleep(0.01)
            for pid in list(pool._processes):
                os.kill(pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGTERM)
            while not futures[2].done():  # the pool sees its worker gone: the task's future fails
                time.sleep(0.01)
            list(pool.results(futures))


def test_a_signal_held_when_another_error_leaves_the_block_is_raised_from_it():
    with pytest.raises(Terminated) as caught:
        with ProcessPool(1):
            os.kill(os.getpid(), signal.SIGTERM)
            raise ValueError("a task's error")
    assert isinstance(caught.value.__cause__, ValueError)


SECOND_CTRL_C = """
import os, signal, sys, time
from data_tools.pool import ProcessPool
with ProcessPool(1) as pool:
    future = pool.submit(time.sleep, 60)
    time.sleep(2)  # the worker runs the task
    os.kill(os.getpid(), signal.SIGINT)
    try:
        list(pool.completed([future]))
    except KeyboardInterrupt:
        print("waiting for the task", flush=True)
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # then a second Ctrl-C, from a timer: the shutdown blocks here
        signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
        raise
"""


def test_a_second_ctrl_c_while_the_running_tasks_are_waited_for_stops_at_once():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", SECOND_CTRL_C], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and "stopped at once, without waiting for the tasks being run" in result.stderr
    assert "waiting for the task" in result.stdout and time.monotonic() - started < 30
