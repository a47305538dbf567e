"""The training and eval streams on real shards: determinism, exact resume, splitting over ranks and workers."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import manifest as mf
from pretrain.data.shards import resolve
from pretrain.data.stream import (
    EvalStream,
    ReaderState,
    StreamState,
    StreamTracker,
    TrainStream,
    check_resumable,
    loader,
)
from pretrain.data.transforms import decode
from pretrain.errors import UserError

SIZE, MICRO, SEED, MIN_SCALE = 32, 16, 0, 0.35
PER_EPOCH = 400 // MICRO  # 25 batches, no batch straddles the first epoch's end with one reader


def train_stream(urls: list[str], rank: int = 0, world: int = 1, resume: StreamState | None = None) -> TrainStream:
    return TrainStream(urls, SIZE, MICRO, SEED, rank, world, MIN_SCALE, resume)


@contextmanager
def batches_of(dataset, workers: int) -> Iterator[Iterator[dict]]:
    """The loader's batches; its workers are stopped at the end, even when the test fails."""
    batches = loader(dataset, workers, pin=False)
    try:
        yield batches
    finally:
        batches.close()


def take(dataset, workers: int, n: int) -> list[dict]:
    with batches_of(dataset, workers) as batches:
        return list(islice(batches, n))


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a["image"], b["image"]), f"batch {i}: images differ"
        assert torch.equal(a["labels"], b["labels"]), f"batch {i}: labels differ"
        assert (a["reader"], a["state"]) == (b["reader"], b["state"]), f"batch {i}: positions differ"


def label_counts(batches: list[dict], classes: int) -> list[int]:
    return torch.bincount(torch.cat([b["labels"][:, 0] for b in batches]), minlength=classes).tolist()


def rewrite_tar(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> None:
    """Copy a tar member by member, in the same order, passing each member's bytes through edit(name, data)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            data = edit(member.name, tin.extractfile(member).read())
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as t:
        return t.getmembers()


@pytest.fixture(scope="module")
def urls(small_shards) -> list[str]:
    return resolve(small_shards["train"]).urls


@pytest.fixture(scope="module")
def reference(urls) -> list[dict]:
    """The first 32 batches of a fresh stream read in the training process: all of epoch 0 and the start of 1."""
    return take(train_stream(urls), 0, PER_EPOCH + 7)


# (a) determinism


@pytest.mark.parametrize("workers", [0, 2])
def test_two_fresh_streams_give_identical_batches(urls, workers):
    first, second = take(train_stream(urls), workers, 8), take(train_stream(urls), workers, 8)
    assert_same_batches(first, second)
    assert first[0]["image"].shape == (MICRO, 3, SIZE, SIZE) and first[0]["image"].dtype == torch.uint8
    assert first[0]["labels"].shape == (MICRO, 1)
    assert not torch.equal(first[0]["image"], first[1]["image"])


def test_fresh_stream_matches_the_reference(urls, reference):
    assert_same_batches(take(train_stream(urls), 0, 8), reference[:8])


# (b) exact resume


@pytest.mark.parametrize(("workers", "consumed"), [(0, 30), (2, 30), (2, 31)])
def test_resume_continues_exactly_where_the_stream_stood(urls, workers, consumed):
    """Consume N batches across an epoch end, save the tracker's state as JSON, resume: the next M batches match.

    N = 31 with 2 workers: the next batch comes from worker 1, so the resumed worker 0 must play reader 1.
    """
    following = 6
    tracker = StreamTracker(workers, 1, None)
    with batches_of(train_stream(urls), workers) as batches:
        for _ in range(consumed):
            tracker.consumed(next(batches))
        saved = json.dumps(tracker.state.to_dict())
        expected = [next(batches) for _ in range(following)]
    assert min(r.epoch for r in tracker.state.readers.values()) >= 1, "the test should cross an epoch end"
    assert tracker.state.next_reader == consumed % max(workers, 1)

    resume = StreamState.from_dict(json.loads(saved))
    assert resume == tracker.state
    assert_same_batches(take(train_stream(urls, resume=resume), workers, following), expected)


def test_resuming_does_not_change_the_state_it_was_given(urls):
    """A checkpoint's StreamState (which the trainer's tracker also holds) must stay as saved.

    With workers > 0 the stream works on a copy in each worker process; in the training process (workers 0)
    it must too, else iterating the same resumed stream twice continues instead of restarting.
    """
    state = StreamState(1, 1, {0: ReaderState(epoch=0, cursor=2, offset=7)})
    saved = copy.deepcopy(state)
    stream = train_stream(urls, resume=state)
    first = take(stream, 0, 2)
    assert state == saved, f"TrainStream advanced the StreamState it resumed from: {state} (was {saved})"
    assert_same_batches(take(stream, 0, 2), first)


# (c) one epoch covers the set


def test_one_epoch_has_the_manifests_class_counts(small_shards, reference):
    """Batches hold images, not keys: the labels of 25 x 16 samples must be the manifest's counts (40 each)."""
    manifest = mf.load(small_shards["train"])[1]
    epoch = reference[:PER_EPOCH]
    assert all(b["state"]["epoch"] == 0 for b in epoch)
    assert label_counts(epoch, len(manifest.classes)) == manifest.class_counts == [40] * 10
    assert reference[PER_EPOCH]["state"]["epoch"] == 1


# (d) ranks split the shards


@pytest.fixture(scope="module")
def labelled_by_shard(small_shards, tmp_path_factory) -> list[str]:
    """A copy of the training shards in which every sample's label is the index of its shard."""
    out = tmp_path_factory.mktemp("by_shard")
    paths = sorted(Path(small_shards["train"]).glob("*.tar"))
    for i, path in enumerate(paths):
        rewrite_tar(path, out / path.name, lambda name, data, i=i: str(i).encode() if name.endswith(".cls") else data)
    return [str(out / path.name) for path in paths]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_disjoint_shards_that_cover_the_set(labelled_by_shard, workers):
    """Each rank's share is 4 shards (200 samples); 12 batches (192 samples) touch all 4 of them."""
    seen = []
    for rank in (0, 1):
        batches = take(train_stream(labelled_by_shard, rank=rank, world=2), workers, 12)
        counts = label_counts(batches, 8)
        assert max(counts) <= 50
        seen.append({shard for shard, n in enumerate(counts) if n})
    assert len(seen[0]) == len(seen[1]) == 4
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(8))


# (e) resuming with another layout


def test_check_resumable_accepts_the_same_layout():
    state = StreamState(2, 1, {0: ReaderState(1, 2, 5), 1: ReaderState(2, 0, 3)}, next_reader=1)
    assert check_resumable(state, workers=2, world=1, allow_resharding=False) is state
    single = StreamState(1, 1, {0: ReaderState(0, 1, 1)})
    assert check_resumable(single, workers=0, world=1, allow_resharding=False) is single  # 0 workers: one reader


@pytest.mark.parametrize(("workers", "world"), [(4, 1), (2, 2), (0, 1)])
def test_check_resumable_refuses_another_layout(workers, world):
    state = StreamState(2, 1, {0: ReaderState(1, 2, 5), 1: ReaderState(2, 0, 3)})
    with pytest.raises(UserError, match="data.allow_resharding"):
        check_resumable(state, workers=workers, world=world, allow_resharding=False)


def test_resharding_restarts_at_the_next_epoch(urls, reference):
    """Read 4 batches with 2 workers, resume with 0: the stream starts epoch 1 as a fresh one-reader stream does."""
    tracker = StreamTracker(2, 1, None)
    with batches_of(train_stream(urls), 2) as batches:
        for _ in range(4):
            tracker.consumed(next(batches))
    state = check_resumable(tracker.state, workers=0, world=1, allow_resharding=True)
    assert state == StreamState(1, 1, {0: ReaderState(epoch=1)})
    assert_same_batches(take(train_stream(urls, resume=state), 0, 2), reference[PER_EPOCH : PER_EPOCH + 2])


# (f) too few shards


@pytest.mark.parametrize(("shards", "workers", "world", "fix"), [
    (1, 2, 1, "1 shard cannot feed 2 readers (1 process(es) x 2: data.workers, or 1 for 0); lower data.workers, or"),
    (8, 0, 9, "8 shards cannot feed 9 readers (9 process(es) x 1: data.workers, or 1 for 0); run fewer processes, or")])
def test_fewer_shards_than_readers_is_a_user_error(urls, shards, workers, world, fix):
    with pytest.raises(UserError, match=re.escape(fix)):
        take(train_stream(urls[:shards], world=world), workers, 1)


def test_fewer_shards_than_workers_is_one_sentence(urls):
    """A user error ends in one sentence (DESIGN.md), not in the DataLoader worker's traceback."""
    with pytest.raises(UserError) as error:
        take(train_stream(urls[:1]), 2, 1)
    assert "Traceback" not in str(error.value), f"the error reads as a worker's traceback:\n{error.value}"


def test_a_process_whose_workers_are_still_running_exits(urls):
    """The training process may end with the loader's workers alive (a UserError raised in one, a crash).

    At exit multiprocessing terminates its daemonic children with SIGTERM and joins them; workers that
    ignore SIGTERM (to leave preemption to the training process) must still not keep it from exiting.
    """
    script = ("import sys; from pretrain.data.stream import TrainStream, loader; "
              "batches = iter(loader(TrainStream(sys.argv[1:], 32, 16, 0, 0, 1, 0.35), 2, pin=False)); next(batches)")
    process = subprocess.Popen([sys.executable, "-c", script, *urls], cwd=Path(__file__).resolve().parents[2])
    try:
        assert process.wait(timeout=120) == 0  # a hang is for ever; 15 s was too short beside other tests
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("the process hung at exit, joining DataLoader workers that ignore SIGTERM")


SIGNALLED_GROUP = """
import os, signal, sys, time
from pretrain.data.stream import TrainStream, loader
if __name__ == "__main__":
    batches = loader(TrainStream(sys.argv[1:], 32, 16, 0, 0, 1, 0.35), 2, pin=False)
    next(batches)
    caught = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda signum, frame: caught.append(signum))
        os.killpg(0, s)
    time.sleep(6)  # a worker whose parent died stops within 5 s (PyTorch's watchdog)
    for _ in range(20):
        next(batches)
    print(len(caught), flush=True)
"""


def test_a_signal_to_the_whole_process_group_leaves_the_workers_serving(urls, tmp_path):
    """Slurm and shells signal every process of a job. The training process takes SIGTERM / SIGUSR1 as the request
    to finish its step and checkpoint, which needs batches: the workers, and the fork server they come from, ignore
    them."""
    (tmp_path / "signalled.py").write_text(SIGNALLED_GROUP)
    run = subprocess.run([sys.executable, str(tmp_path / "signalled.py"), *urls], capture_output=True, text=True,
                         timeout=60, start_new_session=True, cwd=Path(__file__).resolve().parents[2],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert run.returncode == 0 and run.stdout.split() == ["2"], run.stderr[-2000:]


# (g) the eval stream


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_stream_yields_every_sample_once(small_shards, workers):
    val = resolve(small_shards["val"], "data.val")
    batches = take(EvalStream(val, SIZE, MICRO, 0, 1), workers, 100)
    assert sum(len(b["labels"]) for b in batches) == 100
    assert label_counts(batches, 10) == mf.load(small_shards["val"])[1].class_counts == [10] * 10
    assert all(b["bad_samples"] == 0 for b in batches)
    if workers == 0:
        assert [len(b["labels"]) for b in batches] == [16] * 6 + [4]


def test_eval_stream_split_over_two_ranks(small_shards):
    """Each rank reads one of the two shards (50 samples: 3 batches of 16, then 2); together all 100."""
    val = resolve(small_shards["val"], "data.val")
    per_rank = [take(EvalStream(val, SIZE, MICRO, rank, 2), 0, 100) for rank in (0, 1)]
    assert [[len(b["labels"]) for b in batches] for batches in per_rank] == [[16, 16, 16, 2]] * 2
    assert label_counts(per_rank[0] + per_rank[1], 10) == [10] * 10


# (h) damaged shards and resolving shard sets


def test_a_brace_pattern_resolves_to_its_urls_without_classes(small_shards):
    folder = small_shards["train"]
    shard_set = resolve(f"{folder}/train-{{000000..000007}}.tar")
    assert shard_set.urls == [f"{folder}/train-{i:06d}.tar" for i in range(8)]
    assert shard_set.classes is None and shard_set.num_samples is None


def test_a_folder_resolves_through_its_manifest(small_shards):
    shard_set = resolve(small_shards["train"])
    assert [Path(u).name for u in shard_set.urls] == [f"train-{i:06d}.tar" for i in range(8)]
    assert shard_set.num_samples == 400 and len(shard_set.classes) == 10 and not shard_set.multi_label


@pytest.mark.parametrize("spec", ["", "missing"])
def test_a_missing_shard_set_is_a_user_error_naming_the_key(tmp_path, spec):
    with pytest.raises(UserError, match="data.train"):
        resolve(str(tmp_path / spec) if spec else "")


def test_a_list_of_shard_sets_is_one_sentence(small_shards):
    spec = f"[{small_shards['train']},{small_shards['val']}]"  # what data.train=[a,b] gives: the text, as a path
    with pytest.raises(UserError, match=re.escape(f"data.train={spec} is a list; it takes one shard set")):
        resolve(spec)


def test_one_shard_given_as_the_set_names_its_folder(small_shards):
    one = f"{small_shards['train']}/train-000000.tar"
    with pytest.raises(UserError, match=re.escape(f"data.train: {one} is one shard; give its folder "
                                                  f"({small_shards['train']}, with manifest.json)")):
        resolve(one)


def test_a_manifest_that_cannot_be_read_is_one_sentence(tmp_path):
    """What the file system raises (here reading a folder; on gs:// a host that does not answer) names the
    manifest, where it was a traceback."""
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(UserError, match=r"data.val: .*manifest.json cannot be read \(IsADirectoryError"):
        resolve(str(tmp_path), "data.val")


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_greyscale_image_keeps_its_greys(fmt):
    """PIL's own convert("RGB") clips 16-bit values (mode I;16 from PNG, I from TIFF) to white; they are scaled
    to 8 bits instead."""
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32)
    img = Image.fromarray(ramp.astype(np.uint16)) if fmt == "PNG" else Image.fromarray(ramp.astype(np.int32), "I")
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    rgb = np.asarray(decode(Image.open(io.BytesIO(buffer.getvalue()))))
    assert rgb.shape == (32, 32, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert abs(rgb.mean() - 127.5) < 1


def test_a_dark_16_bit_image_stays_dark():
    """Scaled by the bit depth, not by the brightest pixel (255 of 65535 is near black, not white)."""
    for value, grey in ((255, 0), (256, 1), (65535, 255)):
        buffer = io.BytesIO()
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(buffer, "PNG")
        assert np.asarray(decode(Image.open(io.BytesIO(buffer.getvalue()))))[0, 0].tolist() == [grey] * 3, value


def turned_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG stored as the camera's sensor saw it, with the EXIF orientation that says how to show it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation, upright", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                                  (8, lambda a: np.rot90(a, 1))])
def test_a_photo_stored_turned_is_decoded_upright(orientation, upright):
    """Phones store portraits sideways with an EXIF orientation; training and evaluation see them as shown (as
    Hugging Face's load_image does), not on their side."""
    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:8, :8] = 255  # a white corner, top left as stored
    data = turned_jpeg(stored, orientation)
    plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # the stored pixels, JPEG-rounded
    assert np.array_equal(np.asarray(decode(Image.open(io.BytesIO(data)))), upright(plain))
