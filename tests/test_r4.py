"""r4, the neural route of the detected branch, against the exact catalog likelihood."""

import math
import warnings

import numpy as np
import pytest
import torch
from astropy import units as u

from astrotrunc import CompletenessFunction, ConditionalCompleteness, PointSourceModel
from astrotrunc.exceptions import AstrotruncWarning
from astrotrunc.inference import (
    CatalogLikelihood,
    DetectedCatalogRatio,
    DetectedCatalogs,
    NeuralCatalogLikelihood,
    ReferenceDensity,
    completeness_record,
    simulate_detected,
)
from astrotrunc.nre import MarginalRatioEstimator, Trainer
from astrotrunc.priors import BoxPrior, Uniform
from astrotrunc.simulation import SkyGeometry
from astrotrunc.truncation import (CompletenessTable, ConditionalCompletenessTable,
                                   DetectedRegions)

pytestmark = pytest.mark.usefixtures("one_thread")


class _StepCompleteness:
    """A toy S(F, s): a smooth step at ``flux_50`` in log F, the same at every position."""

    extent = None

    def __init__(self, flux_50=5.0, width=0.3):
        self.flux_50, self.width = flux_50, width

    def logit_table(self, flux, lon, lat):
        logit = (torch.log(torch.as_tensor(flux, dtype=torch.float64)) - math.log(self.flux_50))
        return (logit / self.width)[None, :].expand(len(lon), -1)


class _CrowdedCompleteness:
    """A toy S(F, s | θ) = N / (N + 20): flat in flux and position, lower in sparse maps."""

    extent = None
    theta_center = (0.0, 0.0, 0.0)  # marks a θ-conditional completeness

    def logit_table(self, flux, lon, lat, theta=None):
        n = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, 3)[:, 0]
        logit = torch.log(n / 20.0).expand(len(lon))
        return logit[:, None].expand(-1, len(flux))


def _toy():
    """A 16x16 map of 5° pixels, few sources: r4 trains in seconds."""
    geometry = SkyGeometry.from_extent(shape=(16, 16), resolution=5 * u.deg)
    prior = BoxPrior(N=Uniform(5, 60, integer=True), sigma_F=Uniform(1, 3),
                     h=Uniform(2, 20, unit="deg"))
    model = PointSourceModel(geometry=geometry, prior=prior)
    return model, CompletenessTable(_StepCompleteness(), geometry)


def _regions_of(model, table, theta, seed):
    """Regions of a simulated catalog: the pixel of every detected source (distinct pixels)."""
    gen = torch.Generator().manual_seed(seed)
    _, pixel, _, det = simulate_detected(model, table, torch.as_tensor([theta]), gen)
    pixels = np.unique(pixel[det].numpy())
    labels = np.zeros(model.shape[0] * model.shape[1], int)
    labels[pixels] = np.arange(1, len(pixels) + 1)
    return DetectedRegions(labels.reshape(model.shape))


@pytest.fixture(scope="module")
def trained():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, table = _toy()
        ref = ReferenceDensity.from_model(model, table, n_pilot=4000, seed=0)
        torch.manual_seed(0)
        est = DetectedCatalogRatio(ref, n_features=16, set_hidden=32, hidden=32, n_blocks=1,
                                   completeness=completeness_record(table))
        data = DetectedCatalogs(model, table, est.reference_density, 16384, 2048, seed=0)
        Trainer(max_epochs=6, batch_size=256, learning_rate=3e-3, progress=False, seed=0,
                device="cpu").fit(est, data)
    finally:
        torch.set_num_threads(n)
    return model, table, est


def test_batch_source_shapes_and_masks():
    model, table = _toy()
    ref = ReferenceDensity(model.shape)
    data = DetectedCatalogs(model, table, ref, n_train=100, n_val=30, seed=1)
    batches = list(data.train_batches(64, epoch=0))
    assert [len(b["theta"]) for b in batches] == [64, 36]
    b = batches[0]
    x, x_ref = b["x"], b["x_ref"]
    assert x.ndim == 3 and x.shape[-1] == 3 and x_ref.shape[-1] == 3
    present, present_ref = x[..., -1], x_ref[..., -1]
    assert set(present.unique().tolist()) <= {0.0, 1.0}
    # present sources first, padding all zeros
    counts = present.sum(1).long()
    assert bool((present == (torch.arange(x.shape[1]) < counts[:, None])).all())
    assert bool((x[present == 0] == 0).all())
    # the references' N_det is that of another simulation of the batch
    assert torch.equal(present_ref.sum(1).long(), torch.roll(counts, 1))
    # positions inside the map, and not every catalog the same size
    xy = x[present == 1][:, :2]
    assert bool(((xy > -0.5) & (xy < 15.5)).all())
    assert counts.min() < counts.max()
    # fresh catalogs every epoch, the same validation set every time
    again = next(iter(data.train_batches(64, epoch=1)))
    assert not torch.equal(again["theta"], b["theta"])
    v1, v2 = next(iter(data.val_batches(64))), next(iter(data.val_batches(64)))
    assert torch.equal(v1["x"], v2["x"])


def test_reference_catalogs_land_inside_their_regions():
    labels = np.zeros((12, 10), int)
    labels[2, 3:5] = 1  # two pixels
    labels[8, 7] = 2
    labels[5:7, 1] = 3
    regions = DetectedRegions(labels)
    ref = ReferenceDensity((12, 10))
    w = np.ones((12, 10))
    w[2, 4] = 3.0  # region 1: its right pixel three times as likely
    ref.set_pixel_weights(w)
    x = ref.sample_in_regions(regions, 4000, generator=0)
    assert x.shape == (4000, 3, 3)
    ix = torch.floor(x[..., 0] + 0.5).long()
    iy = torch.floor(x[..., 1] + 0.5).long()
    got = torch.as_tensor(labels)[iy, ix]
    assert torch.equal(got, torch.tensor([1, 2, 3]).expand(4000, 3))
    frac_right = float((ix[:, 0] == 4).double().mean())
    assert abs(frac_right - 0.75) < 0.02
    # inside a pixel, uniform: offsets fill (-0.5, 0.5)
    off = x[..., 0] - ix
    assert float(off.min()) < -0.45 and float(off.max()) > 0.45
    # a flux threshold adds the F >= F_th column, 1 for every reference source
    ref_th = ReferenceDensity((12, 10), flux_threshold=10.0)
    assert bool((ref_th.sample_in_regions(regions, 10, generator=1)[..., 2] == 1).all())
    ref_log = ReferenceDensity((12, 10), flux_feature="log", flux_threshold=10.0)
    log_f = ref_log.sample_in_regions(regions, 500, generator=2)[..., 0]
    assert float(log_f.min()) >= math.log(10.0) - 1e-6


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="flux_feature"):
        ReferenceDensity((8, 8), flux_feature="linear")
    with pytest.raises(ValueError, match="flux_threshold"):
        ReferenceDensity((8, 8), flux_threshold=-1)
    ref = ReferenceDensity((8, 8))
    with pytest.raises(ValueError, match="pixel weights"):
        ref.set_pixel_weights(np.ones((4, 4)))
    labels = np.zeros((9, 9), int)
    labels[1, 1] = 1
    with pytest.raises(ValueError, match="map"):
        ref.sample_in_regions(DetectedRegions(labels), 3)
    model, table = _toy()
    small = DetectedCatalogRatio(ReferenceDensity(model.shape, max_detected=1), hidden=8)
    labels = np.zeros(model.shape, int)
    labels[3, 3], labels[5, 5] = 1, 2
    with pytest.raises(ValueError, match="at most 1"):
        NeuralCatalogLikelihood(small, model, DetectedRegions(labels))
    with pytest.raises(ValueError, match="NaN"):
        simulate_detected(model, table, torch.tensor([[10.0, math.nan, 5.0]]))
    data = DetectedCatalogs(model, table, small.reference_density, 64, 8)
    with pytest.raises(ValueError, match="max_detected"):
        data.batch(torch.tensor([[60.0, 3.0, 20.0]] * 4), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown device"):
        DetectedCatalogs(model, table, small.reference_density, 64, 8, device="gpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            DetectedCatalogs(model, table, small.reference_density, 64, 8, device="cuda")


def test_save_load_round_trip(tmp_path, trained):
    model, _, est = trained
    path = tmp_path / "r4.safetensors"
    est.save(path)
    back = DetectedCatalogRatio.load(path)
    assert back.config == est.config
    assert back.config["reference"]["flux_loc"] == est.reference_density.flux_loc
    assert torch.equal(back.reference_density.pixel_weights, est.reference_density.pixel_weights)
    labels = np.zeros(model.shape, int)
    labels[8, 7:9], labels[3, 12] = 1, 2
    regions = DetectedRegions(labels)
    theta = model.prior.sample(50, generator=3)
    a = NeuralCatalogLikelihood(est, model, regions, n_reference=64, seed=5).log_prob(theta)
    b = NeuralCatalogLikelihood(back, model, regions, n_reference=64, seed=5).log_prob(theta)
    assert torch.allclose(a, b)


def test_neural_likelihood_ranks_theta_like_the_exact_one(trained):
    model, table, est = trained
    exact = None
    theta = model.prior.sample(400, generator=11)
    for k, truth in enumerate([(40.0, 2.0, 5.0), (25.0, 2.5, 15.0)]):
        regions = _regions_of(model, table, truth, seed=20 + k)
        exact = (CatalogLikelihood(model, regions, table) if exact is None
                 else exact.for_regions(regions))
        lp_e = exact.log_prob(theta)
        like = NeuralCatalogLikelihood(est, model, regions, n_reference=128, seed=k)
        lp_n = like.log_prob(theta)
        assert lp_n.shape == (400, 4)
        ok = torch.isfinite(lp_e)
        assert torch.equal(ok, torch.isfinite(lp_n[:, -1]))  # N < N_det: -inf in both
        # rank correlation of the joint head with the exact log-likelihood
        r_e = torch.argsort(torch.argsort(lp_e[ok])).double()
        r_n = torch.argsort(torch.argsort(lp_n[ok, -1])).double()
        rho = float(torch.corrcoef(torch.stack([r_e, r_n]))[0, 1])
        assert rho > 0.8, (truth, rho)
        # and the best 10 % of θ by the exact route are well inside the neural route's best half
        top = lp_e[ok] >= torch.quantile(lp_e[ok], 0.9)
        assert float((r_n[top] >= 0.5 * ok.sum()).double().mean()) > 0.9


def test_zero_detections(trained):
    model, table, est = trained
    empty = DetectedRegions(np.zeros(model.shape, int))
    like = NeuralCatalogLikelihood(est, model, empty, n_reference=32)
    assert like.n_reference == 1  # one empty catalog: nothing to average
    theta = model.prior.sample(200, generator=4)
    lp = like.log_prob(theta)
    assert lp.shape == (200, 4) and bool(torch.isfinite(lp).all())
    # few sources and faint ones make an empty catalog likelier: the ranks agree with exact
    lp_e = CatalogLikelihood(model, empty, table).log_prob(theta)
    r_e = torch.argsort(torch.argsort(lp_e)).double()
    r_n = torch.argsort(torch.argsort(lp[:, -1])).double()
    assert float(torch.corrcoef(torch.stack([r_e, r_n]))[0, 1]) > 0.5
    assert like.joint_log_prob(theta).shape == (200,)


def test_likelihood_is_the_log_mean_of_r4_over_reference_catalogs():
    model, _ = _toy()
    torch.manual_seed(1)
    est = DetectedCatalogRatio(ReferenceDensity(model.shape), hidden=8, set_hidden=8).eval()
    labels = np.zeros(model.shape, int)
    labels[4, 4:6], labels[10, 12] = 1, 2
    regions = DetectedRegions(labels)
    theta = model.prior.sample(6, generator=0)
    refs = est.reference_density.sample_in_regions(regions, 5, generator=3)
    with torch.no_grad():
        # r4 = θ-heads (against shuffled θ) + the θ-free head (against the reference catalogs)
        f = est.features(refs)
        split = (MarginalRatioEstimator.heads(est, f, theta[:5])
                 + est.reference_log_ratio(f)[:, None])
        assert torch.allclose(est.log_ratio(refs, theta[:5]), split)
        log_r = torch.stack([est.log_ratio(r[None].expand(6, -1, -1), theta) for r in refs], 1)
    expected = torch.logsumexp(log_r.double(), 1) - math.log(5)
    got = NeuralCatalogLikelihood(est, model, regions, n_reference=5, seed=3).log_prob(theta)
    assert torch.allclose(got, expected, atol=1e-5)


def test_conditional_thinning_follows_each_catalogs_theta():
    """With S(F, s | θ), a source is detected with the S of its own catalog's θ."""
    model, _ = _toy()
    table = ConditionalCompletenessTable(_CrowdedCompleteness(), model.geometry, model.prior)
    # N = 5 and N = 60 are θ nodes: there the table's S is exactly 0.2 and 0.75
    theta = torch.tensor([[5.0, 2.0, 10.0], [60.0, 2.0, 10.0]]).repeat_interleave(400, 0)
    gen = torch.Generator().manual_seed(0)
    _, _, xy, det = simulate_detected(model, table, theta, gen)
    ny, nx = model.shape
    inside = ((xy[..., 0] > -0.5) & (xy[..., 0] < nx - 0.5) & (xy[..., 1] > -0.5)
              & (xy[..., 1] < ny - 0.5) & (torch.arange(det.shape[1]) < theta[:, :1].long()))
    sparse, crowded = (float(det[k].sum() / inside[k].sum()) for k in (slice(0, 400),
                                                                       slice(400, None)))
    assert abs(sparse - 0.2) < 0.03 and abs(crowded - 0.75) < 0.015, (sparse, crowded)
    # the batch source takes the completeness itself and records what it thinned with
    ref = ReferenceDensity.from_model(model, table, n_pilot=256, seed=0)
    data = DetectedCatalogs(model, _CrowdedCompleteness(), ref, n_train=64, n_val=16)
    assert isinstance(data.table, ConditionalCompletenessTable)
    assert data.record == {"kind": "theta-conditional", "identity": None, "detector_id": None}
    counts = data.batch(theta[[0, -1]].repeat(50, 1), gen)["x"][..., -1].sum(1)
    assert counts[1::2].mean() > 5 * counts[::2].mean()  # 60 × 0.75 vs 5 × 0.2 sources
    # drawn on a named device (the CPU here): the same catalogs as by default
    on_cpu = DetectedCatalogs(model, _CrowdedCompleteness(), ref, 64, 16, device="cpu")
    for a, b in zip(data.train_batches(32, 1), on_cpu.train_batches(32, 1)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_r4_records_its_completeness_and_warns_on_another(tmp_path):
    model, _ = _toy()
    torch.manual_seed(0)
    conditional = ConditionalCompleteness(detector_id="det")
    averaged = CompletenessFunction(detector_id="det")
    est = DetectedCatalogRatio(ReferenceDensity(model.shape), hidden=8, set_hidden=8,
                               completeness=completeness_record(conditional))
    est.save(tmp_path / "r4.safetensors")
    back = DetectedCatalogRatio.load(tmp_path / "r4.safetensors")
    assert back.completeness == {"kind": "theta-conditional", "identity": conditional.identity,
                                 "detector_id": "det"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert back.check_completeness(conditional)  # the same S: silent
    with pytest.warns(AstrotruncWarning, match=f"theta-conditional completeness "
                      f"{conditional.identity}.*theta-averaged completeness {averaged.identity}"):
        assert not back.check_completeness(averaged)
    with pytest.warns(AstrotruncWarning, match="an unrecorded completeness"):
        DetectedCatalogRatio(ReferenceDensity(model.shape), hidden=8).check_completeness(averaged)
    with pytest.raises(ValueError, match="completeness_record"):
        DetectedCatalogRatio(ReferenceDensity(model.shape), completeness="conditional")


def test_shipped_r4_follows_the_shipped_conditional_completeness():
    est = DetectedCatalogRatio.load_default()
    assert est.completeness == completeness_record(ConditionalCompleteness.load_default())
    assert est.metadata["settings"]["completeness"] == "conditional"
    assert max(est.metadata["max_jsd_joint"], est.metadata["max_jsd_1d"]) <= 0.05
