"""Loading weights of any source into a model: resampling, mismatches named, file formats told apart, damage in one
sentence."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

from pretrain.errors import UserError
from pretrain.models.convert import (
    from_timm,
    load_into,
    load_weights,
    to_hf,
)
from pretrain.models.posemb import resample_posemb
from pretrain.models.vit import PatchEmbed, VisionTransformer
from pretrain.models.zoo import SIZES
from test_convert import TOL, hf_config, images, max_diff, randomise, tiny


def test_posemb_is_resampled_to_the_models_grid():
    small = randomise(tiny(image_size=32))  # 4x4 grid
    big = tiny(image_size=48)  # 6x6 grid

    load_into(big, small.state_dict())

    assert big.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(big.pos_embed[:, 0], small.pos_embed[:, 0])
    assert torch.allclose(big.pos_embed, resample_posemb(small.pos_embed, (6, 6)))
    assert torch.equal(big.blocks[3].mlp.fc2.weight, small.blocks[3].mlp.fc2.weight)

    load_into(big, small.state_dict(), interp="bicubic", align_corners=False)
    expected = resample_posemb(small.pos_embed, (6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(big.pos_embed, expected)
    assert not torch.allclose(big.pos_embed, resample_posemb(small.pos_embed, (6, 6)))


def test_checkpoint_of_another_size_names_key_and_shapes():
    other = VisionTransformer(SIZES["ti"], PatchEmbed(16, 192), 32, 10, head="linear")
    with pytest.raises(UserError) as e:
        load_into(other, tiny().state_dict())
    assert "cls_token of shape (1, 1, 64) but vit_ti16 expects (1, 1, 192); its weights are those of vit_mu8: set " \
        "model.name=vit_mu8" in str(e.value)
    shallow = {k: v for k, v in tiny().state_dict().items() if not k.startswith("blocks.3.")}  # no size of the zoo
    with pytest.raises(UserError, match=r"expects .1, 1, 192.; no size in the zoo has its width 64 and depth 3: add "
                                        r"one to SIZES in pretrain/models/zoo.py to load it"):
        load_into(other, shallow)
    with pytest.raises(UserError, match=r"lacks blocks.3.norm1.weight, which vit_mu8 has; no size in the zoo has its "
                                        r"width 64 and depth 3"):
        load_into(tiny(), shallow)
    narrow_mlp = {**tiny().state_dict(), "blocks.0.mlp.fc1.weight": torch.zeros(128, 64)}  # vit_mu8's width and depth
    with pytest.raises(UserError, match=r"has blocks.0.mlp.fc1.weight of shape \(128, 64\) but vit_mu8 expects "
                                        r"\(256, 64\); is it a checkpoint of another model\?$"):
        load_into(tiny(), narrow_mlp)
    with pytest.raises(UserError, match=r"expects \(1, 1, 64\); its weights are those of vit_ti16: set "
                                        r"model.name=vit_ti16"):
        load_into(tiny(), from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()))


def test_timm_weights_whose_class_token_has_no_position_embedding_load():
    """timm's no_embed_class (FlexiViT): the grid alone has position embeddings, as a zero one for the class token."""
    theirs = randomise(TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10,
                               no_embed_class=True)).eval()
    assert theirs.pos_embed.shape == (1, 16, 64)
    ours = tiny()
    load_into(ours, from_timm(theirs.state_dict()))
    with torch.no_grad():
        assert max_diff(ours(images()), theirs(images())) < TOL


@pytest.mark.parametrize("checkpoint_pool, model_pool", [("cls", "gap"), ("gap", "cls")])
def test_weights_of_another_pool_name_the_recipe_setting(checkpoint_pool, model_pool):
    with pytest.raises(UserError, match=f"set model.pool={checkpoint_pool} "):
        load_into(tiny(pool=model_pool), tiny(pool=checkpoint_pool).state_dict())


def test_heads_are_dropped_only_when_asked():
    pretrained = randomise(tiny(head="prelogits", num_classes=10)).state_dict()
    finetune = tiny(head="linear", num_classes=5)
    with pytest.raises(UserError, match=r"head\.weight of shape \(10, 64\) but vit_mu8 expects \(5, 64\).*drop_heads"):
        load_into(finetune, pretrained)
    with pytest.raises(UserError, match=r"has pre_logits\.fc\.weight, which vit_mu8 does not have.*drop_heads=True"):
        load_into(tiny(head="linear", num_classes=10), pretrained)

    load_into(finetune, pretrained, drop_heads=True)

    assert torch.equal(finetune.blocks[0].attn.qkv.weight, pretrained["blocks.0.attn.qkv.weight"])
    assert not finetune.head.weight.any()  # still the fine-tuning head's zero init


def test_load_weights_detects_the_format(tmp_path):
    ours = randomise(tiny())
    expected = ours.state_dict()
    to_hf(ours, tmp_path / "hf")
    save_file(expected, tmp_path / "ours.safetensors")
    torch.save({"model": expected, "step": 7}, tmp_path / "ours.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in expected.items()}}, tmp_path / "ddp.pt")
    save_file({"module." + k: v for k, v in expected.items()}, tmp_path / "ddp.safetensors")
    timm_train = {"arch": "vit", "state_dict": expected, "version": 2, "args": argparse.Namespace(lr=0.1)}
    torch.save(timm_train, tmp_path / "model_best.pth.tar")  # as timm's train.py writes it

    for path in ("hf", "hf/model.safetensors", "ours.safetensors", "ours.pth", "ddp.pt", "ddp.safetensors",
                 "model_best.pth.tar"):
        state = load_weights(tmp_path / path)
        assert state.keys() == expected.keys(), path
        assert all(torch.equal(state[k], v) for k, v in expected.items()), path


def test_a_timm_training_checkpoint_gives_its_ema_weights_as_timm_does(tmp_path, capsys):
    trained, ema = tiny().state_dict(), {k: v + 1 for k, v in tiny().state_dict().items()}
    torch.save({"epoch": 3, "state_dict": trained, "state_dict_ema": ema, "args": argparse.Namespace(lr=1e-3)},
               tmp_path / "checkpoint-3.pth.tar")
    loaded = load_weights(tmp_path / "checkpoint-3.pth.tar")
    assert all(torch.equal(loaded[k], v) for k, v in ema.items())
    assert "holds EMA weights (state_dict_ema) beside the trained ones; the EMA weights are read" in \
        capsys.readouterr().err


def test_load_weights_never_unpickles_objects(tmp_path):
    torch.save({"model": tiny().state_dict(), "rng": np.random.default_rng(0)}, tmp_path / "run.pth")
    with pytest.raises(UserError, match="Python objects"):
        load_weights(tmp_path / "run.pth")


@pytest.mark.parametrize("damage, says", [
    ("cut", "model.safetensors cannot be read as a .safetensors weights file"),
    ("lfs", "model.safetensors is a Git LFS pointer, not the weights (a clone made without git-lfs); fetch them"),
    ("config", "config.json is not readable JSON"),
    ("bin", "pytorch_model.bin cannot be read as a .bin weights file"),
    ("shard", "a shard that model.safetensors.index.json names, does not exist; copy the whole folder"),
    ("index", "model.safetensors.index.json is not readable JSON"),
])
def test_a_damaged_transformers_folder_is_one_sentence(tmp_path, damage, says):
    """As a file copied or cloned in part arrives: cut short, a Git LFS pointer, a shard missing."""
    hf = transformers.ViTModel(hf_config())
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if damage in ("shard", "index") else "5GB")
    weights = tmp_path / "model.safetensors"
    if damage == "cut":
        weights.write_bytes(weights.read_bytes()[:20000])
    elif damage == "lfs":
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 81920\n")
    elif damage == "config":
        (tmp_path / "config.json").write_text('{"model_type": "vit", "hidden_size": 6')
    elif damage == "bin":
        weights.unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
        (tmp_path / "pytorch_model.bin").write_bytes((tmp_path / "pytorch_model.bin").read_bytes()[:20000])
    elif damage == "shard":
        sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    else:
        (tmp_path / "model.safetensors.index.json").write_text("")
    with pytest.raises(UserError, match=re.escape(says)):
        load_weights(tmp_path)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth", "w.pth.tar", "w.npz"])
def test_a_damaged_weights_file_is_one_sentence(tmp_path, name):
    save_file(tiny().state_dict(), tmp_path / "w.safetensors")
    torch.save(tiny().state_dict(), tmp_path / "w.pth")
    (tmp_path / "w.pth.tar").write_bytes((tmp_path / "w.pth").read_bytes())
    np.savez(tmp_path / "w.npz", x=np.zeros(3))
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:200])  # a copy cut short
    with pytest.raises(UserError, match=f"{name} .*is it complete"):
        load_weights(path)
