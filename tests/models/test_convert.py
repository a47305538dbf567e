"""Weight interchange, refereed by transformers, timm and an independent NumPy forward pass of the JAX layout."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
import scipy.special
import timm
import torch
import transformers
from PIL import Image
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import _load_weights as timm_load_npz

from pretrain.data.transforms import eval_view
from pretrain.errors import UserError
from pretrain.models.convert import (
    declared,
    from_hf,
    from_jax_npz,
    from_timm,
    load_into,
    load_weights,
    to_hf,
)
from pretrain.models.hybrid import HybridEmbed
from pretrain.models.vit import PatchEmbed, VisionTransformer
from pretrain.models.zoo import BACKBONES, SIZES

TINY = SIZES["mu"]  # width 64, depth 4, 4 heads, MLP 256
TOL = 1e-4


def tiny(image_size=32, num_classes=10, head="linear", pool="cls") -> VisionTransformer:
    """vit_mu8: patch 8, so 32px images make a 4x4 grid."""
    return VisionTransformer(TINY, PatchEmbed(8, TINY.width), image_size, num_classes, head=head, pool=pool).eval()


def tiny_hybrid() -> VisionTransformer:
    """The R50 stem of vit_r50_b16 under 2 tiny transformer blocks, at 64px (a 4x4 grid)."""
    size = TINY._replace(depth=2)
    return VisionTransformer(size, HybridEmbed(BACKBONES["r50"], size.width), 64, 10, head="linear").eval()


@torch.no_grad()
def randomise(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """No parameter left at a trivial value (zero heads, unit norms), so every mapping error shows; seeded."""
    torch.manual_seed(1)
    for p in module.parameters():
        p.normal_(0.0, std)
    return module


def images(size=32, batch=2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# transformers as referee ---------------------------------------------------------------------------------------


def hf_config(**kw) -> transformers.ViTConfig:
    return transformers.ViTConfig(**dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=256, image_size=32, patch_size=8) | kw)


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_from_hf_matches_transformers(tmp_path, weights_file):
    hf = randomise(transformers.ViTForImageClassification(hf_config(num_labels=10))).eval()
    hf.save_pretrained(tmp_path)  # the classic names (encoder.layer.N.attention.attention.query, ...)
    if weights_file == "pytorch_model.bin":  # transformers 5's in-memory names (layers.N.attention.q_proj, ...)
        torch.save(hf.state_dict(), tmp_path / weights_file)
        (tmp_path / "model.safetensors").unlink()

    ours = from_hf(tmp_path).eval()

    assert (ours.head_type, ours.num_classes, ours.norm_eps) == ("linear", 10, 1e-12)
    x = images()
    with torch.no_grad():
        assert max_diff(ours(x), hf(pixel_values=x).logits) < TOL


def test_a_masked_image_modelling_folder_gives_its_encoder(tmp_path, caplog):
    """SimMIM pre-training (ViTForMaskedImageModeling): its encoder is a fine-tuning start; decoder and mask token
    are not part of a classifier."""
    hf = randomise(transformers.ViTForMaskedImageModeling(hf_config(encoder_stride=8))).eval()
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        ours = from_hf(tmp_path).eval()
    assert "the transformers weights' decoder (another task's head) are left out" in caplog.text
    x = images()
    with torch.no_grad():
        assert max_diff(ours.forward_features(x), hf.vit(pixel_values=x).last_hidden_state) < TOL


def test_to_hf_classifier_loads_in_transformers(tmp_path):
    ours = randomise(tiny(head="linear"))
    labels = {i: f"class {i}" for i in range(10)}
    to_hf(ours, tmp_path, id2label=labels)

    classifier = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    encoder = transformers.ViTModel.from_pretrained(tmp_path).eval()

    assert classifier.config.id2label == labels
    x = images()
    with torch.no_grad():
        assert max_diff(classifier(pixel_values=x).logits, ours(x)) < TOL
        assert max_diff(encoder(pixel_values=x).last_hidden_state, ours.forward_features(x)) < TOL


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_to_hf_writes_the_image_processor_of_our_evaluation(tmp_path, backend):
    """AutoImageProcessor (what the pipelines load) gives the model the pixels pretrain.evaluate gives it."""
    to_hf(tiny(), tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
    noise = np.random.default_rng(0).integers(0, 256, (25, 37, 3), dtype=np.uint8)
    for width, height in [(111, 75), (75, 80), (36, 36)]:  # (75, 80): a margin of 7, its offset 3 (HF) not 4
        image = Image.fromarray(noise).resize((width, height), Image.BICUBIC)

        pixels = processor(images=image, return_tensors="pt").pixel_values[0]

        expected = eval_view(image, 32).float() / 127.5 - 1
        assert pixels.shape == expected.shape == (3, 32, 32)
        # the PIL backend resizes with PIL, as evaluate does; torchvision's antialiased resize rounds differently
        assert max_diff(pixels, expected) <= (1e-6 if backend == "pil" else 2.01 / 255)


def test_prelogits_model_exports_as_vit_model_with_its_pooler(tmp_path, caplog):
    ours = randomise(tiny(head="prelogits"))
    with caplog.at_level(logging.WARNING):
        to_hf(ours, tmp_path)
    assert "not exported" in caplog.text  # the 10-class classifier has no place after HF's pooler

    hf = transformers.ViTModel.from_pretrained(tmp_path).eval()
    back = from_hf(tmp_path).eval()

    assert (back.head_type, back.num_classes) == ("prelogits", 0)
    x = images()
    with torch.no_grad():
        assert max_diff(hf(pixel_values=x).pooler_output, ours.representation(x)) < TOL
        assert max_diff(back(x), ours.representation(x)) < TOL


def test_to_hf_refuses_what_transformers_cannot_hold(tmp_path):
    with pytest.raises(UserError, match=r"pool 'gap'.*ONNX"):
        to_hf(tiny(pool="gap"), tmp_path)
    hybrid = VisionTransformer(TINY, HybridEmbed((1,), TINY.width), 32, 10, head="linear")
    with pytest.raises(UserError, match=r"hybrid.*ViTHybrid"):
        to_hf(hybrid, tmp_path)


def test_from_hf_names_config_fields_it_cannot_represent(tmp_path):
    transformers.ViTModel(hf_config(hidden_act="relu", qkv_bias=False)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"hidden_act='relu', qkv_bias=False"):
        from_hf(tmp_path)
    with pytest.raises(UserError, match=r"hidden_act='relu', qkv_bias=False"):  # its weights file, given alone
        load_weights(tmp_path / "model.safetensors")


def test_a_transformers_folder_says_its_heads_and_eps_which_its_weights_cannot(tmp_path):
    transformers.ViTModel(hf_config(num_attention_heads=2, layer_norm_eps=1e-6)).save_pretrained(tmp_path / "hf")
    for path in ("hf", "hf/model.safetensors"):
        assert declared(tmp_path / path) == (2, 1e-6), path
    (tmp_path / "w").mkdir()
    (tmp_path / "hf/model.safetensors").rename(tmp_path / "w/model.safetensors")
    assert declared(tmp_path / "w/model.safetensors") == (None, None)  # no config beside it


def test_exact_gelu_by_its_other_transformers_name_is_read(tmp_path):
    """transformers' 'gelu_python' is the erf GELU too (not 'gelu_new', the tanh approximation)."""
    theirs = randomise(transformers.ViTModel(hf_config(hidden_act="gelu_python"), add_pooling_layer=False)).eval()
    theirs.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(ours.forward_features(images()), theirs(pixel_values=images()).last_hidden_state) < TOL


# timm as referee -------------------------------------------------------------------------------------------------


def test_timm_vit_matches():
    theirs = randomise(TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)).eval()
    ours = tiny()

    load_into(ours, from_timm(theirs.state_dict()))

    x = images()
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) < TOL


def test_timm_hybrid_matches():
    theirs = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=10, img_size=64, embed_dim=64,
                               depth=2, num_heads=4)
    randomise(theirs.eval())  # GroupNorm affine parameters included
    ours = tiny_hybrid()

    load_into(ours, from_timm(theirs.state_dict()))

    x = images(64)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) < TOL


def timm_mu8(**kw) -> torch.nn.Module:
    """vit_mu8's shapes under a timm architecture name (vit_tiny's: 3 heads, unless told)."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_classes=10) | kw
    return randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False, **{"num_heads": 4} | args)).eval()


def test_a_timm_hub_folder_is_read_as_timm(tmp_path):
    """timm/vit_* on the Hugging Face Hub: config.json naming timm's architecture, beside pytorch_model.bin or
    model.safetensors (timm's save_for_hf writes the same)."""
    from timm.models._hub import save_for_hf

    theirs = timm_mu8()
    save_for_hf(theirs, tmp_path / "given")  # timm records create_model's arguments, num_heads=4 among them
    save_for_hf(theirs, tmp_path / "named", safe_serialization="both")
    config = json.loads((tmp_path / "named/config.json").read_text())
    del config["model_args"]  # as the Hub's timm/vit_* folders are: the architecture's name says the rest
    (tmp_path / "named/config.json").write_text(json.dumps(config))
    ours = tiny()
    load_into(ours, load_weights(tmp_path / "given"))
    with torch.no_grad():
        assert max_diff(ours(images()), theirs(images())) < TOL
    assert declared(tmp_path / "given").heads == 4
    assert declared(tmp_path / "named").heads == 3  # what vit_tiny has; the recipe's 4 would be refused
    assert declared(tmp_path / "named" / "model.safetensors").heads == 3
    assert load_weights(tmp_path / "named").keys() == ours.state_dict().keys()
    with pytest.raises(UserError, match=r"is that of a timm model folder \(vit_tiny_patch16_224\), not a transformers"):
        from_hf(tmp_path / "named")


def test_timm_weights_it_cannot_represent_say_what_they_lack(tmp_path):
    from timm.models._hub import save_for_hf

    save_for_hf(timm_mu8(global_pool="avg", fc_norm=False), tmp_path / "avg")
    with pytest.raises(UserError, match=r"averages the tokens beside its class token \(global_pool='avg'\)"):
        load_weights(tmp_path / "avg")  # the state dict alone cannot tell: it has the class token's weights
    with pytest.raises(UserError, match=r"lacks blocks.0.attn.qkv.bias, which vit_mu8 has; its blocks.0.attn.qkv has "
                                        r"no bias \(timm's qkv_bias=False"):
        load_into(tiny(), from_timm(timm_mu8(qkv_bias=False).state_dict()))
    with pytest.raises(UserError, match=r"lacks norm.weight, which vit_mu8 has; it has no LayerNorm after the encoder"):
        load_into(tiny(), from_timm(timm_mu8(final_norm=False, fc_norm=False).state_dict()))


def test_a_timm_hybrid_of_another_resnet_stem_is_named_as_such():
    """timm's R26 (2, 2, 2, 2 units) and stride-32 R50 (3, 4, 6, 3) stems are not the zoo's R50 (3, 4, 9): a model
    name to set would only fail next."""
    theirs = timm.create_model("vit_small_r26_s32_224", pretrained=False, img_size=64, embed_dim=64, depth=2,
                               num_heads=4)
    with pytest.raises(UserError, match=r"its ResNet stem has 2, 2, 2, 2 units in its stages, which no hybrid of the "
                                        r"zoo has \(r50: 3, 4, 9, stride 16\)$"):
        load_into(tiny_hybrid(), from_timm(theirs.state_dict()))


def test_r50_b16_has_timms_parameters():
    with torch.device("meta"):
        theirs = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=10)
        ours = VisionTransformer(SIZES["b"], HybridEmbed(BACKBONES["r50"], 768), 224, 10, head="linear")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_timm_norm_after_pooling_is_refused():
    theirs = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, global_pool="avg",
                     class_token=False)
    with pytest.raises(UserError, match="fc_norm"):
        from_timm(theirs.state_dict())


# official JAX .npz -------------------------------------------------------------------------------------------------


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """A float32 N(0, 0.2) array, the dtype of the npz files' parameters."""
    return rng.normal(0.0, 0.2, shape).astype(np.float32)


def vit_npz(rng, kernel_shape, tokens, depth=TINY.depth, pre_logits=True) -> dict[str, np.ndarray]:
    """Random arrays under google-research/vision_transformer's names and shapes, for TINY and 10 classes."""
    d, _, heads, mlp = TINY
    num_classes = 10
    hd = d // heads
    r = functools.partial(normal, rng)
    a = {"embedding/kernel": r(*kernel_shape), "embedding/bias": r(d), "cls": r(1, 1, d),
         "Transformer/posembed_input/pos_embedding": r(1, tokens, d),
         "Transformer/encoder_norm/scale": r(d), "Transformer/encoder_norm/bias": r(d),
         "head/kernel": r(d, num_classes), "head/bias": r(num_classes)}
    if pre_logits:
        a |= {"pre_logits/kernel": r(d, d), "pre_logits/bias": r(d)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        att = b + "MultiHeadDotProductAttention_1/"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            a |= {f"{b}{norm}/scale": r(d), f"{b}{norm}/bias": r(d)}
        for name in ("query", "key", "value"):
            a |= {f"{att}{name}/kernel": r(d, heads, hd), f"{att}{name}/bias": r(heads, hd)}
        a |= {f"{att}out/kernel": r(heads, hd, d), f"{att}out/bias": r(d)}
        a |= {f"{b}MlpBlock_3/Dense_0/kernel": r(d, mlp), f"{b}MlpBlock_3/Dense_0/bias": r(mlp),
              f"{b}MlpBlock_3/Dense_1/kernel": r(mlp, d), f"{b}MlpBlock_3/Dense_1/bias": r(d)}
    return a


def layer_norm(x, scale, bias, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def numpy_vit(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The paper's forward pass on (B, H, W, C) images, read straight off the npz layout, in float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    p = w["embedding/kernel"].shape[0]
    b, h, wd, c = x.shape
    patches = x.reshape(b, h // p, p, wd // p, p, c)
    t = np.einsum("bipjqc,pqcd->bijd", patches, w["embedding/kernel"]).reshape(b, -1, TINY.width)
    t = t + w["embedding/bias"]
    t = np.concatenate([np.repeat(w["cls"], b, axis=0), t], axis=1) + w["Transformer/posembed_input/pos_embedding"]
    for i in range(TINY.depth):
        blk = f"Transformer/encoderblock_{i}/"
        att = blk + "MultiHeadDotProductAttention_1/"
        y = layer_norm(t, w[blk + "LayerNorm_0/scale"], w[blk + "LayerNorm_0/bias"])
        q, k, v = (np.einsum("bnd,dhk->bnhk", y, w[f"{att}{n}/kernel"]) + w[f"{att}{n}/bias"]
                   for n in ("query", "key", "value"))
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        heads = np.einsum("bhqs,bshk->bqhk", probs, v)
        t = t + np.einsum("bqhk,hkd->bqd", heads, w[att + "out/kernel"]) + w[att + "out/bias"]
        y = layer_norm(t, w[blk + "LayerNorm_2/scale"], w[blk + "LayerNorm_2/bias"])
        y = y @ w[blk + "MlpBlock_3/Dense_0/kernel"] + w[blk + "MlpBlock_3/Dense_0/bias"]
        y = 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2)))
        t = t + y @ w[blk + "MlpBlock_3/Dense_1/kernel"] + w[blk + "MlpBlock_3/Dense_1/bias"]
    t = layer_norm(t, w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"])
    rep = np.tanh(t[:, 0] @ w["pre_logits/kernel"] + w["pre_logits/bias"])
    return rep @ w["head/kernel"] + w["head/bias"]


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_jax_npz_matches_numpy_forward(tmp_path, prefix):
    arrays = vit_npz(np.random.default_rng(0), kernel_shape=(8, 8, 3, 64), tokens=17)
    path = tmp_path / "ViT-mu_8.npz"
    np.savez(path, **{prefix + k: v for k, v in arrays.items()})
    ours = tiny(head="prelogits")

    load_into(ours, from_jax_npz(path))

    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3))
    with torch.no_grad():
        logits = ours(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
    assert np.abs(logits.numpy() - numpy_vit(arrays, x)).max() < TOL
    assert declared(path).heads == TINY.heads  # the query kernels' (D, heads, head_dim), which fusing q, k, v loses


def hybrid_npz(rng) -> dict[str, np.ndarray]:
    """R50+ViT arrays: the official ResNet names (block{s}/unit{u}, counted from 1) and a 1x1 embedding."""
    r = functools.partial(normal, rng)
    a = {"conv_root/kernel": r(7, 7, 3, 64), "gn_root/scale": r(64), "gn_root/bias": r(64)}
    cin = 64
    for s, units in enumerate(BACKBONES["r50"]):
        cout = 256 * 2**s
        mid = cout // 4
        for u in range(units):
            unit = f"block{s + 1}/unit{u + 1}/"
            convs = {"1": (1, cin if u == 0 else cout, mid), "2": (3, mid, mid), "3": (1, mid, cout)}
            if u == 0:
                convs["_proj"] = (1, cin, cout)
            for name, (k, i, o) in convs.items():
                a |= {f"{unit}conv{name}/kernel": r(k, k, i, o), f"{unit}gn{name}/scale": r(o),
                      f"{unit}gn{name}/bias": r(o)}
        cin = cout
    return a


def test_jax_hybrid_npz_matches_timms_reader(tmp_path):
    rng = np.random.default_rng(0)
    arrays = hybrid_npz(rng) | vit_npz(rng, kernel_shape=(1, 1, 1024, 64), tokens=17, depth=2, pre_logits=False)
    path = tmp_path / "R50+ViT-mu_16.npz"
    np.savez(path, **arrays)
    theirs = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=10, img_size=64, embed_dim=64,
                               depth=2, num_heads=4).eval()
    timm_load_npz(theirs, str(path))
    ours = tiny_hybrid()

    load_into(ours, from_jax_npz(path))  # strict: every ResNet unit mapped, with the right shape

    x = images(64)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) < TOL
