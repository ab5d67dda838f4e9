"""Image-to-image functions on maps larger than a network's training shape: overlapping tiles."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiled"]


def tiled(fn, x, tile, overlap, batch_size):
    """Apply an image-to-image ``fn`` on ``x (H, W)`` in overlapping tiles of shape ``tile``.

    Parameters
    ----------
    fn : callable
        ``fn(tiles (n, th, tw)) -> (n, th, tw)``.
    x : `torch.Tensor`
        The map ``(H, W)``.
    tile : tuple of int
        Tile shape ``(th, tw)``; a map no larger than one tile is processed whole.
    overlap : int
        Pixels shared by neighbouring tiles; each tile keeps its centre (half the overlap is cut
        on inner edges), so border effects of ``fn`` up to ``overlap // 2`` pixels vanish.
    batch_size : int
        Tiles per call of ``fn``.

    Returns
    -------
    `torch.Tensor`
        ``(H, W)``.
    """
    h, w = x.shape
    th, tw = tile
    if h <= th and w <= tw:
        return fn(x[None])[0]
    margin = overlap // 2
    step_y, step_x = max(th - 2 * margin, 1), max(tw - 2 * margin, 1)
    ys = list(range(0, max(h - th, 0) + 1, step_y))
    xs = list(range(0, max(w - tw, 0) + 1, step_x))
    if ys[-1] + th < h:
        ys.append(h - th)
    if xs[-1] + tw < w:
        xs.append(w - tw)
    padded = nn.functional.pad(x[None, None], (0, max(tw - w, 0), 0, max(th - h, 0)))[0, 0]
    out = torch.empty(padded.shape, dtype=torch.float32, device=x.device)
    corners = [(y0, x0) for y0 in ys for x0 in xs]
    for i in range(0, len(corners), batch_size):
        group = corners[i:i + batch_size]
        tiles = torch.stack([padded[y0:y0 + th, x0:x0 + tw] for y0, x0 in group])
        res = fn(tiles)
        for (y0, x0), r in zip(group, res):
            # keep the tile's centre; a tile touching the map edge keeps that edge too
            top = 0 if y0 == 0 else margin
            left = 0 if x0 == 0 else margin
            bottom = th if y0 + th >= padded.shape[0] else th - margin
            right = tw if x0 + tw >= padded.shape[1] else tw - margin
            out[y0 + top:y0 + bottom, x0 + left:x0 + right] = r[top:bottom, left:right]
    return out[:h, :w]
