"""SIGTERM / SIGUSR1 to a training run (a preemption): a checkpoint of the last finished step, exit 0, the launcher's
note, then an exact resume; in the start-up, while torch is imported, and while storage does not answer."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_training import ROOT, losses, overrides, run, wait_for_step

from pretrain import checkpoint

def test_sigterm_checkpoints_and_exits_zero_then_the_step_count_continues(small_shards, tmp_path):
    args = overrides(small_shards, tmp_path, **{"schedule.total_steps": 400, "checkpoint.every": 1000})
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.run", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "preempted: checkpoint written at step" in out
    step = int(checkpoint.find(tmp_path).name[5:])
    assert 3 <= step < 400 and max(losses(tmp_path)) == step
    resumed = run([*args, "schedule.total_steps=" + str(step + 4)])
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(losses(tmp_path))[-5:] == list(range(step, step + 5))



SIGTERM_IN_START_UP = """
import os, signal, sys
from pretrain import run
from pretrain.train import loop
build = loop.build_model
def build_then_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # while the trainer is built: before, this ended the process (143)
    return build(*args, **kwargs)
loop.build_model = build_then_signal
sys.exit(run.main(sys.argv[1:]))
"""


def test_sigterm_in_the_start_up_stops_the_run_at_its_first_step_and_tells_the_launcher(small_shards, tmp_path):
    note = tmp_path / "preempted"
    result = run(overrides(small_shards, tmp_path / "run", **{"data.workers": 0}),
                 launcher=(sys.executable, "-c", SIGTERM_IN_START_UP),
                 env={**os.environ, "PRETRAIN_PREEMPTED_FILE": str(note)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "preempted: checkpoint written at step 0" in result.stdout
    assert note.read_text() == "step 0\n"
    resumed = run(overrides(small_shards, tmp_path / "run", **{"data.workers": 0, "schedule.total_steps": 3}),
                  env={**os.environ, "PRETRAIN_PREEMPTED_FILE": str(note)})
    assert resumed.returncode == 0 and "at step 0" in resumed.stdout, resumed.stderr[-2000:]
    assert not note.exists()  # the run completed: the note is taken back

SIGTERM_IN_THE_LAST_EVALUATION = """
import os, signal, sys
from pretrain import run
from pretrain.train import loop
evaluate = loop.Trainer._evaluate
def evaluate_then_signal(self):
    if self.step == self.config.schedule.total_steps:  # the loop's own evaluation of the last step
        os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(self)
loop.Trainer._evaluate = evaluate_then_signal
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_signal_in_the_last_steps_evaluation_leaves_the_run_complete_and_no_note(small_shards, tmp_path):
    """The launcher would otherwise start a complete run again, to find nothing to do."""
    note = tmp_path / "preempted"
    result = run(overrides(small_shards, tmp_path / "run", **{"data.workers": 0, "data.val": small_shards["val"],
                                                              "schedule.total_steps": 4, "log.eval_every": 2}),
                 launcher=(sys.executable, "-c", SIGTERM_IN_THE_LAST_EVALUATION),
                 env={**os.environ, "PRETRAIN_PREEMPTED_FILE": str(note)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "preempted" not in result.stdout and not note.exists()
    assert int(checkpoint.find(tmp_path / "run").name[5:]) == 4


def caught(pid: int, signum: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(status.split("SigCgt:")[1].split()[0], 16) >> (signum - 1) & 1)


def test_sigusr1_while_the_trainer_imports_torch_is_kept_for_it(small_shards, tmp_path):
    """As slurm/train.sbatch starts them, the trainers ignore USR1 until they handle it: one sent while they import
    torch (seconds) was lost. It now stops the run at its first step with a checkpoint and the launcher's note."""
    note = tmp_path / "preempted"
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "pretrain.run",
                                                *overrides(small_shards, tmp_path / "run", **{"data.workers": 0})])
    trainer = subprocess.Popen(["bash", "-c", f'trap "" USR1; exec {command}'], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PRETRAIN_PREEMPTED_FILE": str(note)})
    deadline = time.time() + 30
    while not caught(trainer.pid, signal.SIGUSR1):
        assert time.time() < deadline and trainer.poll() is None, trainer.communicate()
    importing = "libtorch" not in Path(f"/proc/{trainer.pid}/maps").read_text()
    trainer.send_signal(signal.SIGUSR1)
    while not note.exists():  # at once, before the trainer is built: a launcher may kill it before its first step
        assert time.time() < deadline and trainer.poll() is None, trainer.communicate()
    noted_first = not (tmp_path / "run" / "checkpoints").exists()
    out, err = trainer.communicate(timeout=300)
    assert importing, "the trainer handled USR1 only once torch was loaded"
    assert noted_first, "the note came with the checkpoint, not at once"
    assert trainer.returncode == 0, err[-2000:]
    assert "preempted: checkpoint written at step 0" in out and note.read_text() == "step 0\n"


def test_a_dry_run_sent_sigterm_while_it_imports_torch_ends_as_any_command():
    """Held for a trainer, the signal is delivered again to a command that trains nothing."""
    dry = subprocess.Popen([sys.executable, "-m", "pretrain.run", "recipes/demo.yaml", "--dry-run"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not caught(dry.pid, signal.SIGTERM):
        assert time.time() < deadline and dry.poll() is None
    dry.send_signal(signal.SIGTERM)
    assert dry.wait(timeout=60) == -signal.SIGTERM


def test_sigterm_while_storage_does_not_answer_checkpoints_the_last_step_then_resume_is_exact(small_shards, tmp_path):
    """Shards over HTTP from a server that goes down: the reader asks again (saying so), and a preemption then
    checkpoints the last finished step at once instead of waiting for the data; storage that stays down past
    data.storage_patience_s stops the run in one sentence; resumed, the run is exact."""
    import http.server
    import threading

    from ports import free_port

    port = free_port()

    def serve() -> subprocess.Popen:
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", small_shards["train"]], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True).returncode:
            assert time.time() < deadline and server.poll() is None, "the HTTP server did not start"
            time.sleep(0.1)
        return server

    short = {"data.workers": 1, "schedule.total_steps": 16}
    clean = run(overrides(small_shards, tmp_path / "clean", **short))
    assert clean.returncode == 0, clean.stderr
    args = overrides({"train": f"http://127.0.0.1:{port}/"}, tmp_path / "run", **short)
    server = serve()
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
    try:
        wait_for_step(tmp_path / "run", 2, proc)
    finally:
        server.terminate()
        server.wait()
    deadline = time.time() + 120
    while "asking again in" not in errors.read_text():
        assert time.time() < deadline and proc.poll() is None, errors.read_text()[-3000:]
        time.sleep(0.05)
    reached, still = max(losses(tmp_path / "run")), time.time()
    while time.time() - still < 4:  # until the batches read before the server went down are trained: the run waits
        assert time.time() < deadline and proc.poll() is None, errors.read_text()[-3000:]
        if (now := max(losses(tmp_path / "run"))) != reached:
            reached, still = now, time.time()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "preempted: checkpoint written at step" in out, out
    step = int(checkpoint.find(tmp_path / "run").name[5:])
    assert 2 <= step < 16 and max(losses(tmp_path / "run")) == step

    class Busy(http.server.BaseHTTPRequestHandler):  # the manifest, then 503 for every shard
        def do_GET(self):
            body = (Path(small_shards["train"]) / "manifest.json").read_bytes() if "manifest" in self.path else b""
            self.send_response(200 if body else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    busy = http.server.ThreadingHTTPServer(("127.0.0.1", port), Busy)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    state = checkpoint.find(tmp_path / "run") / checkpoint.STATE
    written = state.stat().st_mtime_ns
    try:
        stopped = run([*args, "data.storage_patience_s=1"])
    finally:
        busy.shutdown()
        busy.server_close()
    assert stopped.returncode == 2 and "could not be read for" in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].endswith(f"(at step {step}, checkpointed)")
    assert state.stat().st_mtime_ns == written  # the checkpoint it resumed from was not written again
    server = serve()
    try:
        resumed = run(args)
    finally:
        server.terminate()
        server.wait()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "clean"), "losses differ after resuming"


def test_evaluation_storage_that_stops_answering_stops_the_run_with_its_last_step_checkpointed(small_shards, tmp_path):
    """data.val over HTTP from a server that goes down after the first evaluation: the next one asks again for
    data.storage_patience_s (the manifest read at the start, not again), then the run stops in one sentence with its
    last step checkpointed, as the training data's outage does; it stopped with none, its steps since lost."""
    import http.server
    import threading

    down = threading.Event()

    class Val(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=small_shards["val"], **kwargs)

        def send_head(self):
            if down.is_set():
                self.send_error(503)
                return None
            return super().send_head()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Val)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shards = {"train": small_shards["train"]}
    args = overrides(shards, tmp_path, **{"data.val": f"http://127.0.0.1:{server.server_port}/", "log.eval_every": 3,
                                          "schedule.total_steps": 60, "checkpoint.every": 1000, "data.workers": 0,
                                          "data.storage_patience_s": 1})
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
        while not (metrics.exists() and '"split": "eval"' in metrics.read_text()):
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        down.set()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "could not be read for 1 s" in err, err[-3000:]
        step = int(err.strip().splitlines()[-1].split("(at step ")[1].split(",")[0])
        assert err.strip().endswith(f"(at step {step}, checkpointed)") and step % 3 == 0 and 3 < step < 60
        assert checkpoint.find(tmp_path).name == f"step_{step:09d}"
        down.clear()
        resumed = run(args)
    finally:
        server.shutdown()
        server.server_close()
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-3000:]


KILL_THE_DATA_WORKER = """
import os, signal, sys, time
from pretrain import run
from pretrain.train import loop
step = loop.Trainer.train_step
def step_then_kill(self, window):
    norm = step(self, window)
    if self.step == 3:  # as the out-of-memory killer ends a worker
        worker = self.batches._batches._workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        while worker.exitcode is None:
            time.sleep(0.05)
    return norm
loop.Trainer.train_step = step_then_kill
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_data_worker_killed_stops_the_run_in_one_sentence_with_its_last_step_checkpointed(small_shards, tmp_path):
    args = overrides(small_shards, tmp_path / "run", **{"data.workers": 1, "schedule.total_steps": 40})
    stopped = run(args, launcher=(sys.executable, "-c", KILL_THE_DATA_WORKER))
    last = stopped.stderr.strip().splitlines()[-1]
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert last.startswith("error: data worker ") and " died (killed by signal 9; " in last, last
    step = int(last.rsplit("(at step ", 1)[1].split(",")[0])  # the batches fetched before the kill still train
    assert 3 <= step < 20 and int(checkpoint.find(tmp_path / "run").name[5:]) == step
    resumed = run(args)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-3000:]
