"""Survey scale: all-sky HEALPix maps and many maps at once, in parallel through Dask.

* :func:`find_sources_healpix` cuts the sphere into overlapping patches at the detector's pixel
  scale (:func:`healpix_patches`), detects in each with :func:`~astrotrunc.find_sources` and
  merges one all-sky catalog without duplicates in the overlaps;
* :func:`find_sources_many` runs a list of maps (FITS images, HEALPix files or maps in memory),
  writes one catalog per map and a merged one, and resumes a killed run where it stopped.

Both run their work through Dask: ``client=None`` uses a local pool of ``workers`` threads, any
`distributed.Client` sends the work to its cluster.
"""

from __future__ import annotations

import functools
import json
import math
import os
import uuid
import warnings
from pathlib import Path

import healpy as hp
import numpy as np
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable, vstack
from photutils.utils import NoDetectionsWarning
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from .detection import SourceDetector, default_detector, find_sources
from .detection._onnx import check_backend
from .exceptions import AstrotruncWarning
from .io import HealpixMap, _check_writable, _frame, make_wcs

__all__ = [
    "PAPER_PIXEL_SCALE",
    "find_sources_healpix",
    "find_sources_many",
    "healpix_patches",
    "healpix_point_sources",
]

#: Pixel scale of the paper's maps (128 x 128 px over l, b = +-40 deg), on which the shipped
#: detector was trained.
PAPER_PIXEL_SCALE = 0.625 * u.deg

_PROJECTIONS = ("CAR", "TAN")
_MERGED_NAME = "merged"


# ----------------------------------------------------------------------------------------------
# Patch layout
# ----------------------------------------------------------------------------------------------
def _check_patch_settings(resolution, patch_size, overlap, projection, max_stretch):
    try:
        res = u.Quantity(resolution, u.deg).to_value(u.deg)
    except (TypeError, ValueError, u.UnitsError) as err:
        msg = (f"resolution {resolution!r} is not an angle; expected the angle per patch pixel, "
               "e.g. 0.625 * u.deg")
        raise ValueError(msg) from err
    if not (np.ndim(res) == 0 and np.isfinite(res) and res > 0):
        msg = f"resolution {resolution!r} is not a positive angle per pixel"
        raise ValueError(msg)
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) \
            or patch_size < 16:
        msg = f"patch_size {patch_size!r} is not a patch width; expected an int >= 16 (pixels)"
        raise ValueError(msg)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) \
            or not 2 <= overlap <= patch_size // 2:
        msg = (f"overlap {overlap!r} is not a patch overlap; expected an int in [2, "
               f"{patch_size // 2}] pixels (half of it is the margin kept at each patch edge)")
        raise ValueError(msg)
    if not isinstance(projection, str) or projection.upper() not in _PROJECTIONS:
        msg = f"projection {projection!r} is not supported; expected one of {_PROJECTIONS}"
        raise ValueError(msg)
    half = patch_size / 2 * res
    if projection.upper() == "CAR" and half > 60 or projection.upper() == "TAN" and half > 45:
        msg = (f"patches of {patch_size} px x {res:g} deg span {2 * half:g} deg; expected at most "
               f"{120 if projection.upper() == 'CAR' else 90} deg for {projection.upper()} "
               "patches (use a smaller patch_size)")
        raise ValueError(msg)
    try:
        max_stretch = float(max_stretch)
    except (TypeError, ValueError):
        max_stretch = float("nan")
    if not 1.0 < max_stretch <= 2.0:
        msg = (f"max_stretch {max_stretch!r} is not a projection stretch; expected a number in "
               "(1, 2], e.g. 1.05")
        raise ValueError(msg)
    return float(res), int(patch_size), int(overlap), projection.upper(), max_stretch


def _band_px(wcs, max_stretch) -> float:
    """Half-width (px) of the part of a patch whose projection stretches the sky <= max_stretch.

    A CAR patch stretches longitudes by 1 / cos(native latitude): the band of rows around its
    middle where that stays below ``max_stretch``. A TAN patch stretches radially by
    1 / cos^2(distance from its centre): a disc around the centre.
    """
    res = math.radians(abs(wcs.wcs.cdelt[1]))
    if wcs.wcs.ctype[0].endswith("TAN"):
        theta = math.acos(1 / math.sqrt(max_stretch))
        return math.tan(theta) / math.tan(res)
    return math.acos(1 / max_stretch) / res


def _edge_distance(wcs, lon, lat, max_stretch=None):
    """How far inside a patch sky points (deg, in its frame) lie, in pixels.

    The distance to the nearest patch edge; with ``max_stretch``, also at most the distance to
    the edge of the band where the projection stretches the sky by less than that plus the
    margin ``overlap / 2`` (see `_band_px`) -- the detector, trained on round PSFs of one width,
    misses and splits sources whose PSF is stretched by 10 %. Negative outside, ``-inf`` off
    the projection.
    """
    vec = hp.ang2vec(np.ravel(lon), np.ravel(lat), lonlat=True).reshape(-1, 3)
    x, y = _projector(wcs)(vec)
    return _inside_px(wcs, x, y, max_stretch).reshape(np.shape(lon))


def _inside_px(wcs, x, y, max_stretch=None):
    """`_edge_distance` from pixel coordinates; ``max_stretch`` is (band, margin) in px."""
    ny, nx = wcs.array_shape
    e = np.minimum(np.minimum(x + 0.5, nx - 0.5 - x), np.minimum(y + 0.5, ny - 0.5 - y))
    if max_stretch is not None:
        band, margin = max_stretch
        xc, yc = wcs.wcs.crpix - 1
        if wcs.wcs.ctype[0].endswith("TAN"):
            off = np.hypot(x - xc, y - yc)
        else:
            off = np.abs(y - yc)
        e = np.minimum(e, band + margin - off)
    return np.where(np.isfinite(e), e, -np.inf)


def _radius(wcs) -> float:
    """Angular radius (rad) of the disc around the patch centre that holds the whole patch."""
    ny, nx = wcs.array_shape
    xs = np.r_[np.linspace(-0.5, nx - 0.5, 9), np.full(9, -0.5), np.linspace(-0.5, nx - 0.5, 9),
               np.full(9, nx - 0.5)]
    ys = np.r_[np.full(9, -0.5), np.linspace(-0.5, ny - 0.5, 9), np.full(9, ny - 0.5),
               np.linspace(-0.5, ny - 0.5, 9)]
    lon, lat = wcs.wcs_pix2world(xs, ys, 0)
    centre = hp.ang2vec(*wcs.wcs.crval, lonlat=True)
    cos = hp.ang2vec(lon, lat, lonlat=True) @ centre
    return float(np.arccos(np.clip(cos.min(), -1, 1))) + 2 * math.radians(
        abs(wcs.wcs.cdelt[1]))


def _layout(half_x, half_y):
    """Patch centres (lon, lat) in deg: a cap on each pole and rings of patches in between."""
    centres = [(0.0, 90.0), (0.0, -90.0)]
    cap = min(half_x, half_y)
    band = 180.0 - 2 * cap
    n_rings = max(1, math.ceil(band / (2 * half_y)))
    height = band / n_rings
    for k in range(n_rings):
        lat = -(90.0 - cap) + (k + 0.5) * height
        lo, hi = lat - height / 2, lat + height / 2
        inner = 0.0 if lo < 0 < hi else min(abs(lo), abs(hi))
        n_lon = max(3, math.ceil(360.0 * math.cos(math.radians(inner)) / (2 * half_x)))
        step = 360.0 / n_lon
        centres += [(((j + 0.5 * (k % 2)) * step) % 360.0, lat) for j in range(n_lon)]
    return centres


def _patch_wcs(centre, res, patch_size, projection, frame="galactic"):
    """The WCS of one patch: `make_wcs`, its reference point on a pixel centre, not a corner.

    (The shipped detector finds sources on pixel corners less reliably; a source on a pole,
    which is the centre of a polar patch, then sits on a pixel centre.)
    """
    wcs = make_wcs(patch_size, centre, res, projection=projection, frame=frame)
    wcs.wcs.crpix = [patch_size / 2 + 1, patch_size / 2 + 1]
    wcs.wcs.set()
    return wcs


@functools.lru_cache(maxsize=16)
def _plan(res, patch_size, overlap, projection, max_stretch):
    """Patch centres that put every point of the sphere >= overlap/2 px inside some patch."""
    margin = overlap / 2
    probe = _patch_wcs((0.0, 0.0), res, patch_size, projection)
    band = _band_px(probe, max_stretch)
    half_px = patch_size / 2 - margin
    if projection == "TAN":
        half_x = math.degrees(math.atan(min(half_px, band) * math.tan(math.radians(res))))
        half_y = half_x
    else:
        half_x, half_y = half_px * res, min(half_px, band) * res
    # check on a HEALPix grid at about one patch pixel (coarser for very fine patches)
    spacing = res * max(1.0, margin / 4)
    nside_s = min(512, 2 ** max(2, math.ceil(math.log2(58.63 / spacing))))
    lon_s, lat_s = hp.pix2ang(nside_s, np.arange(hp.nside2npix(nside_s)), lonlat=True)
    lon_s, lat_s = np.r_[lon_s, 0.0, 0.0], np.r_[lat_s, 90.0, -90.0]
    vec_s = hp.ang2vec(lon_s, lat_s, lonlat=True)
    need = margin + hp.nside2resol(nside_s, arcmin=True) / 60 / res
    factor = 1.0
    for _ in range(16):
        centres = _layout(half_x * factor, half_y * factor)
        best = np.full(lon_s.size, -np.inf)
        for lon, lat in centres:
            wcs = _patch_wcs((lon, lat), res, patch_size, projection)
            near = np.flatnonzero(vec_s @ hp.ang2vec(lon, lat, lonlat=True)
                                  > math.cos(_radius(wcs)))
            best[near] = np.maximum(best[near], _edge_distance(
                wcs, lon_s[near], lat_s[near], (band, margin)))
        if best.min() >= need:
            return tuple(centres)
        factor *= 0.93
    msg = f"could not cover the sphere with {projection} patches of {patch_size} px"
    raise RuntimeError(msg)  # pragma: no cover - the layout converges in a few steps


def healpix_patches(resolution=PAPER_PIXEL_SCALE, patch_size=128, overlap=32, projection="CAR",
                    frame="galactic", max_stretch=1.05):
    """The overlapping patches that :func:`find_sources_healpix` cuts the sphere into.

    A patch centred on each pole and rings of patches in between, spaced so that every point
    of the sphere lies at least ``overlap / 2`` pixels inside some patch (checked on a
    HEALPix grid finer than the patch pixels). A ``CAR`` patch off the equator is an oblique
    plate carrée, undistorted along its own equator like the paper's map; ``TAN`` patches are
    gnomonic.

    Parameters
    ----------
    resolution : `~astropy.units.Quantity`
        Angle per patch pixel (the detector's pixel scale); plain numbers are degrees.
    patch_size : int
        Patch width and height in pixels.
    overlap : int
        Pixels shared by neighbouring patches: a margin of ``overlap / 2`` pixels at each
        patch edge is covered by another patch's interior.
    projection : {"CAR", "TAN"}
        FITS projection of the patches.
    frame : str or `~astropy.coordinates.BaseCoordinateFrame`
        Frame of the patch axes (that of the HEALPix map).
    max_stretch : float
        Only the part of a patch where the projection stretches the sky by less than this
        counts as its interior: the band of rows within ``arccos(1 / max_stretch)`` (17.8° for
        1.05) of a ``CAR`` patch's middle, the disc within ``arccos(max_stretch**-0.5)`` of a
        ``TAN`` patch's centre. The shipped detector, trained on round PSFs of one width,
        misses or splits about a quarter of bright sources stretched by 10 %, none at 5 %.

    Returns
    -------
    patches : list of `~astropy.wcs.WCS`
        One celestial WCS per patch, with its ``array_shape``.

    Examples
    --------
    >>> from astrotrunc import healpix_patches
    >>> patches = healpix_patches()     # the shipped detector's 0.625 deg pixels, 128 px
    >>> len(patches), patches[0].array_shape, patches[0].wcs.crval.tolist()
    (42, (128, 128), [0.0, 90.0])
    """
    res, patch_size, overlap, projection, max_stretch = _check_patch_settings(
        resolution, patch_size, overlap, projection, max_stretch)
    frame = _frame(frame)
    return [_patch_wcs(centre, res, patch_size, projection, frame)
            for centre in _plan(res, patch_size, overlap, projection, max_stretch)]


# ----------------------------------------------------------------------------------------------
# HEALPix -> patch, flux-conserving
# ----------------------------------------------------------------------------------------------
def _pixel_solid_angle(wcs) -> np.ndarray:
    """Solid angle (sr) of every patch pixel, from the sky positions of its corners."""
    ny, nx = wcs.array_shape
    yy, xx = np.mgrid[-0.5:ny, -0.5:nx]
    lon, lat = wcs.wcs_pix2world(xx.ravel(), yy.ravel(), 0)
    v = hp.ang2vec(lon, lat, lonlat=True).reshape(ny + 1, nx + 1, 3)
    d1 = v[1:, 1:] - v[:-1, :-1]
    d2 = v[1:, :-1] - v[:-1, 1:]
    return 0.5 * np.linalg.norm(np.cross(d1, d2), axis=-1)


@functools.lru_cache(maxsize=1)
def _sphere_vectors(nside):
    """Unit vectors (float32) of every NESTED pixel centre, computed once per process.

    (37 MB at nside 512; float32 places a point to 1e-5 deg, far below a patch pixel.)
    """
    vec = np.empty((hp.nside2npix(nside), 3), np.float32)
    step = 1 << 20
    for start in range(0, len(vec), step):
        pix = np.arange(start, min(start + step, len(vec)))
        vec[start:start + len(pix)] = np.column_stack(hp.pix2vec(nside, pix, nest=True))
    return vec


def _projector(wcs):
    """A fast ``unit vectors (n, 3) -> pixel (x, y)`` of a CAR or TAN patch (what wcslib does).

    The native axes are read off the WCS itself, so the result agrees with
    ``wcs.wcs_world2pix`` (checked in the tests) at a fraction of the cost.
    """
    cx, cy = wcs.wcs.crpix - 1
    dx, dy = wcs.wcs.cdelt

    def vec(x, y):
        lon, lat = wcs.wcs_pix2world([x], [y], 0)
        return hp.ang2vec(lon[0], lat[0], lonlat=True)

    centre = vec(cx, cy)
    if wcs.wcs.ctype[0].endswith("TAN"):
        # gnomonic: the tangent-plane offset is linear in the pixel offset
        ex, ey = (v / (v @ centre) - centre for v in (vec(cx + 1, cy), vec(cx, cy + 1)))
        ex, ey = ex / (ex @ ex), ey / (ey @ ey)

        def project(v):
            depth = _dot(v, centre)
            with np.errstate(invalid="ignore", divide="ignore"):
                behind = np.where(depth > 0, 0.0, np.nan)
                return (cx + _dot(v, ex) / depth + behind, cy + _dot(v, ey) / depth + behind)
        return project

    # plate carree: native longitude and latitude are linear in x and y
    east, pole = vec(cx + 90 / dx, cy), vec(cx, cy + 90 / dy)

    def project(v):
        phi = np.degrees(np.arctan2(_dot(v, east), _dot(v, centre)))
        theta = np.degrees(np.arcsin(np.clip(_dot(v, pole), -1, 1)))
        return cx + phi / dx, cy + theta / dy
    return project


def _dot(v, a):
    """``v @ a`` for unit vectors ``v (n, 3)``, in v's precision and without BLAS threads
    (which would spin against the pool's workers for a 3-column product)."""
    a = np.asarray(a, v.dtype)
    return v[:, 0] * a[0] + v[:, 1] * a[1] + v[:, 2] * a[2]


def _target_nside(res):
    """The HEALPix resolution patches are filled at: >= 5 sub-pixels per patch pixel side."""
    return min(2 ** math.ceil(math.log2(5 * 58.63 / res)), 8192)


def _working_map(hmap, res):
    """(values, bad, nside, nest) to fill patches from: finer maps summed down, flux kept.

    A map finer than `_target_nside` is degraded to it once (NESTED children summed; a parent
    with more than half of its children masked is masked, a partly masked one gets the mean of
    its good children times their number), so that filling a patch costs the same at any nside.
    """
    target = _target_nside(res)
    if hmap.nside <= target:
        return hmap.values, hmap.mask, hmap.nside, hmap.nest
    values, bad = hmap.values, hmap.mask
    if not hmap.nest:
        order = hp.nest2ring(hmap.nside, np.arange(values.size))
        values, bad = values[order], bad[order]
    k = (hmap.nside // target) ** 2
    good = ~bad.reshape(-1, k)
    n_good = good.sum(axis=1)
    total = np.where(good, values.reshape(-1, k), 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        coarse = total / n_good * k
    coarse_bad = n_good * 2 < k
    coarse[coarse_bad] = 0.0
    return coarse, coarse_bad, target, True


def _healpix_patch(values, bad, nside, nest, wcs, fine):
    """The flux in every pixel of a patch: (data, mask).

    HEALPix values are fluxes per HEALPix pixel. Each HEALPix pixel is split into its equal-area
    NESTED children at nside ``fine`` (itself when ``fine == nside``); a patch pixel gets the
    mean surface brightness of the unmasked children whose centres it holds times its solid
    angle -- the flux in it, without the +-1 child aliasing of a plain sum (which would distort
    a bright source's profile by several per cent) and without shifting flux by more than a
    child's size. A patch pixel is masked when more than half of its children are.
    """
    ny, nx = wcs.array_shape
    shift = 2 * round(math.log2(fine // nside))
    centre = hp.ang2vec(*wcs.wcs.crval, lonlat=True)
    sub = hp.query_disc(fine, centre, _radius(wcs), nest=True)
    x, y = _projector(wcs)(_sphere_vectors(fine)[sub])
    ix, iy = np.floor(x + 0.5), np.floor(y + 0.5)
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    flat = (iy[inside] * nx + ix[inside]).astype(np.intp)
    pix = sub[inside] >> shift
    if not nest:
        pix = hp.nest2ring(nside, pix)
    ok = ~bad[pix]
    n_all = np.bincount(flat, minlength=nx * ny)
    n_ok = np.bincount(flat[ok], minlength=nx * ny)
    total = np.bincount(flat[ok], weights=values[pix[ok]], minlength=nx * ny)
    with np.errstate(invalid="ignore", divide="ignore"):
        data = total / n_ok * _pixel_solid_angle(wcs).ravel() / hp.nside2pixarea(nside)
    mask = (n_ok * 2 < n_all) | (n_all == 0) | ~np.isfinite(data)
    data[mask] = 0.0
    return data.reshape(ny, nx), mask.reshape(ny, nx)


def _detect_patch(values, bad, nside, nest, detector, index, wcs, inner, settings):
    """Catalog of one patch (or None), with its patch index and edge distances."""
    fine = max(nside, _target_nside(abs(wcs.wcs.cdelt[1])))
    data, mask = _healpix_patch(values, bad, nside, nest, wcs, fine)
    if mask.all():
        return None
    cat = find_sources(data, detector, wcs=wcs, mask=mask, **settings)  # `_run` mutes warnings
    if cat is None:
        return None
    cat["patch"] = np.full(len(cat), index)
    cat["edge_distance"] = _inside_px(wcs, cat["x_centroid"].value, cat["y_centroid"].value,
                                      inner) * u.pix
    return cat


# ----------------------------------------------------------------------------------------------
# Dask
# ----------------------------------------------------------------------------------------------
def _check_workers(workers):
    if workers is None:
        return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        msg = f"workers {workers!r} is not a number of workers; expected a positive int or None"
        raise ValueError(msg)
    return int(workers)


class _torch_threads:
    """Context: torch intra-op threads shared out between ``workers`` pool threads."""

    def __init__(self, workers):
        self.workers = workers

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        if self.workers > 1:
            torch.set_num_threads(max(1, self.saved // self.workers))

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved)


def _run(fn, shared, calls, *, client, workers, progress, desc, unit):
    """``[fn(*shared, *args) for args in calls]`` through Dask, in order, with a progress bar.

    ``client=None``: Dask's local threaded scheduler with ``workers`` threads (synchronous for
    one worker); otherwise a `distributed.Client`, to which the large ``shared`` objects
    (arrays, the detector) are scattered once.
    """
    bar = tqdm(total=len(calls), desc=desc, unit=unit, disable=None if progress else True)
    # "nothing found here" in one patch or map is no news: the caller warns once for the lot
    # (set here, in the calling thread: warnings.catch_warnings in pool threads would race)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)
        try:
            return _run_tasks(fn, shared, calls, client=client, workers=workers, bar=bar)
        finally:
            bar.close()


def _quiet(fn, *args):
    """``fn(*args)`` without NoDetectionsWarning, in a cluster worker's process.

    (A worker running several tasks in threads may race on the warning filters: at worst a
    warning shows in its log.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)
        return fn(*args)


def _run_tasks(fn, shared, calls, *, client, workers, bar):
    """The Dask part of `_run`."""
    if client is not None:
        from distributed import as_completed

        # large objects (the map, the network) go to the workers once; small ones travel inline
        shared_f = [client.scatter(s, broadcast=True, hash=False)
                    if isinstance(s, (np.ndarray, SourceDetector)) else s for s in shared]
        futures = [client.submit(_quiet, fn, *shared_f, *args, pure=False) for args in calls]
        for _ in as_completed(futures):
            bar.update()
        return client.gather(futures)

    import dask
    from dask.callbacks import Callback

    shared_d = [dask.delayed(s, name=f"shared-{uuid.uuid4().hex}") for s in shared]
    tasks = [dask.delayed(fn, pure=False)(*shared_d, *args) for args in calls]
    keys = {t.key for t in tasks}

    class _Bar(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in keys:
                bar.update()

    with _Bar(), _torch_threads(workers):
        return list(dask.compute(*tasks, scheduler="sync" if workers == 1 else "threads",
                                 num_workers=workers))


# ----------------------------------------------------------------------------------------------
# All-sky HEALPix
# ----------------------------------------------------------------------------------------------
def _detector_and_scale(detector, resolution):
    if detector is None:
        detector = default_detector()
    elif not isinstance(detector, SourceDetector):
        msg = f"detector must be a SourceDetector, got {type(detector).__name__}"
        raise TypeError(msg)
    if resolution is None:
        resolution = getattr(detector, "pixel_scale", None)
    if resolution is None:
        if detector is not default_detector():
            warnings.warn(f"detector {detector.name!r} does not record its pixel scale; assuming "
                          f"the paper's {PAPER_PIXEL_SCALE} (pass resolution= to choose)",
                          AstrotruncWarning, stacklevel=3)
        resolution = PAPER_PIXEL_SCALE
    return detector, resolution


def _as_healpix(hpx_map, nside, nest, frame):
    """A HealpixMap from a HealpixMap, a 1-D array or a HEALPix FITS path."""
    if isinstance(hpx_map, (str, os.PathLike)):
        from .io import read_map

        hpx_map = read_map(hpx_map)
        if not isinstance(hpx_map, HealpixMap):
            msg = "the file holds an image, not a HEALPix map; use find_sources for images"
            raise ValueError(msg)  # noqa: TRY004 - a wrong kind of map, not of Python object
    elif not isinstance(hpx_map, HealpixMap):
        if isinstance(hpx_map, NDData) or np.ndim(getattr(hpx_map, "data", hpx_map)) == 2:
            msg = ("hpx_map is an image; expected a HEALPix map (a HealpixMap, an array "
                   "of 12*nside**2 values or a HEALPix FITS file) -- use find_sources for images")
            raise ValueError(msg)
        hpx_map = HealpixMap(hpx_map, nest=nest, frame=frame)
    if nside is not None and int(nside) != hpx_map.nside:
        msg = (f"the HEALPix map has nside={hpx_map.nside} ({hpx_map.values.size} pixels) but "
               f"nside={nside} was given; expected 12*nside**2 = "
               f"{12 * int(nside) ** 2} values")
        raise ValueError(msg)
    return hpx_map


def _merge_patches(cats, match_radius_deg, min_edge):
    """One catalog from overlapping patch catalogs, each source kept from one patch only.

    Detections are taken in decreasing order of ``edge_distance`` (how far inside its patch's
    trusted interior a detection lies, see `_edge_distance`); a detection is dropped when one
    already taken from *another* patch lies within the match radius (detections from one
    patch never suppress each other: it deblended them already). Detections with an
    ``edge_distance`` below ``min_edge`` (half the margin: near a patch edge, where the detector
    sees too little context, or out in the stretched part of a patch) are dropped first: the
    layout puts every position at least a full margin inside some patch.
    """
    cats = [c for c in cats if c is not None and len(c)]
    if not cats:
        return None
    cat = vstack(cats, metadata_conflicts="silent")
    lon, lat = cat["sky_centroid"].spherical.lon.deg, cat["sky_centroid"].spherical.lat.deg
    edge = cat["edge_distance"].to_value(u.pix)
    vec = hp.ang2vec(lon, lat, lonlat=True)
    patch = np.asarray(cat["patch"])
    inner = edge >= min_edge
    cat, vec, edge, patch = cat[inner], vec[inner], edge[inner], patch[inner]
    if not len(cat):
        return None
    order = np.argsort(-edge, kind="stable")
    tree = cKDTree(vec)
    chord = 2 * math.sin(math.radians(match_radius_deg) / 2)
    keep = np.zeros(len(cat), bool)
    for i in order:
        near = tree.query_ball_point(vec[i], chord)
        if not any(keep[j] and patch[j] != patch[i] for j in near):
            keep[i] = True
    return cat[keep]


def find_sources_healpix(hpx_map, *, nside=None, nest=False, frame="galactic", detector=None,
                         resolution=None, patch_size=128, overlap=32, projection="CAR",
                         client=None, workers=None, threshold=5.0, flux_threshold=None,
                         n_pixels=1, match_radius=None, max_stretch=1.05, progress=True,
                         backend="auto"):
    """Detect point sources on a whole HEALPix map: one all-sky catalog.

    The sphere is cut into overlapping patches at the detector's pixel scale
    (:func:`healpix_patches`: a cap on each pole, rings in between); each patch is filled
    from the HEALPix map, flux-conserving, and searched with :func:`~astrotrunc.find_sources`;
    the patch catalogs are merged without duplicates: each source is kept from the patch where
    it sits farthest from the edge.

    The detector sees each patch as it saw its training maps: pixels of ``resolution`` holding
    the flux that falls in them. The HEALPix values must therefore be *fluxes per HEALPix
    pixel* in the detector's units (for the shipped detector: counts / exposure, exposure 100,
    the paper's PSF of σ = 1.5 × 0.625° = 0.94°; `healpix_point_sources` makes such maps).
    Patches are filled flux-conserving at any ``nside``: every HEALPix pixel is split into
    its equal-area children at about a fifth of a patch pixel (nside 512 for 0.625° pixels)
    and a patch pixel gets the mean of the children it holds times its solid angle; a map
    finer than that is first summed down to it, once, so nside 1024 costs what nside 512 does.

    Patches are only trusted where their projection keeps the PSF round to ``max_stretch``:
    the shipped detector, trained on maps whose PSF is the same round stamp everywhere,
    misses or splits about a quarter of bright sources whose PSF is stretched by 10 % along
    one axis (and most of those widened by 10 % along both), none at 5 %.

    Parameters
    ----------
    hpx_map : `~astrotrunc.HealpixMap`, array-like or path
        A HEALPix map, ``12 * nside**2`` values (NaN and ``UNSEEN`` are bad pixels) or a
        HEALPix FITS file (:func:`~astrotrunc.read_map`).
    nside : int, optional
        Expected nside; checked against the map's length.
    nest : bool or str
        Ordering of an array (a `~astrotrunc.HealpixMap` and a file know theirs).
    frame : str
        Frame of an array's pixelisation.
    detector : `~astrotrunc.SourceDetector`, optional
        The shipped detector when `None`.
    resolution : `~astropy.units.Quantity`, optional
        Angle per patch pixel. By default the detector's pixel scale: its ``pixel_scale``
        attribute if it has one, else the paper's 0.625° (with a warning for a detector other
        than the shipped one). Patches at another scale than the training maps change what
        the detector sees (PSF width in pixels, flux per pixel).
    patch_size : int
        Patch width in pixels (128: the shipped detector's training maps).
    overlap : int
        Pixels shared by neighbouring patches; every position lies at least ``overlap / 2``
        pixels inside some patch.
    projection : {"CAR", "TAN"}
        Patch projection: oblique plate carrée (like the training maps) or gnomonic.
    client : `distributed.Client`, optional
        Run the patches on this cluster; a local pool of ``workers`` threads when `None`.
    workers : int, optional
        Threads of the local pool (the number of CPUs by default; 1 runs serially).
    threshold, flux_threshold, n_pixels, backend
        As in :func:`~astrotrunc.find_sources`.
    match_radius : `~astropy.units.Quantity`, optional
        Two detections from different patches closer than this are one source; 3 patch pixels
        (twice the paper's PSF σ) by default.
    max_stretch : float
        Largest stretch of the sky by a patch's projection inside its trusted interior (see
        :func:`healpix_patches`); 1.05 gives 42 CAR patches of 128 px, 1.2 gives 23.
    progress : bool
        A progress bar over the patches (shown on terminals only).

    Returns
    -------
    catalog : `~astropy.table.QTable` or `None`
        The columns of :func:`~astrotrunc.find_sources` -- ``x_centroid``/``y_centroid`` are
        pixel coordinates in the source's patch -- plus ``healpix_pixel`` (the pixel of the
        map holding the source, in the map's ordering), ``patch`` (index into
        :func:`healpix_patches`) and ``edge_distance`` (pixels to the edge of that patch's
        trusted interior, plus ``overlap / 2``), sorted by ``healpix_pixel``. ``sky_centroid``
        is Galactic. ``meta`` records ``nside``,
        ``ordering``, ``frame`` and the patch layout. `None` with a
        `~photutils.utils.NoDetectionsWarning` when nothing is detected.

    Raises
    ------
    ValueError
        A map whose length is not ``12 * nside**2`` (or disagrees with ``nside``), an image
        instead of a HEALPix map, a map with no valid pixel, bad patch settings.

    Examples
    --------
    Two bright sources, one on the north pole, on an nside-64 sky (about 10 s on 2 cores):

    >>> from astrotrunc import find_sources_healpix, healpix_point_sources
    >>> sky = healpix_point_sources(64, [0.0, 30.0], [90.0, 20.0], [50.0, 50.0], seed=1)
    >>> cat = find_sources_healpix(sky, progress=False)  # doctest: +SKIP
    >>> len(cat), cat.meta["nside"], cat.meta["n_patches"]  # doctest: +SKIP
    (2, 64, 42)
    """
    hmap = _as_healpix(hpx_map, nside, nest, frame)
    if hmap.mask.all():
        msg = f"the HEALPix map ({hmap!r}) has no valid pixel; nothing to detect"
        raise ValueError(msg)
    detector, resolution = _detector_and_scale(detector, resolution)
    res, patch_size, overlap, projection, max_stretch = _check_patch_settings(
        resolution, patch_size, overlap, projection, max_stretch)
    workers = _check_workers(workers)
    f_th = detector.flux_thresholds[detector._channel(flux_threshold)]
    match_deg = 3 * res if match_radius is None else u.Quantity(match_radius, u.deg).value
    patches = healpix_patches(res, patch_size, overlap, projection, hmap.frame, max_stretch)
    inner = (_band_px(patches[0], max_stretch), overlap / 2)
    settings = {"threshold": float(threshold), "flux_threshold": f_th, "n_pixels": n_pixels,
                "backend": check_backend(backend, detector.psf_stamp.device)}

    was_training = detector.training
    detector.eval()  # the pool threads share the network: no mode switches while they run
    try:
        cats = _run(_detect_patch, (*_working_map(hmap, res), detector),
                    [(i, w, inner, settings) for i, w in enumerate(patches)],
                    client=client, workers=workers, progress=progress,
                    desc="patches", unit="patch")
    finally:
        detector.train(was_training)
    cat = _merge_patches(cats, match_deg, min_edge=overlap / 4)
    if cat is None:
        warnings.warn("No sources were found on the HEALPix map (no region with odds above "
                      "the threshold).", NoDetectionsWarning, stacklevel=2)
        return None
    sky = cat["sky_centroid"].transform_to(hmap.frame)
    lon, lat = sky.spherical.lon.deg, sky.spherical.lat.deg
    cat["healpix_pixel"] = hp.ang2pix(hmap.nside, lon, lat, nest=hmap.nest, lonlat=True)
    cat.sort(["healpix_pixel", "patch"])
    cat["id"] = np.arange(1, len(cat) + 1)
    cat.meta.update({"nside": int(hmap.nside), "ordering": hmap.ordering,
                     "frame": hmap.frame.name, "patch_projection": projection,
                     "patch_size": patch_size, "patch_overlap": overlap,
                     "pixel_scale_deg": res, "n_patches": len(patches),
                     "match_radius_deg": float(match_deg), "max_stretch": max_stretch})
    return cat


def healpix_point_sources(nside, lon, lat, flux, *, nest=False, psf_sigma=1.5 * PAPER_PIXEL_SCALE,
                          normalization=4.0, exposure=100.0, background=0.0, seed=None):
    """A HEALPix map of point sources seen through the paper's instrument, on the sphere.

    The expected flux in HEALPix pixel p is ``normalization * sum_i F_i * w_i(p)``, with
    ``w_i`` a Gaussian PSF of ``psf_sigma`` (the paper's 1.5 px of 0.625°) centred on source i,
    sampled at the pixel centres and normalised to sum 1, plus ``background`` per 0.625° pixel
    scaled to the pixel's area; the data are ``Poisson(exposure * mean) / exposure``, or the
    mean itself with ``seed=None``. For injection-recovery tests of
    :func:`find_sources_healpix` with the shipped detector.

    Parameters
    ----------
    nside : int
        HEALPix resolution.
    lon, lat : array-like
        Source positions in degrees (in the frame of the map).
    flux : array-like
        Source fluxes.
    nest : bool
        NESTED ordering.
    psf_sigma : `~astropy.units.Quantity`
        PSF width.
    normalization, exposure, background : float
        Instrument (see `~astrotrunc.PointSourceModel`).
    seed : int or `numpy.random.Generator`, optional
        Poisson noise seed; no noise when `None`.

    Returns
    -------
    values : `~numpy.ndarray`
        ``12 * nside**2`` values.

    Examples
    --------
    >>> import numpy as np
    >>> from astrotrunc import healpix_point_sources
    >>> sky = healpix_point_sources(64, [10.0], [20.0], [50.0])
    >>> round(float(sky.sum()), 3)      # normalization x flux
    200.0
    """
    nside = int(nside)
    if not hp.isnsideok(nside):
        msg = f"nside {nside!r} is not a HEALPix nside; expected a power of 2"
        raise ValueError(msg)
    lon, lat, flux = np.broadcast_arrays(*(np.asarray(a, float) for a in (lon, lat, flux)))
    sigma = u.Quantity(psf_sigma, u.deg).to_value(u.rad)
    area = hp.nside2pixarea(nside)
    mean = np.full(hp.nside2npix(nside),
                   background * area / math.radians(PAPER_PIXEL_SCALE.to_value(u.deg)) ** 2)
    for v, f in zip(hp.ang2vec(lon.ravel(), lat.ravel(), lonlat=True), flux.ravel()):
        pix = hp.query_disc(nside, v, 6 * sigma, nest=nest)
        if not pix.size:
            pix = np.array([hp.vec2pix(nside, *v, nest=nest)])
        d2 = 2 * (1 - np.clip(np.array(hp.pix2vec(nside, pix, nest=nest)).T @ v, -1, 1))
        w = np.exp(-0.5 * d2 / sigma**2)
        mean[pix] += normalization * f * w / w.sum()
    if seed is None:
        return mean
    rng = np.random.default_rng(seed)
    return rng.poisson(exposure * mean) / exposure


# ----------------------------------------------------------------------------------------------
# Many maps
# ----------------------------------------------------------------------------------------------
def _map_names(maps, names):
    if names is None:
        names = [Path(m).name.split(".")[0] if isinstance(m, (str, os.PathLike))
                 else f"map{i:04d}" for i, m in enumerate(maps)]
    else:
        names = [str(n) for n in names]
        if len(names) != len(maps):
            msg = f"{len(names)} names for {len(maps)} maps; expected one name per map"
            raise ValueError(msg)
    bad = [n for n in names if not n or "/" in n or "\\" in n or n.startswith(".")
           or n == _MERGED_NAME]
    if bad:
        msg = (f"map names {bad} cannot name catalog files; expected plain file names, not "
               f"'{_MERGED_NAME}' (the merged catalog)")
        raise ValueError(msg)
    seen = {}
    for n, m in zip(names, maps):
        seen.setdefault(n, []).append(str(m) if isinstance(m, (str, os.PathLike)) else n)
    dup = {n: v for n, v in seen.items() if len(v) > 1}
    if dup:
        msg = (f"several maps would write the same catalog: {dup}; pass names=[...] with one "
               "distinct name per map")
        raise ValueError(msg)
    return names


def _run_key(detector, settings):
    """What a catalog must have been made with to count as this run's (JSON text)."""
    return json.dumps({"detector_id": detector.identity, **settings}, sort_keys=True)


def _status(path, key):
    """'todo' or 'done' for an output file; OSError if it exists and is not this run's."""
    if not path.exists():
        return "todo"
    try:
        meta = QTable.read(path, format="ascii.ecsv").meta
    except Exception:  # noqa: BLE001 - any unreadable file is "not ours"
        meta = {}
    if meta.get("astrotrunc_run") == key and meta.get("complete"):
        return "done"
    msg = (f"{path} already exists and is not a finished catalog of this run (another detector, "
           "other settings, or not written by find_sources_many); pass overwrite=True "
           "(--overwrite) to replace it, or choose another output directory")
    raise OSError(msg)


def _write_atomic(table, path):
    """Write an ECSV file so that it either exists complete or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        table.write(tmp, format="ascii.ecsv")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _detect_map(detector, settings, key, healpix_kwargs, item, name, path, inner_workers):
    """Detect in one map and write its catalog; returns (name, n_sources or the error text)."""
    try:
        from .io import read_map

        data = read_map(item) if isinstance(item, (str, os.PathLike)) else item
        # (NoDetectionsWarning is muted by `_run`: catch_warnings is not thread-safe)
        if isinstance(data, HealpixMap) or (not isinstance(data, NDData) and np.ndim(data) == 1):
            cat = find_sources_healpix(data, detector=detector, workers=inner_workers,
                                       progress=False, **settings, **healpix_kwargs)
        else:
            cat = find_sources(data, detector, **settings)
        if cat is None:
            cat = QTable({"id": np.zeros(0, int)})
        cat.meta.update({"map": name, "source": str(item) if isinstance(
            item, (str, os.PathLike)) else "in memory", "n_sources": len(cat),
            "astrotrunc_run": key, "complete": True})
        _write_atomic(cat, Path(path))
        return name, len(cat)
    except Exception as err:  # noqa: BLE001 - one bad map must not stop the others
        return name, f"{type(err).__name__}: {err}"


def find_sources_many(maps, *, out_dir, detector=None, client=None, workers=None,
                      overwrite=False, names=None, threshold=5.0, flux_threshold=None,
                      n_pixels=1, healpix_kwargs=None, progress=True, backend="auto"):
    """Detect sources in many maps: one catalog per map plus a merged one, resumable.

    Every map is a Dask task that reads it, detects (:func:`~astrotrunc.find_sources` for
    images, :func:`find_sources_healpix` for HEALPix maps) and writes ``<name>.ecsv`` in
    ``out_dir`` atomically (a temporary file renamed into place), so a killed run leaves only
    finished catalogs. Run it again with the same arguments and the finished maps are skipped;
    the merged catalog ``merged.ecsv`` (a ``map`` column first) is written once every map is
    done. A map that fails does not stop the others: they finish, then a `RuntimeError` lists
    the failures.

    Parameters
    ----------
    maps : sequence
        FITS paths (images or HEALPix files, read with :func:`~astrotrunc.read_map` inside
        the task), `~astropy.nddata.NDData` images, 2-D arrays or `~astrotrunc.HealpixMap`.
    out_dir : str or path-like
        Output directory (created if missing; on a cluster, one the workers can write to).
    detector : `~astrotrunc.SourceDetector`, optional
        The shipped detector when `None`.
    client : `distributed.Client`, optional
        Run the maps on this cluster; a local pool of ``workers`` threads when `None`.
    workers : int, optional
        Threads of the local pool (the number of CPUs by default).
    overwrite : bool
        Redo every map and replace existing catalogs. Without it, a finished catalog of the
        same detector and settings is kept (resume) and any other existing file raises
        `OSError`.
    names : sequence of str, optional
        Catalog names (file stems); by default the file names of the maps without their
        extensions, ``map0000``, ``map0001``, ... for maps in memory.
    threshold, flux_threshold, n_pixels, backend
        As in :func:`~astrotrunc.find_sources`.
    healpix_kwargs : dict, optional
        More arguments of :func:`find_sources_healpix` for HEALPix maps (``patch_size``,
        ``projection``, ...).
    progress : bool
        A progress bar over the maps (shown on terminals only).

    Returns
    -------
    merged : `~astropy.table.QTable` or `None`
        All sources, with a ``map`` column; `None` with a `~photutils.utils.NoDetectionsWarning`
        when no map has a source.

    Raises
    ------
    ValueError
        An empty list, names that collide, bad settings.
    OSError
        Existing outputs that this run did not make, without ``overwrite``.
    RuntimeError
        Some maps failed (the others' catalogs are written).

    Examples
    --------
    >>> import tempfile
    >>> from astrotrunc import PointSourceModel, find_sources_many
    >>> model = PointSourceModel.paper()
    >>> maps = [model.simulate(1, seed=s).maps[0].numpy() for s in (1, 2)]
    >>> with tempfile.TemporaryDirectory() as out:
    ...     cat = find_sources_many(maps, out_dir=out, workers=1, progress=False)
    ...     again = find_sources_many(maps, out_dir=out, workers=1, progress=False)  # resumes
    >>> sorted(set(cat["map"].tolist())), len(again) == len(cat)
    (['map0000', 'map0001'], True)
    """
    if isinstance(maps, np.ndarray) and maps.ndim == 3:
        maps = list(maps)  # a batch of images
    elif isinstance(maps, (str, os.PathLike, HealpixMap, NDData, np.ndarray)):
        maps = [maps]
    maps = list(maps)
    if not maps:
        msg = "no maps to process; expected a non-empty list of map files or maps"
        raise ValueError(msg)
    if isinstance(maps[0], (int, float)):
        msg = "maps is a list of numbers; expected a list of maps (pass one array as [array])"
        raise TypeError(msg)
    for m in maps:
        if isinstance(m, (str, os.PathLike)) and not Path(m).expanduser().is_file():
            msg = f"no such map file: {m}; expected FITS images or HEALPix FITS files"
            raise FileNotFoundError(msg)
    names = _map_names(maps, names)
    if detector is None:
        detector = default_detector()
    elif not isinstance(detector, SourceDetector):
        msg = f"detector must be a SourceDetector, got {type(detector).__name__}"
        raise TypeError(msg)
    workers = _check_workers(workers)
    f_th = detector.flux_thresholds[detector._channel(flux_threshold)]
    settings = {"threshold": float(threshold), "flux_threshold": f_th, "n_pixels": int(n_pixels)}
    healpix_kwargs = dict(healpix_kwargs or {})
    key = _run_key(detector, {**settings, **{k: str(v) for k, v in healpix_kwargs.items()}})
    # the same catalogs either way: not part of the run's key
    settings["backend"] = check_backend(backend, detector.psf_stamp.device)

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        msg = f"out_dir {out_dir} is a file; expected a directory"
        raise OSError(msg)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{n}.ecsv" for n in names]
    merged_path = out_dir / f"{_MERGED_NAME}.ecsv"
    if overwrite:
        status = ["todo"] * len(maps)
    else:
        status = [_status(p, key) for p in paths]
        if merged_path.exists():
            _status(merged_path, key)
    todo = [i for i, s in enumerate(status) if s == "todo"]
    for i in todo:  # leftovers of a killed run
        for stale in out_dir.glob(f".{paths[i].name}.*.tmp"):
            stale.unlink()

    inner = workers if len(todo) == 1 and client is None else 1
    was_training = detector.training
    detector.eval()
    try:
        results = _run(_detect_map, (detector, settings, key, healpix_kwargs),
                       [(maps[i], names[i], str(paths[i]), inner) for i in todo],
                       client=client, workers=1 if inner > 1 else workers, progress=progress,
                       desc="maps", unit="map") if todo else []
    finally:
        detector.train(was_training)
    failed = [(n, r) for n, r in results if isinstance(r, str)]
    if failed:
        lines = "\n".join(f"  {n}: {r}" for n, r in failed)
        msg = (f"{len(failed)} of {len(maps)} maps failed:\n{lines}\nthe other catalogs are in "
               f"{out_dir}; run again to retry (finished maps are not redone)")
        raise RuntimeError(msg)

    tables = []
    for name, path in zip(names, paths):
        t = QTable.read(path, format="ascii.ecsv")
        if len(t):
            t.add_column(name, name="map", index=0)
            tables.append(t)
    if not tables:
        merged = QTable({"map": np.zeros(0, str), "id": np.zeros(0, int)})
    else:
        same = all(t.colnames == tables[0].colnames for t in tables)
        merged = vstack(tables, join_type="exact" if same else "inner",
                        metadata_conflicts="silent")
    merged.meta = {"maps": names, "n_maps": len(maps), "n_sources": len(merged),
                   "astrotrunc_run": key, "complete": True}
    _write_atomic(merged, _check_writable(merged_path, True))
    if not len(merged):
        warnings.warn("No sources were found in any map.", NoDetectionsWarning, stacklevel=2)
        return None
    return merged
