"""python -m data_tools.inspect: the summary, class counts, first keys, the grid PNG and --recount."""

import json
import subprocess
import sys

import pytest
from PIL import Image
from shardset import CLASSES, make_samples, write_shard_set

from data_tools.inspect import CAPTION, TILE, main
from data_tools.manifest import REPORT


def test_summary_counts_and_keys(shard_set, shards, capsys):
    (shard_set / REPORT).write_text('{"path": "x.jpg", "reason": "does not decode"}\n')
    assert main([str(shard_set), "--keys", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        "train: 18 samples in 3 shards (0.1 MiB), 3 classes, single-label",
        "source: /corpus/train (imagefolder)",
        f"skipped: 0 (listed in {shard_set / REPORT})",
    ]
    counts = out.index("samples per class (count, id, name):")
    assert out[counts + 1 : counts + 4] == [
        f"          6       0  {CLASSES[0]}",
        f"          6       1  {CLASSES[1]}",
        f"          6       2  {CLASSES[2]}",
    ]
    keys = out.index("first 3 keys (shard, key, image, labels):")
    assert out[keys + 1 :] == [
        f"  train-000000.tar  {shards[0][i]['__key__']}  {'jpg' if i % 2 == 0 else 'png'}  {i} {CLASSES[i]}"
        for i in range(3)
    ]


def test_many_classes_show_the_top_and_bottom_few(tmp_path, capsys):
    manifest = json.loads(write_shard_set(str(tmp_path), [make_samples(3)]).to_json())
    manifest["classes"] = [f"c{i}" for i in range(20)]
    manifest["class_counts"] = list(range(20))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main([str(tmp_path), "--keys", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    counts = out.index("samples per class (count, id, name):")
    ranking = [line.split()[-1] for line in out[counts + 1 : counts + 12]]
    assert ranking == ["c19", "c18", "c17", "c16", "c15", "...", "c5", "c4", "c3", "c2", "c1"]  # c0 has none
    assert out[counts + 12] == "  1 of 20 classes have no samples (0 c0)"


def test_grid_png_has_a_tile_and_caption_per_sample(shard_set, tmp_path, capsys):
    png = tmp_path / "grid.png"
    assert main([str(shard_set), "--grid", str(png), "--grid-samples", "16"]) == 0
    assert f"grid of 16 samples written to {png}" in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (4 * TILE, 4 * (TILE + CAPTION))
        assert image.getpixel((TILE // 2, TILE + CAPTION + TILE // 2)) != (255, 255, 255)  # a thumbnail in row 2
        assert image.getpixel((1, TILE // 2)) != (255, 255, 255)  # the first, 64 x 48, enlarged to the tile's width
    assert main([str(shard_set), "--grid", str(png), "--grid-samples", "100"]) == 0  # only 18 samples: 5 x 4
    with Image.open(png) as image:
        assert image.size == (5 * TILE, 4 * (TILE + CAPTION))
    assert main([str(shard_set), "--grid", str(tmp_path / "grid.jpg")]) == 0  # the format its name says
    with Image.open(tmp_path / "grid.jpg") as image:
        assert image.format == "JPEG"


def test_recount_agrees_with_the_manifest_and_names_disagreement(tmp_path, shards, capsys):
    write_shard_set(str(tmp_path), shards)
    assert main([str(tmp_path), "--recount", "--keys", "0"]) == 0
    assert "recount: the labels in the shards agree with the manifest's class_counts" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["class_counts"][2] = 9
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main([str(tmp_path), "--recount"]) == 1
    out = capsys.readouterr().out.splitlines()
    at = out.index("recount: 1 classes disagree with the manifest's class_counts (id, name, manifest, shards):")
    assert out[at + 1] == f"       2  {CLASSES[2]}  9  6"


def test_multi_label_keys_and_recount(tmp_path, capsys):
    write_shard_set(str(tmp_path), [make_samples(5, multi_label=True)], multi_label=True)
    assert main([str(tmp_path), "--recount", "--keys", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 classes, multi-label" in out
    assert f"jpg  0 {CLASSES[0]}, 1 {CLASSES[1]}" in out and "agree" in out


def test_a_damaged_first_shard_is_one_sentence_pointing_to_verify(shard_set, capsys):
    path = shard_set / "train-000000.tar"
    path.write_bytes(path.read_bytes()[:700])
    assert main([str(shard_set)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} cannot be read (") and f"python -m data_tools.verify {shard_set}" in err


def test_command_line(shard_set, root, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.inspect", str(tmp_path / "nothing")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path / 'nothing'} does not exist; give the OUTPUT folder of "
                             f"python -m data_tools.shard\n")


@pytest.mark.parametrize("args, says", [
    (["--grid", "{tmp}/g.png", "--grid-samples", "0"], "argument --grid-samples: '0' is not a whole number of 1 or more"),
    (["--keys", "-1"], "argument --keys: '-1' is not a whole number of 0 or more"),
    (["--grid", "{tmp}"], "cannot write the grid to {tmp} ("),
])
def test_arguments_it_cannot_use_are_one_sentence(shard_set, tmp_path, capsys, args, says):
    assert main([str(shard_set), *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says.format(tmp=tmp_path)}") and err.count("\n") == 1, err
