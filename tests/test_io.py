"""Tests of astrotrunc.io: FITS images with WCS, HEALPix maps, projections and bad input."""

import warnings

import healpy as hp
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import NDData
from astropy.wcs import WCS

from astrotrunc import HealpixMap, NoWCSWarning, healpix_to_patch, make_wcs, read_map, write_map
from astrotrunc.exceptions import AstrotruncWarning

PAPER = dict(shape=(128, 128), center=(0, 0), resolution=0.625 * u.deg)


# ----------------------------------------------------------------------------------------------
# make_wcs
# ----------------------------------------------------------------------------------------------
def test_make_wcs_paper_geometry():
    wcs = make_wcs(**PAPER)
    assert list(wcs.wcs.ctype) == ["GLON-CAR", "GLAT-CAR"]
    np.testing.assert_array_equal(wcs.wcs.crpix, [64.5, 64.5])
    np.testing.assert_array_equal(wcs.wcs.crval, [0.0, 0.0])
    np.testing.assert_array_equal(wcs.wcs.cdelt, [-0.625, 0.625])
    assert wcs.array_shape == (128, 128) and wcs.pixel_shape == (128, 128)
    # outer pixel edges at +-40 deg; longitude increases to the left
    edges = wcs.pixel_to_world([-0.5, 127.5, 63.5, 63.5], [63.5, 63.5, -0.5, 127.5])
    np.testing.assert_allclose(edges.l.wrap_at(180 * u.deg).deg, [40, -40, 0, 0], atol=1e-12)
    np.testing.assert_allclose(edges.b.deg, [0, 0, -40, 40], atol=1e-12)
    # the map centre falls between the four central pixels
    x, y = wcs.world_to_pixel(SkyCoord(0 * u.deg, 0 * u.deg, frame="galactic"))
    np.testing.assert_allclose([x, y], [63.5, 63.5], atol=1e-12)
    # the pixel just left of centre and just above it
    x, y = wcs.world_to_pixel(SkyCoord(0.3125 * u.deg, 0.3125 * u.deg, frame="galactic"))
    np.testing.assert_allclose([x, y], [63, 64], atol=1e-12)


def test_make_wcs_centres_frames_and_shapes():
    c = SkyCoord(ra=266.4 * u.deg, dec=-28.9 * u.deg, frame="icrs")
    wcs = make_wcs((31, 20), c, 6 * u.arcmin, projection="TAN", frame="galactic")
    assert list(wcs.wcs.ctype) == ["GLON-TAN", "GLAT-TAN"]
    assert wcs.array_shape == (31, 20)
    np.testing.assert_array_equal(wcs.wcs.crpix, [10.5, 16.0])
    centre = wcs.pixel_to_world(9.5, 15.0)
    assert centre.separation(c) < 1e-6 * u.deg
    eq = make_wcs(10, (10 * u.deg, 20 * u.deg), 0.1, frame="icrs")
    assert list(eq.wcs.ctype) == ["RA---CAR", "DEC--CAR"] and eq.wcs.radesys == "ICRS"
    np.testing.assert_allclose(eq.wcs.cdelt, [-0.1, 0.1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=(0, 10)), "shape"),
    (dict(shape=(2, 3, 4)), "shape"),
    (dict(resolution=-1 * u.deg), "positive angle"),
    (dict(resolution=1 * u.m), "not an angle"),
    (dict(center=(0, 95)), "latitude"),
    (dict(center="here"), "sky position"),
    (dict(frame="nowhere"), "unknown coordinate frame"),
    (dict(frame="barycentricmeanecliptic"), "no FITS celestial axes"),
    (dict(projection="CARTESIAN"), "projection code"),
])
def test_make_wcs_bad_input(kwargs, match):
    args = dict(PAPER, **kwargs)
    with pytest.raises(ValueError, match=match):
        make_wcs(**args)


# ----------------------------------------------------------------------------------------------
# FITS images
# ----------------------------------------------------------------------------------------------
def _image(seed=0, shape=(24, 32)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32)


def test_fits_round_trip(tmp_path):
    data = _image()
    data[3, 4] = np.nan
    mask = np.zeros(data.shape, bool)
    mask[10:12, 5] = True
    wcs = make_wcs(data.shape, (30, -5), 0.5 * u.deg)
    path = tmp_path / "map.fits"
    write_map(path, data, wcs=wcs, mask=mask, unit=u.Jy / u.beam, header={"TELESCOP": "TEST"})

    m = read_map(path)
    assert isinstance(m, NDData)
    assert m.data.dtype == np.float32 and m.data.shape == data.shape
    np.testing.assert_array_equal(m.data, data)          # NaN left in place, not zero-filled
    assert np.isnan(m.data[3, 4])
    expected = mask | np.isnan(data)
    np.testing.assert_array_equal(m.mask, expected)
    assert m.mask.dtype == bool
    assert m.unit == u.Jy / u.beam
    assert m.meta["TELESCOP"] == "TEST" and m.meta["BUNIT"]
    assert isinstance(m.wcs, WCS) and m.wcs.array_shape == data.shape
    for key in ("CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CDELT1", "CDELT2"):
        assert m.meta[key] == wcs.to_header()[key], key
    np.testing.assert_allclose(m.wcs.wcs.cdelt, wcs.wcs.cdelt)
    with fits.open(path) as hdul:
        assert hdul["MASK"].data.dtype == np.uint8
        np.testing.assert_array_equal(hdul["MASK"].data, mask.astype(np.uint8))


def test_fits_round_trip_of_nddata_and_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    data = torch.arange(12 * 10, dtype=torch.float32).reshape(12, 10)
    wcs = make_wcs((12, 10), (0, 0), 1 * u.deg)
    write_map(tmp_path / "a.fits", data, wcs=wcs, unit="ph / (cm2 s)")
    a = read_map(tmp_path / "a.fits")
    np.testing.assert_array_equal(a.data, data.numpy())
    assert not a.mask.any() and a.unit == u.ph / u.cm**2 / u.s
    # an NDData read back writes back unchanged (header carried, WCS not duplicated)
    write_map(tmp_path / "b.fits", a)
    b = read_map(tmp_path / "b.fits")
    np.testing.assert_array_equal(b.data, a.data)
    assert b.unit == a.unit
    assert b.wcs.to_header() == a.wcs.to_header()
    # a Quantity carries its unit
    write_map(tmp_path / "c.fits", np.ones((4, 4)) * u.K)
    with pytest.warns(NoWCSWarning):
        assert read_map(tmp_path / "c.fits").unit == u.K


def test_integer_blank_and_degenerate_axes(tmp_path):
    data = np.arange(20, dtype=np.int16).reshape(1, 1, 4, 5)
    hdr = make_wcs((4, 5), (0, 0), 1 * u.deg).to_header()
    hdr["BLANK"] = 7
    fits.PrimaryHDU(data, hdr).writeto(tmp_path / "cube.fits")
    m = read_map(tmp_path / "cube.fits")
    assert m.data.shape == (4, 5) and m.data.dtype.kind == "f"
    assert m.mask.sum() == 1 and m.mask[1, 2]
    assert m.wcs.naxis == 2


def test_first_2d_image_hdu_is_picked(tmp_path):
    hdus = fits.HDUList([fits.PrimaryHDU(),
                         fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])]),
                         fits.ImageHDU(np.ones((3, 3)), make_wcs(3, (0, 0), 1).to_header(),
                                       name="SKY")])
    hdus.writeto(tmp_path / "multi.fits")
    assert read_map(tmp_path / "multi.fits").data.shape == (3, 3)
    assert read_map(tmp_path / "multi.fits", hdu="SKY").data.shape == (3, 3)
    with pytest.raises(ValueError, match="no HDU 'NOPE'"):
        read_map(tmp_path / "multi.fits", hdu="NOPE")


def test_no_wcs_warns_and_uses_pixels(tmp_path):
    fits.PrimaryHDU(np.ones((5, 6))).writeto(tmp_path / "plain.fits")
    with pytest.warns(NoWCSWarning, match="no celestial WCS"):
        m = read_map(tmp_path / "plain.fits")
    assert m.wcs is None and m.data.shape == (5, 6)
    assert issubclass(NoWCSWarning, AstrotruncWarning)


def test_overwrite_protection(tmp_path):
    path = tmp_path / "map.fits"
    write_map(path, np.ones((4, 4)))
    with pytest.raises(OSError, match=r"map\.fits already exists; pass overwrite=True"):
        write_map(path, np.zeros((4, 4)))
    write_map(path, np.zeros((4, 4)), overwrite=True)
    with pytest.warns(NoWCSWarning):
        assert read_map(path).data.sum() == 0
    hpath = tmp_path / "hpx.fits"
    write_map(hpath, HealpixMap(np.ones(12)))
    with pytest.raises(OSError, match="overwrite=True"):
        write_map(hpath, HealpixMap(np.zeros(12)))
    write_map(hpath, HealpixMap(np.zeros(12)), overwrite=True)
    assert read_map(hpath).values.sum() == 0


# ----------------------------------------------------------------------------------------------
# HEALPix
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nest", [False, True])
def test_healpix_round_trip(tmp_path, nest):
    nside = 8
    values = np.arange(hp.nside2npix(nside), dtype=np.float64)
    values[5] = hp.UNSEEN
    values[6] = np.nan
    mask = np.zeros(values.size, bool)
    mask[100] = True
    hmap = HealpixMap(values, nest=nest, frame="icrs", unit="K", mask=mask)
    path = tmp_path / "hpx.fits"
    write_map(path, hmap)
    with fits.open(path) as hdul:
        assert hdul[1].header["ORDERING"] == ("NESTED" if nest else "RING")
        assert hdul[1].header["COORDSYS"] == "C"
        assert hdul[1].header["PIXTYPE"] == "HEALPIX"

    back = read_map(path)
    assert isinstance(back, HealpixMap)
    assert back.nside == nside and back.nest is nest and back.frame.name == "icrs"
    assert back.unit == u.K
    np.testing.assert_array_equal(back.mask, np.isin(np.arange(values.size), [5, 6, 100]))
    good = ~back.mask
    np.testing.assert_array_equal(back.values[good], values[good])


def test_healpix_file_written_by_healpy_with_other_ordering(tmp_path):
    nside = 4
    ring = np.arange(hp.nside2npix(nside), dtype=float)
    path = tmp_path / "nest.fits"
    hp.write_map(str(path), hp.reorder(ring, r2n=True), nest=True, coord="G")
    m = read_map(path)
    assert m.nest and m.ordering == "NESTED"
    # the same sky: NESTED values reordered to RING are the RING map
    np.testing.assert_array_equal(hp.reorder(m.values, n2r=True), ring)


def _hot_map(nside, lon, lat, nest=False):
    values = np.zeros(hp.nside2npix(nside))
    hot = hp.ang2pix(nside, lon, lat, nest=nest, lonlat=True)
    values[hot] = 1.0
    return values, hot


@pytest.mark.parametrize("nest", [False, True])
def test_hot_pixel_lands_in_the_right_wcs_pixel(nest):
    nside = 32                       # HEALPix pixels (1.8 deg) larger than the patch's (0.625)
    values, hot = _hot_map(nside, 12.3, -7.1, nest)
    lon, lat = hp.pix2ang(nside, hot, nest=nest, lonlat=True)
    patch = healpix_to_patch(values, nest=nest, **PAPER)
    assert patch.data.shape == (128, 128) and not patch.mask.any()
    x, y = patch.wcs.world_to_pixel(SkyCoord(lon * u.deg, lat * u.deg, frame="galactic"))
    assert patch.data[int(np.round(y)), int(np.round(x))] == 1.0
    # every hot patch pixel lies inside the hot HEALPix pixel
    rows, cols = np.nonzero(patch.data)
    sky = patch.wcs.pixel_to_world(cols, rows)
    assert np.all(hp.ang2pix(nside, sky.l.deg, sky.b.deg, nest=nest, lonlat=True) == hot)
    # and their mean position is the HEALPix pixel centre to within a patch pixel
    assert abs(cols.mean() - x) < 1 and abs(rows.mean() - y) < 1


def test_hot_pixel_across_frames_and_bilinear():
    nside = 16
    # an equatorial HEALPix map, projected on a Galactic patch
    values, hot = _hot_map(nside, 266.4, -28.9)
    ra, dec = hp.pix2ang(nside, hot, lonlat=True)
    c = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs")
    hmap = HealpixMap(values, frame="icrs")
    patch = hmap.to_patch(c, (21, 21), 0.5 * u.deg, frame="galactic")
    assert list(patch.wcs.wcs.ctype) == ["GLON-CAR", "GLAT-CAR"]
    assert patch.data[10, 10] == 1.0
    x, y = patch.wcs.world_to_pixel(c)
    np.testing.assert_allclose([x, y], [10, 10], atol=1e-9)
    # bilinear: the hot pixel centre keeps its value and is the maximum
    bil = hmap.to_patch(c, (21, 21), 0.5 * u.deg, frame="galactic", interpolation="bilinear")
    np.testing.assert_allclose(bil.data[10, 10], 1.0, atol=1e-9)
    assert np.unravel_index(np.argmax(bil.data), bil.data.shape) == (10, 10)
    assert 0 < bil.data[10, 11] < 1
    assert bil.meta["HPXINTRP"] == "bilinear" and bil.meta["HPXNSIDE"] == nside


def test_projection_keeps_masks():
    nside = 16
    values, hot = _hot_map(nside, 0.0, 0.0)
    values[hot] = hp.UNSEEN
    patch = healpix_to_patch(values, (0, 0), (16, 16), 0.5 * u.deg)
    assert patch.mask.any()
    np.testing.assert_array_equal(np.isnan(patch.data), patch.mask)
    assert np.all(patch.data[~patch.mask] == 0)
    bil = healpix_to_patch(values, (0, 0), (16, 16), 0.5 * u.deg, interpolation="bilinear")
    assert bil.mask.sum() > patch.mask.sum()              # neighbours that blend it are masked
    assert np.all(np.isfinite(bil.data[~bil.mask]))
    # off the projection (the corners of an all-sky Mollweide image): masked, not filled
    mol = healpix_to_patch(np.ones(12), (0, 0), (8, 16), 22.5 * u.deg, projection="MOL")
    assert mol.mask[0, 0] and not mol.mask[4, 8] and np.all(mol.data[~mol.mask] == 1)
    np.testing.assert_array_equal(np.isnan(mol.data), mol.mask)


def test_read_map_projects_healpix(tmp_path):
    nside = 32
    values, hot = _hot_map(nside, -20.0, 10.0)
    path = tmp_path / "hpx.fits"
    write_map(path, HealpixMap(values, frame="galactic", unit="ph"))
    patch = read_map(path, **PAPER)
    assert isinstance(patch, NDData) and patch.unit == u.ph
    lon, lat = hp.pix2ang(nside, hot, lonlat=True)
    x, y = patch.wcs.world_to_pixel(SkyCoord(lon * u.deg, lat * u.deg, frame="galactic"))
    assert patch.data[int(np.round(y)), int(np.round(x))] == 1.0
    # the patch writes and reads back as an ordinary image
    write_map(tmp_path / "patch.fits", patch)
    again = read_map(tmp_path / "patch.fits")
    np.testing.assert_array_equal(again.data, patch.data)
    assert again.meta["HPXNSIDE"] == nside
    with pytest.raises(ValueError, match="needs all of"):
        read_map(path, center=(0, 0))


def test_healpix_without_coordsys_warns(tmp_path):
    path = tmp_path / "nocoord.fits"
    hp.write_map(str(path), np.ones(48))
    with pytest.warns(AstrotruncWarning, match="COORDSYS"):
        m = read_map(path, frame="icrs")
    assert m.frame.name == "icrs"


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_non_2d_arrays_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"3-D.*expected a 2-D image"):
        write_map(tmp_path / "x.fits", np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="HealpixMap"):
        write_map(tmp_path / "x.fits", np.ones(48))
    fits.PrimaryHDU(np.ones((3, 4, 4))).writeto(tmp_path / "cube.fits")
    with pytest.raises(ValueError, match=r"no 2-D image"):
        read_map(tmp_path / "cube.fits")
    with pytest.raises(ValueError, match=r"3-D array.*expected a 2-D image"):
        read_map(tmp_path / "cube.fits", hdu=0)
    with pytest.raises(ValueError, match="1-D array of 12"):
        HealpixMap(np.ones((12, 2)))
    assert not (tmp_path / "x.fits").exists()


def test_all_nan_maps_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="no finite pixel"):
        write_map(tmp_path / "x.fits", np.full((4, 4), np.nan))
    fits.PrimaryHDU(np.full((4, 4), np.nan)).writeto(tmp_path / "nan.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoWCSWarning)
        with pytest.raises(ValueError, match="no valid pixel"):
            read_map(tmp_path / "nan.fits")
    with pytest.raises(ValueError, match="no valid pixel"):
        write_map(tmp_path / "h.fits", HealpixMap(np.full(12, np.nan)))


def test_bad_healpix_length_and_ordering(tmp_path):
    with pytest.raises(ValueError, match=r"100 pixels; expected 12\*nside\*\*2"):
        HealpixMap(np.ones(100))
    with pytest.raises(ValueError, match=r"12\*nside\*\*2"):
        healpix_to_patch(np.ones(50), (0, 0), 4, 1 * u.deg)
    with pytest.raises(ValueError, match="unknown HEALPix ordering 'SPIRAL'; expected 'RING'"):
        HealpixMap(np.ones(12), nest="SPIRAL")
    path = tmp_path / "bad_order.fits"
    hp.write_map(str(path), np.ones(48), coord="G")
    fits.setval(path, "ORDERING", value="SPIRAL", ext=1)
    with pytest.raises(ValueError, match="unknown HEALPix ordering 'SPIRAL'"):
        read_map(path)
    fits.delval(path, "ORDERING", ext=1)
    with pytest.raises(ValueError, match="no ORDERING keyword"):
        read_map(path)
    with pytest.raises(ValueError, match="interpolation"):
        healpix_to_patch(np.ones(12), (0, 0), 4, 1 * u.deg, interpolation="cubic")


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nothere.fits"
    with pytest.raises(OSError, match="nothere.fits"):
        read_map(missing)
    junk = tmp_path / "junk.fits"
    junk.write_text("this is not FITS\n")
    with pytest.raises(OSError, match="junk.fits"):
        read_map(junk)
    with pytest.raises(OSError, match="does not exist"):
        write_map(tmp_path / "no" / "dir.fits", np.ones((2, 2)))


def test_wcs_shape_must_match_data(tmp_path):
    wcs = make_wcs((10, 20), (0, 0), 1 * u.deg)
    with pytest.raises(ValueError, match=r"pixel_shape.*\(20, 10\).*\(ny, nx\) = \(20, 10\)"):
        write_map(tmp_path / "x.fits", np.ones((20, 10)), wcs=wcs)
    with pytest.raises(ValueError, match="3 axes"):
        write_map(tmp_path / "x.fits", np.ones((10, 20)), wcs=WCS(naxis=3))
    with pytest.raises(ValueError, match="mask has shape"):
        write_map(tmp_path / "x.fits", np.ones((10, 20)), wcs=wcs, mask=np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="no WCS"):
        write_map(tmp_path / "x.fits", HealpixMap(np.ones(12)), wcs=wcs)
    assert not (tmp_path / "x.fits").exists()


def test_reads_ccddata_files_and_picks_hdus_of_multi_map_files(tmp_path):
    from astropy.nddata import CCDData
    wcs = make_wcs((6, 7), (0, 0), 1 * u.deg)
    mask = np.zeros((6, 7), bool)
    mask[2, 3] = True
    CCDData(np.ones((6, 7)), unit="adu", wcs=wcs, mask=mask).write(tmp_path / "ccd.fits")
    m = read_map(tmp_path / "ccd.fits")
    np.testing.assert_array_equal(m.mask, mask)
    assert m.unit == u.adu and m.wcs.wcs.ctype[0] == "GLON-CAR"
    # several maps in one file (as `astrotrunc simulate --n-maps` writes): choose by hdu
    hdr = wcs.to_header()
    fits.HDUList([fits.PrimaryHDU(np.zeros((6, 7)), hdr),
                  fits.ImageHDU(np.ones((6, 7)), hdr, name="MAP1")]).writeto(tmp_path / "two.fits")
    assert read_map(tmp_path / "two.fits").data.sum() == 0
    assert read_map(tmp_path / "two.fits", hdu="MAP1").data.sum() == 42
    assert read_map(tmp_path / "two.fits", hdu=1).data.sum() == 42


def test_metadata_dicts_are_written_where_fits_can_hold_them(tmp_path):
    nd = NDData(np.ones((3, 3)), wcs=make_wcs(3, (0, 0), 1), meta={"object": "Vela",
                                                                    "exposure_time": 2.5,
                                                                    "bad": [1, 2]})
    with pytest.warns(AstrotruncWarning, match=r"\['BAD'\] have no FITS form"):
        write_map(tmp_path / "m.fits", nd)
    meta = read_map(tmp_path / "m.fits").meta
    assert meta["OBJECT"] == "Vela" and meta["EXPOSURE_TIME"] == 2.5 and "BAD" not in meta
