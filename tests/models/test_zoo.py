"""The size table, names, parameter counts and FLOPs against the paper."""

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.models.zoo import build_model, count_params, forward_flops, parse_name


def meta_model(name, image_size=224, num_classes=1000, head="linear"):
    with torch.device("meta"):
        return build_model(ModelConfig(name=name, image_size=image_size, head=head), num_classes=num_classes)


@pytest.mark.parametrize("name, millions", [("vit_b16", 86), ("vit_l16", 304), ("vit_h14", 632)])
def test_parameter_counts_match_the_paper(name, millions):
    assert count_params(meta_model(name)) == pytest.approx(millions * 1e6, rel=0.01)


def test_prelogits_head_adds_a_d_by_d_layer():
    linear, pre = meta_model("vit_b16"), meta_model("vit_b16", head="prelogits")
    assert count_params(pre) - count_params(linear) == 768 * 768 + 768


def test_hybrid_size_and_grid():
    model = meta_model("vit_r50_b16")
    assert model.grid == (14, 14) and model.patch_size == 16
    assert count_params(model) == pytest.approx(98.7e6, rel=0.01)  # timm's vit_base_r50_s16_224
    assert meta_model("vit_r50_b16", image_size=384).grid == (24, 24)


def test_forward_flops_of_vit_b16():
    # 12 blocks of 197 tokens: qkv, proj, MLP and the two attention matmuls; plus the patch embedding.
    n, d, m = 197, 768, 3072
    block = 2 * n * d * (3 * d + d + 2 * m) + 2 * 2 * n * n * d
    expected = 12 * block + 2 * 196 * (3 * 16 * 16) * d + 2 * d * 1000
    assert forward_flops(meta_model("vit_b16")) == pytest.approx(expected, rel=1e-3)


def test_forward_flops_count_the_attention_of_a_model_on_the_cpu():
    # The trainer counts its model before moving it; the CPU's fused attention kernel has no FLOP formula.
    on_cpu = build_model(ModelConfig(name="vit_ti16", image_size=64, head="linear"), num_classes=10)
    assert forward_flops(on_cpu) == forward_flops(meta_model("vit_ti16", image_size=64, num_classes=10))


def test_names():
    assert parse_name("vit_h14").size.width == 1280
    assert parse_name("vit_ti16").size.heads == 3
    assert parse_name("vit_s32").patch_size == 32
    assert parse_name("vit_r50_l16").backbone == (3, 4, 9)
    with pytest.raises(UserError, match="model.name 'vit_q16' is not in the zoo"):
        parse_name("vit_q16")
    with pytest.raises(UserError, match="the r50 stem has stride 16; name it vit_r50_b16"):
        parse_name("vit_r50_b32")
    with pytest.raises(UserError, match="not a multiple of vit_b16's patch stride 16"):
        build_model(ModelConfig(name="vit_b16", image_size=200))
