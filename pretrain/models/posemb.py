"""Resampling learned position embeddings to a new token grid (fine-tuning at a higher resolution).

The prefix entries ([CLS]) are kept as they are; the grid part is resized in 2D. Two corner
conventions exist and both are in use:

- ``align_corners=True``: the embeddings at the four corners of the old grid land exactly on the
  corners of the new one, and the rest are spread evenly between them. This is what the paper's
  code does (``scipy.ndimage.zoom(grid, zoom, order=1)`` in google-research/vision_transformer),
  and it is the default here.
- ``align_corners=False``: each embedding is the centre of a cell covering the image, so the new
  grid samples the old one at cell centres (half-pixel convention of ``jax.image.resize`` in
  big_vision and of timm); the outermost rows are extrapolated by clamping. Resized as timm's
  ``resample_abs_pos_embed`` does, antialiased whether it grows or shrinks: for bicubic that is the
  a = -0.5 cubic of PIL and ``jax.image.resize``, not PyTorch's plain a = -0.75 one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Interpolation


def resample_posemb(
    posemb: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    *,
    old_grid: tuple[int, int] | None = None,
    mode: Interpolation = "bilinear",
    align_corners: bool = True,
) -> torch.Tensor:
    """Resize ``posemb`` of shape (1, prefix + h*w, D) to (1, prefix + new_h*new_w, D).

    ``old_grid`` defaults to the square grid that the token count implies. Computed in float32,
    returned in the input's dtype; shrinking (and any resize with ``align_corners=False``) uses an
    anti-aliasing filter.
    """
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = round(n**0.5)
        if side * side != n:
            raise ValueError(f"{n} grid position embeddings do not form a square; pass old_grid=(h, w)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old grid {old_grid[0]}x{old_grid[1]} does not hold the {n} grid position embeddings")
    if tuple(new_grid) == tuple(old_grid):
        return posemb
    d = grid.shape[-1]
    image = grid.float().reshape(1, *old_grid, d).permute(0, 3, 1, 2)
    shrink = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    antialias = shrink or not align_corners
    image = F.interpolate(image, size=tuple(new_grid), mode=mode, align_corners=align_corners, antialias=antialias)
    grid = image.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)
