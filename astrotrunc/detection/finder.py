"""Finding sources: `NeuralSourceFinder`, the one object that carries the detection settings.

A finder validates its settings once, at construction, like the photutils finders; calling it
on a map checks the map (units, bad and non-physical pixels, the detector's domain), runs the
detector and segments the odds map into the regions R_i; the catalog is described by
`~astrotrunc.detection.catalog.RegionCatalog`. `find_sources` is a thin wrapper.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
from astropy import units as u
from astropy.wcs import WCS
from photutils.segmentation import SegmentationImage
from photutils.utils import NoDetectionsWarning
from scipy import ndimage

from .._utils import celestial_wcs, pixel_scale_deg, validate_map
from ..exceptions import AstrotruncWarning, OutOfDomainWarning
from ._onnx import check_backend
from .catalog import RegionCatalog
from .domain import domain_differences, nonphysical_limit
from .estimator import SourceDetector, default_detector, fill_bad_pixels

__all__ = ["NeuralSourceFinder", "find_sources", "detection_regions", "as_finder"]

_RETRAIN_HINT = ("the catalog may be wrong; retrain a detector for these maps (see 'Training a "
                 "detector for your instrument' in the astrotrunc detection documentation)")


def _check_threshold(threshold):
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        msg = f"threshold must be a positive number (odds), got {threshold!r}"
        raise TypeError(msg) from None
    if not (math.isfinite(value) and value > 0):
        msg = f"threshold must be positive and finite (odds r1 > threshold), got {threshold!r}"
        raise ValueError(msg)
    return value


def _check_n_pixels(n_pixels):
    if isinstance(n_pixels, bool) or not isinstance(n_pixels, numbers.Integral) or n_pixels < 1:
        msg = f"n_pixels must be an integer >= 1, got {n_pixels!r}"
        raise ValueError(msg)
    return int(n_pixels)


def detection_regions(log_odds, threshold=5.0, n_pixels=1, mask=None, deblend=True):
    """The detected regions R_i of a log-odds map, as a `~photutils.segmentation.SegmentationImage`.

    Pixels with odds > ``threshold`` are segmented with `photutils.segmentation.detect_sources`;
    with ``deblend=True`` every segment is then split into the basins of its local odds maxima
    (each pixel joins the maximum that steepest ascent inside its segment leads to), so that
    neighbouring sources whose odds regions touch are catalogued separately -- one region per
    most-probable source centre. A pixel never joins a maximum of another segment.

    Parameters
    ----------
    log_odds : 2-D array
        Per-pixel log r1 (``-inf`` where bad).
    threshold : float
        Odds threshold (> 0).
    n_pixels : int
        Minimum number of connected pixels of a region.
    mask : 2-D bool array, optional
        Pixels excluded from every region.
    deblend : bool
        Split regions at their local odds maxima.

    Returns
    -------
    `~photutils.segmentation.SegmentationImage` or `None`
        `None` when nothing is above the threshold.
    """
    threshold = _check_threshold(threshold)
    n_pixels = _check_n_pixels(n_pixels)
    log_odds = np.asarray(log_odds)
    if log_odds.ndim != 2:
        msg = f"log_odds must be a 2-D array, got shape {log_odds.shape}"
        raise ValueError(msg)
    if mask is not None and np.shape(mask) != log_odds.shape:
        msg = f"mask shape {np.shape(mask)} does not match the log_odds shape {log_odds.shape}"
        raise ValueError(msg)
    segments = _segments(log_odds, math.log(threshold), n_pixels, mask, deblend)
    if segments is None:
        return None
    return SegmentationImage(_deblend(log_odds, segments) if deblend else segments)


_EIGHT = np.ones((3, 3), dtype=int)
# 8-connected within each map of a stack (n, H, W), never across maps
_EIGHT_IN_PLANE = np.stack([np.zeros((3, 3), int), _EIGHT, np.zeros((3, 3), int)])


def _label(image):
    """`scipy.ndimage.label` with 8-connectivity in the last two axes (of a map or a stack of
    maps): labels 1..n in raster order, so those of map ``i`` of a stack follow map ``i - 1``'s."""
    return ndimage.label(image, structure=_EIGHT if image.ndim == 2 else _EIGHT_IN_PLANE)


def _segments(log_odds, level, n_pixels, mask, deblend=False):
    """`photutils.segmentation.detect_sources` (8-connected pixels > ``level``, at least
    ``n_pixels`` of them, labels 1..n in raster order) without its per-segment Python loop.

    ``log_odds`` is a map or a stack of maps ``(n, H, W)`` (labels then run over the stack).
    With ``deblend`` and ``n_pixels == 1``, the pixels above ``level`` (bool) instead of labels:
    every 8-neighbour above it is in a pixel's own segment, so `_deblend` needs no labels.
    """
    with np.errstate(invalid="ignore"):
        above = log_odds > level
    if mask is not None:
        above &= ~np.asarray(mask, dtype=bool)
    if deblend and n_pixels == 1:
        return above if above.any() else None
    segments, n = _label(above)
    if n == 0:
        return None
    if n_pixels > 1:
        keep = np.bincount(segments.ravel(), minlength=n + 1) >= n_pixels
        keep[0] = False
        if not keep.any():
            return None
        relabel = np.zeros(n + 1, dtype=segments.dtype)
        relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=segments.dtype)
        segments = relabel[segments]
    return segments


_DY, _DX = (a.ravel()[[0, 1, 2, 3, 5, 6, 7, 8]] for a in np.mgrid[-1:2, -1:2])  # raster order


def _deblend(log_odds, segments):
    """Split every segment into the basins of its local maxima, working on its pixels only.

    A pixel is a maximum when no 3×3 neighbour is higher (any neighbour: the map is clamped at
    its edges); 8-connected maxima are one marker, numbered in raster order. Every pixel points
    to its highest neighbour in the same segment when that one is higher than itself (the first
    in raster order on ties), and pointer jumping follows the steepest ascent to its end.
    (scipy's watershed_ift let distant markers flood across the background and take pixels of
    other segments.) A stack of maps ``(n, H, W)`` is deblended at once, map by map.
    ``segments`` are labels or, for segments of any size, the pixels above the threshold.
    """
    ny, nx = segments.shape[-2:]
    flat_seg, flat_val = segments.ravel(), log_odds.ravel()
    index = np.flatnonzero(flat_seg)  # the segment pixels, raster order
    seg, value = flat_seg[index], flat_val[index]
    # the flat indices of the 8 neighbours (8, n); past a map's edge, the pixel itself
    nb = index + (_DY * nx + _DX)[:, None]
    y, x = np.divmod(index % (ny * nx), nx)
    edge = np.flatnonzero((y == 0) | (y == ny - 1) | (x == 0) | (x == nx - 1))
    if edge.size:
        ye, xe = y[edge], x[edge]
        # rows -1 and ny (columns -1 and nx), past the edges, are both ny modulo ny + 1
        out = ((ye + _DY[:, None]) % (ny + 1) == ny) | ((xe + _DX[:, None]) % (nx + 1) == nx)
        nb[:, edge] = np.where(out, index[edge], nb[:, edge])
    nb_value = flat_val[nb]
    peak = ~(nb_value > value).any(axis=0)
    climb = np.where((flat_seg[nb] == seg) & (nb_value > value), nb_value, -np.inf)
    step = climb.argmax(axis=0)  # the first of the highest, in raster order
    rows = np.arange(index.size)
    position = np.empty(flat_seg.size, dtype=np.intp)  # flat index -> position in `index`
    position[index] = rows
    parent = np.where(climb[step, rows] > value, position[nb[step, rows]], rows)
    while True:
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            break
        parent = jumped
    peaks = np.zeros(flat_seg.size, dtype=bool)
    peaks[index[peak]] = True
    ahead = nb[4:, peak]  # the neighbours after each maximum in raster order
    marker = np.zeros(index.size, dtype=np.int32)  # each pixel's marker number (0: none)
    if (peaks[ahead] & (ahead != index[peak])).any():  # touching maxima: one marker each
        marker[:] = _label(peaks.reshape(segments.shape))[0].ravel()[index]
    else:  # isolated maxima (the usual case): numbered in raster order, as labelling would
        marker[peak] = np.arange(1, int(peak.sum()) + 1)
    basins = np.zeros(segments.shape, dtype=np.int32)
    basins.ravel()[index] = marker[parent]
    return basins


def _regions_batch(log_odds, threshold, n_pixels, mask, deblend):
    """`detection_regions` of every map of a stack ``(n, H, W)`` at once: labels ``(n, H, W)``
    (``int32``), each map's numbered 1..k in raster order as `detection_regions` numbers them."""
    out = np.zeros(log_odds.shape, dtype=np.int32)
    labels = _segments(log_odds, math.log(threshold), n_pixels, mask, deblend)
    if labels is None:
        return out
    if deblend:
        labels = _deblend(log_odds, labels)
    # labels run over the stack in map order: map i's start after the largest of maps < i
    top = labels.reshape(len(labels), -1).max(axis=1)
    offset = np.maximum.accumulate(np.concatenate([[0], top[:-1]]))
    np.subtract(labels, offset[:, None, None], out=out, where=labels > 0, casting="unsafe")
    return out


# pixels segmented per pass in find_batch (256 maps of 128 x 128)
_PIXELS_PER_SEGMENTATION = 256 * 128 * 128


class NeuralSourceFinder:
    """Detect point sources with an r1 detector: one catalog row per region with odds > threshold.

    Every setting is validated here, once; the finder records them all in each catalog it makes
    (``catalog.meta``), and `~astrotrunc.CompletenessFunction`, `~astrotrunc.injection_recovery`
    and the benchmarks take a finder, so "detected" means the same thing everywhere.

    Parameters
    ----------
    detector : `~astrotrunc.SourceDetector`, optional
        The shipped default (trained on `~astrotrunc.PointSourceModel.paper`) when `None`.
    threshold : float
        Odds threshold r1 > threshold (5 in the paper); positive and finite.
    n_pixels : int
        Minimum number of connected pixels of a region.
    flux_threshold : float, optional
        Which F_th channel of the detector to use (its default when `None`).
    deblend : bool
        Split regions at their local odds maxima (see `detection_regions`).
    tile_overlap : int
        Overlap (pixels) of the tiles on maps larger than four times the training shape.
    batch_size : int
        Maps (or tiles) per network call.
    flux_method : {'neural', 'psf', 'matched'}, optional
        How the flux columns are measured (`~astrotrunc.detection.photometry`): ``'neural'``
        (the learned `~astrotrunc.detection.FluxEstimator`: median flux of the source the
        detection stands for, uncertainties that include confusion), ``'psf'`` (photutils
        `~photutils.psf.PSFPhotometry` at r1's positions, errors inflated by the learned
        confusion term) or ``'matched'`` (matched-filter flux, Poisson error only). By default
        ``'neural'`` when a flux estimator for this detector is given or shipped (the default
        detector's), ``'matched'`` otherwise.
    photometry : `~astrotrunc.detection.FluxEstimator`, optional
        The learned flux estimator (the shipped one when it was trained for ``detector``).
    backend : {'auto', 'torch', 'openvino', 'onnxruntime'}
        Where the detector's and the flux estimator's networks run: torch (the reference),
        OpenVINO or ONNX Runtime, faster on CPUs (``pip install "astrotrunc[openvino]"`` or
        ``"astrotrunc[onnx]"``); the same catalogs to float32 rounding. OpenVINO runs the
        detector's network fastest; under ``'openvino'`` the flux estimator's runs in ONNX
        Runtime where that is installed (faster there). ``'auto'`` (the default): the first of
        OpenVINO and ONNX Runtime installed when the detector is on the CPU, else torch. The
        attribute ``backend`` holds the choice.

    Raises
    ------
    TypeError
        ``detector`` is not a `~astrotrunc.SourceDetector`.
    ValueError
        A setting out of range (threshold <= 0 or NaN, n_pixels < 1, an F_th the detector does
        not have, a negative or too large tile overlap).

    Examples
    --------
    >>> from astrotrunc import NeuralSourceFinder, PointSourceModel
    >>> finder = NeuralSourceFinder(threshold=5)
    >>> cat = finder(PointSourceModel.paper().simulate(1, seed=3).maps[0])
    >>> len(cat) > 0, cat.meta["threshold"]
    (True, 5.0)
    """

    def __init__(self, detector=None, threshold=5.0, n_pixels=1, flux_threshold=None, *,
                 deblend=True, tile_overlap=32, batch_size=16, flux_method=None,
                 photometry=None, backend="auto"):
        if detector is None:
            detector = default_detector()
        elif not isinstance(detector, SourceDetector):
            msg = f"detector must be a SourceDetector, got {type(detector).__name__}"
            raise TypeError(msg)
        self.detector = detector
        self.threshold = _check_threshold(threshold)
        self.n_pixels = _check_n_pixels(n_pixels)
        self.channel = detector.channel(flux_threshold)
        self.flux_threshold = detector.flux_thresholds[self.channel]
        if not isinstance(deblend, (bool, np.bool_)):
            msg = f"deblend must be True or False, got {deblend!r}"
            raise TypeError(msg)
        self.deblend = bool(deblend)
        if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, numbers.Integral) \
                or not 0 <= tile_overlap < min(detector.shape):
            msg = (f"tile_overlap must be an integer in [0, {min(detector.shape)}) (smaller than "
                   f"the detector's training shape), got {tile_overlap!r}")
            raise ValueError(msg)
        self.tile_overlap = int(tile_overlap)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 1:
            msg = f"batch_size must be an integer >= 1, got {batch_size!r}"
            raise ValueError(msg)
        self.batch_size = int(batch_size)
        from .photometry import resolve_photometry

        self.backend = check_backend(backend, detector.psf_stamp.device)
        self.flux_method, self.photometry = resolve_photometry(detector, flux_method, photometry)

    def __repr__(self):
        return (f"NeuralSourceFinder(detector={self.detector.name!r}, threshold={self.threshold}, "
                f"n_pixels={self.n_pixels}, flux_threshold={self.flux_threshold:g}, "
                f"deblend={self.deblend}, tile_overlap={self.tile_overlap})")

    @property
    def settings(self) -> dict:
        """Everything that defines a detection (recorded in catalog metadata and r2 files)."""
        return {"detector": self.detector.name, "detector_id": self.detector.identity,
                "threshold": self.threshold, "flux_threshold": float(self.flux_threshold),
                "n_pixels": self.n_pixels, "deblend": self.deblend,
                "tile_overlap": self.tile_overlap}

    # -- one map -----------------------------------------------------------------------------
    def prepare(self, data, mask=None, wcs=None, *, _stacklevel=2):
        """Validate one map; the map in the detector's unit, its bad pixels, unit and WCS.

        Parameters are those of `__call__`.

        Warns (`~astrotrunc.AstrotruncWarning`) about NaN/infinite pixels outside the mask and
        non-physical pixels (both are masked), and (`~astrotrunc.OutOfDomainWarning`) about
        every way the map differs from the detector's training maps.

        Returns
        -------
        data : 2-D float64 array
        bad : 2-D bool array
        unit : `~astropy.units.Unit` or None
            The map's own unit (`None` when it had none).
        wcs : `~astropy.wcs.WCS` or None
        """
        if wcs is None:
            wcs = getattr(data, "wcs", None)
        data, bad, unit = validate_map(data, mask)
        if min(data.shape) < 3:
            msg = (f"a map of shape {data.shape} is too small to hold a point source; expected "
                   "at least 3x3 pixels")
            raise ValueError(msg)
        det = self.detector
        if unit is not None:
            try:
                data = data * unit.to(u.Unit(det.flux_unit))
            except u.UnitsError:
                msg = (f"the map is in {unit.to_string() or 'dimensionless units'!s}, which does "
                       f"not convert to the detector's flux unit "
                       f"{det.flux_unit or 'dimensionless (model units)'!r}; give the map in "
                       "the detector's units or retrain a detector for these maps")
                raise ValueError(msg) from None
        nonfinite = ~np.isfinite(data) & ~bad
        if nonfinite.any() and not (bad | nonfinite).all():
            warnings.warn(f"{int(nonfinite.sum())} NaN or infinite pixel(s) are not in the mask: "
                          "they are treated as masked", AstrotruncWarning, stacklevel=_stacklevel)
        bad |= nonfinite
        limit = nonphysical_limit(det.domain)
        with np.errstate(invalid="ignore"):
            wild = ~bad & (np.abs(data) > limit)
        if wild.any():
            warnings.warn(f"{int(wild.sum())} pixel(s) with |value| > {limit:.3g} (up to "
                          f"{np.abs(data[wild]).max():.3g}) are not physical for this detector: "
                          "they are masked", AstrotruncWarning, stacklevel=_stacklevel)
            bad |= wild
        if bad.all():
            msg = "every pixel of the map is masked or not finite: nothing to detect"
            raise ValueError(msg)
        scale = None
        if wcs is not None:
            if not isinstance(wcs, WCS):
                msg = f"wcs must be an astropy WCS, got {type(wcs).__name__}"
                raise TypeError(msg)
            if wcs.array_shape is not None and tuple(wcs.array_shape) != data.shape:
                msg = (f"the WCS describes a {tuple(wcs.array_shape)} image but the data are "
                       f"{data.shape}")
                raise ValueError(msg)
            sky = celestial_wcs(wcs)
            if sky is not None:
                scale = pixel_scale_deg(sky)
        differences = domain_differences(det.domain, data, bad, pixel_scale_deg=scale)
        if differences:
            warnings.warn(f"this map is outside the domain of detector {det.name!r}: "
                          + "; ".join(differences) + f" -- {_RETRAIN_HINT}",
                          OutOfDomainWarning, stacklevel=_stacklevel)
        return data, bad, unit, wcs

    def __call__(self, data, mask=None, wcs=None, *, return_segmentation=False, _stacklevel=3):
        """Detect the sources of one map.

        Parameters
        ----------
        data : 2-D array, `~astropy.units.Quantity`, `~astropy.nddata.NDData` or `torch.Tensor`
            The map. A Quantity (or NDData with a unit) is converted to the detector's flux unit
            (`ValueError` when not convertible); an NDData brings its own ``wcs`` and ``mask``.
        mask : 2-D bool array, optional
            True where pixels are bad; NaN, infinite and non-physical pixels are masked too.
        wcs : `~astropy.wcs.WCS`, optional
            Celestial WCS of the map, for sky coordinates (and the pixel-scale check).
        return_segmentation : bool
            Also return the `~photutils.segmentation.SegmentationImage` of the regions.

        Returns
        -------
        catalog : `~astropy.table.QTable` or `None`
            Columns `~astrotrunc.detection.CATALOG_COLUMNS` (photutils 3.x names, with
            descriptions): ``flux`` is the median flux of the source the detection stands for,
            ``flux_lo``/``flux_hi`` its 68 % interval and ``flux ± 2 flux_err`` its 95 % one
            (with the default ``flux_method``; see `~astrotrunc.detection.photometry`);
            ``flux_matched`` is the matched-filter flux (all light under the PSF). `None` (with
            a `~photutils.utils.NoDetectionsWarning`) if nothing is detected. The flux columns
            are in the map's unit (the detector's when the map has none); ``meta`` holds the
            finder's `settings` and ``flux_method``.
        segmentation : `~photutils.segmentation.SegmentationImage`
            Only with ``return_segmentation=True``.
        """
        data, bad, unit, wcs = self.prepare(data, mask, wcs, _stacklevel=_stacklevel)
        log_odds = self.detector.log_odds(data, bad, flux_threshold=self.flux_threshold,
                                          tile_overlap=self.tile_overlap,
                                          batch_size=self.batch_size, backend=self.backend)
        segm = self.segment(log_odds, bad)
        if segm is None:
            warnings.warn("No sources were found (no region with odds above the threshold).",
                          NoDetectionsWarning, stacklevel=_stacklevel - 1)
            return (None, None) if return_segmentation else None
        catalog = self.describe(data, log_odds, segm, bad, wcs=wcs, unit=unit).to_table()
        return (catalog, segm) if return_segmentation else catalog

    def segment(self, log_odds, bad=None):
        """The regions R_i of a log-odds map with this finder's settings (`detection_regions`).

        Parameters
        ----------
        log_odds : 2-D array
            The detector's log-odds map (of this finder's F_th channel).
        bad : 2-D bool array, optional
            Pixels excluded from every region.

        Returns
        -------
        `~photutils.segmentation.SegmentationImage` or `None`
        """
        return detection_regions(log_odds, self.threshold, self.n_pixels, bad, self.deblend)

    def describe(self, data, log_odds, segm, bad=None, *, wcs=None, unit=None):
        """The lazy catalog (`~astrotrunc.detection.catalog.RegionCatalog`) of found regions.

        Columns are computed on first use: ``describe(...).to_table(["x_centroid",
        "y_centroid"])`` computes the positions only.

        Parameters
        ----------
        data : 2-D array
            The map, in the detector's flux unit.
        log_odds : 2-D array
            Its log-odds map.
        segm : `~photutils.segmentation.SegmentationImage`
            The regions (`segment`).
        bad : 2-D bool array, optional
            Bad pixels.
        wcs : `~astropy.wcs.WCS`, optional
            For sky coordinates.
        unit : `~astropy.units.Unit`, optional
            Unit of the flux columns (the detector's by default).

        Returns
        -------
        `~astrotrunc.detection.catalog.RegionCatalog`
        """
        bad = np.zeros(np.shape(data), bool) if bad is None else np.asarray(bad, bool)
        return RegionCatalog(data, log_odds, segm, bad, self.detector, wcs, flux_unit=unit,
                             meta=self.settings, flux_method=self.flux_method,
                             photometry=self.photometry, backend=self.backend)

    # -- many maps -----------------------------------------------------------------------------
    def find_batch(self, maps, mask=None):
        """Region label maps ``(n, H, W)`` (0 = background) of a batch of same-shape maps.

        The detector runs batched; the regions of every map are found exactly as for one map
        (same threshold, channel, ``n_pixels``, deblending, bad-pixel filling). Maps are taken as
        they are, in the detector's flux unit (no domain check: meant for simulations); NaN,
        infinite and masked pixels are bad.

        Parameters
        ----------
        maps : array or `torch.Tensor`, ``(n, H, W)``
            The maps.
        mask : bool array ``(n, H, W)`` or ``(H, W)``, optional
            Bad pixels.

        Returns
        -------
        `numpy.ndarray`
            ``int32`` labels; region ``j`` of map ``i`` is ``labels[i] == j``.
        """
        maps, bad = self._batch(maps, mask)
        out = np.zeros(maps.shape, dtype=np.int32)
        # segmented a few megapixels at a time: the float64 log-odds stack stays small
        step = max(1, _PIXELS_PER_SEGMENTATION // max(1, maps.shape[1] * maps.shape[2]))
        for i in range(0, len(maps), step):
            part = slice(i, i + step)
            log_odds = self._stacked_log_odds(maps[part], bad[part])
            out[part] = _regions_batch(log_odds, self.threshold, self.n_pixels, bad[part],
                                       self.deblend)
        return out

    def log_odds_batch(self, maps, mask=None):
        """The detector's log-odds ``(n, H, W)`` of a batch of maps (this finder's channel).

        Parameters and conventions are those of `find_batch`; bad pixels get ``-inf``.

        Returns
        -------
        `numpy.ndarray`
            float64.
        """
        maps, bad = self._batch(maps, mask)
        return self._stacked_log_odds(maps, bad)

    def _batch(self, maps, mask):
        """The maps as float32 numpy ``(n, H, W)``, bad pixels filled, and the bad pixels.

        In numpy, not torch: torch's element-wise operations on a batch run in parallel, and
        its OpenMP threads then spin and take the cores from the runtime's (and a process
        forked after them hangs in its first parallel torch operation).
        """
        import torch

        if isinstance(maps, torch.Tensor):
            maps = maps.detach().cpu().numpy()
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim != 3:
            msg = f"maps must be a batch (n, H, W), got shape {maps.shape}"
            raise ValueError(msg)
        bad = ~np.isfinite(maps)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            try:
                bad |= mask
            except ValueError:
                msg = f"mask shape {mask.shape} does not broadcast to the maps' {maps.shape}"
                raise ValueError(msg) from None
        if bad.any():  # the same filling as for one map, of the maps that need it
            maps = maps.copy()  # not the caller's array
            for i in np.flatnonzero(bad.any(axis=(1, 2))):
                maps[i] = fill_bad_pixels(maps[i], bad[i])
        return maps, bad

    def _stacked_log_odds(self, maps, bad):
        """The log-odds maps ``(n, H, W)`` (float64; ``-inf`` where bad) of a batch, computed in
        batches of ``batch_size`` (maps larger than four training shapes one by one, tiled)."""
        det, k = self.detector, self.channel
        large = maps.shape[1] > 4 * det.shape[0] or maps.shape[2] > 4 * det.shape[1]
        step = 1 if large else self.batch_size
        out = np.empty(maps.shape, dtype=np.float64)  # an empty batch gives an empty stack
        for start in range(0, len(maps), step):
            part = slice(start, start + step)
            if large:
                out[start] = det.log_odds(maps[start], bad[start],
                                          flux_threshold=self.flux_threshold,
                                          tile_overlap=self.tile_overlap, backend=self.backend)
            else:
                out[part] = det._inference_logits(maps[part], k, self.backend)[:, 0].cpu().numpy()
                out[part][bad[part]] = -np.inf
        return out


def as_finder(finder, *, threshold=None, flux_threshold=None, n_pixels=None):
    """A `NeuralSourceFinder` from a finder, a detector or `None` (the default detector).

    Parameters
    ----------
    finder : `NeuralSourceFinder`, `~astrotrunc.SourceDetector` or None
        A finder is returned as it is; a detector (or `None`) gets a finder with the settings.
    threshold, flux_threshold, n_pixels : optional
        Settings for a new finder; giving them with a finder is a `TypeError` (the finder
        carries its own).

    Returns
    -------
    `NeuralSourceFinder`
    """
    given = {k: v for k, v in (("threshold", threshold), ("flux_threshold", flux_threshold),
                               ("n_pixels", n_pixels)) if v is not None}
    if isinstance(finder, NeuralSourceFinder):
        if given:
            msg = (f"{sorted(given)} belong to the NeuralSourceFinder; build the finder with "
                   "them instead of passing them here")
            raise TypeError(msg)
        return finder
    if finder is not None and not isinstance(finder, SourceDetector):
        msg = f"expected a NeuralSourceFinder or a SourceDetector, got {type(finder).__name__}"
        raise TypeError(msg)
    return NeuralSourceFinder(finder, **given)


def find_sources(data, detector=None, *, wcs=None, mask=None, threshold=5.0, n_pixels=1,
                 flux_threshold=None, deblend=True, return_segmentation=False, flux_method=None,
                 photometry=None, backend="auto"):
    """Detect point sources with the r1 detector: one catalog row per region with odds > threshold.

    A thin wrapper: ``NeuralSourceFinder(detector, threshold, n_pixels, flux_threshold,
    deblend=deblend, flux_method=flux_method, photometry=photometry, backend=backend)(data,
    mask, wcs)``; see
    `NeuralSourceFinder` for the settings and `NeuralSourceFinder.__call__` for the map and the
    catalog.

    Parameters
    ----------
    data : 2-D array, `~astropy.units.Quantity`, `~astropy.nddata.NDData` or `torch.Tensor`
        The map, in (or convertible to) the detector's flux unit.
    detector : `~astrotrunc.SourceDetector`, optional
        The shipped default when `None`.
    wcs : `~astropy.wcs.WCS`, optional
        Celestial WCS of the map.
    mask : 2-D bool array, optional
        True where pixels are bad.
    threshold : float
        Odds threshold (5 in the paper).
    n_pixels : int
        Minimum region size.
    flux_threshold : float, optional
        F_th channel (the detector's default when `None`).
    deblend : bool
        Split regions at their local odds maxima.
    return_segmentation : bool
        Also return the regions' `~photutils.segmentation.SegmentationImage`.
    flux_method : {'neural', 'psf', 'matched'}, optional
        How fluxes are measured (see `NeuralSourceFinder`).
    photometry : `~astrotrunc.detection.FluxEstimator`, optional
        The learned flux estimator (the shipped one for the default detector).
    backend : {'auto', 'torch', 'openvino', 'onnxruntime'}
        Where the networks run (see `NeuralSourceFinder`).

    Returns
    -------
    catalog : `~astropy.table.QTable` or `None`
        See `NeuralSourceFinder.__call__`; `None` (with a `~photutils.utils.NoDetectionsWarning`)
        if nothing is detected.
    segmentation : `~photutils.segmentation.SegmentationImage`
        Only with ``return_segmentation=True``.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel, find_sources
    >>> sims = PointSourceModel.paper().simulate(1, seed=3)
    >>> cat = find_sources(sims.maps[0], wcs=PointSourceModel.paper().wcs)
    >>> cat.colnames[:4]
    ['id', 'x_centroid', 'y_centroid', 'sky_centroid']
    """
    finder = NeuralSourceFinder(detector, threshold, n_pixels, flux_threshold, deblend=deblend,
                                flux_method=flux_method, photometry=photometry, backend=backend)
    # warnings point at the caller of find_sources
    return finder(data, mask, wcs, return_segmentation=return_segmentation, _stacklevel=4)
