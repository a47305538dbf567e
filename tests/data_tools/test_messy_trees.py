"""data_tools.shard on trees as they come from scrapes, old archives, Macs and notebooks: what can be a sample is
one, and what is left out is counted or listed with the reason, or refused in one sentence before anything is
written."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import unicodedata

import numpy as np
from PIL import Image

from corpus import CLASSES, i21k_tars, image_bytes, image_folder
from data_tools import manifest as mf
from data_tools.shard import main
from test_shard import labels_of, read_back


def test_a_scraped_tree_keeps_every_image_and_names_what_it_leaves_out(tmp_path, capsys):
    src = tmp_path / "src"
    good = image_folder(src, per_class=3)  # and a text file, a text file named .png, a JPEG cut short
    rng = np.random.default_rng(1)
    latin1 = os.path.join(os.fsencode(src / CLASSES[0]), b"caf\xe9.jpg")  # a Latin-1 name from an old archive
    with open(latin1, "wb") as f:
        f.write(image_bytes(rng))
    for hidden in (src / ".ipynb_checkpoints", src / CLASSES[1] / ".ipynb_checkpoints"):
        hidden.mkdir()
        (hidden / "copy.jpg").write_bytes(image_bytes(rng))
    (src / CLASSES[1] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / CLASSES[2] / "._photo.jpg").write_bytes(b"\0\5\26\7AppleDouble")
    (src / "README.md").write_text("where these came from")
    panorama = io.BytesIO()  # 90 megapixels: PIL warns (over 89) but decodes it, as training does
    Image.new("L", (9500, 9500), 128).save(panorama, "JPEG")
    (src / CLASSES[2] / "panorama.jpg").write_bytes(panorama.getvalue())
    good[f"{CLASSES[2]}/panorama"] = 2

    assert main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 0
    said = capsys.readouterr().out
    assert "ignored 2 files not named as an image (.md 1, .txt 1), as torchvision's ImageFolder does" in said
    assert ("ignored 4 hidden files and folders (a name starting with '.': .ipynb_checkpoints 2, .DS_Store 1, "
            "._photo.jpg 1)") in said
    manifest, samples = read_back(str(tmp_path / "out"))
    assert manifest.classes == CLASSES, "a hidden folder is no class"
    assert {k: labels_of(s)[0] for k, s in samples.items()} == good
    report = {r["source"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / mf.REPORT).read_text().splitlines())}
    assert report[f"{src / CLASSES[0]}/caf\\xe9.jpg"].startswith("its name is not UTF-8 (an archive's Latin-1?); "
                                                                  "rename it, e.g. with convmv")
    assert manifest.skipped == 3  # with notes.png and cut.jpg

    os.rename(src / CLASSES[0], os.path.join(os.fsencode(src), b"caf\xe9"))
    assert main([str(src), str(tmp_path / "o2"), "--workers", "1"]) == 2
    assert f"class folder 'caf\\xe9' of {src}: its name is not UTF-8" in capsys.readouterr().err


def test_a_tree_below_a_folder_whose_name_is_not_utf8_shards_and_one_class_spelled_twice_is_refused(tmp_path, capsys):
    parent = os.path.join(os.fsencode(tmp_path), b"archiv\xe9")
    os.mkdir(parent)
    src = tmp_path / os.fsdecode(parent) / "src"
    good = image_folder(src, per_class=2)
    assert main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert set(read_back(str(tmp_path / "out"))[1]) == set(good)

    composed = unicodedata.normalize("NFC", "café")
    for spelling in (composed, unicodedata.normalize("NFD", composed)):
        (src / spelling).mkdir()
        (src / spelling / "a.jpg").write_bytes(image_bytes(np.random.default_rng(0)))
    assert main([str(src), str(tmp_path / "o2"), "--workers", "1"]) == 2
    assert "one name spelled two ways (Unicode NFC and NFD" in capsys.readouterr().err


def test_files_that_make_one_key_are_all_named_at_once(tmp_path, capsys):
    src = tmp_path / "src"
    image_folder(src, per_class=2)
    rng = np.random.default_rng(2)
    for name in ("a.jpg", "a.png", "b.jpg", "b.png"):
        (src / CLASSES[0] / name).write_bytes(image_bytes(rng, "PNG" if name.endswith("png") else "JPEG"))
    for name in ("c.01.jpg", "c_01.jpg"):
        (src / CLASSES[1] / name).write_bytes(image_bytes(rng))
    assert main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: 3 pairs of files make the same sample key ({src / CLASSES[0]}/a.jpg and ")
    assert f"-> '{CLASSES[1]}/c_01')" in err and not (tmp_path / "out").exists()


def test_class_folders_named_on_a_mac_match_the_class_list(tmp_path):
    """macOS keeps 'ñ' in a file name as n + a combining tilde (NFD); the training split, sharded on Linux, as one
    character (NFC)."""
    composed = unicodedata.normalize("NFC", "ñandú")
    rng = np.random.default_rng(3)
    for split, spelling in (("train", composed), ("val", unicodedata.normalize("NFD", composed))):
        for name in (spelling, "zebra"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                (tmp_path / split / name / f"{i}.jpg").write_bytes(image_bytes(rng))
    assert main([str(tmp_path / "train"), str(tmp_path / "s-train"), "--workers", "1"]) == 0
    assert main([str(tmp_path / "val"), str(tmp_path / "s-val"), "--workers", "1", "--classes",
                 str(tmp_path / "s-train")]) == 0
    manifest, samples = read_back(str(tmp_path / "s-val"))
    assert manifest.classes == ["zebra", composed]  # sorted by code point
    assert sorted(labels_of(s)[0] for s in samples.values()) == [0, 0, 1, 1]


def test_a_tree_of_class_folders_and_tars_is_refused_unless_the_kind_is_given(tmp_path, capsys):
    src = tmp_path / "src"
    good = image_folder(src, per_class=2)
    with tarfile.open(src / "old_backup.tar", "w"):
        pass
    assert main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    assert ("holds both .tar files (old_backup.tar) and folders (" in capsys.readouterr().err and
            not (tmp_path / "out").exists())
    assert main([str(src), str(tmp_path / "out"), "--workers", "1", "--kind", "imagefolder"]) == 0
    assert "ignored 2 files not named as an image" in capsys.readouterr().out  # the tar and a readme.txt
    assert {k for k in read_back(str(tmp_path / "out"))[1]} == set(good)


def test_synset_tars_as_they_come(tmp_path, capsys):
    """An upper-case .TAR is a synset tar; a .tar.gz under a .tar name, a member with a Latin-1 name, a readme and a
    folder beside the tars are each left out and said so."""
    root = tmp_path / "i21k"
    good = i21k_tars(root, per_class=3)
    (root / f"{CLASSES[1]}.tar").rename(root / f"{CLASSES[1]}.TAR")
    with tarfile.open(root / f"{CLASSES[2]}.tar", "a", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        data = image_bytes(np.random.default_rng(4))
        info = tarfile.TarInfo("café.JPEG")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (root / "n09999999.tar").write_bytes(gzip.compress((root / f"{CLASSES[0]}.tar").read_bytes()))
    (root / "README.txt").write_text("ImageNet fall 2011")
    (root / "extracted").mkdir()
    assert main([str(root), str(tmp_path / "out"), "--workers", "1"]) == 2  # tars and a folder: which is it?
    assert main([str(root), str(tmp_path / "out"), "--workers", "1", "--kind", "i21k"]) == 0
    assert "ignored 2 files not named as a synset tar (" in capsys.readouterr().out
    manifest, samples = read_back(str(tmp_path / "out"))
    assert manifest.classes == [*CLASSES, "n09999999"]
    assert {k: labels_of(s)[0] for k, s in samples.items()} == good
    report = {r["source"].rsplit("/", 1)[-1]: r["reason"]
              for r in map(json.loads, (tmp_path / "out" / mf.REPORT).read_text().splitlines())}
    assert report["n09999999.tar"].startswith("compressed (gzip: a .tar.gz under a .tar name); decompress it")
    assert report[f"{CLASSES[2]}.tar:caf\\xe9.JPEG"].startswith("its name is not UTF-8")


def test_sizes_and_counts_that_make_no_shards_are_refused(tmp_path, capsys):
    image_folder(tmp_path / "src", per_class=1)
    for option, value, said in (("--shard-samples", "-5", "'-5' is not a number of samples above 0"),
                                ("--shard-samples", "0", "'0' is not a number of samples above 0"),
                                ("--shard-size", "0", "'0' is not a size like 1GB"),
                                ("--shard-size", "1.5.5GB", "'1.5.5GB' is not a size like 1GB")):
        assert main([str(tmp_path / "src"), str(tmp_path / "out"), option, value]) == 2
        assert said in capsys.readouterr().err


def test_an_unfinished_run_whose_source_changed_says_to_restore_it(tmp_path, capsys):
    image_folder(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    assert main([str(tmp_path / "src"), str(out), "--workers", "1"]) == 0
    done = json.loads((out / mf.MANIFEST).read_text())
    (out / mf.MANIFEST).unlink()
    (out / "_parts").mkdir()  # as an interrupted run leaves it, whose source's files then changed
    (out / "_parts" / "run.json").write_text(json.dumps({"source": done["source"],
                                                         "options": {**done["options"], "plan_sha256": "0" * 64}}))
    assert main([str(tmp_path / "src"), str(out), "--workers", "1"]) == 2
    assert ("(the same options, but the source's files changed since); restore the source as it was to finish that "
            "run, or pick an empty OUTPUT") in capsys.readouterr().err
