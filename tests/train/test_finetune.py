"""Fine-tuning at a higher resolution: the paper's start (zero head, resampled position embeddings)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain import checkpoint
from pretrain.errors import UserError
from pretrain import run as pretrain_run
from pretrain.config import ModelConfig
from pretrain.models.convert import load_into
from pretrain.models.zoo import build_model

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pretrained(pretrained_run) -> Path:
    return pretrained_run


def evals(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]


def test_finetune_at_48px_starts_at_the_zero_head_and_learns(small_shards, pretrained, tmp_path):
    result = run("recipes/demo_finetune.yaml", f"init_from={pretrained}", f"run_dir={tmp_path}",
                 f"data.train={small_shards['train']}", f"data.val={small_shards['val']}", "schedule.total_steps=150",
                 "data.batch_size=32", "model.name=vit_mu8", "data.workers=0")
    assert result.returncode == 0, result.stderr
    assert (f"fine-tuning from {pretrained}: its encoder, without its heads; a zero-initialised 10-class head; "
            f"position embeddings resampled from its 4x4 grid to 6x6 (bilinear, corners aligned)") in result.stdout
    first, last = evals(tmp_path)[0], evals(tmp_path)[-1]
    assert first["step"] == 0 and first["loss"] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-5)
    assert first["top1"] == pytest.approx(0.1)  # all logits 0: top-1 is class 0, a tenth of the eval set
    assert last["top1"] > 0.3, last  # chance is 0.1

    model, config = checkpoint.load_model(tmp_path)
    assert config.model.image_size == 48 and model.grid == (6, 6) and model.head_type == "linear"
    pre, _ = checkpoint.load_model(pretrained)
    assert pre.grid == (4, 4)
    torch.testing.assert_close(model.pos_embed[:, :1], pre.pos_embed[:, :1], atol=0.2, rtol=0)  # [CLS] moved little


def test_a_resumed_finetune_names_what_changed_and_keeps_where_it_started(small_shards, pretrained, tmp_path,
                                                                         monkeypatch):
    args = ["recipes/demo_finetune.yaml", f"run_dir={tmp_path}", f"data.train={small_shards['train']}", "data.val=",
            "model.name=vit_mu8", "data.workers=1", "schedule.warmup_steps=1"]
    assert run(*args, f"init_from={pretrained}", "schedule.total_steps=2").returncode == 0
    again = run(*args, "init_from=elsewhere/weights.safetensors", "schedule.total_steps=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (f"at step 2; settings changed since it was written: init_from '{pretrained}' -> "
            f"'{ROOT / 'elsewhere/weights.safetensors'}', schedule.total_steps 2 -> 3 (init_from is not used") in again.stdout
    saved = checkpoint.saved_config(checkpoint.find(tmp_path))
    assert saved.init_from == str(pretrained) and saved.schedule.total_steps == 3
    pointer = pretrained / "checkpoints" / checkpoint.LATEST  # a path a user may well give
    assert checkpoint.init_weights(pointer, "vit_mu8").keys() == checkpoint.init_weights(pretrained, "vit_mu8").keys()
    monkeypatch.chdir(pointer.parent)
    assert checkpoint.find(checkpoint.LATEST) == checkpoint.find(pretrained)
    assert f"init_from: {pretrained}" in (tmp_path / "config.yaml").read_text()


def test_zero_head_start_equals_pretrained_features(pretrained):
    """Right after loading, the encoder is the pre-trained one (features equal) and the head outputs 0."""
    pre, config = checkpoint.load_model(pretrained)
    ft = build_model(ModelConfig(name=config.model.name, image_size=32, num_classes=10, head="linear"))
    load_into(ft, checkpoint.init_weights(pretrained, config.model.name), drop_heads=True)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ft.eval().forward_features(x), pre.forward_features(x))
    assert torch.equal(ft(x), torch.zeros(4, 10))


def test_a_start_from_hugging_face_with_another_layernorm_eps_says_so(pretrained, tmp_path):
    """transformers' ViT default eps is 1e-12, the recipes' (the JAX models') 1e-6: features differ by about 1e-4."""
    from pretrain.config import Config
    from pretrain.models.convert_hf import to_hf
    from pretrain.train.loop import start_from_pretrained

    pre, saved = checkpoint.load_model(pretrained)
    to_hf(pre, tmp_path / "hf")
    config = Config(stage="finetune", init_from=str(tmp_path / "hf"))
    config.model = ModelConfig(name=saved.model.name, image_size=32, num_classes=10, head="linear")
    assert "eps" not in start_from_pretrained(build_model(config.model), config)  # exported with the model's own
    settings = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**settings, "layer_norm_eps": 1e-12}))
    assert start_from_pretrained(build_model(config.model), config).endswith(
        "; its LayerNorms were trained with eps 1e-12, this model's is model.norm_eps=1e-06 (set model.norm_eps=1e-12 "
        "to keep its features exactly)")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**settings, "num_attention_heads": 1}))
    with pytest.raises(UserError, match=r"splits attention into 1 head and vit_mu8 into 4, so its features would"):
        start_from_pretrained(build_model(config.model), config)  # the weights' shapes do not show it
    to_hf(build_model(ModelConfig(name="vit_ti16", image_size=32, num_classes=0, head="linear")), tmp_path / "ti")
    config.init_from = str(tmp_path / "ti")  # 3 heads: the shapes tell, and what to set
    with pytest.raises(UserError, match=r"its weights are those of vit_ti16: set model.name=vit_ti16$"):
        start_from_pretrained(build_model(config.model), config)


def test_resampled_posembs_keep_features_of_a_smooth_upscaled_image(pretrained):
    pre, config = checkpoint.load_model(pretrained)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) / 2])[None] * 0.8
    big = F.interpolate(smooth, size=(48, 48), mode="bilinear", align_corners=True)
    with pytest.raises(ValueError, match="resample them"):
        pre(big)
    ft = build_model(ModelConfig(name=config.model.name, image_size=48, num_classes=10))
    load_into(ft, checkpoint.init_weights(pretrained, config.model.name))
    ft.eval()
    a, b = pre.forward_features(smooth)[:, 0], ft.forward_features(big)[:, 0]
    assert F.cosine_similarity(a, b).item() > 0.9
    unrelated = pre.forward_features(torch.rand(1, 3, 32, 32) * 2 - 1)[:, 0]
    assert F.cosine_similarity(a, b).item() > F.cosine_similarity(a, unrelated).item()


def test_finetune_needs_a_start(small_shards, pretrained, tmp_path, monkeypatch, capsys):
    """Refused before anything is written; in this process (the command's own exit code and stderr)."""
    monkeypatch.chdir(ROOT)

    def error(*args: str) -> str:
        assert pretrain_run.main(list(args)) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    data = [f"data.train={small_shards['train']}", f"data.val={small_shards['val']}"]
    assert "stage: finetune needs init_from" in error("recipes/demo_finetune.yaml", "init_from=", f"run_dir={tmp_path}",
                                                       *data, "model.name=vit_mu8")
    assert "does not exist" in error("recipes/demo_finetune.yaml", f"init_from={tmp_path}/nothing",
                                     f"run_dir={tmp_path}", *data)
    assert f"init_from={tmp_path} is read by stage: finetune only" in error(
        "recipes/demo.yaml", f"init_from={tmp_path}", f"run_dir={tmp_path}", *data[:1])
    assert "'run_dir' is empty" in error("recipes/demo.yaml", "run_dir=", *data[:1])
    assert "run_dir gs://bucket/runs/x is a URL" in error("recipes/demo.yaml", "run_dir=gs://bucket/runs/x", *data[:1])
    assert not (ROOT / "gs:").exists() and not list(tmp_path.iterdir())
    written = {p: p.stat().st_mtime_ns for p in pretrained.rglob("*") if p.name != ".lock"}  # each start takes it
    for steps in (50, 200):  # below its step 100, the pre-training run is no finished fine-tune either
        assert "is a checkpoint of a pretrain run and this recipe is stage: finetune; give this run a run_dir of " \
               "its own" in error("recipes/demo_finetune.yaml", f"init_from={pretrained}", f"run_dir={pretrained}",
                                   *data, "model.name=vit_mu8", f"schedule.total_steps={steps}", "data.workers=0")
    assert {p: p.stat().st_mtime_ns for p in pretrained.rglob("*") if p.name != ".lock"} == written


def test_the_hybrid_finetunes_at_a_larger_grid(small_shards, tmp_path):
    """R50 stem + ViT (stride 16): pre-train at 32px (2x2 grid), fine-tune at 64px (4x4 grid).

    Loading copies the stem and the encoder as they were trained (same features at the old grid),
    the position embeddings are resampled to the new grid, and the zero head starts at log(10).
    """
    common = [f"data.train={small_shards['train']}", f"data.val={small_shards['val']}", "model.name=vit_r50_mu16",
              "data.batch_size=16", "data.workers=1", "log.every=2"]
    pre_dir, ft_dir = tmp_path / "pre", tmp_path / "ft"
    result = run("recipes/demo.yaml", f"run_dir={pre_dir}", "schedule.total_steps=4", "schedule.warmup_steps=2",
                 "log.fewshot_every=0", *common)
    assert result.returncode == 0, result.stderr
    result = run("recipes/demo_finetune.yaml", f"init_from={pre_dir}", f"run_dir={ft_dir}", "model.image_size=64",
                 "schedule.total_steps=2", "schedule.warmup_steps=1", *common)
    assert result.returncode == 0, result.stderr
    first = evals(ft_dir)[0]
    assert first["step"] == 0 and first["loss"] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-5)

    pre, _ = checkpoint.load_model(pre_dir)
    ft, config = checkpoint.load_model(ft_dir)
    assert (pre.grid, ft.grid, config.model.image_size) == ((2, 2), (4, 4), 64)
    start = build_model(ModelConfig(name="vit_r50_mu16", image_size=32, num_classes=10, head="linear"))
    load_into(start, checkpoint.init_weights(pre_dir, "vit_r50_mu16"), drop_heads=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(start.eval().forward_features(x), pre.forward_features(x))


def test_a_finetune_leaves_other_runs_alone_and_names_what_its_start_is(small_shards, pretrained, tmp_path, capsys):
    """A run directory belongs to one run: a fine-tune refuses the pre-training run's own, and a bad init_from is one
    sentence naming what it is (the model it holds, a run not yet checkpointed, a damaged checkpoint, no ViT)."""
    from pretrain import run as cli

    pre = tmp_path / "pre"
    shutil.copytree(pretrained, pre)
    before = sorted(p.name for p in (pre / "checkpoints").iterdir())
    common = ["recipes/demo_finetune.yaml", f"data.train={small_shards['train']}", f"data.val={small_shards['val']}",
              "model.name=vit_mu8"]

    def refused(*args: str) -> str:
        assert cli.main([*common, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        return err

    assert "is a checkpoint of a pretrain run and this recipe is stage: finetune; give this run a run_dir of its " \
           "own" in refused(f"init_from={pre}", f"run_dir={pre}")
    assert f"run_dir {pre} holds checkpoints (newest " in refused(f"init_from={pre}", f"run_dir={pre}",
                                                                      "checkpoint.resume=never")
    assert sorted(p.name for p in (pre / "checkpoints").iterdir()) == before
    out = tmp_path / "ft"
    assert f"init_from={pre} holds a vit_mu8 and the recipe builds vit_mu4; set model.name=vit_mu8" in refused(
        f"init_from={pre}", f"run_dir={out}", "model.name=vit_mu4")
    (tmp_path / "starting" / "checkpoints").mkdir(parents=True)
    assert "is a run of ours with no complete checkpoint yet" in refused(f"init_from={tmp_path / 'starting'}",
                                                                         f"run_dir={out}")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "random.pt")
    random = tmp_path / "random.pt"
    assert f"init_from={random} holds no ViT weights (no pos_embed, no blocks.*; it holds foo)" in refused(
        f"init_from={random}", f"run_dir={out}")
    weights = checkpoint.load_model(pre)[0].state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()}}, tmp_path / "lightning.ckpt.pth")
    assert "holds a ViT under the prefix 'model.' (model.pos_embed), not at the top; save that module's own " \
           "state_dict" in refused(f"init_from={tmp_path / 'lightning.ckpt.pth'}", f"run_dir={out}")
    newest = checkpoint.find(pre)
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:3000])
    older = sorted(p for p in (pre / "checkpoints").glob("step_*") if p != newest)
    use = f"use the one before it, init_from={older[-1]}" if older else "give init_from another checkpoint"
    assert f"checkpoint {newest} is damaged" in (err := refused(f"init_from={pre}", f"run_dir={out}")) and use in err
    assert cli.main([*common, f"init_from={tmp_path / 'nothing'}", f"run_dir={out}", "--dry-run"]) == 0
    assert f"warning: init_from={tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    assert not out.exists()
