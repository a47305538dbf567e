"""Damaged and missing shards: the training and eval streams count what they lose and name it, once, and go on."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_stream import MICRO, MIN_SCALE, SEED, SIZE, members, rewrite_tar, take, train_stream

from pretrain.data.shards import read_shard, resolve
from pretrain.data.stream import EvalStream, ReaderState, StreamState, StreamTracker, TrainStream, loader


@pytest.fixture(scope="module")
def damaged(small_shards, tmp_path_factory) -> dict:
    """A copy of the training set: one image replaced by garbage in shard 2, shard 5 cut inside a member's data."""
    out = tmp_path_factory.mktemp("damaged") / "train"
    shutil.copytree(small_shards["train"], out)
    garbled = out / "train-000002.tar"
    victim = [m.name for m in members(garbled) if m.name.endswith(".jpg")][10]
    rewrite_tar(Path(small_shards["train"]) / garbled.name, garbled,
                lambda name, data: b"not an image at all" if name == victim else data)
    cut = out / "train-000005.tar"
    middle = members(cut)[50]
    cut.write_bytes(cut.read_bytes()[: middle.offset_data + middle.size // 2])
    return {"folder": str(out), "truncated": str(cut), "original": str(Path(small_shards["train"]) / cut.name),
            "garbled": f"{garbled}: sample {victim.removesuffix('.jpg')}"}


def test_damaged_shards_are_counted_and_the_stream_goes_on(damaged):
    """Reading through the first epoch: one bad sample, one damaged shard, and batches keep coming. With the
    manifest's counts, the samples the cut shard lost are bad samples too, so that the epoch adds up."""
    shard_set = resolve(damaged["folder"])
    for counts in (None, shard_set.counts):
        stream = TrainStream(shard_set.urls, SIZE, MICRO, SEED, 0, 1, MIN_SCALE, counts=counts)
        bad, reasons, read = 0, [], 0
        for batch in loader(stream, 0, pin=False):
            bad += batch["bad_samples"]
            reasons += batch["damaged_shards"]
            read += len(batch["labels"])
            if batch["state"]["epoch"] >= 1:  # this batch ends with the next epoch's first samples
                read -= batch["state"]["offset"]
                break
        assert len(reasons) == 1 and reasons[0].startswith(damaged["truncated"])
        assert 300 < read < 399  # the truncated shard lost samples, the epoch is shorter
        assert bad == (1 + 1 if counts is None else 400 - read)  # without counts, one for the cut shard


def test_lost_samples_are_counted_once_even_when_resumed_inside_the_damaged_shard(small_shards, tmp_path):
    """A missing shard's samples and a cut one's lost samples are bad samples; resumed inside the cut shard, the
    stream reads it again but does not count its loss a second time."""
    shutil.copytree(small_shards["train"], tmp_path / "train")
    shard_set = resolve(str(tmp_path / "train"))
    mine = np.random.default_rng([SEED, 0]).permutation(len(shard_set.urls))
    Path(shard_set.urls[mine[0]]).unlink()  # the first shard the one reader reads: 50 samples
    cut = tmp_path / "train" / Path(shard_set.urls[mine[1]]).name
    middle = members(cut)[31]  # the 16th sample's image
    cut.write_bytes(cut.read_bytes()[: middle.offset_data + middle.size // 2])
    (first,) = take(TrainStream(shard_set.urls, SIZE, MICRO, SEED, 0, 1, MIN_SCALE, counts=shard_set.counts), 0, 1)
    assert first["bad_samples"] == 50 + 35  # the missing shard's, and what the one cut after 15 samples lacks
    assert len(first["damaged_shards"]) == 2
    inside_the_cut_one = StreamState(1, 1, {0: ReaderState(0, 1, 5)})
    (again,) = take(TrainStream(shard_set.urls, SIZE, MICRO, SEED, 0, 1, MIN_SCALE, inside_the_cut_one,
                                counts=shard_set.counts), 0, 1)
    assert again["bad_samples"] == 0 and len(again["damaged_shards"]) == 1 and again["state"]["cursor"] == 2


def test_a_damaged_shard_and_a_bad_sample_are_named_once_however_many_epochs(damaged):
    tracker, named, unread = StreamTracker(0, 1, None), [], []
    for batch in loader(train_stream(resolve(damaged["folder"]).urls), 0, pin=False):
        named += tracker.consumed(batch)
        unread += [why for why, _ in tracker.new_unread]
        if batch["state"]["epoch"] >= 3:
            break
    assert len(named) == 1 and named[0].startswith(damaged["truncated"])
    assert list(tracker.damaged_shards) == [damaged["truncated"]]
    assert unread == [f"{damaged['garbled']} has no image PIL can identify"]


def test_the_first_ten_bad_samples_are_named_and_the_tenth_says_so():
    tracker, named = StreamTracker(0, 1, None), []
    state = {"epoch": 0, "cursor": 0, "offset": 0}
    for n, start in ((3, 0), (10, 3), (1, 13), (4, 0)):  # the last: samples named before, in the next epoch
        unread = [(f"s.tar: sample k{start + i}", "has no image member") for i in range(n)]
        tracker.consumed({"reader": 0, "state": state, "bad_samples": n, "damaged_shards": [], "unread": unread})
        named.append(tracker.new_unread)
    assert [len(lines) for lines in named] == [3, 7, 0, 0] and tracker.bad_samples == 18
    assert [last for lines in named for _, last in lines] == [False] * 9 + [True]
    assert named[1][-1][0] == "s.tar: sample k9 has no image member"


def test_the_eval_stream_counts_what_damaged_shards_lack(damaged):
    """The truncated shard's lost samples (its manifest count minus those read) are bad samples, and it is named."""
    shard_set = resolve(damaged["folder"])
    batches = take(EvalStream(shard_set, SIZE, MICRO, 0, 1), 0, 1000)
    read = sum(len(b["labels"]) for b in batches)
    assert read + sum(b["bad_samples"] for b in batches) == 400  # one garbled image, the rest lost to the cut
    assert 300 < read < 399
    assert [why for b in batches for why in b["damaged_shards"]] == [read_shard(damaged["truncated"])[1]]


def test_a_rank_whose_only_shard_is_missing_reports_it_in_an_empty_batch(small_shards, tmp_path):
    """Rank 1 of 2 reads only the second validation shard: gone, it yields no image but its 50 missing samples."""
    shutil.copytree(small_shards["val"], tmp_path / "val")
    shard_set = resolve(str(tmp_path / "val"))
    Path(shard_set.urls[1]).unlink()
    (batch,) = take(EvalStream(shard_set, SIZE, MICRO, 1, 2), 0, 10)
    assert batch["image"].shape == (0, 3, SIZE, SIZE) and batch["bad_samples"] == 50
    assert len(batch["damaged_shards"]) == 1 and batch["damaged_shards"][0].startswith(shard_set.urls[1])
    assert sum(len(b["labels"]) for b in take(EvalStream(shard_set, SIZE, MICRO, 0, 2), 0, 10)) == 50


def test_read_shard_returns_the_samples_before_the_damage(damaged):
    samples, reason = read_shard(damaged["truncated"])
    original, _ = read_shard(damaged["original"])
    assert 0 < len(samples) < len(original)
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in original[: len(samples)]]
    assert all(s["jpg"] == o["jpg"] and s["cls"] == o["cls"] for s, o in zip(samples, original))
    assert reason == f"{damaged['truncated']}: damaged after {len(samples)} samples (unexpected end of data)"


def test_read_shard_reports_a_shard_cut_at_a_member_boundary(small_shards, tmp_path):
    """A shard cut between two members (a copy written in whole blocks can stop there) lacks the end-of-archive blocks.

    It must be reported as damaged, like a shard cut inside a member, not read as a shorter, healthy shard.
    """
    source = Path(small_shards["train"]) / "train-000001.tar"
    cut = tmp_path / source.name
    cut.write_bytes(source.read_bytes()[: members(source)[50].offset])  # 25 whole samples, no end marker
    samples, reason = read_shard(str(cut))
    assert len(samples) == 25
    assert reason is not None, "read_shard took a shard truncated at a member boundary for a complete one"


def test_read_shard_reads_a_chained_fsspec_url(small_shards):
    """read_shard fetches the bytes with fsspec; it must parse those bytes, not reopen the URL another way."""
    url = "simplecache::file://" + str(Path(small_shards["train"]) / "train-000000.tar")
    samples, reason = read_shard(url)
    assert (len(samples), reason) == (50, None), (
        f"read_shard discarded the bytes fsspec fetched and reopened {url} with webdataset's gopen: {reason}")


