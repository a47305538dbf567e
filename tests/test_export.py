"""Export to Hugging Face transformers and ONNX, and the evaluate command line, on tiny real runs."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, ViTForImageClassification, ViTModel, pipeline

from pretrain import checkpoint, evaluate, export
from pretrain.config import Config
from pretrain.data import shards
from pretrain.data.transforms import eval_view
from pretrain.errors import UserError
from pretrain.models.hybrid import StdConv2dSame
from pretrain.models.zoo import build_model

ROOT = Path(__file__).resolve().parents[1]


def train(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pretrain.run", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def runs(small_shards, pretrained_run, tmp_path_factory) -> dict[str, Path]:
    """The shared vit_mu8 pre-training run at 32px (pre-logits head) and a 10-step fine-tune of it at 48px."""
    ft = tmp_path_factory.mktemp("finetune")
    train("recipes/demo_finetune.yaml", f"data.train={small_shards['train']}", "data.val=", f"init_from={pretrained_run}",
          f"run_dir={ft}", "model.name=vit_mu8", "schedule.total_steps=10", "schedule.warmup_steps=2")
    return {"pretrain": pretrained_run, "finetune": ft}


def images(n: int, size: int) -> torch.Tensor:
    """Normalised random images in [-1, 1]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)) * 2 - 1


def test_finetuned_run_to_hf_classifier(runs, small_shards, tmp_path, capsys):
    assert export.main([str(runs["finetune"]), "--format", "hf", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"from {checkpoint.find(runs['finetune'])}: wrote ViTForImageClassification (10 classes)")
    model, _ = checkpoint.load_model(runs["finetune"])
    hf = ViTForImageClassification.from_pretrained(tmp_path).eval()
    x = images(3, 48)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), atol=1e-4, rtol=0)
    classes = shards.resolve(small_shards["train"]).classes
    assert hf.config.id2label == dict(enumerate(classes))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixels = processor(Image.new("RGB", (60, 40), (255, 0, 0)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 48) and pixels[0, 0].eq(1).all() and pixels[0, 1].eq(-1).all()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 97, 3), dtype=np.uint8))
    scored = eval_view(photo, 48).float() / 127.5 - 1  # what pretrain.evaluate feeds the model
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    torch.testing.assert_close(pil(photo, return_tensors="pt")["pixel_values"][0], scored, atol=1e-6, rtol=0)
    default = processor(photo, return_tensors="pt")["pixel_values"][0]  # torchvision's resize: within a grey level
    assert (default - scored).abs().max() <= 2 / 255 + 1e-6


def test_pretraining_run_to_hf_vitmodel(runs, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        assert export.main([str(runs["pretrain"]), "--format", "hf", str(tmp_path)]) == 0
    assert "wrote ViTModel" in capsys.readouterr().out
    assert "10-class head is not exported (for its predictions export --format onnx" in caplog.text
    model, _ = checkpoint.load_model(runs["pretrain"])
    hf = ViTModel.from_pretrained(tmp_path).eval()
    x = images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).pooler_output, model.representation(x), atol=1e-4, rtol=0)


def test_labels_fall_back_when_the_training_manifest_is_unreachable(tmp_path, caplog):
    config = Config()
    config.data.train = str(tmp_path / "gone")
    with caplog.at_level(logging.WARNING):
        assert export.class_names(config, 10) is None
    assert "LABEL_i" in caplog.text


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_onnx_matches_with_a_dynamic_batch(runs, stage, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    assert export.main([str(runs[stage]), "--format", "onnx", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    model, config = checkpoint.load_model(runs[stage])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    for batch in (1, 3):
        x = images(batch, config.model.image_size)
        (logits,) = session.run(["logits"], {"pixel_values": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["preprocessor"])["crop_size"] == {"height": config.model.image_size,
                                                               "width": config.model.image_size}
    assert metadata["problem_type"] == "single_label_classification"
    assert json.loads(metadata["id2label"])["0"] == shards.resolve(config.data.train).classes[0]


def test_a_sigmoid_run_exports_as_multi_label(runs, tmp_path, capsys):
    """transformers then scores each class by a sigmoid (its pipeline) and fine-tunes with BCE, as trained."""
    model, config = checkpoint.load_model(runs["finetune"])
    config.loss.kind = "sigmoid"
    print(export.export_hf(model, config, tmp_path / "hf"))
    assert "(10 classes, multi-label)" in capsys.readouterr().out
    classify = pipeline("image-classification", model=str(tmp_path / "hf"), top_k=10)
    image = Image.new("RGB", (60, 40), (200, 30, 90))
    scores = {row["label"]: row["score"] for row in classify(image)}
    pixels = AutoImageProcessor.from_pretrained(tmp_path / "hf")(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.sigmoid(model(pixels))[0]
    classes = shards.resolve(config.data.train).classes
    assert scores == pytest.approx({name: expected[i].item() for i, name in enumerate(classes)}, abs=1e-4)
    export.export_onnx(model, config, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["problem_type"] == "multi_label_classification"


def test_hybrid_onnx_holds_each_weight_once(tmp_path):
    """The standardised convolutions are exported with their standardised weights, not the raw ones and copies."""
    config = Config()
    config.model.name, config.model.image_size, config.model.num_classes = "vit_r50_mu16", 64, 10
    model = build_model(config.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.3, 0.1)  # the standardisation must be done for the result to match
    path = tmp_path / "hybrid.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export.export_onnx(model, config, path)
    assert not [str(w.message) for w in caught]  # the exporter's notes are noise to whoever exports
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert path.stat().st_size < 1.05 * weight_bytes
    assert isinstance(model.patch_embed.backbone.stem.conv, StdConv2dSame)  # the caller's model is untouched
    x = images(2, 64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    preprocessor = json.loads(session.get_modelmeta().custom_metadata_map["preprocessor"])
    assert preprocessor["image_mean"] == preprocessor["image_std"] == [0.5] * 3  # the image's channels, not the trunk's


def test_evaluate_cli_reproduces_the_runs_last_eval(runs, small_shards):
    result = subprocess.run([sys.executable, "-m", "pretrain.evaluate", str(runs["pretrain"]),
                             f"data={small_shards['val']}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    printed = json.loads(lines[0])
    records = map(json.loads, (runs["pretrain"] / "metrics.jsonl").read_text().splitlines())
    last = [r for r in records if r["split"] == "eval"][-1]
    assert printed["top1"] == last["top1"] and printed["samples"] == 100
    assert printed["loss"] == pytest.approx(last["loss"], rel=1e-5)


def test_evaluate_counts_and_names_a_missing_shard(runs, small_shards, tmp_path, capsys, caplog):
    shutil.copytree(small_shards["val"], tmp_path / "val")
    gone = tmp_path / "val" / "val-000001.tar"
    gone.unlink()
    with caplog.at_level(logging.WARNING):
        assert evaluate.main([str(runs["pretrain"]), f"data={tmp_path / 'val'}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["samples"], printed["bad_samples"]) == (50, 50)  # the manifest's count of the lost shard
    assert f"{gone}: not found" in caplog.text and "counted in bad_samples" in caplog.text


def test_evaluate_says_when_it_cannot_check_the_class_names(small_shards, tmp_path, caplog):
    """A run started elsewhere stores a data.train relative to there: only the class count can be checked."""
    with caplog.at_level(logging.WARNING):
        assert evaluate.head_mismatch(10, "runs/elsewhere/train", "the run", small_shards["val"]) == ""
    assert "the training shards runs/elsewhere/train cannot be read from here" in caplog.text


def test_fewshot_on_data_of_other_classes_leaves_out_the_heads_top1(runs, small_shards, capsys, caplog):
    """The paper's few-shot transfer: a linear probe on a downstream set whose classes the head never saw."""
    other = small_shards["val_reversed"]  # the classes in another order: the head's top-1 would be meaningless
    with caplog.at_level(logging.WARNING):
        assert evaluate.main([str(runs["pretrain"]), f"data={other}", "--fewshot-train", other]) == 0
    said = capsys.readouterr()
    printed = json.loads(said.out)
    assert "top1" not in printed and 0 <= printed["fewshot_5shot_top1"] <= 1
    assert f"warning: --fewshot-train {other} shares shards with data={other}" in said.err  # fitted on its test set
    assert "labels its samples by other classes than" in caplog.text and "only the few-shot accuracy" in caplog.text


def test_fewshot_sets_of_other_classes_name_the_fix_that_works(runs, small_shards, tmp_path, capsys):
    """A test split holding 3 of the training split's 10 classes, sharded on its own: the sentence's fix, run, works
    (labelling the training split by the test split's classes would not: it has classes those lack)."""
    from data_tools import shard

    images, train = Path(small_shards["val"]).parent / "images" / "val", small_shards["train"]
    for folder in sorted(images.iterdir())[:3]:
        shutil.copytree(folder, tmp_path / "three" / folder.name)
    assert shard.main([str(tmp_path / "three"), str(tmp_path / "alone"), "--workers", "1", "--name", "val"]) == 0
    assert evaluate.main([str(runs["pretrain"]), f"data={tmp_path / 'alone'}", "--fewshot-train", train]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'alone'} labels its samples by other classes than {train} (3 classes against 10); shard it " \
           f"again with python -m data_tools.shard ... --classes {train}" in err
    assert shard.main([str(tmp_path / "three"), str(tmp_path / "fixed"), "--workers", "1", "--name", "val",
                       "--classes", train]) == 0
    assert evaluate.main([str(runs["pretrain"]), f"data={tmp_path / 'fixed'}", "--fewshot-train", train]) == 0
    assert 0 <= json.loads(capsys.readouterr().out.splitlines()[-1])["fewshot_5shot_top1"] <= 1


def test_evaluate_names_the_checkpoint_it_scored_while_the_run_writes_newer_ones(runs, small_shards, tmp_path,
                                                                                 monkeypatch):
    """evaluate RUN_DIR beside a run in progress: a checkpoint written after the weights were read is not the one
    scored."""
    run = tmp_path / "run"
    shutil.copytree(runs["pretrain"], run)
    scored = checkpoint.find(run)
    load = checkpoint.load_checkpoint

    def then_the_run_writes_another(path):
        loaded = load(path)
        shutil.copytree(scored, scored.with_name("step_000000999"))
        (scored.parent / checkpoint.LATEST).write_text("step_000000999")
        return loaded

    monkeypatch.setattr(checkpoint, "load_checkpoint", then_the_run_writes_another)
    result = evaluate.evaluate_checkpoint(str(run), small_shards["val"])
    assert checkpoint.find(run).name == "step_000000999" and result["checkpoint"] == str(scored)


@pytest.mark.parametrize("spec", ["folder", "braces"])
def test_evaluating_no_sample_is_one_sentence(runs, small_shards, tmp_path, spec):
    shutil.copytree(small_shards["val"], tmp_path / "val")
    for tar in (tmp_path / "val").glob("*.tar"):
        tar.unlink()
    data = tmp_path / "val" if spec == "folder" else tmp_path / "val" / "val-{000000..000001}.tar"
    with pytest.raises(UserError, match=re.escape(f"no sample of {data} could be evaluated (")):
        evaluate.evaluate_checkpoint(str(runs["pretrain"]), str(data))


def test_evaluating_labels_beyond_the_models_classes_is_one_sentence(runs, tmp_path):
    """A brace pattern has no manifest whose classes could be checked before the labels reach the loss."""
    for c in range(12):
        (tmp_path / "images" / f"c{c:02d}").mkdir(parents=True)
        Image.new("RGB", (32, 32), (20 * c, 0, 0)).save(tmp_path / "images" / f"c{c:02d}" / "0.png")
    subprocess.run([sys.executable, "-m", "data_tools.shard", str(tmp_path / "images"), str(tmp_path / "s"),
                    "--shard-samples", "6", "--workers", "1"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    braces = str(tmp_path / "s" / "train-{000000..000001}.tar")
    with pytest.raises(UserError, match=re.escape(f"{braces} labels a sample 11, but the model has 10 classes")):
        evaluate.evaluate_checkpoint(str(runs["pretrain"]), braces, batch=12)


@pytest.mark.parametrize("cli, args, says", [
    (evaluate, ["{missing}", "data={val}"], "missing does not exist; give a run directory"),
    (evaluate, ["{empty}", "data={val}"], "holds no complete checkpoint"),
    (evaluate, ["{run}"], "the following arguments are required: data=SPEC"),
    (evaluate, ["{run}", "data={val}", "--shots", "5"], "unrecognized arguments: --shots 5"),
    (export, ["{missing}", "--format", "hf", "{new}"], "missing does not exist; give a run directory"),
    (export, ["{run}", "--format", "tflite", "{new}"], "invalid choice: 'tflite'"),
    (evaluate, ["{run}", "data={val_reversed}"], "labels its samples by other classes than"),
    (export, ["{run}", "--format", "onnx", "{out}"], "is a folder; --format onnx writes one file"),
    (export, ["{run}", "--format", "hf", "{file}"], "is a file; --format hf writes a folder"),
    (export, ["{run}", "--format", "onnx", "{file}"], "model.onnx exists; give a new path, or pass --overwrite"),
    (export, ["{run}", "--format", "hf", "{out}"], "is a folder that is not empty; give a new path, or pass --overwrite"),
    (export, ["{run}", "--format", "onnx", "{file}/a/m.onnx"], "model.onnx is a file, not a folder; give a path in a"),
    (export, ["{run}", "--format", "onnx", "gs://bucket/m.onnx"], "export writes to this machine's disk, not to gs://"),
    (export, ["{run}", "--format", "hf", "{run}/checkpoints/step_000000100", "--overwrite"],
     "step_000000100 holds a run's checkpoints, which export would overwrite"),
    (export, ["{run}", "--format", "hf", "{run}", "--overwrite"], "holds a run's checkpoints, which export would"),
    (export, ["{run}", "--format", "onnx", "{run}/checkpoints/step_000000100/model.safetensors", "--overwrite"],
     "step_000000100 holds a run's checkpoints, which export would overwrite; give a path of its own"),
])
def test_errors_are_one_line(cli, args, says, runs, small_shards, tmp_path, capsys):
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "new": tmp_path / "new",
             "run": runs["pretrain"], "val": small_shards["val"], "out": tmp_path, "file": tmp_path / "model.onnx",
             "val_reversed": small_shards["val_reversed"]}
    assert cli.main([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1
