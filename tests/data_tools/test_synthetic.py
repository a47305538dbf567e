"""The demo's dataset generator: the same images for a seed, and what it is given wrong in one sentence."""

from __future__ import annotations

from data_tools.synthetic import CLASSES, main


def images(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*.jpg")}


def test_a_rerun_with_fewer_images_leaves_none_of_the_earlier_ones(tmp_path):
    assert main([str(tmp_path / "d"), "--train-per-class", "3", "--val-per-class", "1", "--size", "16"]) == 0
    assert len(images(tmp_path / "d")) == 4 * len(CLASSES)
    for folder in ("d", "e"):
        assert main([str(tmp_path / folder), "--train-per-class", "2", "--val-per-class", "1", "--size", "16"]) == 0
    assert images(tmp_path / "d") == images(tmp_path / "e")  # the same seed draws the same images, and only them
    assert len(images(tmp_path / "e")) == 3 * len(CLASSES)


def test_arguments_it_cannot_draw_are_one_sentence(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for argv, said in (([str(tmp_path / "d"), "--size", "0"], "argument --size: '0' is not a whole number of 8 or more"),
                       ([str(tmp_path / "d"), "--seed", "-1"], "argument --seed: '-1' is not a whole number of 0 or more"),
                       ([str(tmp_path / "file")], "cannot be a folder (a file is in its way); give an OUTPUT folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.splitlines()) == 1, err
