"""data_tools.shard on real corpora: every good sample exactly once, bad ones counted, resumable."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from corpus import CLASSES, i21k_tars, image_bytes, image_folder
from procs import living
from data_tools import manifest as mf
from data_tools.pool import signals_blocked
from data_tools.shard import main
from data_tools.storage import register_webdataset_schemes


def read_back(output: str) -> tuple[mf.Manifest, dict[str, dict]]:
    """Every sample of the shard set, read with webdataset itself, by key."""
    register_webdataset_schemes()
    where, manifest = mf.load(output)
    urls = [where.url_of(s.name) for s in manifest.shards]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in samples, "a sample appears twice"
        samples[sample["__key__"]] = sample
    return manifest, samples


def labels_of(sample: dict) -> tuple[int, ...]:
    return tuple(json.loads(sample["labels.json"])) if "labels.json" in sample else (int(sample["cls"]),)


def test_image_folder(tmp_path, capsys):
    good = image_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert main([str(tmp_path / "src"), str(out), "--shard-samples", "8", "--workers", "2"]) == 0
    assert "ignored 1 file not named as an image (.txt 1)" in capsys.readouterr().out
    manifest, samples = read_back(str(out))
    assert {k: labels_of(s)[0] for k, s in samples.items()} == good
    assert manifest.classes == CLASSES and not manifest.multi_label
    assert manifest.num_samples == len(good) and manifest.class_counts == [12, 12, 12]
    assert len(manifest.shards) == 5 and all(s.samples <= 8 for s in manifest.shards)  # 38 files, 2 bad
    assert manifest.skipped == 2
    report = [json.loads(line) for line in (out / mf.REPORT).read_text().splitlines()]
    assert sorted(r["key"] for r in report) == [f"{CLASSES[0]}/notes", f"{CLASSES[1]}/cut"]
    # shuffled across shards: no shard is one class, and the bytes are the files' own (no re-encode)
    for shard in manifest.shards:
        keys = [k for k in samples if k in {s["__key__"] for s in wds.WebDataset(str(out / shard.name), shardshuffle=False)}]
        assert len({k.split("/")[0] for k in keys}) > 1
    sample = samples[f"{CLASSES[2]}/{CLASSES[2]}_1"]
    assert sample["jpg"] == (tmp_path / "src" / CLASSES[2] / f"{CLASSES[2]}_1.JPEG").read_bytes()
    assert "png" in samples[f"{CLASSES[2]}/{CLASSES[2]}_0"]


def test_linked_folders_in_a_class_are_read_once(tmp_path):
    """As torchvision's ImageFolder: a class's linked sub-folder is read; a link back up the tree is not a loop, and
    a broken link is a counted skip."""
    good = image_folder(tmp_path / "src", per_class=3)
    (tmp_path / "more").mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        (tmp_path / "more" / f"extra_{i}.jpg").write_bytes(image_bytes(rng))
        good[f"{CLASSES[0]}/linked/extra_{i}"] = 0
    (tmp_path / "src" / CLASSES[0] / "linked").symlink_to(tmp_path / "more")
    (tmp_path / "src" / CLASSES[0] / "loop").symlink_to(tmp_path / "src" / CLASSES[0])
    (tmp_path / "src" / CLASSES[2] / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out = tmp_path / "out"
    assert main([str(tmp_path / "src"), str(out), "--workers", "1"]) == 0
    manifest, samples = read_back(str(out))
    assert {k: labels_of(s)[0] for k, s in samples.items()} == good
    report = [json.loads(line)["key"] for line in (out / mf.REPORT).read_text().splitlines()]
    assert sorted(report) == [f"{CLASSES[0]}/notes", f"{CLASSES[1]}/cut", f"{CLASSES[2]}/gone"]


def test_a_jpeg_cut_short_is_skipped_and_one_with_data_after_its_end_is_kept(tmp_path):
    """A download cut short keeps a readable header: the default check decodes a JPEG that lacks its end marker."""
    rng = np.random.default_rng(3)
    for name in CLASSES:
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "src" / name / f"{i}.jpg").write_bytes(image_bytes(rng, size=(64, 64)))
    whole = image_bytes(rng, size=(64, 64))
    (tmp_path / "src" / CLASSES[0] / "cut.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    (tmp_path / "src" / CLASSES[1] / "tail.jpg").write_bytes(whole + b"camera maker's notes")
    mpo = io.BytesIO()  # a phone's JPEG with a second picture: PIL calls it MPO
    first, second = (Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2))
    first.save(mpo, "MPO", save_all=True, append_images=[second])
    (tmp_path / "src" / CLASSES[2] / "phone.jpg").write_bytes(mpo.getvalue()[: len(mpo.getvalue()) // 4])
    with Image.open(tmp_path / "src" / CLASSES[0] / "cut.jpg") as img:
        img.verify()  # what the header check alone saw
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1"]) == 0
    manifest, samples = read_back(str(tmp_path / "out"))
    assert f"{CLASSES[1]}/tail" in samples and f"{CLASSES[0]}/cut" not in samples and manifest.skipped == 2
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / mf.REPORT).read_text().splitlines()]
    assert all(r.startswith("not a readable image (OSError: image file is truncated") for r in reasons), reasons


def test_imagenet21k_tar_of_tars(tmp_path):
    """Unsafe, corrupt and twin members (one key: a tar cannot be renamed in place) are skipped and listed."""
    good = i21k_tars(tmp_path / "i21k")
    with tarfile.open(tmp_path / "i21k" / f"{CLASSES[2]}.tar", "a") as tar:
        data = image_bytes(np.random.default_rng(5))
        info = tarfile.TarInfo(f"more/{CLASSES[2]}_3.jpeg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert main([str(tmp_path / "i21k"), str(out), "--shard-size", "20kB", "--workers", "2"]) == 0
    manifest, samples = read_back(str(out))
    assert manifest.source_kind == "i21k" and len(manifest.shards) > 2
    assert {k: labels_of(s)[0] for k, s in samples.items()} == good
    reasons = {r["source"].rsplit(":", 1)[-1]: r["reason"] for r in map(json.loads, (out / mf.REPORT).read_text().splitlines())}
    assert reasons["../escape.JPEG"].startswith("refused")
    assert reasons["n01440764_bad.JPEG"].startswith("not an image")
    twin = f"more/{CLASSES[2]}_3.jpeg"
    assert reasons[twin].startswith(f"makes the same sample key '{CLASSES[2]}/{CLASSES[2]}_3' as ")
    assert manifest.skipped == 3


def test_a_truncated_synset_tar_keeps_the_images_before_the_cut(tmp_path, capsys):
    good = i21k_tars(tmp_path / "i21k")
    tar = tmp_path / "i21k" / f"{CLASSES[1]}.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])  # a download cut short
    out = tmp_path / "out"
    assert main([str(tmp_path / "i21k"), str(out), "--workers", "1"]) == 0
    manifest, samples = read_back(str(out))
    kept = [k for k in samples if k.startswith(CLASSES[1])]
    assert 3 <= len(kept) < 10 and set(kept) < {k for k, label in good.items() if label == 1}
    reasons = [json.loads(line)["reason"] for line in (out / mf.REPORT).read_text().splitlines()]
    cut = next(r for r in reasons if r.startswith("the rest of the tar is unreadable"))
    read = int(re.search(r"the (\d+) members before the damage are read", cut)[1])
    assert len(kept) in (read - 1, read)  # the last member read may itself be cut: skipped, with its own reason
    skipped_images = len(reasons) - 1  # the tar's own note is not an image
    assert manifest.skipped == skipped_images
    assert f"; {skipped_images} images skipped, 1 tar read in part or not at all (listed in " in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["folder", "i21k"])
def test_a_split_is_labelled_by_the_classes_of_another(tmp_path, kind, capsys):
    """A validation split that lacks a class would otherwise number the others differently from the training
    split: --classes TRAIN_SHARDS labels it by the training split's classes."""
    make = image_folder if kind == "folder" else i21k_tars
    make(tmp_path / "train", seed=0)
    val_good = make(tmp_path / "val", seed=1)
    missing = CLASSES[1]
    if kind == "folder":
        for f in (tmp_path / "val" / missing).iterdir():
            f.unlink()
        (tmp_path / "val" / missing).rmdir()
    else:
        (tmp_path / "val" / f"{missing}.tar").unlink()
    assert main([str(tmp_path / "train"), str(tmp_path / "train-shards"), "--workers", "1"]) == 0
    args = [str(tmp_path / "val"), str(tmp_path / "val-shards"), "--workers", "1", "--name", "val"]
    assert main([*args, "--classes", str(tmp_path / "train-shards")]) == 0
    manifest, samples = read_back(str(tmp_path / "val-shards"))
    assert manifest.classes == CLASSES and manifest.class_counts[1] == 0
    assert {k: labels_of(s)[0] for k, s in samples.items()} == {k: v for k, v in val_good.items()
                                                                 if not k.startswith(missing)}
    (tmp_path / "two.txt").write_text(f"{CLASSES[0]}\n{CLASSES[1]}\n")
    capsys.readouterr()
    args[1] = str(tmp_path / "other-shards")
    assert main([*args, "--classes", str(tmp_path / "two.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert f"'{CLASSES[2]}' is not among the 2 classes of --classes {tmp_path / 'two.txt'}" in err


def test_phone_pictures_are_kept(tmp_path):
    """A JPEG with further pictures appended (MPO: phones, stereo cameras) is a JPEG; one stored turned is kept as
    it is (training shows it upright) and re-encoded upright with --resize-short."""
    image_folder(tmp_path / "src", per_class=1)
    rng = np.random.default_rng(1)
    first, second = (Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(2))
    mpo = io.BytesIO()
    first.save(mpo, "MPO", save_all=True, append_images=[second])
    (tmp_path / "src" / CLASSES[2] / "phone.JPG").write_bytes(mpo.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6  # show it turned a quarter clockwise: a 60x40 portrait
    turned = io.BytesIO()
    first.save(turned, "JPEG", exif=exif.tobytes())
    (tmp_path / "src" / CLASSES[2] / "portrait.jpg").write_bytes(turned.getvalue())
    for options in ([], ["--resize-short", "20"]):
        out = tmp_path / f"out{len(options)}"
        assert main([str(tmp_path / "src"), str(out), "--workers", "1", *options]) == 0
        manifest, samples = read_back(str(out))
        phone, portrait = samples[f"{CLASSES[2]}/phone"], samples[f"{CLASSES[2]}/portrait"]
        assert labels_of(phone) == labels_of(portrait) == (2,) and "jpg" in phone
        if options:
            assert Image.open(io.BytesIO(portrait["jpg"])).size == (20, 30)
        else:
            assert phone["jpg"] == mpo.getvalue() and portrait["jpg"] == turned.getvalue()


def test_output_is_never_overwritten(tmp_path, capsys, monkeypatch):
    image_folder(tmp_path / "src", per_class=3)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep me")
    assert main([str(tmp_path / "src"), str(tmp_path / "busy")]) == 2
    assert "is not empty and holds no run of data_tools.shard" in capsys.readouterr().err
    assert (tmp_path / "busy" / "precious.txt").read_text() == "keep me"
    assert main([str(tmp_path / "src"), str(tmp_path / "busy" / "precious.txt")]) == 2
    assert "precious.txt is a file; give the folder" in capsys.readouterr().err
    out = str(tmp_path / "out")
    assert main([str(tmp_path / "src"), out, "--workers", "1"]) == 0
    monkeypatch.chdir(tmp_path)  # the same source, spelled another way
    for spelled in ("src/", "out/../src"):
        assert main([spelled, out, "--workers", "1"]) == 0
        assert "already holds this run" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / mf.MANIFEST).read_text())["source"] == str(tmp_path / "src")
    assert main([str(tmp_path / "src"), out, "--workers", "1", "--seed", "1"]) == 2
    assert "already holds the shards of another command (--seed 0 there, 1 here)" in capsys.readouterr().err


def test_a_finished_set_with_a_shard_lost_or_cut_short_is_mended_by_the_same_command(tmp_path, capsys):
    from data_tools.verify import main as verify

    image_folder(tmp_path / "src", per_class=6)
    out = tmp_path / "out"
    command = [str(tmp_path / "src"), str(out), "--shard-samples", "4", "--workers", "1"]
    assert main(command) == 0
    written = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    manifest = (out / mf.MANIFEST).read_text()
    (out / "train-000001.tar").unlink()
    cut = out / "train-000003.tar"
    cut.write_bytes(cut.read_bytes()[:1000])
    capsys.readouterr()
    assert main(command) == 0
    assert "train-000001.tar, train-000003.tar are missing or of another size" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == written  # the same plan: the same bytes
    assert (out / mf.MANIFEST).read_text() == manifest and not (out / "_parts").exists()
    assert verify([str(out), "--decode"]) == 0


@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C", "SIGTERM", "a worker killed"])
def test_interrupted_run_resumes_to_the_clean_result(tmp_path, how):
    """Killed (its workers must not outlive it), Ctrl-C in a terminal (SIGINT to the whole process group, workers
    included), SIGTERM (to it alone, as a scheduler or kill sends it) or a worker killed (for memory): one line, no
    traceback, every shard the workers finished kept, then resumed."""
    image_folder(tmp_path / "src", per_class=60)
    command = [sys.executable, "-m", "data_tools.shard", str(tmp_path / "src")]
    options = ["--shard-samples", "6", "--workers", "2", "--check", "decode"]
    assert subprocess.run([*command, str(tmp_path / "clean"), *options], capture_output=True).returncode == 0

    out = tmp_path / "out"
    proc = subprocess.Popen([*command, str(out), *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (out / "_parts" / "train-000004.tar.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    elif how == "a worker killed":
        workers = [pid for pid in living(parent=proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(workers[0], signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert not (out / mf.MANIFEST).exists(), "the run finished before it could be interrupted"
    if how != "SIGKILL":
        code = {"Ctrl-C": 130, "SIGTERM": 143, "a worker killed": 2}[how]
        assert proc.returncode == code and "Traceback" not in err, err[-3000:]
        said = "error: a worker process died" if code == 2 else "interrupted; the finished shards are kept"
        assert err.splitlines()[-1].startswith(said)
        tars = {p.name for p in out.glob("*.tar")}  # the workers' shards, finished while the command stopped
        records = {p.name[: -len(".json")] for p in (out / "_parts").glob("*.tar.json")}
        if code != 2:  # a broken pool ends the other workers too, with their shards unfinished
            assert records == tars
    deadline = time.time() + 30
    while living(session=proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not living(session=proc.pid), "workers outlived the command"
    finished = len(list((out / "_parts").glob("*.tar.json")))
    other = subprocess.run([*command, str(out), *options, "--seed", "3"], capture_output=True, text=True)
    assert other.returncode == 2 and "unfinished run of another command (--seed 0 there, 3 here)" in other.stderr
    rerun = subprocess.run([*command, str(out), *options], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {finished} of 31 shards" in rerun.stdout
    clean = json.loads((tmp_path / "clean" / mf.MANIFEST).read_text())
    resumed = json.loads((out / mf.MANIFEST).read_text())
    assert resumed["shards"] == clean["shards"] and resumed["class_counts"] == clean["class_counts"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())


def test_a_signal_that_arrives_while_workers_start_is_handled_not_lost():
    with signals_blocked(signal.SIGINT):
        started = subprocess.run([sys.executable, "-c", "import signal; print(signal.SIGINT in "
                                  "signal.pthread_sigmask(signal.SIG_BLOCK, []))"], capture_output=True, text=True)
    assert started.stdout.strip() == "True"  # a process started meanwhile never receives it
    with pytest.raises(KeyboardInterrupt):  # this one does: as the block ends, or at once through another thread
        with signals_blocked(signal.SIGINT):
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_resize_short_reencodes(tmp_path):
    image_folder(tmp_path / "src", per_class=4)
    out = tmp_path / "out"
    assert main([str(tmp_path / "src"), str(out), "--resize-short", "20", "--workers", "1"]) == 0
    _, samples = read_back(str(out))
    for sample in samples.values():
        assert set(sample) >= {"jpg", "cls"} and "png" not in sample
        assert min(Image.open(io.BytesIO(sample["jpg"])).size) == 20


def test_memory_filesystem(tmp_path):
    good = image_folder(tmp_path / "src", per_class=5)
    assert main([str(tmp_path / "src"), "memory://shards/train", "--shard-samples", "4"]) == 0
    manifest, samples = read_back("memory://shards/train")
    assert {k: labels_of(s)[0] for k, s in samples.items()} == good
    assert fsspec.filesystem("memory").exists("/shards/train/manifest.json")
    assert Counter(labels_of(s)[0] for s in samples.values()) == Counter(good.values())


def test_google_cloud_storage(tmp_path, gcs_emulator, capsys):
    good = image_folder(tmp_path / "src", per_class=5)
    url = gcs_emulator("shards-test") + "/i1k/train"
    assert main([str(tmp_path / "src"), url, "--shard-samples", "4", "--workers", "2"]) == 0
    manifest, samples = read_back(url)
    assert {k: labels_of(s)[0] for k, s in samples.items()} == good
    assert len(manifest.shards) == 5 and not fsspec.filesystem("gs").exists("shards-test/i1k/train/_parts")
    missing = "gs://no-such-bucket/i1k/train"  # buckets are created, not implied by a path
    assert main([str(tmp_path / "src"), missing, "--shard-samples", "4", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the line after the progress bar's
    assert err.startswith(f"error: {missing} cannot be written (") and "a bucket must be created first" in err


def test_a_second_command_writing_the_same_output_is_named(tmp_path):
    """Two identical commands at once into one folder: one's temporary shard file is renamed by the other before
    its own rename (seen with two commands started together, not reproducible on cue)."""
    from data_tools.shard import written_to
    from data_tools.storage import Location
    from pretrain.errors import UserError

    tmp = str(tmp_path / ".train-000004.tar.tmp")
    with pytest.raises(UserError, match=r"is being written by another data_tools.shard command as well"):
        with written_to(Location(str(tmp_path))):
            raise FileNotFoundError(2, "No such file or directory", tmp, str(tmp_path / "train-000004.tar"))
    with pytest.raises(UserError, match=r"cannot be written \(FileNotFoundError"):  # the output's folder itself gone
        with written_to(Location(str(tmp_path))):
            raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "gone"))
