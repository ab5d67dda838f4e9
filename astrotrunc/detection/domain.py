"""The domain of validity of a detector: the instrument and the maps it was trained on.

A detector file records the instrument of its training model (pixel scale, PSF width,
exposure, background, flux unit) and the range of four statistics of its training maps. Before
a detector is applied, `domain_differences` compares a map with that record; the finder turns
every difference into an `~astrotrunc.OutOfDomainWarning`.

The statistics are chosen to catch the usual ways a map differs from the training maps:

* ``p1``, ``p50`` -- the 1st percentile and the median pixel value (a background, an offset,
  negative pixels);
* ``p99`` -- the 99th percentile (the flux scale: a map in other units, or rescaled);
* ``psf_sigma`` -- the PSF width in pixels measured from the map's own spatial autocovariance,
  ``sigma = sqrt(-3 / (4 ln(C(2) / C(1))))`` with ``C(k)`` the autocovariance at lag ``k``
  (pixel noise is white and drops out; a field of point sources convolved with a Gaussian PSF
  has ``C(k) ~ exp(-k^2 / 4 sigma^2)``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["map_statistics", "instrument_domain", "domain_differences", "nonphysical_limit",
           "MIN_PIXELS_FOR_STATISTICS"]

#: The statistics are only compared for maps with at least this many valid pixels.
MIN_PIXELS_FOR_STATISTICS = 1024

_STAT_NAMES = ("p1", "p50", "p99", "psf_sigma")
_STAT_TEXT = {"p1": "1st-percentile pixel value", "p50": "median pixel value",
              "p99": "99th-percentile pixel value", "psf_sigma": "PSF width measured on the map",
              "max": "largest pixel value"}


def _autocov(d, bad, k):
    """Mean product of valid pixel pairs ``k`` apart (both axes) of a centred map."""
    if bad is None:  # no bad pixel: no masks to build
        num = float(np.einsum("ij,ij->", d[:, k:], d[:, :-k]) + np.einsum("ij,ij->", d[k:], d[:-k]))
        cnt = d.shape[0] * (d.shape[1] - k) + (d.shape[0] - k) * d.shape[1]
        return num / cnt if cnt else math.nan
    num, cnt = 0.0, 0
    for a, b, ba, bb in ((d[:, k:], d[:, :-k], bad[:, k:], bad[:, :-k]),
                         (d[k:], d[:-k], bad[k:], bad[:-k])):
        ok = ~(ba | bb)
        num += float((a * b)[ok].sum())
        cnt += int(ok.sum())
    return num / cnt if cnt else math.nan


_QUANTILES = np.array([0.01, 0.5, 0.99])


def _quantiles(ordered, q):
    """``np.quantile(values, q)`` (its default, linear method, to the bit) of sorted values: one
    sort is ten times faster than ``np.quantile``'s partitions on a map's pixels."""
    pos = q * (ordered.size - 1)
    lo = np.floor(pos).astype(np.intp)
    a, b, t = ordered[lo], ordered[np.minimum(lo + 1, ordered.size - 1)], pos - lo
    d = b - a
    return np.where(t >= 0.5, b - d * (1 - t), a + d * t)  # numpy's two-sided interpolation


def map_statistics(data, bad=None) -> dict:
    """The domain statistics of one map (see the module notes).

    Parameters
    ----------
    data : 2-D array
        The map.
    bad : 2-D bool array, optional
        Pixels to ignore.

    Returns
    -------
    dict
        ``p1, p50, p99, psf_sigma, min, max`` (floats; ``psf_sigma`` is NaN for a map without
        spatial structure).
    """
    data = np.asarray(data, dtype=np.float64)
    bad = ~np.isfinite(data) if bad is None else (np.asarray(bad, bool) | ~np.isfinite(data))
    any_bad = bool(bad.any())
    values = data[~bad] if any_bad else data.ravel()
    if values.size == 0:
        return dict.fromkeys((*_STAT_NAMES, "min", "max"), math.nan)
    # quantiles of at most ~1 million pixels (a regular subsample of large maps)
    step = max(1, values.size // 1_000_000)
    ordered = np.sort(values[::step])
    p1, p50, p99 = _quantiles(ordered, _QUANTILES)
    low, high = (ordered[0], ordered[-1]) if step == 1 else (values.min(), values.max())
    d = np.where(bad, 0.0, data - values.mean()) if any_bad else data - values.mean()
    sigma = math.nan
    if min(data.shape) > 2:
        mask = bad if any_bad else None
        c1, c2 = _autocov(d, mask, 1), _autocov(d, mask, 2)
        if c1 > 0 and 0 < c2 < c1:
            sigma = math.sqrt(-3.0 / (4.0 * math.log(c2 / c1)))
    return {"p1": float(p1), "p50": float(p50), "p99": float(p99), "psf_sigma": sigma,
            "min": float(low), "max": float(high)}


def instrument_domain(model, n_maps=1000, seed=12345, chunk_size=250) -> dict:
    """The domain record of a detector trained on ``model``: instrument and map statistics.

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`
        The training model.
    n_maps : int
        Simulated maps whose statistics give the ranges.
    seed : int
        Seed of those simulations.
    chunk_size : int
        Maps simulated at once.

    Returns
    -------
    dict
        JSON-serialisable: ``pixel_scale_deg, psf_sigma_px, exposure, background,
        normalization, flux_unit, shape`` and ``statistics`` (``{name: [min, max]}`` over the
        maps, with ``n_maps`` and ``seed``).
    """
    from astropy import units as u

    inst = model.instrument
    stats = []
    for sims in model.iter_simulate(int(n_maps), seed=seed, chunk_size=chunk_size):
        stats += [map_statistics(m) for m in sims.maps.double().numpy()]
    ranges = {}
    for name in (*_STAT_NAMES, "max"):
        vals = np.array([s[name] for s in stats])
        vals = vals[np.isfinite(vals)]
        ranges[name] = [float(vals.min()), float(vals.max())] if vals.size else None
    psf = inst.psf
    if isinstance(psf, u.Quantity):
        psf_px = float((psf / model.geometry.pixel_scale).to_value(u.one))
    elif np.ndim(psf) == 0:
        psf_px = float(psf)
    else:  # a kernel: its RMS width
        k = np.asarray(psf, dtype=float)
        yy, xx = np.indices(k.shape)
        cy, cx = (k * yy).sum(), (k * xx).sum()
        psf_px = float(np.sqrt(0.5 * (k * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum()))
    return {"pixel_scale_deg": float(model.geometry.pixel_scale.to_value(u.deg)),
            "psf_sigma_px": psf_px, "exposure": float(np.mean(inst.exposure)),
            "background": float(np.mean(inst.background)),
            "normalization": float(inst.normalization),
            "flux_unit": model.flux_unit.to_string(), "shape": list(model.shape),
            "statistics": dict(ranges, n_maps=int(n_maps), seed=int(seed))}


def nonphysical_limit(domain) -> float:
    """Pixels with ``|value|`` above this are not data.

    Parameters
    ----------
    domain : dict or None
        A detector's domain record.

    Returns
    -------
    float
        A million times the brightest pixel seen in training (1e20 without a record).
    """
    stats = (domain or {}).get("statistics") or {}
    top = stats.get("max")
    return 1e6 * max(abs(top[1]), 1.0) if top else 1e20


def domain_differences(domain, data, bad, *, pixel_scale_deg=None) -> list:
    """What makes a map unlike the detector's training maps, as sentences (empty: in domain).

    Parameters
    ----------
    domain : dict or None
        A detector's domain record (`instrument_domain`); `None` checks nothing.
    data, bad : 2-D arrays
        The map (in the detector's flux unit) and its bad-pixel mask.
    pixel_scale_deg : float, optional
        The map's pixel scale (from its WCS).

    Returns
    -------
    list of str
    """
    if not domain:
        return []
    out = []
    ref = domain.get("pixel_scale_deg")
    if pixel_scale_deg is not None and ref and not math.isclose(pixel_scale_deg, ref, rel_tol=0.02):
        out.append(f"the map's pixel scale is {pixel_scale_deg:.4g} deg, the detector was trained "
                   f"on {ref:.4g} deg pixels")
    stats = domain.get("statistics") or {}
    if not stats or bad.size - np.count_nonzero(bad) < MIN_PIXELS_FOR_STATISTICS:
        return out
    got = map_statistics(data, bad)
    if got["min"] == got["max"]:
        out.append(f"the map is constant (every valid pixel is {got['min']:.4g})")
        return out
    quantum = 3.0 / domain.get("exposure", 1.0) if domain.get("exposure") else 0.0
    for name in _STAT_NAMES:
        rng = stats.get(name)
        if not rng:
            continue
        lo, hi = rng
        value = got[name]
        if name in ("p1", "p50"):
            tol = 0.1 * (hi - lo) + quantum
            inside = lo - tol <= value <= hi + tol
        elif name == "p99":
            inside = value > 0 and lo / 2 <= value <= 2 * hi
        else:
            inside = not np.isfinite(value) or lo / 1.1 <= value <= 1.1 * hi
        if not inside:
            unit = " px" if name == "psf_sigma" else ""
            out.append(f"the {_STAT_TEXT[name]} is {value:.4g}{unit}, the training maps had "
                       f"{lo:.4g} to {hi:.4g}{unit}")
    return out
