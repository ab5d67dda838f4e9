"""The forward model: priors, rendering, noise, geometry, reproducibility, bad input."""

import threading

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.coordinates import SkyCoord
from scipy import stats
from scipy.ndimage import gaussian_filter

from astrotrunc import Instrument, PointSourceModel, SkyGeometry
from astrotrunc.priors import BoxPrior, Uniform


@pytest.fixture(scope="module")
def model():
    return PointSourceModel.paper()


def test_paper_geometry(model):
    geom = model.geometry
    assert geom.shape == (128, 128)
    assert u.isclose(geom.pixel_scale, 0.625 * u.deg)
    corner_lo = geom.pixel_to_world(-0.5, -0.5)
    corner_hi = geom.pixel_to_world(127.5, 127.5)
    # Galactic CAR, longitude increasing to the left, edges at +-40 deg
    assert u.isclose(corner_lo.l.wrap_at(180 * u.deg), 40 * u.deg)
    assert u.isclose(corner_lo.b, -40 * u.deg)
    assert u.isclose(corner_hi.l.wrap_at(180 * u.deg), -40 * u.deg)
    assert u.isclose(corner_hi.b, 40 * u.deg)


def test_prior_ranges_and_moments(model):
    theta = model.sample_population(20000, seed=3).double().numpy()
    n, sig, h = theta.T
    assert n.min() >= 10 and n.max() < 500 and np.all(n == np.floor(n))
    assert sig.min() >= 1 and sig.max() <= 3 and h.min() >= 1 and h.max() <= 20
    # floor(U(10, 500)) has mean 254.5; U(1, 3) mean 2, var 1/3; U(1, 20) mean 10.5
    assert abs(n.mean() - 254.5) < 3 * 141.5 / np.sqrt(len(n))
    assert abs(sig.mean() - 2) < 0.02 and abs(sig.var() - 1 / 3) < 0.02
    assert abs(h.mean() - 10.5) < 0.15
    assert stats.kstest(h, stats.uniform(1, 19).cdf).pvalue > 1e-3


def test_source_distributions(model):
    theta = torch.tensor([[400.0, 1.5, 7.0]]).repeat(50, 1)
    flux, lon, lat, valid = model.sample_sources(theta, generator=1)
    assert valid.sum() == 50 * 400
    f, ll, bb = flux[valid].double(), lon[valid].double(), lat[valid].double()
    assert stats.kstest(np.log(f.numpy()), stats.norm(1.0, 1.5).cdf).pvalue > 1e-3
    assert stats.kstest(ll.numpy(), stats.norm(0, 20).cdf).pvalue > 1e-3
    assert stats.kstest(bb.numpy(), stats.norm(0, 7).cdf).pvalue > 1e-3
    # the density used by the exact detected-catalog likelihood matches the sampler
    logp = model.source_log_density(f[:5], ll[:5], bb[:5], theta[0])
    expected = (stats.lognorm(s=1.5, scale=np.e).logpdf(f[:5]) + stats.norm(0, 20).logpdf(ll[:5])
                + stats.norm(0, 7).logpdf(bb[:5]))
    np.testing.assert_allclose(logp.numpy(), expected, rtol=1e-6)


def test_flux_conservation_and_scipy_equivalence(model):
    sims = model.simulate(6, seed=11, noise=False)
    inside = sims.in_map
    # away from edges: restrict to sources more than 8 px from the border
    total = sims.maps.double().sum((1, 2))
    expected = 4.0 * (sims.flux * inside).double().sum(1)
    np.testing.assert_allclose(total.numpy(), expected.numpy(), rtol=1e-4)
    # exactly the authors' rendering: histogram -> scipy gaussian_filter(., 1.5) * 4
    ix = np.floor(sims.x[0].numpy() + 0.5).astype(int)
    iy = np.floor(sims.y[0].numpy() + 0.5).astype(int)
    ok = inside[0].numpy()
    binned = np.zeros((128, 128))
    np.add.at(binned, (iy[ok], ix[ok]), sims.flux[0].numpy()[ok])
    ref = 4 * gaussian_filter(binned, 1.5)
    np.testing.assert_allclose(sims.maps[0].numpy(), ref, atol=1e-4 * ref.max())


def test_flux_conservation_constant_boundary_with_background():
    geom = SkyGeometry.from_extent(shape=(64, 80), resolution=0.5 * u.deg)
    inst = Instrument(psf=1.0 * u.deg, background=0.25, boundary="constant")
    model = PointSourceModel(geometry=geom, instrument=inst)
    gen = torch.Generator().manual_seed(0)
    # sources at least 10 px from the edges (PSF sigma 2 px, kernel radius 8 px)
    x = 10 + 59 * torch.rand(5, 30, generator=gen)
    y = 10 + 43 * torch.rand(5, 30, generator=gen)
    flux = torch.exp(torch.randn(5, 30, generator=gen))
    mu = model.render(flux, x, y, torch.ones(5, 30, dtype=torch.bool))
    expected = 4.0 * flux.double().sum(1) + 0.25 * 64 * 80
    np.testing.assert_allclose(mu.double().sum((1, 2)).numpy(), expected.numpy(), rtol=1e-4)
    # at the edge, a 'constant' boundary loses flux (a 'reflect' one would not)
    edge = model.render(
        torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
    )
    assert edge.sum() - 0.25 * 64 * 80 < 0.5 * 4.0


def test_kernel_psf_matches_scipy():
    kernel = np.outer([1, 2, 1], [1, 3, 5, 3, 1]).astype(float)
    geom = SkyGeometry.from_extent(shape=(32, 40), resolution=1 * u.deg)
    for boundary, mode in (("reflect", "reflect"), ("constant", "constant")):
        model = PointSourceModel(
            geometry=geom, instrument=Instrument(psf=kernel, boundary=boundary)
        )
        sims = model.simulate(2, seed=4, noise=False, theta=torch.tensor([[30.0, 1.0, 10.0]] * 2))
        from scipy.ndimage import convolve

        ix = np.floor(sims.x[0].numpy() + 0.5).astype(int)
        iy = np.floor(sims.y[0].numpy() + 0.5).astype(int)
        ok = sims.in_map[0].numpy()
        binned = np.zeros((32, 40))
        np.add.at(binned, (iy[ok], ix[ok]), sims.flux[0].numpy()[ok])
        ref = 4 * convolve(binned, kernel / kernel.sum(), mode=mode)
        np.testing.assert_allclose(sims.maps[0].numpy(), ref, atol=1e-4 * ref.max())


def test_poisson_mean_and_variance():
    geom = SkyGeometry.from_extent(shape=(16, 16), resolution=1 * u.deg)
    model = PointSourceModel(geometry=geom, instrument=Instrument(background=0.3, exposure=100.0))
    theta = torch.tensor([[0.0, 1.0, 1.0]]).repeat(400, 1)  # no sources: background only
    data = model.simulate(400, seed=5, theta=theta).maps.double()
    counts = data * 100
    assert torch.allclose(counts, counts.round(), atol=1e-3)  # integer counts / exposure
    lam = 30.0
    mean, var = counts.mean().item(), counts.var().item()
    n = counts.numel()
    assert abs(mean - lam) < 5 * np.sqrt(lam / n)
    assert abs(var - lam) < 5 * lam * np.sqrt(2 / n)


def test_source_lands_in_wcs_pixel(model):
    for l0, b0 in [(12.3, -4.7), (-33.0, 21.1), (0.1, 0.1)]:
        theta = torch.tensor([[1.0, 1.0, 10.0]])
        x, y = model.geometry.world_to_pixel(torch.tensor([[l0]]), torch.tensor([[b0]]))
        xw, yw = model.wcs.world_to_pixel(SkyCoord(l0 * u.deg, b0 * u.deg, frame="galactic"))
        assert abs(x.item() - xw) < 1e-4 and abs(y.item() - yw) < 1e-4
        mu = model.render(torch.tensor([[10.0]]), x, y, torch.tensor([[True]]))[0]
        iy, ix = np.unravel_index(int(mu.argmax()), mu.shape)
        assert (ix, iy) == (int(np.round(xw)), int(np.round(yw)))
        del theta


def test_non_affine_projection_uses_wcs():
    geom = SkyGeometry.from_extent(shape=(40, 40), resolution=0.5 * u.deg,
                                   center=SkyCoord(30 * u.deg, 20 * u.deg, frame="galactic"),
                                   projection="TAN")
    assert geom._affine is None
    lon, lat = torch.tensor([[31.0, 28.0]]), torch.tensor([[21.5, 19.0]])
    x, y = geom.world_to_pixel(lon, lat)
    xw, yw = geom.wcs.world_to_pixel(
        SkyCoord([31.0, 28.0] * u.deg, [21.5, 19.0] * u.deg, frame="galactic")
    )
    np.testing.assert_allclose(x[0].numpy(), xw, atol=1e-4)
    np.testing.assert_allclose(y[0].numpy(), yw, atol=1e-4)


def test_seeds_reproduce_and_differ(model):
    a = model.simulate(5, seed=7)
    b = model.simulate(5, seed=7)
    c = model.simulate(5, seed=8)
    assert (
        torch.equal(a.maps, b.maps)
        and torch.equal(a.theta, b.theta)
        and torch.equal(a.flux, b.flux)
    )
    assert not torch.equal(a.maps, c.maps)
    assert a.maps.dtype == torch.float32


def test_seeds_reproduce_whatever_the_number_of_threads(model):
    n = torch.get_num_threads()
    try:
        maps = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            maps.append(model.simulate(6, seed=7).maps)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(maps[0], maps[1])


def test_chunking_bounds_memory_and_concatenates(model):
    chunks = list(model.iter_simulate(10, seed=1, chunk_size=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    full = model.simulate(10, seed=1, chunk_size=4)
    assert torch.equal(full.maps[8:], chunks[2].maps)
    assert full.flux.shape[1] == max(c.flux.shape[1] for c in chunks)


def test_truth_tables(model):
    sims = model.simulate(3, seed=1)
    t = sims.sources(1)
    assert len(t) == int(sims.theta[1, 0])
    assert t["l"].unit == u.deg and t["x"].unit == u.pix
    assert set(t.colnames) >= {"flux", "l", "b", "x", "y", "in_map"}
    truth = sims.truth_table()
    assert len(truth) == int(sims.theta[:, 0].sum())
    assert truth["h"].unit == u.deg
    arrays = model.simulate_arrays(2, seed=1)
    assert arrays["maps"].shape == (2, 128, 128) and arrays["flux"].shape == (2, 500)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Uniform(5, 1), "low < high"),
        (lambda: Uniform(0, np.inf), "finite"),
        (lambda: Instrument(psf=-1.5), "positive"),
        (lambda: Instrument(psf=-1 * u.deg), "positive"),
        (lambda: Instrument(psf=np.ones(3)), "2-D"),
        (lambda: Instrument(exposure=0), "exposure"),
        (lambda: Instrument(boundary="wrap"), "boundary"),
        (lambda: PointSourceModel(prior=BoxPrior(N=Uniform(1, 2))), "BoxPrior over"),
        (lambda: PointSourceModel(instrument=Instrument(background=np.ones((3, 3)))), "shape"),
        (
            lambda: PointSourceModel.paper().simulate(2, theta=np.ones((3, 3))),
            "theta must have shape",
        ),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cli_simulate(tmp_path, capsys):
    from astropy.io import fits
    from astropy.table import QTable

    from astrotrunc import read_map
    from astrotrunc.cli import main

    obs, truth = tmp_path / "obs.fits", tmp_path / "truth.ecsv"
    assert (
        main(["simulate", "--seed", "3", "--out", str(obs), "--truth", str(truth), "--n-maps", "2"])
        == 0
    )
    assert main(["simulate", "--seed", "3", "--out", str(obs)]) == 2  # never clobbers
    assert "already exists" in capsys.readouterr().err
    with fits.open(obs) as hdul:
        assert len(hdul) == 2 and hdul[0].header["CTYPE1"] == "GLON-CAR"
        n_true = [int(h.header["HIERARCH TRUTH N"]) for h in hdul]
    nd = read_map(obs)
    sims = PointSourceModel.paper().simulate(2, seed=3)
    np.testing.assert_array_equal(nd.data, sims.maps[0].numpy())
    assert nd.wcs.wcs.ctype[1] == "GLAT-CAR"
    t = QTable.read(truth)
    assert t["l"].unit == u.deg and t["flux"].unit == u.dimensionless_unscaled
    assert [int((t["map_id"] == i).sum()) for i in range(2)] == n_true
    assert main(["simulate", "--out", str(tmp_path / "x.fits"), "--n-maps", "0"]) == 2


def test_simulate_leaves_no_threads_behind():
    # the Poisson draws run on the intra-op threads' number of worker threads; a pool kept alive
    # after them (they have run torch operations) made torch half as fast on the main thread
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = threading.active_count()
        model = PointSourceModel.paper()
        model.simulate(4, seed=0)
        assert threading.active_count() == before
    finally:
        torch.set_num_threads(threads)
