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
import pytest
from PIL import Image

from corpus import CLASSES, i21k_tars, image_bytes, image_folder, image_list
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
    for option, value, said in (("--shard-samples", "-5", "'-5' is not a whole number of 1 or more"),
                                ("--shard-samples", "0", "'0' is not a whole number of 1 or more"),
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


def test_arguments_out_of_their_range_are_refused(tmp_path, capsys):
    image_folder(tmp_path / "src", per_class=1)
    for option, value, said in (("--seed", "-1", "'-1' is not a whole number of 0 or more"),
                                ("--resize-short", "-1", "'-1' is not a whole number of 0 or more"),
                                ("--quality", "0", "'0' is not a whole number from 1 to 100"),
                                ("--quality", "101", "'101' is not a whole number from 1 to 100"),
                                ("--workers", "0", "'0' is not a whole number of 1 or more"),
                                ("--name", "a/b", "'a/b' is not a file name prefix"),
                                ("--name", "../esc", "'../esc' is not a file name prefix")):
        assert main([str(tmp_path / "src"), str(tmp_path / "out"), option, value]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def sources_that_cannot_be_read(root):
    """(SOURCE, extra options, what the one sentence says) for inputs read wrong before."""
    image_list(root / "jft")
    (root / "latin1.csv").write_bytes(b"jft/images/caf\xe9.jpg, n01440764\n")
    (root / "latin1_classes.txt").write_bytes(b"caf\xe9\n")
    (root / "s3.csv").write_text("jft/images/im0.jpg, n01440764\nfoo://bucket/im1.jpg, n01440764\n")
    (root / "ids.csv").write_text("jft/images/im0.jpg, 0\n")
    i21k_tars(root / "i21k", per_class=2)
    with tarfile.open(root / "release.tar", "w") as tar:  # the ImageNet-21k release: a tar of the synset tars
        tar.add(root / "i21k", arcname="i21k")
    with tarfile.open(root / "winter21_whole.tar.gz", "w:gz") as tar:  # as the release is, compressed
        tar.add(root / "i21k", arcname="winter21_whole")
    (root / "release.bin").write_bytes((root / "winter21_whole.tar.gz").read_bytes())
    with tarfile.open(root / "winter21_whole.tar.gz") as tar:  # unpacked as told: the tars in a folder of their own
        tar.extractall(root / "unpacked", filter="data")
    image_folder(root / "tree", per_class=2)
    assert main([str(root / "tree"), str(root / "set"), "--workers", "1"]) == 0
    i21k_tars(root / "twins", per_class=2)
    (root / "twins" / f"{CLASSES[0]}.tar").rename(root / "twins" / f"{CLASSES[0]}.TAR")
    (root / "twins" / f"{CLASSES[0]}.tar").write_bytes((root / "twins" / f"{CLASSES[1]}.tar").read_bytes())
    classes = ["--classes", str(root / "jft" / "classes.txt")]
    return [
        (root / "latin1.csv", classes, "latin1.csv is not UTF-8 text (byte 0xe9 at 14); save it as UTF-8"),
        (root / "jft" / "list.csv", ["--classes", str(root / "latin1_classes.txt")], "is not UTF-8 text (byte 0xe9"),
        (root / "release.tar", [], "release.tar is an archive; unpack it first (tar xf"),
        (root / "winter21_whole.tar.gz", [], "winter21_whole.tar.gz is an archive; unpack it first (tar xf"),
        (root / "release.bin", [], "release.bin is an archive; unpack it first"),  # gzip's magic number
        (root / "unpacked", [], "unpacked holds no images to shard; it holds .tar files in a folder: give the folder "
                                "that holds the synset tars"),
        (root / "tree", ["--kind", "list", *classes], "tree is a folder, not an image list"),
        (root / "nothing.csv", ["--kind", "list", *classes], "nothing.csv is not there"),
        (root / "s3.csv", classes, "s3.csv line 2: 'foo://bucket/im1.jpg' cannot be read here (Protocol not known"),
        (root / "ids.csv", classes, "label '0' is not in"),
        (root / "set", [], "set is a shard set already (it holds manifest.json); train on it as it is"),
        (root / "twins", [], f"synset tars '{CLASSES[0]}.TAR' and '{CLASSES[0]}.tar', one class spelled two ways"),
    ]


def test_sources_that_cannot_be_read_are_one_sentence(tmp_path, capsys):
    for source, options, said in sources_that_cannot_be_read(tmp_path):
        capsys.readouterr()
        assert main([str(source), str(tmp_path / "out"), "--workers", "1", *options]) == 2, source
        err = capsys.readouterr().err
        assert said in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


def test_a_csv_list_of_class_ids_is_told_that_json_lines_take_them(tmp_path, capsys):
    image_list(tmp_path)
    (tmp_path / "ids.csv").write_text('images/im0.jpg, 0\n')
    (tmp_path / "quoted.csv").write_text(f'"images/im0.jpg", "{CLASSES[1]}"\n')  # a space after the comma
    assert main([str(tmp_path / "ids.csv"), str(tmp_path / "o1"), "--classes", str(tmp_path / "classes.txt")]) == 2
    assert 'a CSV list names its classes; JSON lines take ids: {"path": "...", "labels": [0]}' in capsys.readouterr().err
    assert main([str(tmp_path / "quoted.csv"), str(tmp_path / "o2"), "--classes", str(tmp_path / "classes.txt"),
                 "--workers", "1"]) == 0
    assert [labels_of(s) for s in read_back(str(tmp_path / "o2"))[1].values()] == [(1,)]


def test_a_source_of_which_no_image_can_be_read_is_an_error_not_an_empty_set(tmp_path, capsys):
    for name in CLASSES[:2]:
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "x.jpg").write_bytes(b"<html>403 Forbidden</html>")
    for _ in range(2):  # and again: the same
        assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert "none of the 2 images of" in err and "could be read (" in err and "every reason is in" in err, err
        assert [p.name for p in (tmp_path / "out").iterdir()] == [mf.REPORT]  # no shard kept to be reused
        assert len((tmp_path / "out" / mf.REPORT).read_text().splitlines()) == 2
    rng = np.random.default_rng(0)
    for name in CLASSES[:2]:  # the source mended (the storage's credentials, say)
        (tmp_path / "src" / name / "x.jpg").write_bytes(image_bytes(rng))
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert read_back(str(tmp_path / "out"))[0].num_samples == 2


def test_members_of_synset_tars_that_are_no_images_are_left_out(tmp_path, capsys):
    good = i21k_tars(tmp_path / "i21k", per_class=2)
    with tarfile.open(tmp_path / "i21k" / f"{CLASSES[1]}.tar", "a") as tar:
        for name, data in (("LICENSE.txt", b"terms"), ("meta.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main([str(tmp_path / "i21k"), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert "ignored 2 tar members not named as an image (.txt 1, .json 1)" in capsys.readouterr().out
    manifest, samples = read_back(str(tmp_path / "out"))
    assert set(samples) == set(good) and manifest.skipped == 2  # the corrupt and the unsafe member, not the text


def test_the_same_command_from_another_folder_or_naming_the_class_set_otherwise_is_the_same_run(tmp_path, capsys,
                                                                                                monkeypatch):
    image_list(tmp_path / "jft")
    assert main([str(tmp_path / "jft"), str(tmp_path / "cls"), "--kind", "list", "--workers", "1"]) == 2  # no list
    monkeypatch.chdir(tmp_path / "jft")
    assert main(["list.csv", "../out", "--classes", "classes.txt", "--workers", "1"]) == 0
    monkeypatch.chdir(tmp_path / "jft" / "images")
    capsys.readouterr()
    assert main(["../list.csv", "../../out", "--classes", "../classes.txt", "--workers", "1"]) == 0
    assert "already holds this run" in capsys.readouterr().out
    image_folder(tmp_path / "tree", per_class=2)
    monkeypatch.chdir(tmp_path)
    assert main(["tree", "s-train", "--workers", "1"]) == 0
    assert main(["tree", "s-val", "--classes", "s-train", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["tree", "s-val", "--classes", "s-train/manifest.json", "--workers", "1"]) == 0
    assert "already holds this run" in capsys.readouterr().out


@pytest.mark.parametrize("manifest", ['{"format": "vit', "[1, 2]", b'{"classes": ["caf\xe9"]}', None])
def test_a_set_whose_manifest_is_damaged_or_lost_is_written_again_by_the_same_command(tmp_path, capsys, manifest):
    from data_tools.verify import main as verify

    image_folder(tmp_path / "src", per_class=4)
    command = [str(tmp_path / "src"), str(tmp_path / "out"), "--shard-samples", "5", "--workers", "1"]
    assert main(command) == 0
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    if manifest is None:
        (tmp_path / "out" / mf.MANIFEST).unlink()
    else:
        (tmp_path / "out" / mf.MANIFEST).write_bytes(manifest if isinstance(manifest, bytes) else manifest.encode())
        assert verify([str(tmp_path / "out")]) == 2
        assert "manifest.json is damaged" in capsys.readouterr().err
    assert main(command) == 0
    said = "no manifest.json" if manifest is None else "a damaged manifest.json"
    assert f"holds shards named as this run's and {said} to check them by; writing them again" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == written
    (tmp_path / "other").mkdir()  # shards of another tool, named as webdataset names them: not ours
    for i in range(2):
        (tmp_path / "other" / f"train-00000{i}.tar").write_bytes(b"someone else's")
    assert main([command[0], str(tmp_path / "other"), *command[2:]]) == 2
    assert "is not empty and holds no run of data_tools.shard" in capsys.readouterr().err
    (tmp_path / "other" / mf.MANIFEST).write_text('{"format": "vit-pretrain/shards/2"}')  # a later version's
    assert main([command[0], str(tmp_path / "other"), *command[2:]]) == 2
    assert "is not a manifest of this tool (format 'vit-pretrain/shards/2'" in capsys.readouterr().err
    (tmp_path / "other" / mf.MANIFEST).write_text("{")
    assert main([command[0], str(tmp_path / "other"), *command[2:]]) == 2
    assert "holds other files than this run's shards; move them away" in capsys.readouterr().err
    assert (tmp_path / "other" / "train-000000.tar").read_bytes() == b"someone else's"


def test_images_in_formats_the_shards_do_not_hold_are_skipped_or_re_encoded(tmp_path, capsys):
    image_folder(tmp_path / "src", per_class=1)
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(tmp_path / "src" / CLASSES[2] / "scan.ppm")
    assert main([str(tmp_path / "src"), str(tmp_path / "kept"), "--workers", "1"]) == 0
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "kept" / mf.REPORT).read_text().splitlines()]
    assert any(r.startswith("unsupported image format PPM (shards hold JPEG, PNG") and "--resize-short N re-encodes"
               in r for r in reasons), reasons
    assert main([str(tmp_path / "src"), str(tmp_path / "jpeg"), "--workers", "1", "--resize-short", "32"]) == 0
    samples = read_back(str(tmp_path / "jpeg"))[1]
    assert f"{CLASSES[2]}/scan" in samples and samples[f"{CLASSES[2]}/scan"]["jpg"][:2] == b"\xff\xd8"
