import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs test files side by side (pytest-xdist), so each, and what it starts, takes one core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The files that take minutes, longest first (--durations on a 2-core machine). xdist hands whole files to its
# workers in the order collected: these go first, so that the run does not end waiting on one of them alone.
LONGEST = ["train/test_deepspeed.py", "train/test_training.py", "submit/test_slurm.py", "train/test_xla.py",
           "test_benchmarks.py", "train/test_fast_path.py", "train/test_preemption.py", "train/test_finetune.py",
           "submit/test_k8s.py", "train/test_float8.py", "train/test_checkpoint_damage.py", "test_export.py"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.relative_to(ROOT / "tests").as_posix()
        return LONGEST.index(name) if name in LONGEST else len(LONGEST)

    items.sort(key=rank)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator on loopback (PyPI gcp-storage-emulator), reached by gcsfs through fsspec.

    Yields a function that creates a bucket and returns its gs:// URL. The environment points
    gcsfs at the emulator (anonymous, project "test"); spawned worker processes inherit it.
    """
    port = free_port()
    exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen(
        [exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    env = {
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs probes bucket types over gRPC: 60 s each
        "FSSPEC_GCS_TOKEN": "anon",
        "FSSPEC_GCS_PROJECT": "test",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("the GCS emulator did not start")
            time.sleep(0.1)
    import fsspec

    fsspec.config.set_conf_env(fsspec.config.conf)  # pick up FSSPEC_GCS_* set after fsspec was imported

    def bucket(name: str) -> str:
        fs = fsspec.filesystem("gs")
        fs.mkdir(name)
        return f"gs://{name}"

    yield bucket
    proc.terminate()
    proc.wait(10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> dict[str, str]:
    """The demo's synthetic shapes, small: 400 training images in 8 shards, 100 eval images in 2.

    Returns {"train": folder, "val": folder} (each a shard set with manifest.json).
    """
    from data_tools import shard, synthetic

    root = tmp_path_factory.mktemp("small_shards")
    synthetic.main([str(root / "images"), "--train-per-class", "40", "--val-per-class", "10", "--size", "36"])
    shard.main([str(root / "images/train"), str(root / "train"), "--shard-samples", "50", "--workers", "1"])
    shard.main([str(root / "images/val"), str(root / "val"), "--shard-samples", "50", "--workers", "1", "--name", "val"])
    # The same validation images labelled by the classes in reverse order: labels that mean other classes.
    classes = sorted(p.name for p in (root / "images/val").iterdir())
    (root / "reversed.txt").write_text("\n".join(reversed(classes)) + "\n")
    shard.main([str(root / "images/val"), str(root / "val-reversed"), "--workers", "1", "--name", "val",
                "--classes", str(root / "reversed.txt")])
    return {"train": str(root / "train"), "val": str(root / "val"), "val_reversed": str(root / "val-reversed")}


@pytest.fixture(scope="session")
def pretrained_run(small_shards, tmp_path_factory) -> Path:
    """vit_mu8 (8x8 patches, pre-logits head) pre-trained at 32px for 100 steps on small_shards."""
    run_dir = tmp_path_factory.mktemp("pretrained_run")
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.run", "recipes/demo.yaml", f"data.train={small_shards['train']}",
         f"data.val={small_shards['val']}", f"run_dir={run_dir}", "model.name=vit_mu8", "data.batch_size=64",
         "schedule.total_steps=100", "schedule.warmup_steps=10", "log.eval_every=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return run_dir
