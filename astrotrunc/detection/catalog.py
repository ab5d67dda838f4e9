"""Describing detected regions: the catalog columns, computed lazily (photutils style).

Finding (`~astrotrunc.NeuralSourceFinder`) and describing are two steps: the finder hands the
odds map and the regions to `RegionCatalog`, whose columns are computed on first use and
assembled by `RegionCatalog.to_table`.
"""

from __future__ import annotations

import functools

import numpy as np
from astropy import units as u
from astropy.coordinates import Galactic, SkyCoord, UnitSphericalRepresentation
from astropy.table import QTable

from .._utils import celestial_wcs, clip, pixel_scale_deg

__all__ = ["RegionCatalog", "peak_centroids", "empty_catalog", "CATALOG_COLUMNS",
           "COLUMN_DESCRIPTIONS", "FLUX_DESCRIPTIONS"]

#: The columns of a `~astrotrunc.find_sources` catalog, in order.
CATALOG_COLUMNS = ("id", "x_centroid", "y_centroid", "sky_centroid", "l", "b", "flux", "flux_err",
                   "flux_lo", "flux_hi", "flux_matched", "peak_odds", "detection_probability",
                   "n_pixels", "label")

_FLUX_DEFINITION = ("of the source the detection stands for (the brightest true source centred "
                    "in its region; blended neighbours are part of the uncertainty)")
#: Descriptions of the flux columns for each ``flux_method`` (the others are fixed).
FLUX_DESCRIPTIONS = {
    "neural": {
        "flux": "median flux " + _FLUX_DEFINITION + ", learned (FluxEstimator)",
        "flux_err": "symmetric error, confusion included: flux +- 2 flux_err holds 95 % of the "
                    "learned distribution (of the true fluxes, once calibrated)",
        "flux_lo": "16 % quantile of the learned flux distribution",
        "flux_hi": "84 % quantile of the learned flux distribution"},
    "psf": {
        "flux": "photutils PSFPhotometry flux at the r1 position (grouped sources)",
        "flux_err": "PSF fit error and learned confusion scatter in quadrature, plus the "
                    "offset from the learned median flux",
        "flux_lo": "flux minus its lower 68 % error (as flux_err, with the learned 16 % quantile)",
        "flux_hi": "flux plus its upper 68 % error (as flux_err, with the learned 84 % quantile)"},
    "matched": {
        "flux": "PSF-matched-filter flux at the r1 position (includes blended neighbours)",
        "flux_err": "Poisson error only: confusion is not included",
        "flux_lo": "flux - flux_err (Poisson only)",
        "flux_hi": "flux + flux_err (Poisson only)"},
}
#: Descriptions of the other catalog columns.
COLUMN_DESCRIPTIONS = {
    "id": "row number (1-based)",
    "x_centroid": "source position: odds peak refined by the 3x3 odds-weighted centroid",
    "y_centroid": "source position: odds peak refined by the 3x3 odds-weighted centroid",
    "sky_centroid": "sky position of (x_centroid, y_centroid)",
    "l": "Galactic longitude", "b": "Galactic latitude",
    "flux_matched": "PSF-matched-filter flux at the r1 position (all light under the PSF, "
                    "neighbours included; the estimate before v0.3)",
    "peak_odds": "largest r1 odds in the region",
    "detection_probability": "1 - prod(1 - p) over the region's pixels, p = odds / (1 + odds)",
    "n_pixels": "pixels in the region", "label": "region label in the segmentation image",
}


def peak_centroids(odds, segm):
    """Source position of every region: its odds peak, refined by the odds-weighted 3×3 centroid.

    A region that merges several sources (bright neighbours at a low odds threshold) is placed on
    its most probable source centre, not between the sources as a whole-region centroid would be.

    Parameters
    ----------
    odds : 2-D array
        The odds map.
    segm : `~photutils.segmentation.SegmentationImage`
        The regions.

    Returns
    -------
    x, y : arrays
        Pixel coordinates (0-based), in the order of ``segm.labels``.
    """
    index, region = _region_pixels(segm)
    peaks = _peak_index(np.asarray(odds).ravel()[index], index, region)
    return _centroids_at(odds, segm.data, peaks)


def _galactic_coord(lon, lat):
    """``SkyCoord(lon, lat, unit="deg", frame="galactic")``, built from its representation
    without copies: half the time."""
    return SkyCoord(Galactic(UnitSphericalRepresentation(lon * u.deg, lat * u.deg, copy=False),
                             copy=False), copy=False)


#: The sky position of a source on a map without a celestial WCS, indexed to any length.
_NAN_SKY = _galactic_coord(np.array([np.nan]), np.array([np.nan]))


def _region_pixels(segm):
    """Flat indices (raster order) of the pixels of all regions, and each one's region number
    (the position of its label in ``segm.labels``)."""
    flat = segm.data.ravel()
    index = np.flatnonzero(flat)
    labels = np.asarray(segm.labels)
    if labels.size and labels[-1] == labels.size:  # labels 1..n: no search needed
        return index, flat[index] - 1
    return index, np.searchsorted(labels, flat[index])


def _peak_index(values, index, region):
    """Flat index of the largest value of every region (the first in raster order on ties)."""
    order = np.lexsort((-index, values, region))
    ordered = region[order]
    last = np.ones(len(ordered), dtype=bool)  # the last pixel of each region (np.diff: slower)
    np.not_equal(ordered[1:], ordered[:-1], out=last[:-1])
    return index[order[last]]


_BOX = np.mgrid[-1:2, -1:2]  # (dy, dx) of a 3x3 box (np.mgrid costs 60 us a call)


def _centroids_at(odds, labels, peaks):
    """The odds-weighted centroids of the same-label pixels of the 3×3 boxes around ``peaks``."""
    ny, nx = labels.shape
    py, px = np.divmod(peaks, nx)
    yy = clip(py[:, None, None] + _BOX[0], 0, ny - 1)
    xx = clip(px[:, None, None] + _BOX[1], 0, nx - 1)
    same = labels[yy, xx] == labels[py, px][:, None, None]
    w = np.where(same, odds[yy, xx], 0.0)
    w_sum = w.sum((1, 2))
    return (w * xx).sum((1, 2)) / w_sum, (w * yy).sum((1, 2)) / w_sum


class RegionCatalog:
    """The catalog of detected regions; every column is computed on first use.

    Parameters
    ----------
    data : 2-D array
        The map in the detector's flux unit.
    log_odds : 2-D array
        The detector's log-odds map (``-inf`` at bad pixels).
    segm : `~photutils.segmentation.SegmentationImage`
        The regions R_i.
    bad : 2-D bool array
        Bad pixels.
    detector : `~astrotrunc.SourceDetector`
        For the flux estimate.
    wcs : `~astropy.wcs.WCS`, optional
        Celestial WCS for sky coordinates.
    flux_unit : `~astropy.units.Unit`, optional
        Unit of the flux columns (the map's own unit); the detector's when `None`.
    meta : dict, optional
        The table's metadata (the finder's settings).
    flux_method : {'matched', 'neural', 'psf'}
        How ``flux``, ``flux_err``, ``flux_lo``, ``flux_hi`` are measured (see
        `~astrotrunc.detection.photometry`).
    photometry : `~astrotrunc.detection.photometry.FluxEstimator`, optional
        The learned estimator (``'neural'``; the confusion term of ``'psf'``).
    backend : {'torch', 'openvino', 'onnxruntime'}
        Where the flux estimator's network runs (see `~astrotrunc.NeuralSourceFinder`).
    """

    def __init__(self, data, log_odds, segm, bad, detector, wcs=None, flux_unit=None, meta=None,
                 *, flux_method="matched", photometry=None, backend="torch"):
        self.data, self.log_odds, self.segm, self.bad = data, log_odds, segm, bad
        self.detector, self.wcs = detector, wcs
        self.flux_unit = u.Unit(flux_unit if flux_unit is not None else detector.flux_unit)
        self.meta = dict(meta or {})
        if flux_method not in FLUX_DESCRIPTIONS or (flux_method == "neural" and photometry is None):
            msg = (f"flux_method must be one of {sorted(FLUX_DESCRIPTIONS)} ('neural' needs a "
                   f"FluxEstimator), got {flux_method!r}")
            raise ValueError(msg)
        self.flux_method, self.photometry, self.backend = flux_method, photometry, backend

    def __len__(self):
        return len(self.segm.labels)

    @functools.cached_property
    def odds(self):
        with np.errstate(over="ignore"):
            odds = np.exp(np.clip(self.log_odds, -700, 700))
        odds[self.bad] = 0.0
        return odds

    @functools.cached_property
    def _pixels(self):
        """The region pixels: flat indices, region numbers and odds (0 at bad pixels)."""
        index, region = _region_pixels(self.segm)
        with np.errstate(over="ignore"):
            odds = np.exp(np.clip(self.log_odds.ravel()[index], -700, 700))
        odds[self.bad.ravel()[index]] = 0.0
        return index, region, odds

    @functools.cached_property
    def _peaks(self):
        index, region, odds = self._pixels
        return _peak_index(odds, index, region)

    @functools.cached_property
    def _centroids(self):
        # the odds of the region pixels suffice: the centroid weighs same-region pixels only
        index, _, odds = self._pixels
        region_odds = np.zeros(self.segm.data.size)
        region_odds[index] = odds
        return _centroids_at(region_odds.reshape(self.segm.data.shape), self.segm.data,
                             self._peaks)

    @property
    def x_centroid(self):
        return self._centroids[0] * u.pix

    @property
    def y_centroid(self):
        return self._centroids[1] * u.pix

    @functools.cached_property
    def _sky_wcs(self):
        return celestial_wcs(self.wcs)

    @property
    def _has_sky(self):
        return self._sky_wcs is not None

    @functools.cached_property
    def _galactic(self):
        """Galactic (l, b) of the centroids in deg, l in [0, 360)."""
        w = self._sky_wcs
        if (w.wcs.lngtyp, w.wcs.lattyp) == ("GLON", "GLAT"):  # wcs_to_celestial_frame's test
            # the WCS's own angles: SkyCoord's frame machinery would double the time
            world = w.all_pix2world(*self._centroids, 0)
            return world[w.wcs.lng] % 360, world[w.wcs.lat]
        sky = w.pixel_to_world(*self._centroids).galactic
        return sky.l.deg, sky.b.deg

    @property
    def sky_centroid(self):
        if self._has_sky:
            return _galactic_coord(*self._galactic)
        return _NAN_SKY[np.zeros(len(self), dtype=int)]  # 26 us against 158 to build one

    @property
    def l(self):  # noqa: E743
        if not self._has_sky:  # NaN: no need to go through the coordinates
            return np.full(len(self), np.nan) * u.deg
        return ((self._galactic[0] + 180) % 360 - 180) * u.deg

    @property
    def b(self):
        if not self._has_sky:
            return np.full(len(self), np.nan) * u.deg
        return self._galactic[1] * u.deg

    @functools.cached_property
    def _matched(self):
        """Matched-filter flux and its Poisson error (detector units)."""
        return self.detector.estimate_flux(self.data, *self._centroids, self.bad)

    @functools.cached_property
    def _flux(self):
        from .photometry import measure_fluxes

        columns = measure_fluxes(self.flux_method, self.data, self.bad, *self._centroids,
                                 self.detector, self.photometry, matched=self._matched,
                                 backend=self.backend, b=self.b)  # NaN without a WCS
        scale = u.Unit(self.detector.flux_unit).to(self.flux_unit) * self.flux_unit
        return tuple(c * scale for c in columns)

    @property
    def flux(self):
        return self._flux[0].copy()

    @property
    def flux_err(self):
        return self._flux[1].copy()

    @property
    def flux_lo(self):
        return self._flux[2].copy()

    @property
    def flux_hi(self):
        return self._flux[3].copy()

    @property
    def flux_matched(self):
        return self._matched[0] * u.Unit(self.detector.flux_unit).to(self.flux_unit) \
            * self.flux_unit

    @property
    def peak_odds(self):
        index, _, odds = self._pixels
        return odds[np.searchsorted(index, self._peaks)]

    @property
    def detection_probability(self):
        """``1 - prod(1 - p)`` over the region's pixels, ``p = odds / (1 + odds)``."""
        index, region, _ = self._pixels
        log_odds = np.where(self.bad.ravel()[index], -np.inf, self.log_odds.ravel()[index])
        s = np.bincount(region, weights=-np.logaddexp(0, log_odds), minlength=len(self))
        return -np.expm1(s)

    @property
    def n_pixels(self):
        return np.bincount(self._pixels[1], minlength=len(self))

    @property
    def label(self):
        return np.array(self.segm.labels)

    @property
    def id(self):
        return np.arange(1, len(self) + 1)

    def to_table(self, columns=None) -> QTable:
        """The catalog as a `~astropy.table.QTable` (all `CATALOG_COLUMNS` by default).

        Parameters
        ----------
        columns : list of str, optional
            The columns to compute, in order.

        Returns
        -------
        `~astropy.table.QTable`
        """
        columns = CATALOG_COLUMNS if columns is None else tuple(columns)
        unknown = [c for c in columns if c not in CATALOG_COLUMNS]
        if unknown:
            msg = f"unknown catalog columns {unknown}; available: {list(CATALOG_COLUMNS)}"
            raise ValueError(msg)
        table = QTable()
        for name in columns:  # each column a new object: the table need not copy it
            table.add_column(getattr(self, name), name=name, copy=False)
        _describe(table, self.flux_method)
        table.meta.update(self.meta)
        table.meta["flux_method"] = self.flux_method
        if self._has_sky:
            table.meta["pixel_scale_deg"] = pixel_scale_deg(self._sky_wcs)
        table.meta["flux_unit"] = self.flux_unit.to_string()
        return table


def empty_catalog(flux_unit="", meta=None, flux_method="neural") -> QTable:
    """A catalog with the `CATALOG_COLUMNS` (and their units) and no rows.

    Parameters
    ----------
    flux_unit : str or `~astropy.units.Unit`
        Unit of the flux columns.
    meta : dict, optional
        Table metadata.
    flux_method : {'neural', 'psf', 'matched'}
        Which flux column descriptions to use.

    Returns
    -------
    `~astropy.table.QTable`
    """
    funit = u.Unit(flux_unit)
    empty = np.zeros(0)
    table = QTable()
    table["id"] = np.zeros(0, dtype=int)
    table["x_centroid"] = empty * u.pix
    table["y_centroid"] = empty * u.pix
    table["sky_centroid"] = _galactic_coord(empty, empty)
    table["l"] = empty * u.deg
    table["b"] = empty * u.deg
    for name in ("flux", "flux_err", "flux_lo", "flux_hi", "flux_matched"):
        table[name] = empty * funit
    table["peak_odds"] = empty
    table["detection_probability"] = empty
    table["n_pixels"] = np.zeros(0, dtype=int)
    table["label"] = np.zeros(0, dtype=int)
    _describe(table, flux_method)
    table.meta.update(meta or {})
    table.meta["flux_unit"] = funit.to_string()
    table.meta["flux_method"] = flux_method
    return table


def _describe(table, flux_method):
    """Set the column descriptions of a catalog."""
    descriptions = dict(COLUMN_DESCRIPTIONS, **FLUX_DESCRIPTIONS[flux_method])
    for name in table.colnames:
        if name in descriptions:
            table[name].info.description = descriptions[name]
