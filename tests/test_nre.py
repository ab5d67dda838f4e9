"""NRE engine: marginal estimators against an analytic posterior, safe files, trainer, posteriors.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from astrotrunc.exceptions import LowEffectiveSampleSizeWarning
from astrotrunc.nre import (ChannelResidualNet, MarginalRatioEstimator, OnlineStandardize,
                            RatioEstimator, Trainer, WeightedSamples, contrastive_loss,
                            effective_sample_size, match_marginals)
from astrotrunc._toys import (LG_MATRIX, LG_PRIOR, LG_SIGMA, linear_gaussian,
                              linear_gaussian_moments)

pytestmark = pytest.mark.usefixtures("one_thread")

A, SIGMA, PRIOR = LG_MATRIX, LG_SIGMA, LG_PRIOR
_linear_gaussian, _analytic_moments = linear_gaussian, linear_gaussian_moments


def test_linear_gaussian_marginals_match_analytic():
    torch.manual_seed(0)
    est = MarginalRatioEstimator(3, PRIOR.names, pairs=[("a", "b")], hidden=64)
    Trainer(max_epochs=30, batch_size=128, learning_rate=3e-3, progress=False, seed=0,
            patience=100).fit(est, _linear_gaussian(16000, 0))
    theta_true = torch.tensor([[0.45, -0.6, 0.65]])
    x_obs = theta_true @ A.T + SIGMA * torch.randn(
        1, 3, generator=torch.Generator().manual_seed(11)
    )
    post = est.sample(x_obs, PRIOR, 50_000, generator=1)
    mean, std = _analytic_moments(x_obs)
    # means within 10 % of the posterior width, widths within 10 %
    np.testing.assert_array_less(np.abs(post.mean() - mean) / std, 0.1)
    np.testing.assert_array_less(np.abs(post.std() / std - 1), 0.1)
    assert post.column_names == ("a", "b", "c", "a,b")
    levels = post.credible_level(theta_true[0])
    assert levels.shape == (4,) and ((levels >= 0) & (levels <= 1)).all()
    summary = post.summary()
    assert list(summary["name"]) == ["a", "b", "c"] and (summary["ess"] > 1000).all()


def test_channel_net_equals_separate_networks():
    net = ChannelResidualNet(channels=3, n_features=4, n_params=2, hidden=5, n_blocks=1)
    f, p = torch.randn(6, 4), torch.randn(6, 3, 2)
    out = net(f, p)
    silu = torch.nn.functional.silu
    for c in range(3):  # channel c by hand
        w_f = net.w_features.view(4, 3, 5)[:, c]
        h = f @ w_f + p[:, c] @ net.w_params[c] + net.bias[c]
        first, second = net.blocks[0]
        h = h + silu(silu(h) @ first.weight[c] + first.bias[c]) @ second.weight[c] + second.bias[c]
        ref = silu(h) @ net.out.weight[c] + net.out.bias[c]
        torch.testing.assert_close(out[:, c], ref[:, 0])


def test_online_standardize_exact_and_frozen_in_eval():
    norm = OnlineStandardize(2)
    x = torch.randn(1000, 2) * torch.tensor([3.0, 0.5]) + torch.tensor([10.0, -2.0])
    for chunk in x.split(77):
        norm(chunk)
    torch.testing.assert_close(norm.mean, x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.std, x.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
    norm.eval()
    before = norm.mean.clone()
    norm(torch.randn(10, 2) + 100)
    torch.testing.assert_close(norm.mean, before)


def test_reference_contrast_and_default_loss():
    batch = {"x": torch.zeros(4, 1), "theta": torch.zeros(4, 1), "x_ref": torch.ones(4, 1)}
    seen = []

    def logits(b):
        seen.append(b["x"].sum().item())
        return torch.zeros(4)

    contrastive_loss(logits, batch, reference={"x": "x_ref"})
    assert seen == [0.0, 4.0]  # the marginal pairs used the reference samples
    est = MarginalRatioEstimator(1, ["t"], hidden=8, reference_key="x_ref")
    assert torch.isfinite(est.loss(batch))


def test_save_load_roundtrip_and_safety(tmp_path):
    est = MarginalRatioEstimator([2, 3], ["a", "b"], pairs=[(0, 1)], hidden=8,
                                 embedding_kwargs={"hidden": 16, "n_features": 4})
    est.train()
    est.log_ratio(torch.randn(32, 2, 3), torch.randn(32, 2))  # updates the standardisation
    path = tmp_path / "est.safetensors"
    est.save(path, metadata={"F_th": 10.0})
    with pytest.raises(OSError, match="already exists.*overwrite=True"):
        est.save(path)
    back = RatioEstimator.load(path)
    assert isinstance(back, MarginalRatioEstimator) and back.metadata == {"F_th": 10.0}
    est.eval()
    x, t = torch.randn(5, 2, 3), torch.randn(5, 2)
    torch.testing.assert_close(back.log_ratio(x, t), est.log_ratio(x, t))
    # a crafted pickle is refused without being unpickled
    evil = tmp_path / "evil.safetensors"
    torch.save({"w": torch.zeros(2)}, evil)
    with pytest.raises(ValueError, match="pickled files are refused"):
        MarginalRatioEstimator.load(evil)
    # not a model file at all
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    with pytest.raises(ValueError, match="not an astrotrunc model file"):
        MarginalRatioEstimator.load(junk)
    # right format, other architecture
    meta = {"format": "astrotrunc-ratio-estimator", "class": "MarginalRatioEstimator",
            "config": json.dumps(dict(est.config, hidden=16)), "metadata": "{}"}
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in est.state_dict().items()}, wrong, metadata=meta)
    with pytest.raises(ValueError, match="do not fit the MarginalRatioEstimator architecture"):
        MarginalRatioEstimator.load(wrong)
    with pytest.raises(ValueError, match="unknown embedding"):
        MarginalRatioEstimator(2, 1, embedding="transformer")


def test_trainer_checks_and_sources(tmp_path):
    est = MarginalRatioEstimator(2, 2, hidden=8)
    trainer = Trainer(max_epochs=2, batch_size=16, progress=False, seed=0)
    good = {"theta": torch.randn(64, 2), "x": torch.randn(64, 2)}
    with pytest.raises(ValueError, match="same length"):
        trainer.fit(est, dict(good, x=torch.randn(63, 2)))
    with pytest.raises(ValueError, match="'theta' holds NaN or infinite"):
        trainer.fit(
            est, dict(good, theta=good["theta"].clone().index_fill_(0, torch.tensor([3]), np.inf))
        )
    with pytest.raises(ValueError, match="empty"):
        trainer.fit(est, {})

    class Items(torch.utils.data.Dataset):
        def __init__(self, bad=False):
            self.bad = bad

        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = torch.full((2,), np.nan) if self.bad and i == 5 else good["x"][i]
            return {"theta": good["theta"][i], "x": x}

    hist = trainer.fit(est, Items())
    assert len(hist) == 2 and hist["time"].unit == "s"
    with pytest.raises(ValueError, match="'x' holds NaN"):
        trainer.fit(est, Items(bad=True))
    with pytest.raises(TypeError, match="IterableDataset"):
        trainer.fit(est, torch.utils.data.IterableDataset())


def test_trainer_reproducible_and_resume_finished(tmp_path):
    data = {"theta": torch.randn(200, 2), "x": torch.randn(200, 2)}

    def run(**kw):
        torch.manual_seed(1)
        est = MarginalRatioEstimator(2, 2, hidden=8, dropout=0.1)
        hist = Trainer(max_epochs=3, batch_size=32, progress=False, seed=5, **kw).fit(est, data)
        return est, hist

    (_, h1), (e2, h2) = run(), run(checkpoint_dir=tmp_path)
    assert list(h1["val_loss"]) == list(h2["val_loss"])
    # resuming a finished run trains no more and restores the best weights
    e3 = MarginalRatioEstimator(2, 2, hidden=8, dropout=0.1)
    h3 = Trainer(max_epochs=3, batch_size=32, progress=False, seed=5,
                 checkpoint_dir=tmp_path).fit(e3, data, resume=True)
    assert list(h3["val_loss"]) == list(h2["val_loss"])
    for a, b in zip(e2.state_dict().values(), e3.state_dict().values()):
        torch.testing.assert_close(a, b)
    # the best weights of a checkpoint, as a stopped run's result
    best, info = Trainer.best_weights(tmp_path)
    assert info["architecture"] == "MarginalRatioEstimator" and info["epoch"] == 3
    assert info["best"] == pytest.approx(min(h2["val_loss"]))
    for name, value in e2.state_dict().items():
        torch.testing.assert_close(best[name], value)
    # a checkpoint is refused by another architecture
    with pytest.raises(ValueError, match="does not fit"):
        Trainer(max_epochs=3, progress=False, checkpoint_dir=tmp_path).fit(
            MarginalRatioEstimator(2, 2, hidden=16), data, resume=True)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="not an astrotrunc checkpoint"):
        Trainer(max_epochs=3, progress=False, checkpoint_dir=tmp_path).fit(e3, data, resume=True)
    with pytest.raises(ValueError, match="not an astrotrunc checkpoint"):
        Trainer.best_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="wrote none yet"):
        Trainer.best_weights(tmp_path / "empty")


def test_seeded_trainer_leaves_the_global_rng_alone():
    data = {"theta": torch.randn(200, 2), "x": torch.randn(200, 2)}
    est = MarginalRatioEstimator(2, 2, hidden=8, dropout=0.1)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    Trainer(max_epochs=2, batch_size=32, progress=False, seed=5).fit(est, data)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_weighted_samples():
    rng = np.random.default_rng(0)
    theta = rng.uniform(-6, 6, size=(40_000, 2))
    lw = np.stack([-0.5 * theta[:, 0] ** 2, -0.5 * ((theta[:, 1] - 1) / 0.5) ** 2], axis=1)
    post = WeightedSamples(theta, lw, names=["a", "b"], units=["", "deg"])
    np.testing.assert_allclose(post.mean(), [0, 1], atol=0.03)
    np.testing.assert_allclose(post.std(), [1, 0.5], rtol=0.03)
    np.testing.assert_allclose(post.quantile([0.16, 0.84])[:, 0], [-0.99, 0.99], atol=0.05)
    assert post.quantile(0.5).shape == (2,)
    # HPD level of a point 1 sigma away is P(|z| < 1) = 0.683 (histogram estimate)
    np.testing.assert_allclose(post.credible_level([1.0, 0.5]), [0.683, 0.683], atol=0.03)
    exact = WeightedSamples(theta, lw, log_weight_fn=lambda t: np.stack(
        [-0.5 * t[:, 0] ** 2, -0.5 * ((t[:, 1] - 1) / 0.5) ** 2], axis=1))
    np.testing.assert_allclose(exact.credible_level([2.0, 0.0]), [0.954, 0.954], atol=0.01)
    thr = exact.hpd_threshold([0.683], column=0)
    np.testing.assert_allclose(thr, [-0.5], atol=0.05)
    assert float(effective_sample_size(np.zeros(10))) == pytest.approx(10)
    with pytest.warns(LowEffectiveSampleSizeWarning, match="low effective sample size"):
        WeightedSamples(theta, -1e6 * theta[:, 0] ** 2)
    with pytest.raises(ValueError, match="NaN"):
        WeightedSamples(theta, np.full(len(theta), np.nan))
    with pytest.raises(ValueError, match="same\nnumber|same number"):
        WeightedSamples(theta, np.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WeightedSamples(theta, np.zeros(len(theta)))


def test_interrupted_run_resumes_exactly(tmp_path):
    data = {"theta": torch.randn(200, 2), "x": torch.randn(200, 2)}

    def make():
        torch.manual_seed(1)
        return MarginalRatioEstimator(2, 2, hidden=8, dropout=0.1)

    ref = Trainer(max_epochs=4, batch_size=32, progress=False, seed=5, patience=100).fit(
        make(), data
    )
    est, calls = make(), []
    loss = est.loss

    def crashing(batch):
        calls.append(1)
        if len(calls) == 17:  # during epoch 3 (6 training + 1 validation batches per epoch)
            raise KeyboardInterrupt
        return loss(batch)

    est.loss = crashing
    with pytest.raises(KeyboardInterrupt):
        Trainer(max_epochs=4, batch_size=32, progress=False, seed=5, patience=100,
                checkpoint_dir=tmp_path).fit(est, data)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["epoch"] == 2
    # resumed without the seed: split, batch order and RNG all come from the checkpoint
    hist = Trainer(max_epochs=4, batch_size=32, progress=False, patience=100,
                   checkpoint_dir=tmp_path).fit(make(), data, resume=True)
    np.testing.assert_allclose(hist["val_loss"], ref["val_loss"], rtol=1e-6)


def test_deepsets_embedding_for_catalogs():
    est = MarginalRatioEstimator([6, 3], ["N", "s"], embedding="deepsets",
                                 embedding_kwargs={"n_features": 8, "hidden": 16}, hidden=8,
                                 reference_key="x_ref")
    x = torch.zeros(4, 6, 3)
    x[:, :3] = torch.cat([torch.randn(4, 3, 2), torch.ones(4, 3, 1)], dim=2)  # 3 sources each
    batch = {"x": x, "x_ref": x.flip(0), "theta": torch.randn(4, 2)}
    assert torch.isfinite(est.loss(batch))  # training mode: masked standardisation updated
    assert float(est.embedding.norm.count) == 24  # present elements of x and x_ref only
    est.eval()
    shuffled = x[:, [2, 0, 1, 3, 4, 5]]
    padded_junk = x.clone()
    padded_junk[:, 4, :2] = 99.0  # a padding row's features are ignored
    for other in (shuffled, padded_junk):
        torch.testing.assert_close(
            est.log_ratio(other, batch["theta"]), est.log_ratio(x, batch["theta"])
        )


def test_match_marginals_sets_marginals_and_keeps_dependence():
    rng = np.random.default_rng(1)
    t = rng.uniform(-8, 8, size=(60000, 2))
    cov = np.array([[4.0, 2.4], [2.4, 4.0]])  # joint: std 2 each, correlation 0.6
    wide = -0.5 * np.einsum("ni,ij,nj->n", t, np.linalg.inv(cov), t)
    sharp = -0.5 * (t / np.array([1.0, 1.5])) ** 2  # targets: std 1 and 1.5
    lw = match_marginals(t, wide, sharp)
    post = WeightedSamples(t, lw)
    assert np.allclose(post.std(), [1.0, 1.5], atol=0.05)
    w = post.weights[:, 0]
    m = (w[:, None] * t).sum(0)
    c = (w * (t[:, 0] - m[0]) * (t[:, 1] - m[1])).sum() / np.prod(post.std())
    assert c > 0.3  # the joint's positive dependence survives
    with pytest.raises(ValueError, match="marginal_log_weights"):
        match_marginals(t, wide, sharp[:, :1])


def test_balanced_loss_adds_the_balance_penalty():
    torch.manual_seed(0)
    kwargs = dict(x_shape=3, params=["a", "b"], hidden=8, standardize=False)
    plain, balanced = (MarginalRatioEstimator(**kwargs, balance=b) for b in (0.0, 100.0))
    balanced.load_state_dict(plain.state_dict())
    batch = {"x": torch.randn(64, 3), "theta": torch.randn(64, 2)}
    with torch.no_grad():
        d = torch.sigmoid(torch.cat([plain(batch), plain.log_ratio(
            batch["x"], torch.roll(batch["theta"], 1, 0))]))
        gap = d[:64].mean(0) + d[64:].mean(0) - 1
        extra = float(balanced.loss(batch) - plain.loss(batch))
    assert extra == pytest.approx(100 * float((gap**2).mean()), rel=1e-4)
    assert extra > 0
    assert balanced.config["balance"] == 100.0
    with pytest.raises(ValueError, match="balance"):
        MarginalRatioEstimator(**kwargs, balance=-1)
