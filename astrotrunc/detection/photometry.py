"""Photometry of detected sources: fluxes whose uncertainties include confusion.

What ``flux`` estimates
-----------------------
A catalog row stands for one region R_i of the odds map, and the source it stands for is the
**brightest true source centred in R_i** -- the same one-to-one rule that defines "detected" for
the completeness r2 (`~astrotrunc.completeness.match_sources`). ``flux`` is the median, and
``flux_lo``/``flux_hi`` the 16 and 84 % quantiles, of the distribution of *that source's* flux
given the map around the detection. Everything else in the PSF -- fainter neighbours centred in
the same region, sources of the next region, sources sharing a pixel, the unresolved background
of sub-threshold sources -- is not part of the estimate but part of its uncertainty. This is the
quantity the population likelihood needs (one flux per detected source of the population), and
it stays defined in crowded fields where "all the light in the region" would count neighbours
twice.

A detection that stands for no true source (a false detection) has no true flux; its estimate
is what the network infers as if it were real.

How it is estimated
-------------------
`FluxEstimator` is a small network that reads a cutout of the map around each
detection (the map minus the background, a validity channel for masked pixels, the sub-pixel
offset of the r1 position and the PSF-matched-filter flux) and predicts quantiles of ``ln F``
(0.5, 2.5, 16, 50, 84, 97.5, 99.5 %). It is trained with the pinball (quantile) loss, a proper
scoring rule, through the engine's `~astrotrunc.nre.Trainer` on `PhotometrySimulations`: maps of
a `~astrotrunc.PointSourceModel`, detected by the finder, with detections matched to their true
sources by `~astrotrunc.completeness.match_sources`. Retraining for another instrument is one
call (`FluxEstimator.fit_to`) or ``astrotrunc train photometry``.

The quantiles are then calibrated (`FluxEstimator.calibrate`): split-conformal recalibration
of quantile regression (Romano et al. 2019) on detections of new maps, per group of predicted
flux and local crowding (the median of the cutout), each quantile's distance to the median
scaled so that its level holds in its group. An estimator may also hold factors per group of
predicted flux, crowding and absolute Galactic latitude (``calibrate(n_latitude_bins=...)``),
used for the detections of maps with a celestial WCS.

``flux_err`` is the symmetric error of the predicted distribution: ``flux ± 2 flux_err`` holds
95 % of it (for a Gaussian, 0.98 of its standard deviation), and the calibration scales it per
group so that ``flux ± 2 flux_err`` holds the true flux 95 % of the time. Use
``flux_lo``/``flux_hi`` for the 68 % interval, which is asymmetric where the distribution is.

`psf_photometry` is the photutils-compatible path (``flux_method="psf"``): photutils'
`~photutils.psf.PSFPhotometry` with grouped sources at r1's positions; its errors get the learned
confusion term (`FluxEstimator.psf_errors`): the learned distances to the 16/84 % quantiles and
the learned ``flux_err``, relative, in quadrature with the fit error, scaled per group by factors
calibrated on PSF photometry of simulated maps.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import numpy as np
import torch
from scipy import special
from torch import nn

from .._utils import celestial_wcs, clip, nearest_pixel, padded_map, take_stamps
from ..nre import RatioEstimator, Trainer
from ._onnx import OnnxNetwork, check_backend, flux_runtime

__all__ = ["FluxEstimator", "PhotometrySimulations", "default_photometry", "psf_photometry",
           "flux_summary", "measure_fluxes", "QUANTILE_LEVELS", "FLUX_METHODS"]

#: Quantile levels of ``ln F`` predicted by a `FluxEstimator`.
QUANTILE_LEVELS = (0.005, 0.025, 0.16, 0.5, 0.84, 0.975, 0.995)
#: Accepted ``flux_method`` values of `~astrotrunc.NeuralSourceFinder`.
FLUX_METHODS = ("neural", "psf", "matched")

_DEFAULT_PHOTOMETRY = "photometry_paper.safetensors"


# ----------------------------------------------------------------------------------------------
# Inputs: cutouts around the detections
# ----------------------------------------------------------------------------------------------
def _cutouts(data, bad, x, y, half, background=0.0):
    """Cutouts ``(n, 2, 2 half + 1, 2 half + 1)`` (map minus background, validity) and offsets.

    Pixels outside the map or bad are 0 in the first channel and 0 in the validity channel.
    """
    return _take_cutouts(padded_map(data, bad, half, background), x, y, half)


def _take_cutouts(padded, x, y, half, patch=None):
    """`_cutouts` of positions (x, y) from a `~astrotrunc._utils.padded_map` of the map.

    With ``patch``, each cutout comes cut into its ``patch x patch`` squares, ``(n, grid², 2,
    patch²)`` (`_PatchNet`'s order), gathered from the map in one pass: cutting them out of
    ``(n, 2, s, s)`` cutouts costs more than the gather itself.
    """
    ny, nx = padded.shape[1] - 2 * half, padded.shape[2] - 2 * half
    ix, iy = nearest_pixel(x, nx), nearest_pixel(y, ny)
    if patch:
        corner = iy * padded.shape[2] + ix  # the flat index of each cutout's first pixel
        cut = padded.reshape(-1)[corner[:, None] + _square_offsets(padded.shape, half, patch)]
        cut = cut.reshape(len(corner), -1, 2, patch * patch)
    else:
        cut = take_stamps(padded, ix, iy, half, channels_first=False)
    offset = np.stack([np.asarray(x, float) - ix, np.asarray(y, float) - iy], axis=1)
    return cut, offset.astype(np.float32)


def _squares(image, patch):
    """``(n, grid², 2 patch²)`` squares (each: its channels, then rows) of cutouts
    ``(n, 2, s, s)`` (numpy arrays or tensors; ``s = grid × patch``): `_PatchNet`'s input."""
    n, g = len(image), image.shape[-1] // patch
    shaped = image.reshape(n, 2, g, patch, g, patch)
    order = (0, 2, 4, 1, 3, 5)
    shaped = shaped.permute(*order) if hasattr(shaped, "permute") else shaped.transpose(order)
    return shaped.reshape(n, g * g, 2 * patch * patch)


@functools.lru_cache(maxsize=8)
def _square_offsets(shape, half, patch):
    """Flat offsets in a padded map ``shape`` of a cutout's pixels from its first one, in the
    order of `_squares`."""
    side = 2 * half + 1
    c, row, col = np.meshgrid(np.arange(2), np.arange(side), np.arange(side), indexing="ij")
    offsets = (c * shape[1] + row) * shape[2] + col  # of the cutout (2, side, side)
    return _squares(offsets[None], patch).reshape(-1)


def _crowding(cut):
    """Local crowding of each cutout: the median of its valid pixels (map minus background).

    The level of the unresolved sources around the detection, in detector units (0 when no
    pixel is valid). ``cut``: cutouts ``(n, 2, s, s)`` or squares ``(n, grid², 2, patch²)``
    (`_take_cutouts`; a grid has an odd number of squares, never 2).
    """
    if cut.shape[1] != 2:
        cut = cut.swapaxes(1, 2)
    values = cut[:, 0].reshape(len(cut), -1)
    valid = cut[:, 1].reshape(len(cut), -1) > 0
    mid = values.shape[1] // 2  # cutouts have an odd number of pixels
    level = np.sort(values, axis=1)[:, mid]  # numpy's vectorised sort: twice np.partition's speed
    partial = ~valid.all(1)
    if partial.any():  # the median of the valid pixels only (NaN sorts last)
        part = np.sort(np.where(valid[partial], values[partial], np.nan), axis=1)
        n_valid = valid[partial].sum(1)
        rows = np.arange(len(part))
        mid = 0.5 * (part[rows, np.maximum(n_valid - 1, 0) // 2] + part[rows, n_valid // 2])
        level[partial] = np.where(n_valid > 0, mid, 0.0)
    return level


def _nan_to_0(a):
    """``a`` with NaN as 0 (`numpy.nan_to_num` without its checks, infinities kept)."""
    a = np.asarray(a)
    return np.where(a == a, a, 0)


def _check_bins(n_crowding_bins, n_latitude_bins, latitude_crowding_bins):
    """Validate the bin counts of `FluxEstimator.calibrate`'s groups."""
    if int(n_crowding_bins) < 1 or int(latitude_crowding_bins) < 1 or int(n_latitude_bins) < 0:
        msg = (f"n_crowding_bins and latitude_crowding_bins must be >= 1 and n_latitude_bins >= 0, "
               f"got {n_crowding_bins}, {latitude_crowding_bins} and {n_latitude_bins}")
        raise ValueError(msg)


def _equal_count_edges(values, n_bins):
    """The inner edges of ``n_bins`` bins of equal counts of ``values`` (a list of floats)."""
    return [float(v) for v in np.quantile(values, np.linspace(0, 1, int(n_bins) + 1)[1:-1])]


def _abs_latitude(b):
    """``|b|`` in degrees of latitudes ``b`` (a Quantity, or plain degrees), or `None`."""
    if b is None:
        return None
    return np.abs(b.to_value("deg") if hasattr(b, "to_value") else np.asarray(b, float))


def _conformal_factors(q, log_flux, levels, groups, n_groups, n_crowd, min_group):
    """Per group, the factor of each quantile's gap to the median that makes its level hold on
    detections with true ``log_flux`` (split-conformal; the median's factor is 1). Returns
    ``(n_groups, k)``; see `_group_quantiles` for small groups."""
    k = list(levels).index(0.5)
    with np.errstate(invalid="ignore", divide="ignore"):  # the median's own column
        ratio = (np.asarray(log_flux)[:, None] - q[:, k:k + 1]) / (q - q[:, k:k + 1])
    ratio[:, k] = 1.0  # the median is not moved
    level = np.asarray(levels)
    level = np.where(level > 0.5, level, 1 - level)  # below the median the gap is negative
    return _group_quantiles(ratio, level, groups, n_groups, n_crowd, min_group)


def _calibration_table(q, log_flux, levels, groups, n_groups, n_crowd, min_group):
    """Per group, the quantile factors (`_conformal_factors`) and, in a last column, the factor
    of `flux_summary`'s ``flux_err`` (of the quantiles so calibrated) that makes
    ``flux ± 2 flux_err`` hold the true flux 95 % of the time. Returns ``(n_groups, k + 1)``.

    The quantiles alone fix ``flux_err`` only through the distribution interpolated between
    them (`_quantile_cdf`): with them alone the shipped estimator's ``flux ± 2 flux_err`` held
    the true flux of sources brighter than 10 95.5-96.9 % of the time (too wide) on held-out
    maps, and with these factors 94.9-96.3 %."""
    scale = _conformal_factors(q, log_flux, levels, groups, n_groups, n_crowd, min_group)
    flux, err = flux_summary(_scaled(q, scale[groups], list(levels).index(0.5)), levels)[:2]
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = np.abs(np.exp(log_flux) - flux) / (2 * err)
    err_factor = _group_quantiles(dist[:, None], [0.95], groups, n_groups, n_crowd, min_group)
    return np.concatenate([scale, err_factor], axis=1)


def _scaled(q, scale, k):
    """Quantiles ``q`` with each gap to the median (column ``k``) times ``scale``, sorted."""
    med = q[:, k:k + 1]
    return np.sort(med + scale * (q - med), axis=1)


def _group_quantiles(values, levels, groups, n_groups, n_crowd, min_group):
    """Per calibration group, the quantile at ``levels[j]`` of each column ``j`` of ``values``.

    A group with fewer than ``min_group`` rows takes those of its whole flux bin (the groups
    ``n_crowd`` at a time), or 1 when that has too few too. Returns ``(n_groups, n_columns)``.
    """
    out = np.ones((n_groups, values.shape[1]))
    for g in range(n_groups):
        for sel in (groups == g, groups // n_crowd == g // n_crowd):
            if sel.sum() >= min_group:
                out[g] = [np.quantile(values[sel, j], lv) for j, lv in enumerate(levels)]
                break
    return out


def _quantile_cdf(q, z_levels, value):
    """P(ln F <= value) of quantile functions ``q (n, k)`` at values ``(n, m)``.

    Interpolated linearly in the normal score ``z = Phi^-1(level)`` between the quantiles (exact
    for a Gaussian in ``ln F``) and extrapolated with the slope of the end segments.
    """
    n, k = q.shape
    seg = np.zeros(value.shape, np.intp)  # value in segment [q[seg], q[seg + 1]] (ends extended)
    for i in range(1, k - 1):  # k - 2 comparisons: cheaper than a sort or a search
        seg += value >= q[:, i:i + 1]
    flat = seg + k * np.arange(n)[:, None]
    q0, q1 = q.ravel()[flat], q.ravel()[flat + 1]
    t = (value - q0) / np.maximum(q1 - q0, 1e-12)
    return special.ndtr(z_levels[:-1][seg] + t * np.diff(z_levels)[seg])


#: Points of log e, from a quarter of the 95 % range, at which `flux_summary` brackets its
#: solution: first the few where it lies (-0.05 to +0.36 on the paper model's detections), then,
#: for rows it missed, a factor 20 either way.
_SUMMARY_GRIDS = (np.linspace(-0.125, 0.375, 5), np.linspace(-3.0, 3.0, 17))


def flux_summary(log_quantiles, levels=QUANTILE_LEVELS):
    """Catalog columns from predicted quantiles of ``ln F``.

    Parameters
    ----------
    log_quantiles : array ``(n, k)``
        Increasing quantiles of ``ln F`` at ``levels``.
    levels : sequence of float
        Their levels; must include 0.16, 0.5 and 0.84.

    Returns
    -------
    flux, flux_err, flux_lo, flux_hi : arrays ``(n,)``
        Median; symmetric error such that ``flux ± 2 flux_err`` holds 95 % of the distribution;
        16 and 84 % quantiles.

    Examples
    --------
    >>> import numpy as np
    >>> from astrotrunc.detection.photometry import flux_summary
    >>> q = np.log(100.0) + 0.01 * np.array([[-2.576, -1.96, -0.994, 0, 0.994, 1.96, 2.576]])
    >>> flux, err, lo, hi = flux_summary(q)
    >>> round(float(flux[0]), 3), round(float(err[0]), 2)  # 1 %: err = 1.96 / 2 sigma
    (100.0, 0.98)
    """
    q = np.asarray(log_quantiles, dtype=np.float64).reshape(-1, len(levels))
    levels = list(levels)
    med = np.exp(q[:, levels.index(0.5)])
    lo, hi = np.exp(q[:, levels.index(0.16)]), np.exp(q[:, levels.index(0.84)])
    # solve P(|F - med| <= 2 e) = 0.95 for e (F = exp(ln F)): that probability on points of
    # log e around a quarter of the 95 % range (`_SUMMARY_GRIDS`), interpolated linearly between
    # the two points that bracket 0.95
    z_levels = special.ndtri(np.asarray(levels, dtype=np.float64))

    def solve(q, med, centre, grid):
        log_e = centre[:, None] + grid
        two_e, m = 2 * np.exp(log_e), med[:, None]
        both = _quantile_cdf(q, z_levels, np.concatenate(  # upper and lower ends in one call
            [np.log(m + two_e), np.log(np.maximum(m - two_e, 1e-300))], axis=1))
        k = log_e.shape[1]
        p = both[:, :k] - np.where(two_e < m, both[:, k:], 0.0)
        i = clip(np.count_nonzero(p < 0.95, axis=1), 1, k - 1)  # p rises with e
        rows = np.arange(len(q))
        p0, p1 = p[rows, i - 1], p[rows, i]
        t = clip((0.95 - p0) / np.maximum(p1 - p0, 1e-12), 0.0, 1.0)
        inside = (p[:, 0] < 0.95) & (p[:, -1] >= 0.95)
        return log_e[rows, i - 1] + t * (log_e[rows, i] - log_e[rows, i - 1]), inside

    at = [levels.index(0.025), levels.index(0.975)] if {0.025, 0.975} <= set(levels) else [0, -1]
    guess = np.log(np.maximum(np.exp(q[:, at[1]]) - np.exp(q[:, at[0]]), 1e-300) / 4)
    log_e, inside = solve(q, med, guess, _SUMMARY_GRIDS[0])
    if not inside.all():
        log_e[~inside] = solve(q[~inside], med[~inside], guess[~inside], _SUMMARY_GRIDS[1])[0]
    e_hi = np.exp(log_e)
    return med, e_hi, lo, hi


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
#: Activations of the `FluxEstimator` network (ReLU is the cheaper one on CPUs).
_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}


def _asinh(x):
    """``torch.asinh`` by ``log`` and ``sqrt`` (3x faster on CPUs) where no value overflows."""
    a = x.abs()
    if torch.onnx.is_in_onnx_export():  # no data-dependent branch, no aten::asinh in ONNX:
        # one logarithm: ln(m + sqrt(m^2 + 1)) for a = m <= 1e18, and ln(2 a) (= asinh(a) to
        # float rounding) beyond, where m stops at 1e18 and a - m takes over (up to 1e38, near
        # float32's largest value; the finder's maps are finite)
        m = a.clamp_max(1e18)
        return torch.sign(x) * torch.log(m + torch.sqrt(m * m + 1) + 2 * (a - m).clamp_max(1e38))
    if a.numel() == 0 or a.max() > 1e18:
        return torch.asinh(x)
    return torch.copysign(torch.log(a + torch.sqrt(a * a + 1)), x)


class _Quantiles(nn.Module):
    """A `FluxEstimator`'s inputs -> increasing quantiles of ``ln F`` (uncalibrated).

    The input scaling, the network and the assembly of the quantiles (the median plus cumulated
    positive gaps) in one module, so that ONNX Runtime runs all of it as one graph. The inference
    copies (``scaled_input=True``) leave the scaling to `scale_cutouts`, in numpy.
    """

    def __init__(self, net, gain, flux_floor, median_index, scaled_input=False):
        super().__init__()
        self.net, self.gain, self.k = net, float(gain), int(median_index)
        self.floor, self.log_floor = float(flux_floor), math.log(flux_floor)
        # the cutouts' first channel arrives as asinh(cutout * gain) already (`scale_cutouts`)
        self.scaled_input = bool(scaled_input)

    def scale_cutouts(self, cutout, channels_last=False):
        """The network's input image of numpy cutouts ``(n, 2, s, s)``: ``asinh(gain *
        cutout)`` and the validity channel, for a copy made with ``scaled_input=True``.
        (``np.arcsinh`` is faster than the same function inside the network, in torch and even
        more in ONNX Runtime.) With ``channels_last``, the array is a ``(n, 2, s, s)`` view of
        ``(n, s, s, 2)`` memory, which torch's channels-last convolutions take without a copy.
        A `_PatchNet` takes its squares ``(n, grid², 2 patch²)`` instead, made of cutouts or of
        the squares ``(n, grid², 2, patch²)`` that `_take_cutouts` gathers for it.
        """
        if isinstance(self.net, _PatchNet):
            n, g, p = len(cutout), self.net.grid, self.net.patch
            squares = np.asarray(cutout)
            if squares.shape[1:] != (g * g, 2, p * p):  # cutouts: cut them here (slower)
                squares = self.net.patches(squares).reshape(n, g * g, 2, p * p)
            image = np.empty((n, g * g, 2, p * p), np.float32)
            np.arcsinh(squares[:, :, 0] * np.float32(self.gain), out=image[:, :, 0])
            image[:, :, 1] = squares[:, :, 1]
            return image.reshape(n, g * g, 2 * p * p)
        if not channels_last:
            image = np.array(cutout, dtype=np.float32)
            np.arcsinh(image[:, 0] * np.float32(self.gain), out=image[:, 0])
            return image
        n, _, h, w = np.shape(cutout)
        image = np.empty((n, h, w, 2), np.float32)
        np.arcsinh(cutout[:, 0] * np.float32(self.gain), out=image[..., 0])
        image[..., 1] = cutout[:, 1]
        return image.transpose(0, 3, 1, 2)

    def forward(self, cutout, offset, matched):
        image = cutout if self.scaled_input else torch.cat(
            [_asinh(cutout[:, :1] * self.gain), cutout[:, 1:]], dim=1)
        base = torch.log(matched.clamp_min(self.floor))
        out = self.net(image, torch.cat([offset, (base - self.log_floor)[:, None]], dim=1))
        k = self.k
        median = base + out[:, k]
        gaps = nn.functional.softplus(out) + 1e-4
        below = median[:, None] - torch.flip(torch.cumsum(torch.flip(gaps[:, :k], [1]), 1), [1])
        above = median[:, None] + torch.cumsum(gaps[:, k + 1:], 1)
        return torch.cat([below, median[:, None], above], dim=1)


class _AvgPool2(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(2)`` of ``n x n`` inputs, exportable to ONNX for every ``n`` (the
    exporter takes only multiples of 2). For even ``n`` (bins that do not overlap) a plain average
    pooling, the same values, several times faster on channels-last CPU tensors; for odd ``n``
    the same (overlapping) bins, as slices, when exported."""

    def __init__(self, n):
        super().__init__(2)
        self.n = int(n)
        self.bins = [(i * n // 2, -(-(i + 1) * n // 2)) for i in range(2)]

    def forward(self, x):
        if self.n % 2 == 0:  # the bins do not overlap: a plain pooling (also much faster on
            return nn.functional.avg_pool2d(x, self.n // 2)  # channels-last CPU tensors)
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        return torch.stack([torch.stack([x[..., a:b, c:d].mean((-2, -1)) for c, d in self.bins],
                                        -1) for a, b in self.bins], -2)


class _CutoutNet(nn.Module):
    """Conv features of a cutout + scalar features -> median and positive quantile gaps.

    Two strided convolutions keep it cheap: the photometry must cost little next to r1. With
    ``strided``, the first, full-resolution convolution is left out too (about 3x cheaper; the
    3x3 pixels at the centre keep their own, unpooled features either way).
    """

    def __init__(self, size, channels, hidden, n_scalars, n_out, activation="silu",
                 strided=False):
        super().__init__()
        c = channels
        act = _ACTIVATIONS[activation]
        first = [] if strided else [nn.Conv2d(2, c, 3, padding=1), act()]
        self.conv = nn.Sequential(
            *first,
            nn.Conv2d(2 if strided else c, c, 3, stride=2, padding=1), act(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), act(),
            _AvgPool2((size + 3) // 4))  # the side after the two strided convolutions
        self.centre = nn.Conv2d(2, c, 3)  # the 3x3 pixels around the position, unpooled
        self.head = nn.Sequential(nn.Linear(8 * c + c + n_scalars, hidden), act(),
                                  nn.Linear(hidden, hidden), act(), nn.Linear(hidden, n_out))
        self.size = size

    def forward(self, image, scalars):
        h = self.size // 2
        # the 3x3 convolution of the 3x3 centre, as one matrix product (cheaper than a conv call)
        centre = nn.functional.linear(image[:, :, h - 1:h + 2, h - 1:h + 2].flatten(1),
                                      self.centre.weight.flatten(1), self.centre.bias)
        feats = torch.cat([self.conv(image).flatten(1), centre, scalars], dim=1)
        return self.head(feats)


class _DenseNet(nn.Module):
    """All pixels of a cutout + scalar features -> median and positive quantile gaps.

    Two hidden layers on the flattened cutout: a few large matrix products, about 6x cheaper on
    CPUs than `_CutoutNet`'s small convolutions for the same detections.
    """

    def __init__(self, size, hidden, n_scalars, n_out, activation="relu"):
        super().__init__()
        act = _ACTIVATIONS[activation]
        self.head = nn.Sequential(nn.Linear(2 * size * size + n_scalars, hidden), act(),
                                  nn.Linear(hidden, hidden), act(), nn.Linear(hidden, n_out))

    def forward(self, image, scalars):
        return self.head(torch.cat([image.flatten(1), scalars], dim=1))


class _PatchNet(nn.Module):
    """Patches of a cutout, each embedded by one shared linear map, + scalar features -> median
    and positive quantile gaps.

    The cutout is cut into non-overlapping ``patch x patch`` squares (the centre one is the 3x3
    pixels around the position for ``patch=3``); each square's pixels and validities go through
    the same dense layer (``channels`` wide), and the head reads every square's features in
    place. All of it is matrix products: two to four times cheaper in torch on CPUs than
    `_CutoutNet`'s small convolutions, and the inference copies take the squares already cut
    (`_take_cutouts`).
    """

    def __init__(self, size, channels, hidden, n_scalars, n_out, activation="relu", patch=3):
        super().__init__()
        if size % patch:
            msg = (f"architecture='patch' needs cutouts whose side 2 half_size + 1 is a multiple "
                   f"of {patch} (half_size 1, 4, 7, 10...), got a side of {size}")
            raise ValueError(msg)
        act = _ACTIVATIONS[activation]
        self.size, self.patch, self.grid = size, patch, size // patch
        self.embed = nn.Sequential(nn.Linear(2 * patch * patch, channels), act())
        self.head = nn.Sequential(nn.Linear(self.grid ** 2 * channels + n_scalars, hidden), act(),
                                  nn.Linear(hidden, hidden), act(), nn.Linear(hidden, n_out))

    def patches(self, image):
        """`_squares` of cutouts ``(n, 2, size, size)``."""
        return _squares(image, self.patch)

    def forward(self, image, scalars):
        squares = self.patches(image) if image.ndim == 4 else image  # (n, 2, s, s) or cut
        # the squares of all cutouts as one matrix: one fused Gemm in ONNX Runtime (a 3-D input
        # gave a MatMul and a separate bias Add: 0.15 ms more per 189 cutouts)
        feats = self.embed(squares.reshape(-1, squares.shape[-1]))
        feats = feats.reshape(-1, self.grid ** 2 * feats.shape[-1])  # (n, squares x channels)
        return self.head(torch.cat([feats, scalars], dim=1))


#: Networks of a `FluxEstimator` (``architecture``).
_ARCHITECTURES = ("conv", "strided", "dense", "patch")


class FluxEstimator(RatioEstimator):
    """Learned photometry: quantiles of ``ln F`` of the source a detection stands for.

    A small network (the shipped one: 69k parameters) reading a cutout of the map around each
    detection; see the module documentation for what ``flux`` means. Train it with `fit_to` (or
    ``Trainer().fit(est, PhotometrySimulations(model, finder, ...))``); the finder's settings
    and detector identity are recorded in it.

    Parameters
    ----------
    detector_id : str
        `~astrotrunc.SourceDetector.identity` of the detector whose detections it was trained on.
    finder_settings : dict, optional
        The finder's `~astrotrunc.NeuralSourceFinder.settings` (recorded, not used).
    exposure, background, normalization : float
        The instrument (as in the detector): the input is ``asinh(exposure × (data - background)
        / scale)``.
    half_size : int
        Cutouts are ``2 half_size + 1`` pixels on a side.
    channels, hidden : int
        Network width.
    activation : {'silu', 'relu'}
        The network's activation.
    architecture : {'conv', 'strided', 'dense', 'patch'}
        ``'conv'``: a convolution of the cutout, two strided ones (``channels`` wide) and a
        dense head; ``'strided'``: the same without the first, full-resolution convolution
        (about 3x cheaper); ``'dense'``: two dense layers (``hidden`` wide) on all pixels of the
        cutout (cheaper still on CPUs, less accurate; ``channels`` is not used); ``'patch'``:
        the cutout cut into 3 x 3 squares, each embedded by one shared dense layer (``channels``
        wide), and the dense head on all of them (matrix products only, two to four times
        cheaper than ``'strided'`` in torch; needs ``half_size`` 1, 4, 7, 10...).
    calibration : dict, optional
        Set by `calibrate` (its settings, bin edges and counts); `None`: uncalibrated.
    flux_floor : float
        The matched-filter flux is clipped to at least this before its log is taken (the
        network's baseline).
    levels : sequence of float
        Quantile levels (`QUANTILE_LEVELS`).

    Examples
    --------
    >>> import numpy as np
    >>> from astrotrunc.detection.photometry import FluxEstimator
    >>> est = FluxEstimator(half_size=4, channels=4, hidden=8)
    >>> q = est.log_quantiles(np.ones((32, 32)), None, [10.0, 20.0], [5.0, 7.0], [3.0, 1.0])
    >>> q.shape, bool(np.all(np.diff(q, axis=1) > 0))
    ((2, 7), True)
    """

    def __init__(self, detector_id="", finder_settings=None, exposure=100.0, background=0.0,
                 normalization=1.0, half_size=7, channels=12, hidden=48, flux_floor=0.1,
                 levels=QUANTILE_LEVELS, activation="silu", calibration=None,
                 architecture="conv"):
        super().__init__()
        levels = tuple(float(v) for v in levels)
        if not levels or any(b <= a for a, b in zip(levels, levels[1:])) or not 0 < levels[0] \
                or not levels[-1] < 1 or not {0.16, 0.5, 0.84} <= set(levels):
            msg = f"levels must increase in (0, 1) and include 0.16, 0.5 and 0.84, got {levels}"
            raise ValueError(msg)
        if int(half_size) < 1 or int(channels) < 1 or int(hidden) < 1:
            msg = (f"half_size, channels and hidden must be >= 1, got {half_size}, {channels}, "
                   f"{hidden}")
            raise ValueError(msg)
        if activation not in _ACTIVATIONS:
            msg = f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}"
            raise ValueError(msg)
        if architecture not in _ARCHITECTURES:
            msg = f"architecture must be one of {_ARCHITECTURES}, got {architecture!r}"
            raise ValueError(msg)
        if not (float(exposure) > 0 and float(flux_floor) > 0 and math.isfinite(exposure)):
            msg = f"exposure and flux_floor must be positive, got {exposure}, {flux_floor}"
            raise ValueError(msg)
        self.detector_id = str(detector_id)
        self.finder_settings = dict(finder_settings or {})
        self.exposure, self.background = float(exposure), float(background)
        self.normalization, self.flux_floor = float(normalization), float(flux_floor)
        self.half_size, self.channels, self.hidden = int(half_size), int(channels), int(hidden)
        self.levels, self.activation = levels, str(activation)
        self.architecture = str(architecture)
        size = 2 * self.half_size + 1
        if self.architecture == "dense":
            self.net = _DenseNet(size, self.hidden, 3, len(levels), self.activation)
        elif self.architecture == "patch":
            self.net = _PatchNet(size, self.channels, self.hidden, 3, len(levels),
                                 self.activation)
        else:
            self.net = _CutoutNet(size, self.channels, self.hidden, 3, len(levels),
                                  self.activation, strided=self.architecture == "strided")
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32))
        self.calibration = None if calibration is None else dict(calibration)
        if self.calibration is not None:
            n_groups = ((len(self.calibration["flux_edges"]) + 1)
                        * (len(self.calibration["crowding_edges"]) + 1))
            # quantile factors, and a flux_err factor where the calibration made one
            n_columns = len(levels) + bool(self.calibration.get("flux_err_factors"))
            self.register_buffer("_calibration", torch.ones(n_groups, n_columns))
            if self.calibration.get("psf_maps"):
                self.register_buffer("_calibration_psf", torch.ones(n_groups, 3))
            lat = self.calibration.get("latitude")
            if lat:
                n_groups = ((len(self.calibration["flux_edges"]) + 1)
                            * (len(lat["crowding_edges"]) + 1) * (len(lat["latitude_edges"]) + 1))
                self.register_buffer("_calibration_lat", torch.ones(n_groups, n_columns))

    @classmethod
    def for_finder(cls, finder, **kwargs) -> "FluxEstimator":
        """An untrained estimator matched to a finder's detector (instrument) and settings.

        Parameters
        ----------
        finder : `~astrotrunc.NeuralSourceFinder`
            The finder.
        **kwargs
            Other `FluxEstimator` arguments.

        Returns
        -------
        `FluxEstimator`
        """
        det = finder.detector
        kwargs.setdefault("flux_floor", float(det.flux_thresholds[0]))
        return cls(detector_id=det.identity, finder_settings=finder.settings,
                   exposure=det.exposure, background=det.background,
                   normalization=det.normalization, **kwargs)

    @classmethod
    def fit_to(cls, model, finder=None, *, n_maps=1500, n_val_maps=150, seed=0, chunk_size=128,
               progress=True, resume=False, calibration_maps=600, psf_calibration_maps=0,
               n_crowding_bins=4, n_latitude_bins=0, latitude_crowding_bins=4, **kwargs):
        """An estimator trained on detections of fresh simulations of ``model`` (the one-liner).

        Parameters
        ----------
        model : `~astrotrunc.PointSourceModel`
            The simulator.
        finder : `~astrotrunc.NeuralSourceFinder` or `~astrotrunc.SourceDetector`, optional
            What "detected" means (the default finder when `None`).
        n_maps, n_val_maps : int
            Training and validation maps (`PhotometrySimulations`).
        seed : int
            Seed of the simulations, the network initialisation and the trainer.
        chunk_size : int
            Maps simulated and detected at once.
        progress : bool
            Progress bars.
        **kwargs
            `FluxEstimator` arguments (``half_size``, ``channels``, ``hidden``, ``activation``,
            ``architecture``) and
            `~astrotrunc.nre.Trainer` arguments (``max_epochs``, ``batch_size``, ``nproc``...).
        resume : bool
            Continue from the trainer's checkpoint (``checkpoint_dir``).
        calibration_maps, psf_calibration_maps : int
            Then `calibrate` on this many new maps (seed ``seed + 1``; 0: not), and the PSF
            errors on that many more.
        n_crowding_bins, n_latitude_bins, latitude_crowding_bins : int
            Crowding bins of the calibration groups, and the latitude groups' ``|b|`` and
            crowding bins (`calibrate`; ``n_latitude_bins=0``: none).

        Returns
        -------
        `FluxEstimator`
            Trained (and calibrated); ``history`` holds the trainer's history.
        """
        # before the training, not after it
        _check_bins(n_crowding_bins, n_latitude_bins, latitude_crowding_bins)
        finder = _detection_finder(finder)
        net_args = {k: kwargs.pop(k) for k in ("half_size", "channels", "hidden", "levels",
                                                   "activation", "architecture")
                    if k in kwargs}
        data = PhotometrySimulations(model, finder, n_maps, n_val_maps, seed=seed,
                                     half_size=net_args.get("half_size", 7),
                                     chunk_size=chunk_size, progress=progress)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            est = cls.for_finder(finder, **net_args)
        kwargs.setdefault("seed", seed)
        kwargs.setdefault("progress", progress)
        est.history = Trainer(**kwargs).fit(est, data, resume=resume)
        if calibration_maps:
            est.calibrate(model, finder, n_maps=calibration_maps, seed=seed + 1,
                          psf_maps=psf_calibration_maps, n_crowding_bins=n_crowding_bins,
                          n_latitude_bins=n_latitude_bins,
                          latitude_crowding_bins=latitude_crowding_bins,
                          chunk_size=chunk_size, progress=progress)
        return est

    @property
    def config(self) -> dict:
        """The constructor arguments (JSON-serialisable)."""
        return dict(detector_id=self.detector_id, finder_settings=self.finder_settings,
                    exposure=self.exposure, background=self.background,
                    normalization=self.normalization, half_size=self.half_size,
                    channels=self.channels, hidden=self.hidden, flux_floor=self.flux_floor,
                    levels=list(self.levels), activation=self.activation,
                    calibration=self.calibration, architecture=self.architecture)

    # -- the network -------------------------------------------------------------------------
    def _scale(self):
        # counts of a source of flux ~ flux_floor in its brightest pixel: a natural asinh knee
        return max(self.exposure * self.normalization * self.flux_floor * 0.1, 1e-6)

    def forward(self, batch) -> torch.Tensor:
        """Increasing quantiles of ``ln F`` ``(n, len(levels))`` of a batch dict (uncalibrated).

        ``batch`` holds ``"cutout"`` ``(n, 2, s, s)`` (map minus background, validity),
        ``"offset"`` ``(n, 2)`` (sub-pixel position) and ``"matched"`` ``(n,)`` (matched-filter
        flux, detector units). `log_quantiles` applies the calibration (`calibrate`).
        """
        return self._quantiles(self.net)(batch["cutout"], batch["offset"], batch["matched"])

    def _quantiles(self, net, scaled_input=False):
        """`_Quantiles` of ``net`` (this estimator's network or a copy of it)."""
        return _Quantiles(net, self.exposure / self._scale(), self.flux_floor,
                          self.levels.index(0.5), scaled_input)

    @property
    def _patch(self):
        """The side of the squares a `_PatchNet` takes (`_take_cutouts`), else `None`."""
        return self.net.patch if isinstance(self.net, _PatchNet) else None

    def _inference_net(self):
        """`_Quantiles` of the network's channels-last copy, for inference (rebuilt when the
        weights change); it takes cutouts scaled by its ``scale_cutouts``."""
        def build():
            net = copy.deepcopy(self.net).eval().to(memory_format=torch.channels_last)
            for p in net.parameters():
                p.requires_grad_(False)
            for m in net.modules():
                if isinstance(m, nn.ReLU):
                    m.inplace = True
            return self._quantiles(net, scaled_input=True).eval()

        return self._cached("_inference_copy", self._weights_key(), build)

    def _onnx_net(self, runtime="onnxruntime"):
        """`_inference_net` as an ONNX Runtime or OpenVINO network (``runtime``; rebuilt
        likewise)."""
        def build():
            size = 2 * self.half_size + 1
            net = self._inference_net()
            cutout = torch.from_numpy(net.scale_cutouts(np.zeros((1, 2, size, size))))
            example = (cutout, torch.zeros(1, 2), torch.ones(1))
            # one thread: a few hundred cutouts are too little work to share (and a second
            # thread pool would spin against the detector's)
            return OnnxNetwork(net, example, threads=1, runtime=runtime)

        return self._cached("_onnx_copy", (self._weights_key(), runtime), build)

    def loss(self, batch) -> torch.Tensor:
        """Pinball (quantile) loss of ``batch["log_flux"]`` (true ``ln F``), mean over levels."""
        q = self(batch)
        diff = batch["log_flux"][:, None] - q
        tau = self._levels.to(q.dtype)
        return torch.maximum(tau * diff, (tau - 1) * diff).mean()

    # -- inference -------------------------------------------------------------------------
    def log_quantiles(self, data, bad, x, y, matched, *, b=None, batch_size=4096):
        """Predicted quantiles of ``ln F`` (detector flux units) of detections at (x, y).

        Parameters
        ----------
        data : 2-D array
            The map (detector flux units).
        bad : 2-D bool array or None
            Bad pixels (NaN and infinite pixels are bad too).
        x, y : arrays
            Detection positions (pixels, 0-based).
        matched : array
            Matched-filter fluxes (`~astrotrunc.SourceDetector.estimate_flux`).
        b : array or `~astropy.units.Quantity`, optional
            Galactic latitudes of the detections (deg when a plain array). With a latitude
            calibration (`calibrate`'s ``n_latitude_bins``) its groups, which include ``|b|``, are
            used where b is finite; elsewhere, and without ``b``, the crowding groups.
        batch_size : int
            Detections per network call.

        Returns
        -------
        `numpy.ndarray` ``(n, len(levels))``
        """
        abs_b = _abs_latitude(b)
        if abs_b is not None and abs_b.ndim and abs_b.shape != np.shape(np.atleast_1d(x)):
            msg = f"b must be a scalar or one latitude per position, got shape {abs_b.shape}"
            raise ValueError(msg)
        return self._predict(data, bad, x, y, matched, batch_size, abs_b=abs_b)[0]

    def _predict(self, data, bad, x, y, matched, batch_size=4096, backend="torch", abs_b=None):
        """Calibrated quantiles ``(n, k)``, the crowding ``(n,)`` and the calibration's
        ``flux_err`` factors ``(n,)`` of detections at (x, y) (absolute Galactic latitude
        ``abs_b`` in deg, for the latitude calibration groups)."""
        x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        if len(x) == 0:
            return np.zeros((0, len(self.levels))), np.zeros(0), np.ones(0)
        padded = padded_map(data, bad, self.half_size, self.background)
        matched = np.nan_to_num(np.asarray(matched, np.float32), nan=0.0, posinf=0.0)
        q, crowd = np.empty((len(x), len(self.levels))), np.empty(len(x), np.float32)
        for i in range(0, len(x), batch_size):  # a few MB of cutouts at a time on large maps
            chunk = slice(i, i + batch_size)
            cut, offset = _take_cutouts(padded, x[chunk], y[chunk], self.half_size,
                                        self._patch)
            q[chunk] = self._raw_log_quantiles(cut, offset, matched[chunk], batch_size, backend)
            crowd[chunk] = _crowding(cut)
        if self.calibration is None:
            return q, crowd, np.ones(len(x))
        q, err_factor = self._calibrated(q, crowd, None if abs_b is None else np.broadcast_to(
            np.asarray(abs_b, float), len(x)))
        return q, crowd, err_factor

    def _raw_log_quantiles(self, cut, offset, matched, batch_size=4096, backend="torch"):
        """The network's quantiles ``(n, k)`` (float64) of cutouts (or the squares
        `_take_cutouts` gathers for a `_PatchNet`), offsets and matched fluxes; the network runs
        in torch or (``backend="onnxruntime"`` or ``"openvino"``) in `flux_runtime`'s runtime."""
        out = np.empty((len(cut), len(self.levels)))
        net = self._inference_net()
        scale = net.scale_cutouts  # numpy's arcsinh: faster than inside the network
        if backend != "torch":  # numpy in and out, no tensors
            session = self._onnx_net(flux_runtime(backend))
            for i in range(0, len(cut), batch_size):
                chunk = slice(i, i + batch_size)
                out[chunk] = session.run(scale(cut[chunk]), offset[chunk], matched[chunk])
            return out
        device = self._levels.device
        with torch.inference_mode():  # inference mode: a third faster
            for i in range(0, len(cut), batch_size):
                chunk = slice(i, i + batch_size)
                out[chunk] = net(*(torch.as_tensor(a, device=device) for a in (
                    scale(cut[chunk], channels_last=True), offset[chunk],
                    matched[chunk]))).cpu().numpy()
        return out

    # -- calibration -----------------------------------------------------------------------
    def _groups(self, median, crowding, abs_b=None):
        """Calibration group of each detection: predicted-flux bin x crowding bin, or with
        ``abs_b`` (absolute Galactic latitude, deg) the latitude calibration's flux x crowding x
        ``|b|``."""
        edges = self.calibration if abs_b is None else self.calibration["latitude"]
        n_crowd = len(edges["crowding_edges"]) + 1
        # np.digitize's bins, by searchsorted (its cost is most of digitize's); NaN -> 0 as
        # np.nan_to_num would (infinities fall in the end bins either way)
        groups = (np.searchsorted(np.log(self.calibration["flux_edges"]), median, "right")
                  * n_crowd + np.searchsorted(edges["crowding_edges"], _nan_to_0(crowding),
                                              "right"))
        if abs_b is None:
            return groups
        return groups * (len(edges["latitude_edges"]) + 1) \
            + np.searchsorted(edges["latitude_edges"], _nan_to_0(abs_b), "right")

    def _factor_arrays(self):
        """The calibration factors (crowding groups, latitude groups or None) as float64
        arrays, kept until a table is replaced or changed."""
        tables = (self._calibration, getattr(self, "_calibration_lat", None))
        versions = tuple(None if t is None else t._version for t in tables)
        cached = self.__dict__.get("_factor_cache")
        if cached is None or cached[1] != versions \
                or any(a is not b for a, b in zip(cached[0], tables)):
            arrays = tuple(None if t is None else t.detach().cpu().double().numpy()
                           for t in tables)
            cached = self.__dict__["_factor_cache"] = (tables, versions, arrays)
        return cached[2]

    def _calibrated(self, q, crowding, abs_b=None):
        """Quantiles with each gap to the median scaled by its group's factor (then sorted),
        and the factor of each row's ``flux_err`` (1 where the calibration has none).

        Rows with a finite ``abs_b`` take the latitude calibration's factors where there is one.
        """
        k = self.levels.index(0.5)
        has_b = (np.isfinite(abs_b) if abs_b is not None and "latitude" in self.calibration
                 else np.zeros(len(q), bool))
        factors, factors_lat = self._factor_arrays()
        if has_b.all() and len(q):  # every row has a latitude: its groups only
            scale = factors_lat[self._groups(q[:, k], crowding, abs_b)]
        else:
            scale = factors[self._groups(q[:, k], crowding)]
            if has_b.any():
                scale[has_b] = factors_lat[self._groups(q[has_b, k], crowding[has_b],
                                                        abs_b[has_b])]
        n_levels = len(self.levels)
        err_factor = scale[:, n_levels] if scale.shape[1] > n_levels else np.ones(len(q))
        return _scaled(q, scale[:, :n_levels], k), err_factor

    def psf_errors(self, flux, fit_err, q, crowding):
        """``flux_err, flux_lo, flux_hi`` of PSF-fit fluxes: fit error + learned confusion term.

        The learned distances from the median to the 16/84 % quantiles and the learned
        ``flux_err`` (relative, times the flux), in quadrature with the fit error; scaled per
        calibration group by the factors `calibrate` fitted on PSF photometry of simulations
        (``psf_maps``), so that ``[flux_lo, flux_hi]`` holds the true flux 68 % of the time and
        ``flux ± 2 flux_err`` 95 % (a negative factor, where the PSF flux is biased beyond a
        quantile, is taken as 0 so that the interval holds the flux). Without those factors
        (``psf_maps=0``), the PSF flux's offset from the learned median is added as well
        (conservative).

        Parameters
        ----------
        flux, fit_err : arrays ``(n,)``
            PSF fluxes and their fit errors (`psf_photometry`).
        q, crowding : arrays
            Calibrated learned quantiles of ``ln F`` ``(n, k)`` and crowding ``(n,)`` of the
            same detections.

        Returns
        -------
        flux_err, flux_lo, flux_hi : arrays ``(n,)``
        """
        med, d_err, d_lo, d_hi = self._psf_distances(flux, fit_err, q)
        factors = getattr(self, "_calibration_psf", None) if self.calibration else None
        if factors is None:  # uncalibrated: hold the learned interval too
            shift = np.abs(flux - med)
            return shift + d_err, flux - shift - d_lo, flux + shift + d_hi
        f = factors.detach().cpu().double().numpy()[self._groups(np.log(med), crowding)]
        # a factor below 0 (the PSF flux biased beyond the quantile, as in crowded fields) is
        # taken as 0: the interval always holds the PSF flux (that side is then conservative)
        f = np.maximum(f, 0.0)
        return f[:, 0] * d_err, flux - f[:, 1] * d_lo, flux + f[:, 2] * d_hi

    def _psf_distances(self, flux, fit_err, q):
        """Learned median and the fit error ⊕ learned flux_err, lower and upper distances."""
        med, err, lo, hi = flux_summary(q, self.levels)
        scale = np.maximum(np.abs(flux), med)
        return (med, np.hypot(fit_err, scale * err / med),
                np.hypot(fit_err, scale * (1 - lo / med)),
                np.hypot(fit_err, scale * (hi / med - 1)))

    def calibrate(self, model, finder=None, *, n_maps=600, seed=1, flux_edges=(10.0, 100.0),
                  n_crowding_bins=4, n_latitude_bins=0, latitude_crowding_bins=4, min_group=200,
                  psf_maps=0, chunk_size=128, progress=True):
        """Calibrate the predicted quantiles on fresh simulations (conformal, per group).

        Split-conformal recalibration of quantile regression (Romano et al. 2019, "Conformalized
        quantile regression"; Kuleshov et al. 2018), per group (Mondrian): the detections of
        ``n_maps`` new maps (not the training ones) are grouped by predicted flux (bins with
        ``flux_edges``) and by local crowding (`_crowding`: the median of the cutout, the level
        of the unresolved sources around the detection; ``n_crowding_bins`` bins of equal
        counts); in each group every quantile's gap to the median is scaled by the factor that
        makes its level hold exactly on those detections. The median is not moved. Then, in each
        group, ``flux_err`` (`flux_summary` of the calibrated quantiles) is scaled by the factor
        that makes ``flux ± 2 flux_err`` hold the true flux on 95 % of those detections
        (``calibration["flux_err_factors"]``). A group with fewer than ``min_group``
        detections takes the factors of its whole flux bin (or 1).

        With ``n_latitude_bins``, a second set of factors is made for catalogs whose map has a
        celestial WCS: groups of predicted flux x crowding (``latitude_crowding_bins``) x
        absolute Galactic latitude of the detection (``n_latitude_bins`` bins of equal counts). The
        crowding of the cutout does not tell everything the latitude does about a source's
        surroundings (in the paper's model, a Galactic disk, the 68 % intervals of in-plane
        detections held 66 % with the crowding groups alone and 68 % with these).

        Parameters
        ----------
        model : `~astrotrunc.PointSourceModel`
            The simulator (that of the training).
        finder : `~astrotrunc.NeuralSourceFinder`, optional
            What "detected" means (the training's: the default finder when `None`).
        n_maps : int
            Calibration maps.
        seed : int
            Their seed (use one the training did not).
        flux_edges : sequence of float
            Edges of the predicted-flux bins (detector units).
        n_crowding_bins : int
            Crowding bins.
        n_latitude_bins, latitude_crowding_bins : int
            ``|b|`` bins and crowding bins of the latitude groups (``n_latitude_bins=0``: none). The
            latitudes are those of the detections' positions in ``model.wcs``.
        min_group : int
            As above (for the PSF factors, a quarter of it).
        psf_maps : int
            Also calibrate `psf_errors` on photutils PSF photometry of this many more maps
            (seed ``seed + 1``; a few seconds per map); 0: not.
        chunk_size, progress
            Maps simulated at once; progress bar.

        Returns
        -------
        `FluxEstimator`
            ``self``, calibrated; `calibration` records the settings, edges and counts.
        """
        edges = np.asarray(flux_edges, dtype=float)
        if edges.ndim != 1 or np.any(edges <= 0) or np.any(np.diff(edges) <= 0):
            msg = f"flux_edges must increase and be positive, got {np.ravel(flux_edges).tolist()}"
            raise ValueError(msg)
        _check_bins(n_crowding_bins, n_latitude_bins, latitude_crowding_bins)
        finder = _detection_finder(finder)
        rows = _matched_detections(model, finder, int(n_maps), seed, self.half_size,
                                   chunk_size, progress)
        if len(rows["log_flux"]) < min_group:
            msg = (f"{len(rows['log_flux'])} matched detections in {n_maps} maps: too few to "
                   "calibrate; simulate more maps")
            raise ValueError(msg)
        q = self._raw_log_quantiles(rows["cutout"], rows["offset"], rows["matched"])
        crowd = _crowding(rows["cutout"])
        k = self.levels.index(0.5)
        self.calibration = dict(flux_edges=[float(v) for v in flux_edges],
                                crowding_edges=_equal_count_edges(crowd, n_crowding_bins),
                                n_maps=int(n_maps), seed=int(seed), min_group=int(min_group),
                                flux_err_factors=True)
        n_flux = len(self.calibration["flux_edges"]) + 1
        n_inner = int(n_crowding_bins)
        groups = self._groups(q[:, k], crowd)
        scale = _calibration_table(q, rows["log_flux"], self.levels, groups, n_flux * n_inner,
                                   n_inner, min_group)
        self.calibration["counts"] = np.bincount(groups, minlength=n_flux * n_inner).tolist()
        self.calibration["psf_maps"] = 0  # set by _calibrate_psf once its factors exist
        self.register_buffer("_calibration", torch.as_tensor(scale, dtype=torch.float32))
        for name in ("_calibration_psf", "_calibration_lat"):  # an earlier calibration's
            self._buffers.pop(name, None)
        if n_latitude_bins:
            abs_b = rows["abs_b"]
            self.calibration["latitude"] = dict(
                crowding_edges=_equal_count_edges(crowd, latitude_crowding_bins),
                latitude_edges=_equal_count_edges(abs_b, n_latitude_bins))
            n_inner = int(latitude_crowding_bins) * int(n_latitude_bins)
            groups = self._groups(q[:, k], crowd, abs_b)
            scale = _calibration_table(q, rows["log_flux"], self.levels, groups,
                                       n_flux * n_inner, n_inner, min_group)
            self.calibration["latitude"]["counts"] = np.bincount(
                groups, minlength=n_flux * n_inner).tolist()
            self.register_buffer("_calibration_lat", torch.as_tensor(scale, dtype=torch.float32))
        self.__dict__.pop("_tensor_list", None)
        if psf_maps:
            self._calibrate_psf(model, finder, int(psf_maps), int(seed) + 1,
                                max(int(min_group) // 4, 1), progress)
        return self

    def _calibrate_psf(self, model, finder, n_maps, seed, min_group, progress):
        """The `psf_errors` factors (per group: flux_err, lower, upper) from PSF photometry."""
        from tqdm.auto import tqdm

        from ..completeness import match_sources

        groups, dist = [], []  # distance of the truth in units of d_err, d_lo, d_hi
        sims = model.simulate(n_maps, seed=seed)
        for i in tqdm(range(n_maps), desc="PSF photometry", unit="map",
                      disable=None if progress else True):
            data = sims.maps[i].numpy().astype(np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # maps without detections
                cat, segm = finder(data, return_segmentation=True)
            if cat is None:
                continue
            arrays = [a[i].numpy() for a in (sims.flux, sims.x, sims.y, sims.in_map)]
            detected = match_sources(segm.data[None], *(a[None] for a in arrays))[0]
            row, src = _rows_of_sources(segm, detected, arrays[1], arrays[2])
            x, y = cat["x_centroid"].value, cat["y_centroid"].value
            matched = finder.detector.estimate_flux(data, x, y)
            q, crowd, _ = self._predict(data, None, x, y, matched[0])
            flux, fit_err = psf_photometry(data, None, x, y, finder.detector)
            med, d_err, d_lo, d_hi = (a[row] for a in self._psf_distances(flux, fit_err, q))
            true, f = arrays[0][src], flux[row]
            dist.append(np.stack([np.abs(true - f) / (2 * d_err), (f - true) / d_lo,
                                  (true - f) / d_hi], 1))
            groups.append(self._groups(np.log(med), crowd[row]))
        if not groups:
            msg = f"no detection in the {n_maps} PSF calibration maps; simulate more maps"
            raise ValueError(msg)
        groups, dist = np.concatenate(groups), np.concatenate(dist)
        n_crowd = len(self.calibration["crowding_edges"]) + 1
        levels = np.array([0.95, 0.84, 0.84])
        factors = _group_quantiles(dist, levels, groups, len(self.calibration["counts"]), n_crowd,
                                   min_group)
        self.calibration.update(psf_maps=n_maps, psf_seed=seed, psf_detections=len(groups))
        self.register_buffer("_calibration_psf", torch.as_tensor(factors, dtype=torch.float32))
        self.__dict__.pop("_tensor_list", None)

    def check_detector(self, detector):
        """Warn (`~astrotrunc.AstrotruncWarning`) when ``detector`` is not the trained-for one."""
        from ..exceptions import AstrotruncWarning

        if self.detector_id and detector.identity != self.detector_id:
            warnings.warn(f"this flux estimator was trained on detections of detector "
                          f"{self.detector_id}, not {detector.identity}: its fluxes and errors "
                          "are not calibrated for it; retrain it (FluxEstimator.fit_to)",
                          AstrotruncWarning, stacklevel=3)

    @classmethod
    def load_default(cls) -> "FluxEstimator":
        """The flux estimator shipped for the default detector and finder.

        Returns
        -------
        `FluxEstimator`
        """
        return cls.load_shipped(_DEFAULT_PHOTOMETRY)


@functools.lru_cache(maxsize=1)
def default_photometry() -> FluxEstimator:
    """The shipped `FluxEstimator` (loaded once per process).

    Returns
    -------
    `FluxEstimator`
    """
    return FluxEstimator.load_default()


# ----------------------------------------------------------------------------------------------
# Training data
# ----------------------------------------------------------------------------------------------
def _detection_finder(finder):
    """The finder whose detections are matched (the default one, without photometry, if None)."""
    from .finder import NeuralSourceFinder, as_finder

    return NeuralSourceFinder(flux_method="matched") if finder is None else as_finder(finder)


def _rows_of_sources(segm, detected, x, y):
    """Catalog rows and the true sources they stand for, from `match_sources`' labels of one map.

    Parameters
    ----------
    segm : `~photutils.segmentation.SegmentationImage`
        The map's regions (catalog row ``j`` is ``segm.labels[j]``).
    detected : bool array ``(n_max,)``
        `~astrotrunc.completeness.match_sources` of the map's true sources.
    x, y : arrays ``(n_max,)``
        True source positions (pixels).

    Returns
    -------
    row, source : int arrays
        Catalog row ``row[k]`` stands for true source ``source[k]``.
    """
    ny, nx = segm.data.shape
    src = np.nonzero(detected)[0]
    region = segm.data[nearest_pixel(y[src], ny), nearest_pixel(x[src], nx)]
    return np.searchsorted(segm.labels, region), src


def _matched_detections(model, finder, n_maps, seed, half_size, chunk_size=128, progress=True):
    """Every detection of ``n_maps`` maps matched to its true source (dict of arrays).

    Detection ``j`` of a map stands for the source `~astrotrunc.completeness.match_sources`
    gives it (the brightest true source centred in its region); unmatched detections are left
    out. Also returns the true source's ``b``, the absolute Galactic latitude of the detection's
    position (``abs_b``, deg) and the map index of each row.
    """
    from tqdm.auto import tqdm

    from ..completeness import match_sources
    from .catalog import peak_centroids

    det, sky_wcs = finder.detector, celestial_wcs(model.wcs)
    cols = {k: [] for k in ("cutout", "offset", "matched", "log_flux", "flux", "b", "abs_b",
                            "map")}
    n_det = n_matched = 0
    bar = tqdm(total=int(n_maps), desc="matching detections", unit="map",
               disable=None if progress else True)
    start = 0
    for sims in model.iter_simulate(int(n_maps), seed=seed, chunk_size=chunk_size):
        maps = sims.maps.numpy().astype(np.float64)
        log_odds = finder.log_odds_batch(sims.maps)
        segm = np.zeros(maps.shape, np.int32)
        segms = [finder.segment(lo) for lo in log_odds]
        for i, s in enumerate(segms):
            if s is not None:
                segm[i] = s.data
        flux, x, y, valid = (a.numpy() for a in (sims.flux, sims.x, sims.y, sims.in_map))
        d = match_sources(segm, flux, x, y, valid)
        for i, s in enumerate(segms):
            if s is None:
                continue
            with np.errstate(over="ignore"):
                odds = np.exp(np.clip(log_odds[i], -700, 700))
            px, py = peak_centroids(odds, s)
            n_det += len(px)
            row, src = _rows_of_sources(s, d[i], x[i], y[i])
            n_matched += len(row)
            mflux, _ = det.estimate_flux(maps[i], px[row], py[row])
            cut, off = _cutouts(maps[i], None, px[row], py[row], half_size, det.background)
            cols["cutout"].append(cut)
            cols["offset"].append(off)
            cols["matched"].append(mflux.astype(np.float32))
            cols["log_flux"].append(np.log(flux[i, src]).astype(np.float32))
            cols["flux"].append(flux[i, src])
            cols["b"].append(sims.b.numpy()[i, src])
            cols["abs_b"].append(_abs_latitude(
                sky_wcs.pixel_to_world(px[row], py[row]).galactic.b))
            cols["map"].append(np.full(len(src), start + i))
        start += len(sims)
        bar.update(len(sims))
    bar.close()
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    out["n_detections"], out["n_matched"] = n_det, n_matched
    return out


class PhotometrySimulations:
    """`FluxEstimator` training data as a batch source of `~astrotrunc.nre.Trainer.fit`.

    Every detection of ``n_maps + n_val_maps`` simulated maps is matched to its true source
    (`~astrotrunc.completeness.match_sources`: the brightest true source centred in its region),
    once, at construction; detections of the last ``n_val_maps`` maps are the validation set.

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`
        The simulator.
    finder : `~astrotrunc.NeuralSourceFinder` or `~astrotrunc.SourceDetector`, optional
        What "detected" means (`None`: the shipped detector with default settings).
    n_maps, n_val_maps : int
        Training and validation maps.
    seed : int
        Seed of the simulations and of the batch order.
    half_size : int
        Cutout half size (that of the `FluxEstimator`).
    chunk_size : int
        Maps simulated and detected at once.
    progress : bool
        Progress bar.

    Attributes
    ----------
    train, val : dict of `torch.Tensor`
        ``cutout, offset, matched, log_flux``.
    matched_fraction : float
        Fraction of the detections matched to a true source.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel
    >>> from astrotrunc.detection.photometry import PhotometrySimulations
    >>> data = PhotometrySimulations(PointSourceModel.paper(), None, 2, 1, progress=False)
    >>> sorted(data.train)
    ['cutout', 'log_flux', 'matched', 'offset']
    """

    checked = True  # finite by construction

    def __init__(self, model, finder=None, n_maps=1500, n_val_maps=150, *, seed=0, half_size=7,
                 chunk_size=128, progress=True):
        if int(n_maps) < 1 or int(n_val_maps) < 1:
            msg = f"n_maps and n_val_maps must be at least 1, got {n_maps}, {n_val_maps}"
            raise ValueError(msg)
        self.finder = _detection_finder(finder)
        self.seed = int(seed)
        rows = _matched_detections(model, self.finder, int(n_maps) + int(n_val_maps), seed,
                                   int(half_size), chunk_size, progress)
        self.matched_fraction = rows["n_matched"] / max(rows["n_detections"], 1)
        is_val = rows["map"] >= int(n_maps)
        keys = ("cutout", "offset", "matched", "log_flux")
        self.train = {k: torch.as_tensor(rows[k][~is_val]) for k in keys}
        self.val = {k: torch.as_tensor(rows[k][is_val]) for k in keys}
        if len(self.train["log_flux"]) < 2 or len(self.val["log_flux"]) < 1:
            msg = (f"too few matched detections ({len(rows['log_flux'])}) to train and validate; "
                   "simulate more maps")
            raise ValueError(msg)

    def __repr__(self):
        return (f"PhotometrySimulations({len(self.train['log_flux'])} training and "
                f"{len(self.val['log_flux'])} validation detections, {self.finder!r})")

    def _take(self, data, idx, batch_size):
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield {k: v[j] for k, v in data.items()}

    def train_batches(self, batch_size, epoch):
        """Shuffled batches of the training detections (order set by seed and epoch)."""
        gen = torch.Generator().manual_seed(self.seed * 100003 + int(epoch))
        n = len(self.train["log_flux"])
        return self._take(self.train, torch.randperm(n, generator=gen), batch_size)

    def val_batches(self, batch_size):
        """Batches of the validation detections."""
        return self._take(self.val, torch.arange(len(self.val["log_flux"])), batch_size)

    def n_batches(self, batch_size):
        """Training batches per epoch."""
        return -(-len(self.train["log_flux"]) // batch_size)


# ----------------------------------------------------------------------------------------------
# The catalog's flux columns
# ----------------------------------------------------------------------------------------------
def resolve_photometry(detector, flux_method=None, photometry=None):
    """A finder's ``(flux_method, photometry)`` from its arguments (validated).

    Parameters
    ----------
    detector : `~astrotrunc.SourceDetector`
        The finder's detector.
    flux_method : {'neural', 'psf', 'matched'}, optional
        `None`: ``'neural'`` when a flux estimator for ``detector`` is available, ``'matched'``
        otherwise.
    photometry : `FluxEstimator`, optional
        Given: used (with a warning if it was trained for another detector). `None`: the
        shipped estimator when it was trained for ``detector``.

    Returns
    -------
    flux_method : str
    photometry : `FluxEstimator` or None

    Raises
    ------
    ValueError
        An unknown method, or ``'neural'`` with no estimator for this detector.
    TypeError
        ``photometry`` is not a `FluxEstimator`.
    """
    from ..exceptions import AstrotruncWarning

    if flux_method is not None and flux_method not in FLUX_METHODS:
        msg = f"flux_method must be one of {FLUX_METHODS} or None, got {flux_method!r}"
        raise ValueError(msg)
    if photometry is not None:
        if not isinstance(photometry, FluxEstimator):
            msg = f"photometry must be a FluxEstimator, got {type(photometry).__name__}"
            raise TypeError(msg)
        photometry.check_detector(detector)
    elif flux_method != "matched":
        shipped = default_photometry()
        if shipped.detector_id == detector.identity:
            photometry = shipped
    if photometry is None:
        if flux_method == "neural":
            msg = (f"flux_method='neural' needs a FluxEstimator trained on detections of this "
                   f"detector ({detector.identity}); train one (FluxEstimator.fit_to, astrotrunc "
                   "train photometry) and pass it as photometry=, or use flux_method='matched'")
            raise ValueError(msg)
        if flux_method == "psf":
            warnings.warn("no FluxEstimator for this detector: the 'psf' flux errors are "
                          "photutils' fit errors alone and do not include confusion",
                          AstrotruncWarning, stacklevel=4)
    method = flux_method or ("neural" if photometry is not None else "matched")
    return method, (photometry if method != "matched" else None)


def measure_fluxes(method, data, bad, x, y, detector, photometry=None, *, matched=None,
                   backend="torch", b=None):
    """The catalog's ``flux, flux_err, flux_lo, flux_hi`` (detector units) by one method.

    Parameters
    ----------
    method : {'neural', 'psf', 'matched'}
        ``'neural'``: the `FluxEstimator`'s median, 95 %-symmetric error and 68 % interval;
        ``'psf'``: `psf_photometry` with `FluxEstimator.psf_errors` (the fit error and the
        learned confusion term, calibrated) when ``photometry`` is given, the fit error alone
        otherwise; ``'matched'``: the matched-filter flux and its Poisson error (no confusion).
    data, bad : 2-D arrays
        The map (detector units) and its bad pixels.
    x, y : arrays
        Positions (pixels).
    detector : `~astrotrunc.SourceDetector`
        The detector (instrument).
    photometry : `FluxEstimator`, optional
        Required by ``'neural'``.
    matched : tuple of arrays, optional
        Precomputed ``detector.estimate_flux(data, x, y, bad)``.
    backend : {'torch', 'openvino', 'onnxruntime', 'auto'}
        Where the flux estimator's network runs (``'auto'``: OpenVINO or ONNX Runtime when one
        is installed and the estimator is on the CPU; under ``'openvino'`` the network runs in
        ONNX Runtime where that is installed, faster on these small inputs).
    b : array or `~astropy.units.Quantity`, optional
        Galactic latitudes of the positions (deg when plain): ``'neural'`` then uses the
        estimator's latitude calibration groups, where it has them (`FluxEstimator.calibrate`).

    Returns
    -------
    flux, flux_err, flux_lo, flux_hi : arrays
    """
    if matched is None:
        matched = detector.estimate_flux(data, x, y, bad)
    m_flux, m_err = (np.asarray(a, dtype=np.float64) for a in matched)
    if method == "matched":
        return m_flux, m_err, m_flux - m_err, m_flux + m_err
    if method not in ("neural", "psf"):
        msg = f"method must be one of {FLUX_METHODS}, got {method!r}"
        raise ValueError(msg)
    if method == "neural" and photometry is None:
        msg = "method='neural' needs the flux estimator: pass photometry (a FluxEstimator)"
        raise ValueError(msg)
    q = crowding = None
    if photometry is not None:  # the PSF factors were calibrated on the crowding groups' q
        backend = check_backend(backend, photometry._levels.device)
        q, crowding, err_factor = photometry._predict(
            data, bad, x, y, m_flux, backend=backend,
            abs_b=_abs_latitude(b) if method == "neural" else None)
    if method == "neural":
        flux, err, lo, hi = flux_summary(q, photometry.levels)
        return flux, err * err_factor, lo, hi
    flux, fit_err = psf_photometry(data, bad, x, y, detector)
    if photometry is None:
        return flux, fit_err, flux - fit_err, flux + fit_err
    return (flux, *photometry.psf_errors(flux, fit_err, q, crowding))


# ----------------------------------------------------------------------------------------------
# The photutils path
# ----------------------------------------------------------------------------------------------
def psf_photometry(data, bad, x, y, detector, *, fit_half_size=3, min_separation=None):
    """photutils `~photutils.psf.PSFPhotometry` fluxes at fixed positions, grouped sources.

    The PSF model is the detector's own PSF stamp (`~photutils.psf.ImagePSF`), so that it holds
    for any instrument a detector is trained for; sources closer than ``min_separation`` are fit
    simultaneously (`~photutils.psf.SourceGrouper`); positions are held fixed at r1's.

    Parameters
    ----------
    data : 2-D array
        The map (detector flux units).
    bad : 2-D bool array or None
        Bad pixels (masked in the fit).
    x, y : arrays
        Positions (pixels, 0-based).
    detector : `~astrotrunc.SourceDetector`
        Gives the PSF stamp, normalisation, background and exposure.
    fit_half_size : int
        The fit uses ``2 fit_half_size + 1`` pixels on a side around each source.
    min_separation : float, optional
        Grouping distance (pixels); ``2 fit_half_size + 1`` by default.

    Returns
    -------
    flux, flux_err : arrays
        Fitted fluxes and photutils' fit errors (Poisson pixel errors), detector units.
    """
    from astropy.table import QTable
    from photutils.psf import ImagePSF, PSFPhotometry, SourceGrouper

    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    if len(x) == 0:
        return np.zeros(0), np.zeros(0)
    data = np.asarray(data, dtype=np.float64)
    bad = ~np.isfinite(data) if bad is None else (np.asarray(bad, bool) | ~np.isfinite(data))
    stamp = detector.psf_stamp.cpu().numpy().astype(np.float64)
    stamp = stamp / stamp.sum()
    psf = ImagePSF(stamp, flux=1.0, x_0=0.0, y_0=0.0)
    psf.x_0.fixed = psf.y_0.fixed = True
    fit_shape = 2 * int(fit_half_size) + 1
    sep = float(min_separation) if min_separation is not None else float(fit_shape)
    counts = np.clip(np.where(bad, 0.0, data), 0, None) * detector.exposure
    # Poisson error of each pixel in data units (at least that of one count)
    error = np.sqrt(np.maximum(counts, 1.0)) / detector.exposure
    init = QTable({"x": x, "y": y,
                   "flux": np.maximum(detector.estimate_flux(data, x, y, bad)[0], 1e-3)
                   * detector.normalization})
    phot = PSFPhotometry(psf, fit_shape, grouper=SourceGrouper(min_separation=sep),
                         group_warning_threshold=10**6)
    sub = np.where(bad, 0.0, data - detector.background)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit-quality warnings are reported in the flags
        table = phot(sub, mask=bad, error=error, init_params=init)
    flux = np.asarray(table["flux_fit"], float) / detector.normalization
    err = np.asarray(table["flux_err"], float) / detector.normalization
    return flux, err
