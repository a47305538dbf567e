"""Position-embedding resampling keeps [CLS] and resizes the grid in 2D."""

import pytest
import torch

from pretrain.models.posemb import resample_posemb


def ramp(h, w, d=3):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([xs / (w - 1), ys / (h - 1), 2 * xs / (w - 1) - ys / (h - 1)], dim=-1)[..., :d]
    return grid.reshape(1, h * w, d)


def test_linear_ramp_stays_a_ramp_and_cls_is_untouched():
    cls = torch.randn(1, 1, 3)
    posemb = torch.cat([cls, ramp(14, 14)], dim=1)
    out = resample_posemb(posemb, (24, 24), num_prefix_tokens=1, mode="bilinear", align_corners=True)
    assert out.shape == (1, 1 + 24 * 24, 3)
    assert torch.equal(out[:, :1], cls)
    torch.testing.assert_close(out[:, 1:], ramp(24, 24), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_shapes_dtypes_and_round_trip(mode, align_corners):
    posemb = torch.randn(1, 1 + 16 * 16, 8, dtype=torch.bfloat16)
    out = resample_posemb(posemb, (27, 27), mode=mode, align_corners=align_corners)
    assert out.shape == (1, 1 + 27 * 27, 8) and out.dtype == torch.bfloat16
    back = resample_posemb(out, (16, 16), mode=mode, align_corners=align_corners)
    assert back.shape == posemb.shape


def test_corner_conventions_differ_on_the_edge():
    posemb = ramp(4, 4, d=1)
    aligned = resample_posemb(posemb, (8, 8), num_prefix_tokens=0, align_corners=True)
    centred = resample_posemb(posemb, (8, 8), num_prefix_tokens=0, align_corners=False)
    assert aligned[0, 0, 0] == 0 and aligned[0, 7, 0] == 1  # corners land on corners
    assert centred[0, 0, 0] == 0 and 0 < centred[0, 1, 0] < aligned[0, 1, 0]  # clamped edge, then slower


def test_rectangular_grids_and_errors():
    posemb = torch.randn(1, 1 + 6 * 4, 2)
    assert resample_posemb(posemb, (3, 8), old_grid=(6, 4)).shape == (1, 1 + 24, 2)
    with pytest.raises(ValueError, match="do not form a square"):
        resample_posemb(posemb, (5, 5))
    with pytest.raises(ValueError, match="does not hold"):
        resample_posemb(posemb, (5, 5), old_grid=(5, 5))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("new", [(12, 12), (5, 7)])
def test_cell_centres_resample_as_timm_does(mode, new):
    """align_corners=false is timm's resample_abs_pos_embed, which antialiases when it enlarges too (for bicubic
    a different kernel from PyTorch's plain one)."""
    from timm.layers import resample_abs_pos_embed

    posemb = torch.randn(1, 1 + 8 * 8, 16, generator=torch.Generator().manual_seed(0))
    ours = resample_posemb(posemb, new, 1, mode=mode, align_corners=False)
    assert torch.allclose(ours, resample_abs_pos_embed(posemb, list(new), num_prefix_tokens=1, interpolation=mode),
                          atol=1e-5)
