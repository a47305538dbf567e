"""python -m data_tools.verify: a clean set passes; each kind of damage is named by shard (and key), exit 1."""

import io
import json
import subprocess
import tarfile
import sys

import fsspec
import pytest
from shardset import make_samples, write_shard_set

from data_tools.verify import main


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main([*map(str, argv), "--workers", "1"])
    return code, capsys.readouterr().out.splitlines()


def test_a_clean_set_verifies_in_worker_processes(shard_set, root):
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.verify", str(shard_set), "--decode", "--workers", "2"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["verified 3 shards, 18 samples: OK"]
    assert "3/3 shards" in result.stderr  # the progress bar


def test_the_manifest_json_itself_may_be_named(shard_set, capsys):
    assert run(capsys, shard_set / "manifest.json") == (0, ["verified 3 shards, 18 samples: OK"])


def test_a_flipped_byte_is_a_sha256_mismatch(shard_set, shards, capsys):
    path = shard_set / "train-000001.tar"
    data = bytearray(path.read_bytes())
    png = shards[1][2]["png"]
    data[data.find(png) + len(png) // 2] ^= 0xFF  # inside the image, where the tar itself stays readable
    path.write_bytes(bytes(data))
    code, out = run(capsys, shard_set)
    assert code == 1
    assert out[0] == (
        "train-000001.tar: sha256 mismatch (the file changed after sharding; delete it and re-run the data_tools.shard "
        "command that wrote the set, which writes missing shards again)"
    )
    assert out[1:] == ["verified 3 shards, 18 samples: 1 problem"]


def test_a_truncated_shard_is_reported_not_a_crash(shard_set, capsys):
    path = shard_set / "train-000002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # inside a member's data
    code, out = run(capsys, shard_set)
    assert code == 1
    assert all(line.startswith("train-000002.tar: ") for line in out[:-1]), out
    assert any("not a readable tar" in line and "unexpected end of data" in line for line in out)
    assert any(f"bytes, the manifest says {len(data)}" in line for line in out)


def test_a_shard_cut_at_a_member_boundary_is_reported_by_size_and_count(shard_set, capsys):
    path = shard_set / "train-000000.tar"
    path.write_bytes(path.read_bytes()[:1024])  # one header and the first .cls member's block
    code, out = run(capsys, shard_set)
    assert code == 1 and out[-1].startswith("verified 3 shards")
    assert "train-000000.tar: 1024 bytes, the manifest says" in out[0]


def test_a_missing_shard_and_a_stray_one_are_reported(shard_set, capsys):
    (shard_set / "train-000001.tar").unlink()
    (shard_set / "train-000007.tar").write_bytes((shard_set / "train-000002.tar").read_bytes())
    code, out = run(capsys, shard_set)
    assert code == 1
    assert out[0].startswith(f"train-000001.tar: missing from {shard_set}; re-run the data_tools.shard command")
    assert out[1].startswith("train-000007.tar: looks like a shard but is not in the manifest")
    assert out[-1] == "verified 3 shards, 11 samples: 2 problems"


def test_a_renamed_shard_is_told_to_be_renamed_back(shard_set, capsys):
    (shard_set / "train-000001.tar").rename(shard_set / "train-000007.tar")
    code, out = run(capsys, shard_set)
    assert code == 1
    assert out == [f"train-000001.tar: missing from {shard_set}, but train-000007.tar holds it (the same sha256): "
                   f"rename that file back to train-000001.tar", "verified 3 shards, 11 samples: 1 problem"]


def test_decode_names_the_shard_and_key_of_a_corrupt_image(tmp_path, shards, capsys):
    sample = shards[1][1]
    sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
    write_shard_set(str(tmp_path), shards)  # the manifest matches the damaged bytes
    assert run(capsys, tmp_path)[0] == 0  # without --decode only the structure is checked
    code, out = run(capsys, tmp_path, "--decode")
    assert code == 1
    assert out[0].startswith(f"train-000001.tar key {sample['__key__']}: image does not decode (OSError: ")
    assert len(out) == 2


def test_labels_out_of_range_missing_or_unparsable_are_reported(tmp_path, shards, capsys):
    shards[0][1]["cls"] = b"7"
    del shards[0][3]["cls"]
    shards[2][0]["cls"] = b"seven"
    write_shard_set(str(tmp_path), shards)
    code, out = run(capsys, tmp_path)
    assert code == 1
    assert out[:3] == [
        f"train-000000.tar key {shards[0][3]['__key__']}: 0 label members (none); expected one .cls or .labels.json",
        f"train-000002.tar key {shards[2][0]['__key__']}: label does not parse "
        "(invalid literal for int() with base 10: 'seven')",
        f"1 sample in 1 shard carries class ids beyond the manifest's 3 classes (the first: train-000000.tar key "
        f"{shards[0][1]['__key__']}); restore the manifest.json written with these shards, or shard the source again "
        f"into an empty folder",
    ]


@pytest.mark.parametrize("edit", ["class", "multi_label"])
def test_a_manifest_edited_by_hand_is_one_line_not_one_per_sample(shard_set, capsys, edit):
    manifest = json.loads((shard_set / "manifest.json").read_text())
    if edit == "class":  # the last class taken out: its samples' ids point past the list
        manifest["classes"].pop()
        manifest["class_counts"].pop()
    else:
        manifest["multi_label"] = True
    (shard_set / "manifest.json").write_text(json.dumps(manifest))
    code, out = run(capsys, shard_set)
    assert code == 1
    said = ("carry class ids beyond the manifest's 2 classes" if edit == "class" else
            "manifest.json says multi_label true, but 18 samples carry .cls labels (the first: train-000000.tar key")
    assert said in out[0] and out[0].endswith("restore the manifest.json written with these shards, or shard the "
                                              "source again into an empty folder"), out
    assert len(out) <= 3, out  # that line, maybe the class counts' and the summary


def test_a_sample_with_two_images_is_reported(tmp_path, shards, capsys):
    shards[0][0]["png"] = shards[0][1]["png"]
    write_shard_set(str(tmp_path), shards)
    code, out = run(capsys, tmp_path)
    assert code == 1
    assert out[0] == f"train-000000.tar key {shards[0][0]['__key__']}: 2 image members (jpg, png); expected exactly one"


def test_multi_label_sets_verify_and_bad_label_lists_are_reported(tmp_path, capsys):
    shards = [make_samples(6, multi_label=True)]
    write_shard_set(str(tmp_path / "good"), shards, multi_label=True)
    assert run(capsys, tmp_path / "good")[0] == 0
    shards[0][4]["labels.json"] = b'{"a": 1}'
    write_shard_set(str(tmp_path / "bad"), shards, multi_label=True)
    code, out = run(capsys, tmp_path / "bad")
    assert code == 1 and "label does not parse ({'a': 1} is not a JSON list of class ids)" in out[0]


def test_class_counts_that_disagree_with_the_labels_are_reported(shard_set, capsys):
    manifest = json.loads((shard_set / "manifest.json").read_text())
    manifest["class_counts"][0] += 1
    (shard_set / "manifest.json").write_text(json.dumps(manifest))
    code, out = run(capsys, shard_set)
    assert code == 1 and out[0].startswith("manifest.json: class_counts disagree with the labels in the shards for 1 ")



def test_a_shard_replaced_by_another_tar_is_named_without_blaming_the_manifests_counts(shard_set, capsys):
    """Rewriting the shard mends the counts too, so the manifest's class_counts are not called wrong."""
    path = shard_set / "train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.endswith(".cls")]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    code, out = run(capsys, shard_set)
    assert code == 1 and out[0].startswith("train-000000.tar: sha256 mismatch (the file changed after sharding")
    assert not any("class_counts" in line for line in out), out

def test_a_folder_without_a_manifest_is_one_sentence_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no manifest.json in {tmp_path}; ") and err.count("\n") == 1
    assert "Traceback" not in err
    (tmp_path / "images" / "cat").mkdir(parents=True)
    assert main([str(tmp_path / "images")]) == 2
    images = tmp_path / "images"
    assert capsys.readouterr().err == (f"error: {images} holds folders, not shards; if it is an image folder, shard "
                                       f"it first: python -m data_tools.shard {images} OUTPUT\n")


@pytest.fixture
def memory_url():
    url = "memory://verify-tests/out"
    yield url
    fsspec.filesystem("memory").rm("/verify-tests", recursive=True)


def test_verify_over_memory_urls(memory_url, shards, capsys):
    write_shard_set(memory_url, shards)
    assert main([memory_url]) == 0  # memory:// is per process: the tool reads it here, whatever --workers says
    assert capsys.readouterr().out.splitlines() == ["verified 3 shards, 18 samples: OK"]
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/verify-tests/out/train-000002.tar", fs.cat_file("/verify-tests/out/train-000002.tar")[:-1024])
    code, out = run(capsys, memory_url)
    assert code == 1 and out[0].startswith("train-000002.tar: ")


def test_verify_over_gs_urls_in_worker_processes(gcs_emulator, shards, capsys):
    url = gcs_emulator("verify-tests") + "/shards"
    write_shard_set(url, shards)
    fs = fsspec.filesystem("gs")
    fs.pipe_file("verify-tests/shards/train-000009.tar", b"stray")
    assert main([url, "--workers", "2"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "train-000009.tar: looks like a shard but is not in the manifest (left over from an earlier run?); delete it",
        "verified 3 shards, 18 samples: 1 problem",
    ]
