"""Population inference: regions, the truncated model, the exact catalog likelihood, r3, the run."""

import math
import warnings

import numpy as np
import pytest
import torch
from astropy.table import QTable

from astrotrunc import (CompletenessFunction, PointSourceModel, PopulationInference,
                        PopulationPosterior, find_sources)
from astrotrunc.exceptions import AstrotruncWarning
from astrotrunc.inference import (CatalogLikelihood, DetectedCatalogRatio, InferenceSettings,
                                  ReferenceDensity, SubThresholdRatio,
                                  naive_catalog_log_likelihood)
from astrotrunc.truncation import CompletenessTable, DetectedRegions, TruncatedModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return PointSourceModel.paper()


@pytest.fixture(scope="module")
def completeness():
    torch.manual_seed(3)
    return CompletenessFunction(detector_id="test", flux_threshold=10.0, extent=[-40, 40, -40, 40])


@pytest.fixture(scope="module")
def observation(model):
    from astrotrunc.completeness import default_completeness

    S = default_completeness()
    sims = model.simulate(1, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cat, segm = find_sources(sims.maps[0], wcs=model.wcs, threshold=S.threshold,
                                 flux_threshold=S.flux_threshold, return_segmentation=True)
    return sims, cat, segm


# -- regions --------------------------------------------------------------------------------
def test_regions_from_segmentation_follow_catalog_order(model, observation):
    _, cat, segm = observation
    regions = DetectedRegions.from_catalog(cat[::-1], model.shape, segmentation=segm)
    assert regions.n == len(cat)
    lab = regions.label_image()
    for i, label in enumerate(cat[::-1]["label"]):  # region i holds exactly segment `label`
        assert set(np.unique(segm.data[lab == i + 1])) == {label}


def test_regions_from_positions_mask_and_errors(model):
    cat = QTable({"x_centroid": [10.2, 11.0, 100.0], "y_centroid": [20.0, 20.4, 5.0]})
    regions = DetectedRegions.from_catalog(cat, model.shape, radius=1.5)
    assert regions.n == 3 and (regions.sizes > 1).all()
    lab = regions.label_image()
    assert lab[20, 10] == 1 and lab[20, 11] == 2 and lab[5, 100] == 3  # nearest position wins
    mask = np.zeros(model.shape, bool)
    mask[5, 100] = True
    masked = DetectedRegions.from_catalog(cat, model.shape, mask=mask)
    assert masked.label_image()[5, 100] == 0 and masked.sizes[2] == regions.sizes[2] - 1
    assert DetectedRegions.from_catalog(None, model.shape).n == 0
    with pytest.raises(ValueError, match="outside"):
        DetectedRegions.from_catalog(QTable({"x_centroid": [200.0], "y_centroid": [3.0]}),
                                     model.shape)
    full = np.ones(model.shape, bool)
    with pytest.raises(ValueError, match="no unmasked pixel"):
        DetectedRegions.from_catalog(cat, model.shape, mask=full)


# -- the truncated model ----------------------------------------------------------------------
def test_truncated_model_pins_detections_and_conserves_n(model, completeness):
    labels = np.zeros(model.shape, int)
    labels[60:62, 30] = 1
    labels[70, 90] = 2
    regions = DetectedRegions(labels)
    tm = TruncatedModel(model, regions, completeness)
    sims = tm.simulate(300, seed=1, chunk_size=128)
    assert (sims.theta[:, 0] >= 2).all() and float(tm.prior.low[0]) == 10
    assert (sims.valid.sum(1) == sims.theta[:, 0].long()).all()  # N sources, no more, no less
    assert (sims.detected.sum(1) == 2).all()
    ix = torch.floor(sims.x + 0.5).long()
    iy = torch.floor(sims.y + 0.5).long()
    det = sims.detected
    assert set(zip(iy[:, 0].tolist(), ix[:, 0].tolist())) <= {(60, 30), (61, 30)}
    assert ((iy[:, 1] == 70) & (ix[:, 1] == 90)).all()
    # sub-threshold sources are thinned by 1 - S: never more bright ones than the full model
    table = CompletenessTable(completeness, model.geometry)
    s_sub = table(sims.flux, sims.x, sims.y)[sims.valid & ~det]
    full = model.simulate(300, seed=2, theta=sims.theta)
    s_full = table(full.flux, full.x, full.y)[full.valid]
    assert s_sub.mean() < s_full.mean()
    same = tm.simulate(5, seed=7)
    assert torch.equal(same.maps, tm.simulate(5, seed=7).maps)


def test_conditional_completeness_in_the_truncated_model(model):
    from astrotrunc import ConditionalCompleteness
    from astrotrunc.truncation import ConditionalCompletenessTable

    torch.manual_seed(4)
    cond = ConditionalCompleteness(detector_id="test", flux_threshold=10.0,
                                   extent=[-40, 40, -40, 40], params=model.param_names,
                                   theta_center=[5.0, 2.0, 1.5], theta_scale=[1.0, 0.5, 0.8])
    labels = np.zeros(model.shape, int)
    labels[60:62, 30] = 1
    labels[70, 90] = 2
    regions = DetectedRegions(labels)
    tm = TruncatedModel(model, regions, cond)
    table = tm.table
    assert isinstance(table, ConditionalCompletenessTable)
    # at a node, the interpolation the truncated model and the likelihood share is the node's S
    pix = torch.unique(regions.pixel_index)
    tables = table.all_nodes(pix).float()
    node = 37
    flux = torch.exp(table.log_flux[::20]).float()[None, None].expand(1, len(pix), -1)
    index = torch.arange(len(pix))[None, :, None].expand_as(flux)
    s = table.interpolate(tables, flux, index, table.nodes[node][None])
    assert torch.allclose(s[0], table.node_table(node, pix)[:, ::20].float(), atol=1e-5)
    # and the network evaluated exactly agrees with the interpolation at a node
    exact = table.at_pixels(flux[0], pix[:, None].expand(-1, flux.shape[-1]),
                            table.nodes[node][None].float())
    assert torch.allclose(exact, s[0], atol=2e-3)
    # sources not marked active are skipped (S = 0 there), the others evaluated
    active = torch.zeros(flux.shape[1:], dtype=torch.bool)
    active[0] = True
    part = table.at_pixels(flux[0], pix[:, None].expand(-1, flux.shape[-1]),
                           table.nodes[node][None].float(), active)
    assert torch.equal(part[0], exact[0]) and (part[1:] == 0).all()
    sims = tm.simulate(64, seed=2, chunk_size=32)
    assert (sims.detected.sum(1) == 2).all()
    assert (sims.valid.sum(1) == sims.theta[:, 0].long()).all()


def test_truncated_model_options_and_errors(model, completeness):
    labels = np.zeros(model.shape, int)
    labels[64, 64] = 1
    tm = TruncatedModel(model, DetectedRegions(labels), completeness, flux_threshold=30.0)
    sims = tm.simulate(64, seed=0)
    assert (sims.flux[:, 0] >= 30.0).all()
    none = TruncatedModel(model, DetectedRegions(np.zeros(model.shape, int)), completeness)
    assert none.simulate(8, seed=0).detected.sum() == 0
    with pytest.raises(ValueError, match="N >= N_det"):
        tm.simulate(2, theta=[[0.5, 2, 5], [20, 2, 5]])
    many = np.arange(model.shape[0] * model.shape[1]).reshape(model.shape) % 600 + 1
    with pytest.raises(ValueError, match="detections"):
        TruncatedModel(model, DetectedRegions(many), completeness)
    with pytest.raises(ValueError, match="map"):
        TruncatedModel(model, DetectedRegions(np.zeros((8, 8), int)), completeness)


def test_simulate_truncated_from_a_catalog(model, observation):
    from astrotrunc.completeness import default_completeness

    sims, cat, segm = observation
    out = model.simulate_truncated(cat, default_completeness(), 4, seed=0, segmentation=segm)
    assert out.maps.shape == (4, *model.shape) and (out.detected.sum(1) == len(cat)).all()
    assert "detected" in out.sources(0).colnames


# -- the exact catalog likelihood -------------------------------------------------------------
def test_detection_fraction_matches_monte_carlo(model, completeness):
    whole = DetectedRegions(np.ones(model.shape, int))  # one region: the whole map
    like = CatalogLikelihood(model, whole, completeness, n_h=60)
    theta = torch.tensor([[200.0, 1.3, 2.0], [300.0, 2.6, 14.0]])
    for t in theta:
        sims = model.simulate(100, seed=0, theta=t[None].expand(100, -1))
        s = like.table(sims.flux, sims.x, sims.y)
        mc = float(s[sims.valid].mean())
        assert abs(float(like.detection_fraction(t)) - mc) < 0.03 * mc + 2e-3
    # P_1 of a region covering the map is p̄ (same quadrature, pixel-exact h)
    np.testing.assert_allclose(like.region_log_prob(theta)[:, 0].exp(),
                               like.detection_fraction(theta), rtol=0.02)


def test_catalog_log_likelihood_shape_and_limits(model, completeness):
    labels = np.zeros(model.shape, int)
    labels[64, 64] = 1
    labels[64, 70] = 2
    like = CatalogLikelihood(model, DetectedRegions(labels), completeness, n_h=40)
    theta = torch.tensor([[1.0, 2.0, 5.0], [2.0, 2.0, 5.0], [300.0, 2.0, 5.0]])
    lp = like.log_prob(theta)
    assert lp[0] == -math.inf and torch.isfinite(lp[1:]).all()
    # zero detections: N (1 - p̄) only
    none = like.for_regions(DetectedRegions(np.zeros(model.shape, int)))
    pbar = none.detection_fraction(theta)
    np.testing.assert_allclose(none.log_prob(theta), theta[:, 0].double() * torch.log1p(-pbar))
    # sources on the plane are likelier with a thin disk
    thin, thick = like.log_prob(torch.tensor([[100.0, 2.0, 2.0], [100.0, 2.0, 19.0]]))
    assert thin > thick
    # the naive fit needs the catalog's fluxes and sky positions
    cat = QTable({"flux": [20.0, 30.0], "l": [0.0, -3.0], "b": [0.1, 0.2]})
    naive = naive_catalog_log_likelihood(like, cat, theta)
    assert naive[0] == -math.inf and torch.isfinite(naive[1:]).all()


# -- r3 ----------------------------------------------------------------------------------------
def test_r3_round_trip_and_mask(tmp_path, model):
    mask = np.zeros(model.shape, bool)
    mask[:4] = True
    r3 = SubThresholdRatio(model.shape, model.param_names, mask=mask, hidden=16).eval()
    x = torch.rand(2, *model.shape)
    y = x.clone()
    y[:, :4] = 1e3  # masked pixels carry no information
    assert torch.equal(r3.prepare(x), r3.prepare(y))
    r3.save(tmp_path / "r3.safetensors")
    back = SubThresholdRatio.load(tmp_path / "r3.safetensors")
    t = torch.rand(2, 3)
    torch.testing.assert_close(back.log_ratio(back.prepare(x), t), r3.log_ratio(r3.prepare(x), t))
    with pytest.raises(ValueError, match="features"):
        SubThresholdRatio(model.shape, model.param_names, features="fft")


# -- the whole run --------------------------------------------------------------------------
TINY = InferenceSettings(n_rounds=1, n_simulations=512, max_epochs=2, n_samples=2000,
                         chunk_size=128, hidden=16)


def test_population_inference_run_write_read_resume(tmp_path, model, observation, monkeypatch):
    sims, _, _ = observation
    inf = PopulationInference(model, settings=TINY)
    work = tmp_path / "work"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = inf.run(sims.maps[0], client="sync", workdir=work, progress=False,
                       truth=sims.theta[0])
    table = post.summary()
    assert table.colnames == ["posterior", "parameter", "median", "low_68", "high_68", "low_95",
                              "high_95", "ess"]
    assert list(table["posterior"]) == ["sub-threshold"] * 3 + ["detected"] * 3 + ["combined"] * 3
    assert (table["low_95"] <= table["low_68"]).all() and (table["low_68"] <= table["median"]).all()
    assert (table["median"] <= table["high_68"]).all()
    assert (table["high_68"] <= table["high_95"]).all()
    assert post.meta["n_detected"] == len(post.catalog) and post.truncation is not None
    assert float(post.combined.theta[:, 0].min()) >= post.meta["n_detected"]
    for suffix in ("ecsv", "fits"):
        path = tmp_path / f"post.{suffix}"
        post.write(path)
        back = PopulationPosterior.read(path)
        np.testing.assert_allclose(back.summary()["median"], table["median"])
        with pytest.raises(OSError):
            post.write(path)
    # a second run with the same workdir reuses the finished round: nothing is simulated
    from astrotrunc.store import SimulationStore

    def boom(*a, **k):
        raise AssertionError("a finished round was simulated again")

    monkeypatch.setattr(SimulationStore, "fill", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = inf.run(sims.maps[0], client="sync", workdir=work, progress=False)
    np.testing.assert_allclose(again.truncation["volume"], post.truncation["volume"])


def test_population_inference_bad_input(model, observation):
    from astrotrunc.io import make_wcs

    sims, _, _ = observation
    inf = PopulationInference(model, settings=TINY)
    with pytest.raises(ValueError, match="model simulates"):
        inf.run(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="branches"):
        inf.run(sims.maps[0], branches=("everything",))
    other = CompletenessFunction(detector_id="0123456789abcdef")
    with pytest.raises(ValueError, match="0123456789abcdef"):
        PopulationInference(model, completeness=other)
    with pytest.raises(ValueError, match="flux_threshold"):
        PopulationInference(model, flux_threshold=1.0)
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    wcs = make_wcs(model.shape, SkyCoord(0 * u.deg, 0 * u.deg, frame="galactic"), 0.1 * u.deg)
    with pytest.raises(ValueError, match="WCS"):
        inf.run(sims.maps[0], wcs=wcs)


def test_population_inference_detected_branch_masks_and_no_detections(model):
    inf = PopulationInference(model, settings=TINY)
    empty = np.zeros(model.shape)  # nothing detected: the zero-detection likelihood
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = inf.run(empty, branches=("detected",), progress=False)
    assert post.meta["n_detected"] == 0 and post.sub_threshold is None
    assert post.combined is not None and np.isfinite(post.summary()["median"]).all()
    data = model.simulate(1, seed=4).maps[0].numpy().copy()
    data[:10] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = inf.run(data, branches=("detected",), progress=False)
    assert post.meta["n_detected"] == len(post.catalog)
    assert (post.catalog["y_centroid"].value >= 9.5).all()


def test_cli_infer(tmp_path, monkeypatch):
    """The infer command writes every promised file (tiny settings; the demo: test_demo.py)."""
    from astrotrunc import cli
    from astrotrunc.inference import population

    monkeypatch.setattr(population, "InferenceSettings", _tiny_settings)
    obs = tmp_path / "obs.fits"
    assert cli.main(["simulate", "--seed", "3", "--out", str(obs)]) == 0
    out = tmp_path / "post.ecsv"
    args = ["infer", str(obs), "--out", str(out), "--plots", str(tmp_path / "plots"), "--quiet",
            "--client", "sync"]
    assert cli.main(args) == 0
    assert PopulationPosterior.read(out).summary()["posterior"][0] == "sub-threshold"
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "posterior_corner.png", "truncated_samples.png", "truncation.png"}
    assert not (tmp_path / "post.ecsv.work").exists()  # the work directory is cleaned up
    assert cli.main(args) == 2  # no clobber without --overwrite
    assert cli.main(["infer", str(obs), "--out", str(obs), "--overwrite"]) == 2


class _tiny_settings(InferenceSettings):
    """InferenceSettings whose defaults are TINY (for the command-line tests)."""

    def __init__(self, **kwargs):
        super().__init__(**{**TINY.__dict__, **kwargs})

    @classmethod
    def quick(cls, **kwargs):
        return cls(**kwargs)


def test_population_inference_neural_catalog_route(model, observation):
    """catalog_likelihood='neural' runs r4 (the shipped one) through the same run."""
    sims, _, _ = observation
    inf = PopulationInference(model, settings=TINY)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        post = inf.run(sims.maps[0], branches=("detected",), catalog_likelihood="neural",
                       progress=False)
    # the shipped r4 learned catalogs thinned by the inference's default (conditional) S: silent
    assert not [w for w in seen if "r4 was trained" in str(w.message)]
    assert post.meta["r4_completeness"]["identity"] == inf.completeness.identity
    assert post.meta["catalog_likelihood"] == "neural"
    assert np.isfinite(post.summary()["median"]).all()
    # an r4 of another (here: unrecorded) S is named in a warning
    other = DetectedCatalogRatio(ReferenceDensity(model.shape), hidden=8, set_hidden=8)
    with pytest.warns(AstrotruncWarning, match="unrecorded completeness.*theta-conditional"):
        inf.run(sims.maps[0], branches=("detected",), catalog_likelihood="neural", r4=other,
                progress=False)
    with pytest.raises(ValueError, match="catalog_likelihood"):
        inf.run(sims.maps[0], catalog_likelihood="magic")
