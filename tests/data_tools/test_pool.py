"""The tools' process pool holds Ctrl-C and SIGTERM until it waits, so that neither strikes inside
concurrent.futures' locks (a SIGTERM that did once left the shard command hanging on its shutdown)."""

import os
import signal
import time
import traceback

import pytest

from data_tools.pool import ProcessPool
from pretrain.cli import Terminated


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
