"""data_tools.shard on image lists (JFT-style: path, labels): formats, labels by name or id, each mistake named by
its line."""

from __future__ import annotations

import json
import unicodedata

import pytest

from corpus import CLASSES, image_list
from test_shard import labels_of, read_back

from data_tools.shard import main


@pytest.mark.parametrize("jsonl", [False, True])
def test_multi_label_list(tmp_path, jsonl):
    good = image_list(tmp_path, jsonl=jsonl)
    listing = tmp_path / ("list.jsonl" if jsonl else "list.csv")
    out = tmp_path / "out"
    assert main([str(listing), str(out), "--classes", str(tmp_path / "classes.txt"), "--shard-samples", "7", "--workers", "1"]) == 0
    manifest, samples = read_back(str(out))
    assert manifest.multi_label and manifest.source_kind == "list"
    assert {k: labels_of(s) for k, s in samples.items()} == good
    assert all("labels.json" in s and "cls" not in s for s in samples.values())
    assert manifest.class_counts == [sum(c in ids for ids in good.values()) for c in range(len(CLASSES))]


def test_a_list_of_one_label_a_line_is_a_single_label_set(tmp_path):
    """An ImageNet split written as 'path, class' lines: single-label shards, which the few-shot probe takes."""
    image_list(tmp_path)
    listing = tmp_path / "list.csv"
    listing.write_text("".join(line.split()[0] + " " + line.split()[1] + "\n" for line in listing.read_text().splitlines()))
    assert main([str(listing), str(tmp_path / "out"), "--classes", str(tmp_path / "classes.txt"), "--workers", "1"]) == 0
    manifest, samples = read_back(str(tmp_path / "out"))
    assert not manifest.multi_label and manifest.source_kind == "list"
    assert all("cls" in s and "labels.json" not in s for s in samples.values())
    firsts = {f"images/im{i}": CLASSES.index(line.split()[1]) for i, line in enumerate(listing.read_text().splitlines())}
    assert {k: labels_of(s) for k, s in samples.items()} == {k: (c,) for k, c in firsts.items()}


def test_a_class_listed_twice_is_one_label(tmp_path):
    image_list(tmp_path, n=2, jsonl=True)
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"path": "images/im0.jpg", "labels": [CLASSES[1], CLASSES[1], CLASSES[0]]}) + "\n"
                       + json.dumps({"path": "images/im1.jpg", "labels": [2, 2]}) + "\n")
    classes = str(tmp_path / "classes.txt")
    assert main([str(listing), str(tmp_path / "out"), "--classes", classes, "--workers", "1"]) == 0
    manifest, samples = read_back(str(tmp_path / "out"))
    assert sorted(sorted(labels_of(s)) for s in samples.values()) == [[0, 1], [2]]
    assert manifest.class_counts[:3] == [1, 1, 1]


def test_list_errors_name_the_line(tmp_path, capsys):
    image_list(tmp_path, n=3)
    listing = tmp_path / "list.csv"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join([lines[0], "images/im1.jpg,", lines[2]]) + "\n")
    assert main([str(listing), str(tmp_path / "out"), "--classes", str(tmp_path / "classes.txt")]) == 2
    assert "list.csv line 2: no labels for 'images/im1.jpg'" in capsys.readouterr().err
    listing.write_text(lines[0] + "\nimages/im1.jpg, n01443538\n")
    assert main([str(listing), str(tmp_path / "out"), "--classes", str(tmp_path / "classes.txt")]) == 2
    err = capsys.readouterr().err
    assert "line 2: label 'n01443538' is not in" in err and "did you mean 'n01443537'?" in err
    assert main([str(listing), str(tmp_path / "out")]) == 2
    assert "pass --classes FILE" in capsys.readouterr().err
    (tmp_path / "spaced.txt").write_text("hot dog\nn01443537\n")
    assert main([str(listing), str(tmp_path / "out"), "--classes", str(tmp_path / "spaced.txt")]) == 2
    assert "spaced.txt names the class 'hot dog', with spaces, which a CSV line of" in (err := capsys.readouterr().err)
    assert "(line 1: it separates labels by spaces); if that file gives each class a description after its name " \
        "(ImageNet's LOC_synset_mapping.txt), keep only the first word of each line, else write the list as JSON " \
        "lines" in err
    (tmp_path / "list.json").write_text('[\n  {"path": "images/im1.jpg", "labels": ["n01443537"]}\n]\n')
    assert main([str(tmp_path / "list.json"), str(tmp_path / "out"), "--classes", str(tmp_path / "classes.txt")]) == 2
    assert f"list.json holds a JSON array; the list takes JSON lines, one object per line: jq -c '.[]' " \
        f"{tmp_path / 'list.json'} > {tmp_path / 'list.jsonl'}" in capsys.readouterr().err
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text('{"path": "images/im1.jpg", "labels": [true]}\n')
    assert main([str(jsonl), str(tmp_path / "out"), "--classes", str(tmp_path / "classes.txt")]) == 2
    assert "list.jsonl line 1: label 'true' is not in" in capsys.readouterr().err  # as written, not Python's True
    jsonl.write_text('{"path": "images/im1.jpg", "labels": "n01443537"}\n')
    assert main([str(jsonl), str(tmp_path / "out"), "--classes", str(tmp_path / "classes.txt")]) == 2
    assert """list.jsonl line 1: 'labels' is "n01443537", not a list; write ["n01443537"]""" in capsys.readouterr().err
    listing.write_text("path,labels\n" + "\n".join(lines) + "\n")
    assert main([str(listing), str(tmp_path / "out"), "--classes", str(tmp_path / "classes.txt")]) == 2
    assert "line 1: label 'labels' is not in" in (err := capsys.readouterr().err) and "a header line?" in err
    for listed, said in [("# my corpus\n" + lines[0], "line 1: '# my corpus' looks like a comment"),
                         (f"images/im1.jpg {CLASSES[0]}", "no labels for 'images/im1.jpg " + CLASSES[0] + "'; every "
                          "image needs at least one label; separate the path from its labels with a comma"),
                         ('{"path": "images/im1.jpg", "label": "x"}', """the key is 'labels' (a list), not 'label'""")]:
        listing.write_text(listed + "\n")
        assert main([str(listing), str(tmp_path / "out"), "--classes", str(tmp_path / "classes.txt")]) == 2
        assert said in capsys.readouterr().err
    listing.write_text("\n".join(lines) + "\n")
    (tmp_path / "odd.txt").write_text("\n")
    assert main([str(listing), str(tmp_path / "out"), "--classes", str(tmp_path / "odd.txt")]) == 2
    assert "names no class" in capsys.readouterr().err
    (tmp_path / "odd.txt").write_text("#v2\n" + "\n".join(CLASSES))  # or a hashtag: a class it may be
    assert main([str(listing), str(tmp_path / "odd"), "--classes", str(tmp_path / "odd.txt"), "--workers", "1"]) == 0
    assert f"warning: 1 of {len(CLASSES) + 1} classes have no sample: '#v2' ('#v2', the first, may be a header line " \
        f"of --classes {tmp_path / 'odd.txt'}: remove it)" in capsys.readouterr().out
    assert main([str(listing), str(tmp_path / "out"), "--classes", str(tmp_path / "images")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --classes {tmp_path / 'images'}: ")
    assert not (tmp_path / "out").exists()


def test_lists_from_spreadsheets_and_their_mistakes(tmp_path, capsys):
    """A byte-order mark (Excel's "CSV UTF-8", Notepad) is not part of the first name; a class listed twice, a
    path written twice and two paths that make one key are each one sentence."""
    image_list(tmp_path, n=3)
    listing, classes = tmp_path / "list.csv", tmp_path / "classes.txt"
    listing.write_text("\ufeff" + listing.read_text(), encoding="utf-8")
    classes.write_text("\ufeff" + classes.read_text(), encoding="utf-8")
    assert main([str(listing), str(tmp_path / "out"), "--classes", str(classes), "--workers", "1"]) == 0
    manifest, samples = read_back(str(tmp_path / "out"))
    assert manifest.classes == CLASSES and len(samples) == 3 and manifest.skipped == 0

    classes.write_text(f"{CLASSES[0]}\n{CLASSES[1]}\n\n{CLASSES[0]}\n")
    assert main([str(listing), str(tmp_path / "o2"), "--classes", str(classes)]) == 2
    assert f"names '{CLASSES[0]}' twice (lines 1 and 4)" in capsys.readouterr().err
    classes.write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "images" / "a.b.jpg").write_bytes((tmp_path / "images" / "im0.jpg").read_bytes())
    (tmp_path / "images" / "a_b.jpg").write_bytes((tmp_path / "images" / "im1.jpg").read_bytes())
    for lines, said in [(["images/im0.jpg, " + CLASSES[0], "./images/im0.jpg, " + CLASSES[0]],
                         "lines 1 and 2 name the same image 'images/im0.jpg'; remove one"),
                        (["images/im0.jpg, " + CLASSES[0], "images/im1.jpg, " + CLASSES[2],
                          "images/im0.jpg, " + CLASSES[1]],  # a list of (image, label) pairs
                         f"lines 1 and 3 name the same image 'images/im0.jpg' with other labels; give each image one "
                         f"line with all its labels: 'images/im0.jpg, {CLASSES[0]} {CLASSES[1]}'"),
                        (["images/im0.jpg, " + CLASSES[0], f"{tmp_path}/images/im0.jpg, " + CLASSES[1]],
                         f"lines 1 and 2 name the same image ('images/im0.jpg' and '{tmp_path}/images/im0.jpg')"),
                        (["images/im0.jpg, " + CLASSES[0], f"file://{tmp_path}/images/im0.jpg, " + CLASSES[1]],
                         "lines 1 and 2 name the same image"),
                        (["images/a.b.jpg, " + CLASSES[0], "images/a_b.jpg, " + CLASSES[1]],
                         "lines 1 and 2: 'images/a.b.jpg' and 'images/a_b.jpg' make the same sample key 'images/a_b'")]:
        listing.write_text("\n".join(lines) + "\n")
        assert main([str(listing), str(tmp_path / "o3"), "--classes", str(classes)]) == 2
        assert said in capsys.readouterr().err


def test_a_list_labels_each_image_by_the_class_it_names(tmp_path, capsys):
    """Class names that are numbers beside JSON lines' numeric class ids, a name in another Unicode spelling, and a
    --classes file edited after the set was written: none labels an image by another class than the one meant."""
    image_list(tmp_path, n=2)
    listing, classes = tmp_path / "list.jsonl", tmp_path / "numbers.txt"
    classes.write_text("1\n2\n3\n")
    listing.write_text('{"path": "images/im0.jpg", "labels": [1]}\n')
    assert main([str(listing), str(tmp_path / "o1"), "--classes", str(classes)]) == 2
    assert ("list.jsonl line 1: label 1, a number, is a class id in JSON lines, here the class '2', but "
            f"{classes} has a class named '1' too (id 0); write the name as a string") in capsys.readouterr().err
    listing.write_text('{"path": "images/im0.jpg", "labels": ["1"]}\n{"path": "images/im1.jpg", "labels": ["3"]}\n')
    assert main([str(listing), str(tmp_path / "o1"), "--classes", str(classes), "--workers", "1"]) == 0
    assert sorted(labels_of(s) for s in read_back(str(tmp_path / "o1"))[1].values()) == [(0,), (2,)]

    composed = "caf\u00e9"
    (tmp_path / "names.txt").write_text(f"{composed}\ntea\n")
    listing = tmp_path / "list.csv"
    listing.write_text(f"images/im0.jpg, {unicodedata.normalize('NFD', composed)}\nimages/im1.jpg, tea\n")
    out = tmp_path / "o2"
    assert main([str(listing), str(out), "--classes", str(tmp_path / "names.txt"), "--workers", "1"]) == 0
    manifest, samples = read_back(str(out))
    assert manifest.classes == [composed, "tea"] and sorted(map(labels_of, samples.values())) == [(0,), (1,)]

    (tmp_path / "names.txt").write_text("coffee\ntea\n")  # a class renamed, and the list with it
    listing.write_text("images/im0.jpg, coffee\nimages/im1.jpg, tea\n")
    assert main([str(listing), str(out), "--classes", str(tmp_path / "names.txt")]) == 2
    assert (f"{out} holds the shards of this command, but its manifest.json names other classes than --classes "
            f"{tmp_path / 'names.txt'} now does (class 0 '{composed}' there, 'coffee' here); delete "
            f"{out / 'manifest.json'} to have the set written again") in capsys.readouterr().err
    (out / "manifest.json").unlink()
    assert main([str(listing), str(out), "--classes", str(tmp_path / "names.txt"), "--workers", "1"]) == 0
    assert read_back(str(out))[0].classes == ["coffee", "tea"]
