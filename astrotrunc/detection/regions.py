"""DS9 region files of catalogs (through the ``regions`` package)."""

from __future__ import annotations

import numpy as np
from astropy import units as u

__all__ = ["catalog_to_regions"]


def catalog_to_regions(catalog, radius=None):
    """DS9-ready `regions.Regions` of a `~astrotrunc.find_sources` catalog: one circle per source.

    Sky circles (Galactic) when the catalog has sky coordinates, pixel circles otherwise. Write
    them with ``catalog_to_regions(cat).write("catalog.reg", format="ds9")``.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        A `~astrotrunc.find_sources` catalog (it may be empty: no regions).
    radius : `~astropy.units.Quantity` or float, optional
        Circle radius (pixels, or an angle); 1.5 pixels by default.

    Returns
    -------
    `regions.Regions`
    """
    from regions import CirclePixelRegion, CircleSkyRegion, PixCoord, RegionMeta, Regions

    if catalog is None or len(catalog) == 0:
        return Regions([])
    sky = catalog["sky_centroid"] if "sky_centroid" in catalog.colnames else None
    scale = catalog.meta.get("pixel_scale_deg")
    use_sky = sky is not None and scale is not None and np.isfinite(sky.galactic.l.deg).all()
    radius = 1.5 * u.pix if radius is None else radius
    out = []
    for i, row in enumerate(catalog):
        meta = RegionMeta({"text": str(row["id"])})
        if use_sky:
            r = radius * scale * u.deg / u.pix if radius.unit == u.pix else radius
            out.append(CircleSkyRegion(sky[i], r.to(u.arcmin), meta=meta))
        else:
            r = radius.to_value(u.pix) if isinstance(radius, u.Quantity) else float(radius)
            out.append(CirclePixelRegion(PixCoord(row["x_centroid"].value,
                                                  row["y_centroid"].value), r, meta=meta))
    return Regions(out)
