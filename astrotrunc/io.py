"""Reading and writing sky maps: FITS images with a WCS, and HEALPix maps.

Maps come back as `~astropy.nddata.NDData` (an image, its `~astropy.wcs.WCS`, its unit and a
boolean bad-pixel mask) so that they plug straight into astropy, photutils and
:func:`astrotrunc.find_sources`. HEALPix maps are read and written through :mod:`healpy` and can
be projected onto a WCS patch (:meth:`HealpixMap.to_patch`, :func:`healpix_to_patch`).

Bad pixels are never silently zero-filled: NaN pixels, pixels flagged in a stored mask and
HEALPix ``UNSEEN`` pixels all end up ``True`` in the ``mask`` (``True`` = bad, as in
`~astropy.nddata.NDData`).
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import healpy as hp
import numpy as np
from astropy import units as u
from astropy.coordinates import (BaseCoordinateFrame, Galactic, SkyCoord,
                                 UnitSphericalRepresentation, frame_transform_graph)
from astropy.io import fits
from astropy.nddata import NDData
from astropy.wcs import WCS
from astropy.wcs.utils import celestial_frame_to_wcs

from ._utils import _to_numpy, atomic_write, check_writable
from .exceptions import AstrotruncWarning, NoWCSWarning

__all__ = ["HealpixMap", "healpix_to_patch", "make_wcs", "read_map", "write_map"]

#: Extension name of the bad-pixel mask written by :func:`write_map`.
MASK_EXTNAME = "MASK"

_WCS_SHAPE_HELP = "a 2-D celestial WCS whose pixel shape (nx, ny) matches the data"
_PROJECT_HELP = "center (SkyCoord or (lon, lat)), shape (ny, nx) and resolution (angle per pixel)"


# ----------------------------------------------------------------------------------------------
# Frames, centres and resolutions
# ----------------------------------------------------------------------------------------------
def _frame(frame) -> BaseCoordinateFrame:
    """An astropy frame instance from a name, a frame class or a frame instance."""
    if isinstance(frame, BaseCoordinateFrame):
        return frame
    if isinstance(frame, type) and issubclass(frame, BaseCoordinateFrame):
        return frame()
    if isinstance(frame, str):
        cls = frame_transform_graph.lookup_name(frame.lower())
        if cls is not None:
            return cls()
    raise ValueError(f"unknown coordinate frame {frame!r}; expected an astropy frame name such as "
                     "'galactic', 'icrs' or 'fk5', or a frame instance")


def _lonlat(coord) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude in degrees of a SkyCoord or frame, in its own frame."""
    sph = coord.represent_as(UnitSphericalRepresentation)
    return sph.lon.to_value(u.deg), sph.lat.to_value(u.deg)


def _center(center, frame: BaseCoordinateFrame) -> tuple[float, float]:
    """(lon, lat) in degrees of ``center`` in ``frame``."""
    if isinstance(center, (SkyCoord, BaseCoordinateFrame)):
        lon, lat = _lonlat(center.transform_to(frame))
    else:
        try:
            lon, lat = center
            lon = u.Quantity(lon, u.deg).to_value(u.deg)
            lat = u.Quantity(lat, u.deg).to_value(u.deg)
        except (TypeError, ValueError, u.UnitsError) as err:
            raise ValueError(f"center {center!r} is not a sky position; expected a SkyCoord or a "
                             "(lon, lat) pair of angles (degrees if plain numbers)") from err
    lon, lat = float(np.squeeze(lon)), float(np.squeeze(lat))
    if not (np.isfinite(lon) and np.isfinite(lat) and -90.0 <= lat <= 90.0):
        raise ValueError(f"center ({lon}, {lat}) deg is not a valid sky position; expected a "
                         "finite longitude and a latitude in [-90, 90] deg")
    return lon, lat


def _shape(shape) -> tuple[int, int]:
    if np.isscalar(shape):
        shape = (shape, shape)
    try:
        ny, nx = (int(n) for n in shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"shape {shape!r} is not a map shape; expected (ny, nx) positive "
                         "integers") from err
    if ny < 1 or nx < 1 or (ny, nx) != tuple(shape):
        raise ValueError(f"shape {tuple(shape)!r} is not a map shape; expected (ny, nx) positive "
                         "integers")
    return ny, nx


def _resolution(resolution) -> tuple[float, float]:
    """(dy, dx) pixel size in degrees from an angle or a pair of angles."""
    try:
        res = np.atleast_1d(u.Quantity(resolution, u.deg).to_value(u.deg)).astype(float)
    except (TypeError, ValueError, u.UnitsError) as err:
        raise ValueError(f"resolution {resolution!r} is not an angle; expected an angle per pixel, "
                         "e.g. 0.625 * u.deg, or a (dy, dx) pair") from err
    if res.size == 1:
        res = np.repeat(res, 2)
    if res.size != 2 or not np.all(np.isfinite(res)) or np.any(res <= 0):
        raise ValueError(f"resolution {resolution!r} is not a positive angle per pixel; expected "
                         "e.g. 0.625 * u.deg or a (dy, dx) pair")
    return float(res[0]), float(res[1])


def make_wcs(shape, center, resolution, projection="CAR", frame="galactic") -> WCS:
    """The standard celestial WCS of a map: centred on ``center``, square pixels of ``resolution``.

    Longitude increases to the left (``CDELT1 < 0``) and latitude upwards, as on the sky; the
    reference pixel is the centre of the array (``CRPIX = (n + 1) / 2``, 1-based), so that a map
    of an even number of pixels has pixel *edges*, not centres, on the central meridian. The
    paper's map is ``make_wcs((128, 128), (0, 0), 0.625 * u.deg)``: 128 × 128 pixels whose outer
    edges are at l, b = ±40°.

    For a centre off the equator of ``frame`` the reference point sits at ``center`` (FITS
    convention), so a ``CAR`` patch is an oblique plate carrée: undistorted at its centre rather
    than aligned with lines of constant latitude. Use ``projection="TAN"`` for small patches.

    Parameters
    ----------
    shape : int or tuple of int
        ``(ny, nx)`` (numpy order); an int gives a square map.
    center : `~astropy.coordinates.SkyCoord` or tuple
        Map centre: a SkyCoord (any frame, transformed to ``frame``) or a ``(lon, lat)`` pair of
        angles in ``frame`` (plain numbers are degrees).
    resolution : `~astropy.units.Quantity`
        Angular size of a pixel (or a ``(dy, dx)`` pair); plain numbers are degrees.
    projection : str
        FITS projection code: ``"CAR"``, ``"TAN"``, ``"MOL"``, ``"AIT"``, ...
    frame : str or `~astropy.coordinates.BaseCoordinateFrame`
        Celestial frame of the axes: ``"galactic"`` (``GLON``/``GLAT``), ``"icrs"`` or ``"fk5"``
        (``RA``/``DEC``).

    Returns
    -------
    wcs : `~astropy.wcs.WCS`
        With ``pixel_shape`` / ``array_shape`` set to the map's shape.

    Examples
    --------
    >>> import astropy.units as u
    >>> from astrotrunc import make_wcs
    >>> wcs = make_wcs((128, 128), (0, 0), 0.625 * u.deg)
    >>> list(wcs.wcs.ctype), wcs.wcs.crpix.tolist(), wcs.wcs.cdelt.tolist()
    (['GLON-CAR', 'GLAT-CAR'], [64.5, 64.5], [-0.625, 0.625])
    >>> wcs.array_shape
    (128, 128)
    >>> edge = wcs.pixel_to_world(-0.5, -0.5)   # bottom-left corner of the map
    >>> float(edge.l.wrap_at(180 * u.deg).deg), float(edge.b.deg)
    (40.0, -40.0)
    """
    ny, nx = _shape(shape)
    dy, dx = _resolution(resolution)
    frame = _frame(frame)
    lon, lat = _center(center, frame)
    if not isinstance(projection, str) or not re.fullmatch(r"[A-Z]{3}", projection.upper()):
        raise ValueError(f"projection {projection!r} is not a FITS projection code; expected three "
                         "letters such as 'CAR', 'TAN', 'MOL'")
    try:
        wcs = celestial_frame_to_wcs(frame, projection=projection.upper())
    except ValueError as err:
        raise ValueError(f"frame {frame.name!r} has no FITS celestial axes; expected 'galactic', "
                         "'icrs', 'fk5' or 'fk4'") from err
    wcs.wcs.crval = [lon, lat]
    wcs.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    wcs.wcs.cdelt = [-dx, dy]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.set()
    wcs.pixel_shape = (nx, ny)
    return wcs


# ----------------------------------------------------------------------------------------------
# Array checks
# ----------------------------------------------------------------------------------------------
def _check_image(data, what="map") -> np.ndarray:
    data = _to_numpy(data)
    if data.ndim != 2:
        hint = ""
        if data.ndim == 3:
            hint = " (for a batch of maps, write each one, e.g. maps[0])"
        elif data.ndim == 1:
            hint = (" (a 1-D array of 12*nside**2 values is a HEALPix map: wrap it in "
                    "HealpixMap(values, nest=..., frame=...))")
        raise ValueError(f"{what} has shape {data.shape} ({data.ndim}-D); expected a 2-D image "
                         f"of shape (ny, nx){hint}")
    if data.dtype.kind not in "fiub":
        raise ValueError(f"{what} has dtype {data.dtype}; expected real numbers")
    if data.size == 0 or (data.dtype.kind == "f" and not np.isfinite(data).any()):
        raise ValueError(f"{what} of shape {data.shape} has no finite pixel (all NaN or inf); "
                         "expected at least one valid pixel, with bad pixels NaN or masked")
    return data


def _check_mask(mask, shape, what="mask") -> np.ndarray | None:
    if mask is None:
        return None
    mask = _to_numpy(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{what} has shape {mask.shape}; expected the data's shape {tuple(shape)} "
                         "(True = bad pixel)")
    return mask.astype(bool)


def _check_wcs(wcs, shape) -> WCS | None:
    """A 2-D celestial astropy WCS consistent with an image of ``shape`` = (ny, nx)."""
    if wcs is None:
        return None
    if hasattr(wcs, "low_level_wcs") and not isinstance(wcs, WCS):
        wcs = wcs.low_level_wcs
    if not isinstance(wcs, WCS):
        raise ValueError(f"wcs of type {type(wcs).__name__} cannot be written to FITS; expected "
                         "an astropy.wcs.WCS")
    if wcs.naxis != 2:
        raise ValueError(f"wcs has {wcs.naxis} axes; expected {_WCS_SHAPE_HELP} "
                         "(use wcs.celestial for a cube's WCS)")
    if wcs.pixel_shape is not None and tuple(wcs.pixel_shape) != tuple(shape[::-1]):
        raise ValueError(f"wcs pixel_shape (nx, ny) = {tuple(wcs.pixel_shape)} disagrees with the "
                         f"data of shape (ny, nx) = {tuple(shape)}; expected {_WCS_SHAPE_HELP}")
    return wcs


# ----------------------------------------------------------------------------------------------
# HEALPix
# ----------------------------------------------------------------------------------------------
_COORDSYS = {"G": "galactic", "C": "icrs", "Q": "icrs", "E": "barycentricmeanecliptic"}


def _parse_ordering(ordering) -> bool:
    """``nest`` flag from True/False or an ORDERING string."""
    if isinstance(ordering, (bool, np.bool_)):
        return bool(ordering)
    key = str(ordering).strip().upper()
    if key == "RING":
        return False
    if key in ("NESTED", "NEST"):
        return True
    raise ValueError(f"unknown HEALPix ordering {ordering!r}; expected 'RING' or 'NESTED' "
                     "(or nest=True/False)")


def _frame_from_coordsys(coordsys) -> BaseCoordinateFrame:
    key = str(coordsys).strip().upper()[:1]
    if key not in _COORDSYS:
        raise ValueError(f"unknown HEALPix COORDSYS {coordsys!r}; expected 'G' (galactic), "
                         "'C' (equatorial) or 'E' (ecliptic)")
    return _frame(_COORDSYS[key])


def _coordsys_from_frame(frame: BaseCoordinateFrame) -> str:
    if isinstance(frame, Galactic):
        return "G"
    if frame.name in ("icrs", "fk5", "fk4", "fk4noeterms"):
        return "C"
    if "ecliptic" in frame.name:
        return "E"
    raise ValueError(f"frame {frame.name!r} has no HEALPix COORDSYS; expected a galactic, "
                     "equatorial (icrs/fk5) or ecliptic frame")


def _nside(npix: int) -> int:
    if npix < 12 or not hp.isnpixok(npix):
        raise ValueError(f"HEALPix map has {npix} pixels; expected 12*nside**2 values with nside a "
                         "power of 2 (e.g. 768 for nside=8, 49152 for nside=64)")
    return hp.npix2nside(npix)


def _healpix_values(values, unit=None, mask=None):
    """(float values, nside, unit, bad-pixel mask) of a HEALPix array, checked."""
    if isinstance(values, u.Quantity):
        unit = values.unit if unit is None else unit
        values = values.value
    values = _to_numpy(values)
    if values.ndim != 1:
        raise ValueError(f"HEALPix values have shape {values.shape}; expected a 1-D array of "
                         "12*nside**2 values")
    nside = _nside(values.size)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    bad = ~np.isfinite(values) | np.isclose(values, hp.UNSEEN)
    if mask is not None:
        bad |= _check_mask(mask, values.shape, "HEALPix mask")
    return values, nside, _unit(unit), bad


def _unit(unit):
    """A Unit from a Unit, a string (FITS or generic format) or None."""
    if unit is None or isinstance(unit, u.UnitBase):
        return unit
    text = str(unit).strip()
    if not text:
        return None
    for fmt in ("fits", "generic"):
        try:
            return u.Unit(text, format=fmt)
        except ValueError:
            pass
    return u.Unit(text, parse_strict="silent")  # an UnrecognizedUnit keeps the name


def _unit_string(unit) -> str:
    if isinstance(unit, u.UnrecognizedUnit):
        return unit.name
    try:
        return unit.to_string("fits")
    except (ValueError, u.UnitsError):
        return unit.to_string()


class HealpixMap:
    """A HEALPix sky map: one value per HEALPix pixel, its ordering, frame, unit and mask.

    Parameters
    ----------
    values : array-like
        ``12 * nside**2`` pixel values (ndarray, Quantity, masked array or torch tensor).
    nest : bool or str
        ``True`` / ``"NESTED"`` for NESTED ordering, ``False`` / ``"RING"`` for RING.
    frame : str or `~astropy.coordinates.BaseCoordinateFrame`
        Coordinate frame of the pixelisation (``"galactic"``, ``"icrs"``, ...).
    unit : `~astropy.units.Unit` or str, optional
        Unit of the values (taken from ``values`` when it is a Quantity).
    mask : array-like of bool, optional
        ``True`` = bad pixel. Pixels that are NaN or ``healpy.UNSEEN`` are always masked.
    meta : dict or `~astropy.io.fits.Header`, optional
        Metadata; :func:`read_map` puts the FITS header here.

    Attributes
    ----------
    values : `~numpy.ndarray`
        The pixel values as given (masked pixels keep their value, e.g. ``UNSEEN``).
    nside : int
        HEALPix resolution parameter.
    nest : bool
        ``True`` for NESTED ordering.
    frame : `~astropy.coordinates.BaseCoordinateFrame`
        Frame of the pixelisation.
    unit : `~astropy.units.UnitBase` or None
        Unit of the values.
    mask : `~numpy.ndarray` of bool
        ``True`` = bad pixel.
    meta : dict or `~astropy.io.fits.Header`
        Metadata.

    Examples
    --------
    >>> import numpy as np
    >>> import astropy.units as u
    >>> from astrotrunc import HealpixMap
    >>> m = HealpixMap(np.arange(768.0), nest=False, frame="galactic", unit="K")
    >>> m
    <HealpixMap nside=8 RING galactic unit=K masked=0/768>
    >>> patch = m.to_patch((0, 0), (4, 6), 2 * u.deg)
    >>> patch.data.shape, patch.unit, list(patch.wcs.wcs.ctype)
    ((4, 6), Unit("K"), ['GLON-CAR', 'GLAT-CAR'])
    """

    def __init__(self, values, *, nest=False, frame="galactic", unit=None, mask=None, meta=None):
        self.values, self.nside, self.unit, self.mask = _healpix_values(values, unit, mask)
        self.nest = _parse_ordering(nest)
        self.frame = _frame(frame)
        self.meta = meta if meta is not None else {}

    @property
    def ordering(self) -> str:
        """``"NESTED"`` or ``"RING"``."""
        return "NESTED" if self.nest else "RING"

    def __repr__(self):
        unit = f" unit={_unit_string(self.unit)}" if self.unit is not None else ""
        return (f"<HealpixMap nside={self.nside} {self.ordering} {self.frame.name}{unit} "
                f"masked={int(self.mask.sum())}/{self.mask.size}>")

    def to_patch(self, center, shape, resolution, projection="CAR", frame=None,
                 interpolation="nearest") -> NDData:
        """Project a region of the map onto a WCS patch (see :func:`healpix_to_patch`).

        Parameters
        ----------
        center, shape, resolution, projection
            Patch geometry, as in :func:`make_wcs`.
        frame : str or frame, optional
            Frame of the patch axes; the map's own frame by default.
        interpolation : {"nearest", "bilinear"}
            How pixel values are sampled.

        Returns
        -------
        patch : `~astropy.nddata.NDData`
        """
        return healpix_to_patch(self.values, center, shape, resolution, nest=self.nest,
                                frame=self.frame if frame is None else frame,
                                healpix_frame=self.frame, projection=projection,
                                interpolation=interpolation, mask=self.mask, unit=self.unit)

    def write(self, path, *, overwrite=False):
        """Write to a HEALPix FITS file (see :func:`write_map`)."""
        write_map(path, self, overwrite=overwrite)


def healpix_to_patch(values, center, shape, resolution, *, nest=False, frame="galactic",
                     projection="CAR", healpix_frame=None, interpolation="nearest", mask=None,
                     unit=None) -> NDData:
    """Project a HEALPix map onto a WCS patch.

    The centre of every patch pixel is taken to the sky with the patch WCS
    (:func:`make_wcs`), transformed to the frame of the HEALPix map and looked up there:

    * ``interpolation="nearest"`` (default) takes the value of the HEALPix pixel that contains
      the point (`healpy.ang2pix`). Values are copied, not mixed, so counts stay integers and a
      bright pixel stays one pixel; use it when the patch pixels are about as large as, or larger
      than, the HEALPix pixels.
    * ``interpolation="bilinear"`` blends the four nearest HEALPix pixels with the weights of
      `healpy.get_interp_weights` (the same as `healpy.get_interp_val`); a patch pixel is masked
      when any pixel it blends is masked, so bad pixels never leak into good ones.

    The values are sampled as a surface brightness: nothing rescales them by the ratio of pixel
    areas. Patch pixels that fall off the projection or on masked HEALPix pixels are NaN in
    ``data`` and ``True`` in ``mask``.

    Parameters
    ----------
    values : array-like
        ``12 * nside**2`` HEALPix values (UNSEEN and NaN are bad pixels).
    center : `~astropy.coordinates.SkyCoord` or tuple
        Patch centre: a SkyCoord or a ``(lon, lat)`` pair in ``frame`` (plain numbers are degrees).
    shape : int or tuple of int
        ``(ny, nx)``.
    resolution : `~astropy.units.Quantity`
        Angular size of a patch pixel.
    nest : bool or str
        Ordering of ``values``: ``True``/``"NESTED"`` or ``False``/``"RING"``.
    frame : str or frame
        Frame of the patch axes (and of a ``(lon, lat)`` centre).
    projection : str
        FITS projection code of the patch.
    healpix_frame : str or frame, optional
        Frame of the HEALPix pixelisation; ``frame`` by default.
    interpolation : {"nearest", "bilinear"}
        See above.
    mask : array-like of bool, optional
        Extra bad HEALPix pixels (``True`` = bad).
    unit : `~astropy.units.Unit` or str, optional
        Unit of the values.

    Returns
    -------
    patch : `~astropy.nddata.NDData`
        ``data`` (float), ``wcs``, ``mask`` (bool), ``unit`` and ``meta`` (a FITS header
        recording the HEALPix source).

    Examples
    --------
    >>> import numpy as np
    >>> import healpy as hp
    >>> import astropy.units as u
    >>> from astrotrunc import healpix_to_patch
    >>> values = np.zeros(hp.nside2npix(16))
    >>> hot = hp.ang2pix(16, 10.0, 5.0, lonlat=True)     # one hot pixel near l=10, b=5
    >>> values[hot] = 1.0
    >>> l, b = hp.pix2ang(16, hot, lonlat=True)            # its centre
    >>> patch = healpix_to_patch(values, (l, b), (9, 9), 1 * u.deg)
    >>> float(patch.data[4, 4]), float(patch.data[0, 0]), bool(patch.mask.any())
    (1.0, 0.0, False)
    """
    values, nside, unit, bad = _healpix_values(values, unit, mask)
    nest = _parse_ordering(nest)
    if interpolation not in ("nearest", "bilinear"):
        raise ValueError(f"interpolation {interpolation!r} is not supported; expected 'nearest' "
                         "or 'bilinear'")
    hpx_frame = _frame(frame if healpix_frame is None else healpix_frame)

    wcs = make_wcs(shape, center, resolution, projection=projection, frame=frame)
    ny, nx = wcs.array_shape
    yy, xx = np.mgrid[:ny, :nx]
    with warnings.catch_warnings():  # pixels off the projection come back NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        sky = wcs.pixel_to_world(xx.ravel(), yy.ravel())
    lon, lat = _lonlat(sky.transform_to(hpx_frame))
    on_sky = np.isfinite(lon) & np.isfinite(lat)

    out = np.full(lon.size, np.nan)
    out_bad = ~on_sky
    lon_ok, lat_ok = lon[on_sky], lat[on_sky]
    if interpolation == "nearest":
        pix = hp.ang2pix(nside, lon_ok, lat_ok, nest=nest, lonlat=True)
        pix_bad = bad[pix]
        vals = values[pix].astype(np.float64)
    else:
        pix, weights = hp.get_interp_weights(nside, lon_ok, lat_ok, nest=nest, lonlat=True)
        pix_bad = np.any(bad[pix] & (weights > 0), axis=0)
        vals = np.sum(np.where(bad[pix], 0.0, values[pix]) * weights, axis=0)
    out[on_sky] = np.where(pix_bad, np.nan, vals)
    out_bad[on_sky] = pix_bad

    meta = fits.Header()
    meta["HPXNSIDE"] = (nside, "NSIDE of the HEALPix map this patch samples")
    meta["HPXORDER"] = ("NESTED" if nest else "RING", "ordering of the HEALPix map")
    meta["HPXCOORD"] = (_coordsys_from_frame(hpx_frame), "frame of the HEALPix map")
    meta["HPXINTRP"] = (interpolation, "how HEALPix values were sampled")
    return NDData(out.reshape(ny, nx), wcs=wcs, mask=out_bad.reshape(ny, nx), unit=unit,
                  meta=meta)


def _check_healpix_length(path, header, field):
    """Refuse a HEALPix table whose length is not 12 * nside**2 before healpy reads it."""
    if str(header.get("OBJECT", "")).strip().upper() == "PARTIAL" or \
            str(header.get("INDXSCHM", "")).strip().upper() == "EXPLICIT":
        return
    n_rows = int(header.get("NAXIS2", 0))
    match = re.match(r"\s*(\d*)", str(header.get(f"TFORM{field + 1}", "")))
    repeat = int(match.group(1) or 1) if match else 1
    npix = n_rows * repeat
    if npix < 12 or not hp.isnpixok(npix):
        raise ValueError(
            f"HEALPix table in {path} holds {npix} values ({n_rows} rows of {repeat}); "
            "expected 12*nside**2 values with nside a power of 2 (a truncated or "
            "cut map? partial maps need OBJECT='PARTIAL' and an index column)"
        )
    if "NSIDE" in header and hp.nside2npix(int(header["NSIDE"])) != npix:
        raise ValueError(f"HEALPix table in {path} has NSIDE = {header['NSIDE']} "
                         f"({hp.nside2npix(int(header['NSIDE']))} pixels) but holds {npix} values")


def _hdu_data(hdu_obj, path, index):
    """The data of an HDU; a truncated or corrupt file raises `OSError` naming the problem."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = hdu_obj.data
        except (ValueError, TypeError, OSError, IndexError) as err:
            raise OSError(f"{path} is truncated or corrupt: the data of HDU {index} cannot be "
                          f"read ({err}); expected a complete FITS file") from None
    truncated = [w for w in caught if "truncated" in str(w.message)]
    if truncated:
        raise OSError(f"{path} is truncated ({truncated[0].message}); expected a complete FITS "
                      "file (was a download or a write interrupted?)")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return data


def _read_healpix(path, index, header, field, hdu_frame_default) -> HealpixMap:
    pixtype = str(header.get("PIXTYPE", "")).strip().upper()
    if pixtype != "HEALPIX":
        raise ValueError(f"HDU {index} of {path} is a table with PIXTYPE={pixtype or None!r}; "
                         "expected a 2-D image or a HEALPix table (PIXTYPE='HEALPIX')")
    if "ORDERING" not in header:
        raise ValueError(f"HEALPix table in {path} has no ORDERING keyword; expected ORDERING = "
                         "'RING' or 'NESTED'")
    nest = _parse_ordering(header["ORDERING"])
    if "COORDSYS" in header:
        frame = _frame_from_coordsys(header["COORDSYS"])
    else:
        frame = _frame(hdu_frame_default)
        warnings.warn(f"HEALPix map in {path} has no COORDSYS keyword; assuming {frame.name}",
                      AstrotruncWarning, stacklevel=3)
    if not isinstance(field, (int, np.integer)):
        raise ValueError(f"field {field!r} is not a column number; expected one int (0 for the "
                         "first map column)")
    _check_healpix_length(path, header, int(field))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # healpy prints its dtype choice
            values, hdr = hp.read_map(path, field=int(field), hdu=index, nest=None, h=True)
    except (IndexError, KeyError) as err:
        raise ValueError(f"HEALPix table in {path} has no column {field}; expected field < "
                         f"{header.get('TFIELDS')}") from err
    hdr = fits.Header(hdr)
    unit = hdr.get(f"TUNIT{int(field) + 1}")
    if unit is None and header.get("OBJECT", "").upper() == "PARTIAL":
        unit = hdr.get(f"TUNIT{int(field) + 2}")
    return HealpixMap(values, nest=nest, frame=frame, unit=unit, meta=hdr)


# ----------------------------------------------------------------------------------------------
# FITS images
# ----------------------------------------------------------------------------------------------
def _is_image(hdu) -> bool:
    return isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))


def _plane_shape(hdu):
    """The 2-D shape ``(ny, nx)`` of an image HDU (extra length-1 axes allowed), or None."""
    shape = tuple(hdu.shape) if hdu.header.get("NAXIS", 0) else ()
    if len(shape) >= 2 and all(n == 1 for n in shape[:-2]):
        return shape[-2:]  # a 2-D image, possibly (1, 1, ny, nx); also 1 x 1 and 1 x n images
    squeezed = tuple(n for n in shape if n > 1)
    return squeezed if len(squeezed) == 2 else None


def _pick_hdu(hdul, hdu, path):
    if hdu is not None:
        try:
            index = int(hdu) if isinstance(hdu, (int, np.integer)) else hdul.index_of(hdu)
            return index, hdul[index]
        except (KeyError, IndexError) as err:
            raise ValueError(f"{path} has no HDU {hdu!r}; it has "
                             f"{[h.name or i for i, h in enumerate(hdul)]}") from err
    for i, h in enumerate(hdul):
        if h.name == MASK_EXTNAME:
            continue
        if _is_image(h) and h.header.get("NAXIS", 0) >= 2 and _plane_shape(h) is not None:
            return i, h
    for i, h in enumerate(hdul):
        if isinstance(h, fits.BinTableHDU) and str(h.header.get("PIXTYPE", "")).upper().strip() \
                == "HEALPIX":
            return i, h
    shapes = [(i, h.name, getattr(h, "shape", None)) for i, h in enumerate(hdul)]
    raise ValueError(f"{path} holds no 2-D image and no HEALPix table (HDUs: {shapes}); expected "
                     "a FITS image of shape (ny, nx) or a binary table with PIXTYPE='HEALPIX'")


def _image_wcs(header, hdul, data_shape, path):
    """A 2-D celestial WCS of the HDU, or None with a NoWCSWarning."""
    try:
        wcs = WCS(header, fobj=hdul)
    except Exception as err:  # astropy raises many kinds on broken headers
        warnings.warn(f"{path}: the WCS in the header could not be parsed ({err}); using pixel "
                      "coordinates (wcs=None)", NoWCSWarning, stacklevel=3)
        return None
    if not wcs.has_celestial:
        warnings.warn(f"{path} has no celestial WCS (CTYPE = {list(wcs.wcs.ctype)}); using pixel "
                      "coordinates (wcs=None). Expected e.g. CTYPE1/2 = 'GLON-CAR'/'GLAT-CAR'",
                      NoWCSWarning, stacklevel=3)
        return None
    wcs = wcs.celestial
    wcs.pixel_shape = tuple(data_shape[::-1])
    return wcs


def _read_image(path, hdul, index, hdu_obj):
    header = hdu_obj.header
    data = _hdu_data(hdu_obj, path, index)
    if data is None:
        raise ValueError(f"HDU {index} of {path} has no data; expected a 2-D image")
    if data.ndim != 2:
        plane = _plane_shape(hdu_obj)
        if plane is None:
            raise ValueError(f"HDU {index} of {path} holds a {hdu_obj.data.ndim}-D array of shape "
                             f"{hdu_obj.data.shape}; expected a 2-D image (ny, nx) -- slice the "
                             "cube and pass the plane as an array")
        data = data.reshape(plane)  # e.g. a radio image (1, 1, ny, nx)
    bad = np.zeros(data.shape, bool)
    if data.dtype.kind in "iu" and "BLANK" in header:
        bad |= data == header["BLANK"]
    data = data.astype(np.float32 if data.dtype.kind == "f" and data.dtype.itemsize == 4
                       else np.float64)  # native byte order, a copy
    bad |= ~np.isfinite(data)
    if not np.isfinite(data[~bad]).any():
        raise ValueError(f"the map in HDU {index} of {path} has no valid pixel (all NaN/blank); "
                         "expected at least one finite pixel")

    # the mask written by write_map (MASKEXT points at it); failing that, an extension named MASK
    # (astropy CCDData's convention: nonzero = bad) when the file holds a single map
    mask_name = header.get("MASKEXT", MASK_EXTNAME)
    n_maps = sum(_is_image(h) and h.header.get("NAXIS", 0) > 0 and h.name != MASK_EXTNAME
                 for h in hdul)
    if mask_name in hdul and hdul[mask_name] is not hdu_obj and ("MASKEXT" in header
                                                                 or n_maps == 1):
        stored = _hdu_data(hdul[mask_name], path, mask_name)
        if stored is not None and np.squeeze(stored).shape == data.shape:
            bad |= np.squeeze(stored).astype(bool)
        elif "MASKEXT" in header:
            raise ValueError(f"mask extension {mask_name!r} in {path} has shape "
                             f"{None if stored is None else stored.shape}; expected the map's "
                             f"shape {data.shape}")

    wcs = _image_wcs(header, hdul, data.shape, path)
    return NDData(data, wcs=wcs, mask=bad, unit=_unit(header.get("BUNIT")), meta=header.copy())


def read_map(path, *, hdu=None, center=None, shape=None, resolution=None, projection="CAR",
             frame="galactic", field=0):
    """Read a sky map from a FITS image or a HEALPix FITS file.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        FITS file.
    hdu : int or str, optional
        HDU to read (index or EXTNAME). By default the first HDU with 2-D image data, else the
        first HEALPix table. Images with extra length-1 axes (e.g. radio cubes of shape
        ``(1, 1, ny, nx)``) are read as 2-D.
    center, shape, resolution : optional
        For a HEALPix file, project onto a WCS patch of this centre, ``(ny, nx)`` shape and pixel
        size (see :func:`make_wcs`) and return `~astropy.nddata.NDData`. All three or none.
    projection : str
        FITS projection code of that patch.
    frame : str
        Frame of that patch (and of a ``(lon, lat)`` centre); also the frame assumed for a
        HEALPix file without ``COORDSYS``. Not used for FITS images, whose WCS says its frame.
    field : int
        Column of a HEALPix table (0 = first map).

    Returns
    -------
    map : `~astropy.nddata.NDData` or `HealpixMap`
        For images and projected HEALPix maps, `~astropy.nddata.NDData` with ``data`` (float
        array, bad pixels left as they are in the file), ``wcs`` (a 2-D celestial
        `~astropy.wcs.WCS`, or ``None`` when the file has none -- a `~astrotrunc.NoWCSWarning`
        is issued and pixel coordinates are the only coordinates), ``unit`` (from ``BUNIT``),
        ``mask`` (bool, ``True`` = bad: NaN, ``BLANK`` or flagged in the ``MASK`` extension
        written by :func:`write_map`) and ``meta`` (the FITS header). For HEALPix files without a
        patch geometry, a `HealpixMap`.

    Raises
    ------
    OSError
        The file is missing or is not FITS.
    ValueError
        No 2-D image or HEALPix table, a cube, a map with no valid pixel, an unknown HEALPix
        ordering or a HEALPix length that is not ``12 * nside**2``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> import astropy.units as u
    >>> from astrotrunc import make_wcs, read_map, write_map
    >>> data = np.ones((16, 16))
    >>> data[0, 0] = np.nan
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = pathlib.Path(tmp) / "map.fits"
    ...     write_map(path, data, wcs=make_wcs(16, (0, 0), 1 * u.deg), unit="ph / cm2 s")
    ...     m = read_map(path)
    >>> m.data.shape, m.unit, int(m.mask.sum()), m.wcs.wcs.ctype[0]
    ((16, 16), Unit("ph / (s cm2)"), 1, 'GLON-CAR')
    """
    path = Path(path).expanduser()
    geometry = (center, shape, resolution)
    if any(g is not None for g in geometry) and not all(g is not None for g in geometry):
        raise ValueError(f"projecting {path} needs all of {_PROJECT_HELP}; got "
                         f"center={center!r}, shape={shape!r}, resolution={resolution!r}")
    if not path.exists():
        raise FileNotFoundError(f"no such map file: {path}; expected a FITS image or HEALPix FITS "
                                "file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=False)
        except (OSError, ValueError, TypeError) as err:
            raise OSError(f"cannot read {path} as FITS ({err}); expected a FITS image or HEALPix "
                          "FITS file") from err
    truncated = [w for w in caught if "truncated" in str(w.message)]
    if truncated:
        hdul.close()
        raise OSError(f"{path} is truncated ({truncated[0].message}); expected a complete FITS "
                      "file (was a download or a write interrupted?)")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    with hdul:
        index, hdu_obj = _pick_hdu(hdul, hdu, path)
        if isinstance(hdu_obj, (fits.BinTableHDU, fits.TableHDU)):
            hmap = _read_healpix(path, index, hdu_obj.header, field, frame)
            if center is None:
                return hmap
            return hmap.to_patch(center, shape, resolution, projection=projection, frame=frame)
        if not _is_image(hdu_obj):
            raise ValueError(f"HDU {index} of {path} is a {type(hdu_obj).__name__}; expected a 2-D "
                             "image or a HEALPix table")
        if center is not None:
            raise ValueError(f"{path} holds an image, which read_map does not reproject; center, "
                             "shape and resolution apply to HEALPix files only (use the "
                             "'reproject' package for images)")
        return _read_image(path, hdul, index, hdu_obj)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
_STRUCTURAL = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|EXTNAME|BSCALE|BZERO|BLANK|BUNIT|"
    r"MASKEXT|WCSAXES|CTYPE\d+|CRVAL\d+|CRPIX\d+|CDELT\d+|CUNIT\d+|CROTA\d+|CD\d+_\d+|PC\d+_\d+|"
    r"PV\d+_\d+|PS\d+_\d+|LONPOLE|LATPOLE|RADESYS|EQUINOX|EPOCH|A_\w+|B_\w+|AP_\w+|BP_\w+|"
    r"PIXTYPE|ORDERING|NSIDE|COORDSYS|INDXSCHM|FIRSTPIX|LASTPIX|"
    r"T(TYPE|FORM|UNIT|NULL|DIM|SCAL|ZERO|DISP)\d+|TFIELDS|THEAP|CHECKSUM|DATASUM)$")


_check_writable = check_writable  # the name other modules used before 0.2


def _merge_header(target: fits.Header, extra) -> None:
    """Copy user keywords into ``target``, skipping structural, WCS and HEALPix keywords."""
    if extra is None:
        return
    if isinstance(extra, fits.Header):
        cards = [(c.keyword, c.value, c.comment) for c in extra.cards]
    else:
        try:
            cards = [(str(k).upper(), v, "") for k, v in dict(extra).items()]
        except (TypeError, ValueError):
            warnings.warn(f"metadata of type {type(extra).__name__} is not written; expected a "
                          "FITS Header or a dict", AstrotruncWarning, stacklevel=3)
            return
    skipped = []
    for key, value, comment in cards:
        if key in ("COMMENT", "HISTORY"):
            target.add_comment(value) if key == "COMMENT" else target.add_history(value)
        elif not key or _STRUCTURAL.match(key) or (
                key == "OBJECT" and str(value).strip().upper() in ("FULLSKY", "PARTIAL")):
            continue
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # HIERARCH keys
                    target[key] = (value, comment)
            except (TypeError, ValueError):
                skipped.append(key)
    if skipped:
        warnings.warn(f"metadata keys {skipped} have no FITS form and are not written; expected "
                      "scalar values (str, number, bool)", AstrotruncWarning, stacklevel=3)


def write_map(path, data, *, wcs=None, mask=None, unit=None, header=None, overwrite=False):
    """Write a sky map to FITS: an image with its WCS, or a HEALPix map.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Output file.
    data : array-like, `~astropy.nddata.NDData` or `HealpixMap`
        A 2-D image ``(ny, nx)`` -- ndarray, `~astropy.units.Quantity`, masked array, torch
        tensor or `~astropy.nddata.NDData` -- or a `HealpixMap`. The ``wcs``, ``mask``, ``unit``
        and ``meta`` of an NDData (the unit of a Quantity, the mask of a masked array) are used
        unless given here; an NDData's ``uncertainty`` is not written.
    wcs : `~astropy.wcs.WCS`, optional
        2-D celestial WCS of the image; its ``pixel_shape``, if set, must match the data.
    mask : array-like of bool, optional
        ``True`` = bad pixel. Written as a ``uint8`` image extension named ``MASK`` (1 = bad);
        :func:`read_map` reads it back. For HEALPix maps, masked pixels are written as
        ``healpy.UNSEEN``.
    unit : `~astropy.units.Unit` or str, optional
        Written as ``BUNIT`` (images) or ``TUNIT1`` (HEALPix).
    header : `~astropy.io.fits.Header` or dict, optional
        Extra keywords (structural, WCS and HEALPix keywords in it are ignored).
    overwrite : bool
        Replace an existing file. Without it an existing file raises `OSError`.

    Returns
    -------
    None
        The file is written atomically (a temporary file renamed over ``path``).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from astrotrunc import HealpixMap, read_map, write_map
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = pathlib.Path(tmp) / "sky.fits"
    ...     write_map(path, HealpixMap(np.arange(192.0), nest=True, frame="galactic"))
    ...     m = read_map(path)
    >>> m.nside, m.ordering, m.frame.name
    (4, 'NESTED', 'galactic')
    """
    if isinstance(data, HealpixMap):
        if wcs is not None:
            raise ValueError("a HEALPix map has no WCS; expected wcs=None with a HealpixMap")
        _write_healpix(path, data, mask=mask, unit=unit, header=header, overwrite=overwrite)
        return

    meta = None
    if isinstance(data, NDData):
        wcs = data.wcs if wcs is None else wcs
        mask = data.mask if mask is None else mask
        unit = data.unit if unit is None else unit
        meta = data.meta
        data = data.data
    if isinstance(data, u.Quantity):
        unit = data.unit if unit is None else unit
        data = data.value
    if isinstance(data, np.ma.MaskedArray) and mask is None:
        mask = np.ma.getmaskarray(data)
    data = _check_image(data)
    mask = _check_mask(mask, data.shape)
    wcs = _check_wcs(wcs, data.shape)
    unit = _unit(unit)
    path = check_writable(path, overwrite)
    _write_images(path, [dict(data=data, wcs=wcs, unit=unit, meta=meta, header=header,
                              mask=mask)], overwrite=overwrite)


def _image_hdus(data, *, wcs=None, unit=None, meta=None, header=None, mask=None, name=None,
                primary=True):
    """The HDU(s) of one checked map (and its mask extension)."""
    hdr = fits.Header()
    _merge_header(hdr, meta)
    _merge_header(hdr, header)
    if wcs is not None:
        hdr.update(wcs.to_header(relax=wcs.sip is not None))
    if unit is not None:
        hdr["BUNIT"] = _unit_string(unit)
    hdus = [fits.PrimaryHDU(data, hdr) if primary else fits.ImageHDU(data, hdr, name=name)]
    if mask is not None:
        hdus[0].header["MASKEXT"] = (MASK_EXTNAME, "extension holding the bad-pixel mask")
        mhdr = wcs.to_header() if wcs is not None else fits.Header()
        mhdr["COMMENT"] = "bad-pixel mask of the primary map: 1 = bad, 0 = good"
        hdus.append(fits.ImageHDU(mask.astype(np.uint8), mhdr, name=MASK_EXTNAME))
    return hdus


def _write_images(path, images, *, overwrite=False):
    """Write maps (dicts of `_image_hdus` arguments) as one FITS file, atomically.

    The first map is the primary HDU; the others are image extensions named by their ``name``.
    """
    path = check_writable(path, overwrite)
    hdus = []
    for i, image in enumerate(images):
        image = dict(image)
        data = _check_image(image.pop("data"))
        image["wcs"] = _check_wcs(image.get("wcs"), data.shape)
        image["mask"] = _check_mask(image.get("mask"), data.shape)
        image["unit"] = _unit(image.get("unit"))
        hdus += _image_hdus(data, primary=(i == 0), **image)
    atomic_write(path, lambda tmp: fits.HDUList(hdus).writeto(tmp, overwrite=True))


def _write_healpix(path, hmap: HealpixMap, *, mask, unit, header, overwrite):
    path = check_writable(path, overwrite)
    bad = hmap.mask if mask is None else hmap.mask | _check_mask(mask, hmap.values.shape)
    if bad.all():
        raise ValueError(f"HEALPix map for {path} has no valid pixel; expected at least one "
                         "unmasked, finite value")
    unit = _unit(unit if unit is not None else hmap.unit)
    values = np.where(bad, hp.UNSEEN, hmap.values)
    extra = fits.Header()
    _merge_header(extra, hmap.meta)
    _merge_header(extra, header)
    hp.write_map(str(path), values, nest=hmap.nest, dtype=values.dtype,
                 coord=_coordsys_from_frame(hmap.frame),
                 column_units=_unit_string(unit) if unit is not None else None,
                 extra_header=[(c.keyword, c.value, c.comment) for c in extra.cards
                               if c.keyword not in ("COMMENT", "HISTORY", "")],
                 overwrite=overwrite)
