"""The ViT and hybrid modules: shapes, heads, initialisation, and the errors a user can hit."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.hybrid import StdConv2dSame, pad_same
from pretrain.models.zoo import build_model, forward_flops


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{"name": "vit_mu8", "image_size": 32, "num_classes": 5, **kw}))


def test_shapes_and_heads():
    x = torch.randn(3, 3, 32, 32)
    model = tiny()
    assert model.forward_features(x).shape == (3, 1 + 16, 64)
    assert model.representation(x).abs().max() <= 1  # tanh pre-logits
    assert model(x).shape == (3, 5)
    gap = tiny(pool="gap", head="linear")
    assert gap.cls_token is None and gap.pos_embed.shape == (1, 16, 64)
    assert gap.forward_features(x).shape == (3, 16, 64)
    torch.testing.assert_close(gap.representation(x), gap.forward_features(x).mean(1))
    assert tiny(num_classes=0)(x).shape == (3, 64)


def test_classifier_starts_at_zero_and_bias_can_start_at_minus_ten():
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(tiny()(x), torch.zeros(2, 5))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="vit_mu8", image_size=32, num_classes=5), head_bias=-10.0)
    assert torch.equal(model(x), torch.full((2, 5), -10.0))


def test_initialisation_follows_the_papers_code():
    model = tiny()
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (64 + 64))  # Xavier of each D x D projection, not of the fused 3D x D matrix
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert 0 < model.blocks[0].mlp.fc1.bias.abs().max() < 1e-5
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(model.cls_token) == 0


def test_dropout_only_in_training():
    model = tiny(dropout=0.5, attn_dropout=0.5, head="linear", num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_wrong_resolution_names_the_fix():
    with pytest.raises(ValueError, match=r"48x48 pixels makes a 6x6 token grid, but the position embeddings cover 4x4"):
        tiny()(torch.randn(1, 3, 48, 48))


def test_every_parameter_gets_a_gradient():
    model = tiny(head="linear")
    torch.nn.init.normal_(model.head.weight)  # a zero head blocks the gradient to the encoder
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_hybrid_forward_and_same_padding():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="vit_r50_mu16", image_size=64, num_classes=3))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3) and model.grid == (4, 4)
    for size, stride in [(224, 2), (113, 2), (56, 1)]:
        padded = pad_same(torch.zeros(1, 1, size, size), (3, 3), (stride, stride))
        assert F.max_pool2d(padded, 3, stride).shape[-1] == math.ceil(size / stride)
    padded = pad_same(torch.zeros(1, 1, 224, 224), (7, 7), (2, 2))
    assert padded.shape[-1] == 224 + 5  # TensorFlow puts the odd pixel on the far side: 2 + 3


def test_weight_standardisation():
    conv = StdConv2dSame(4, 6, 3)
    torch.nn.init.normal_(conv.weight, mean=3.0, std=5.0)
    x = torch.zeros(1, 4, 5, 5)
    x[..., 2, 2] = 1  # picks out the centre tap of every kernel
    w = conv.weight.reshape(6, -1)
    expected = ((w - w.mean(1, keepdim=True)) / w.std(1, unbiased=False, keepdim=True)).reshape_as(conv.weight)
    torch.testing.assert_close(conv(x)[0, :, 2, 2], expected[:, :, 1, 1].sum(1), atol=1e-5, rtol=1e-5)


def residual_dtypes(model, x: torch.Tensor) -> set[torch.dtype]:
    """The dtypes of the residual stream, as it enters and leaves each block."""
    seen: set[torch.dtype] = set()
    hooks = [b.register_forward_hook(lambda m, args, out: seen.update({args[0].dtype, out.dtype}))
             for b in model.blocks]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def test_bf16_residual_keeps_the_stream_in_bf16_under_autocast_only():
    x = torch.randn(4, 3, 32, 32)
    plain, bf16 = tiny(), tiny(bf16_residual=True)
    with torch.autocast("cpu", torch.bfloat16):
        assert residual_dtypes(plain, x) == {torch.float32}  # the fp32 position embeddings promote it
        assert residual_dtypes(bf16, x) == {torch.bfloat16}
    assert residual_dtypes(bf16, x) == {torch.float32}
    torch.testing.assert_close(bf16(x), plain(x), rtol=0, atol=0)  # without autocast it changes nothing
    assert forward_flops(bf16) == forward_flops(plain)  # counted on the meta device, which has no autocast


def test_bf16_residual_trains_like_the_fp32_residual():
    """60 steps of AdamW on a fixed batch under bf16 autocast: the loss curves stay together."""
    x, y = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 5

    def curve(**kw) -> torch.Tensor:
        model = tiny(head="linear", **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(60):
            with torch.autocast("cpu", torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    fp32, bf16 = curve(), curve(bf16_residual=True)
    assert fp32[-5:].mean() < 0.5 * fp32[:5].mean()  # it learns
    assert ((bf16 - fp32).abs() / fp32).max() < 0.02
