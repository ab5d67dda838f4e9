"""Issue 9, "Proven" 6: plain neural posterior estimation (sbi's NPE) on the full map as a baseline.

What a user would pick instead of astrotrunc: amortised NPE (``sbi``, a benchmark-only dependency,
``pip install astrotrunc[benchmarks]``) trained on full-model simulations of
`~astrotrunc.PointSourceModel.paper` with the box prior ``model.prior``, at the simulation budget of
`~astrotrunc.PopulationInference`'s default (3 TMNRE rounds of 8192 = 24576) and, with
``--budgets``, others (6144: the quick settings, 2 x 2048 plus margin). The density estimator reads
the maps through the same parameter-free summaries r3 uses
(`~astrotrunc.nre.MapSummaries` ``((128, 128), scale=100.0)``, 146 numbers, computed once per
simulation in chunks) and an MLP embedding (``--embedding summary``); ``--embedding cnn`` instead
trains sbi's `CNNEmbedding` on the maps (``v = log1p(100 max(x, 0))``, average-pooled by
``--cnn-pool``), reported separately.

N is an integer (``floor`` of U(10, 500)): NPE is trained on the dequantised ``N + u``, u ~ U(0, 1),
which is exactly U(10, 500) and fits sbi's `BoxUniform`; posterior draws are floored back.

Prints, per embedding and budget, the training time and epochs, and on two sets of observations --
the ones ``benchmarks/inference.py end-to-end`` uses (``model.simulate(--n-obs, seed=2025)``) and a
larger held-out set (``model.simulate(--n-heldout, seed=777)``) -- per parameter the median width of
the central 68 % interval and the coverage of the central 68 % and 95 % intervals (fraction of
observations whose truth lies inside, with the Jeffreys binomial 68 % interval), plus the sbi and
torch versions; when ``benchmarks/output/inference_end-to-end.json`` exists (``--compare``), the
NPE figures beside astrotrunc's combined posterior on the same observations. Writes the figures
(and the per-observation widths and hits of the end-to-end set) to
``benchmarks/output/npe_baseline.json``.

CPU only. Run: ``python benchmarks/npe_baseline.py`` (default: summary embedding, 24576
simulations, 20 + 300 observations, 5000 posterior draws each; about 15 min on 2 busy cores:
3 min simulating, 8.5 min training, 3.5 min sampling), or e.g.
``python benchmarks/npe_baseline.py --budgets 24576,6144`` (both budgets, nested) and
``python benchmarks/npe_baseline.py --embedding cnn --n-simulations 6144 --cnn-pool 4
--out benchmarks/output/npe_baseline_cnn.json`` (the CNN: ~1.1 ms per 32 x 32 map and epoch).
"""

import argparse
import json
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from astrotrunc import PointSourceModel
from astrotrunc.diagnostics import binomial_interval
from astrotrunc.nre import MapSummaries

OUT = Path(__file__).parent / "output"
NAMES = ("N", "sigma_F", "h")
LEVELS = (0.68, 0.95)
#: credibility levels of the recalibration grid
GRID = np.linspace(0.40, 0.99, 60)


def _cnn_transform(maps, pool):
    v = torch.log1p(maps.clamp_min(0) * 100.0)
    return torch.nn.functional.avg_pool2d(v[:, None], pool)[:, 0] if pool > 1 else v


def _features(model, n, seed, embedding, pool, chunk):
    """``(theta, x)`` of ``n`` full-model simulations, compressed chunk by chunk."""
    summ = MapSummaries(model.shape, scale=100.0)
    thetas, xs = [], []
    for k, start in enumerate(range(0, n, chunk)):
        sim = model.simulate(min(chunk, n - start), seed=seed if n <= chunk else (seed, k))
        thetas.append(sim.theta.float())
        xs.append(summ(sim.maps) if embedding == "summary" else
                  _cnn_transform(sim.maps, pool).half())
        del sim
    return torch.cat(thetas), torch.cat(xs)


def _dequantise(theta, gen):
    theta = theta.clone()
    theta[:, 0] += torch.rand(len(theta), generator=gen)
    return theta


class _NoTracker:
    """An sbi ``Tracker`` that keeps nothing (sbi's default writes TensorBoard logs to
    ``./sbi-logs``)."""

    log_dir = None

    def log_metric(self, name, value, step=None):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def add_figure(self, name, figure, step=None):
        pass

    def flush(self):
        pass


def _train(prior, theta, x, embedding, args, shape):
    from sbi.inference import NPE
    from sbi.neural_nets import posterior_nn
    from sbi.neural_nets.embedding_nets import CNNEmbedding, FCEmbedding

    if embedding == "summary":
        net = FCEmbedding(x.shape[1], output_dim=64, num_layers=3, num_hiddens=128)
    else:
        net = CNNEmbedding(input_shape=tuple(shape), out_channels_per_layer=[8, 16, 32],
                           num_conv_layers=3, num_linear_units=128, output_dim=64)
    est = posterior_nn(model=args.density_estimator, embedding_net=net, hidden_features=64,
                       num_transforms=5)
    npe = NPE(prior=prior, density_estimator=est, device="cpu", show_progress_bars=False,
              tracker=_NoTracker())
    t0 = time.perf_counter()
    npe.append_simulations(theta, x.float(), exclude_invalid_x=False)
    npe.train(training_batch_size=args.batch_size, learning_rate=args.lr,
              stop_after_epochs=args.patience, max_num_epochs=args.max_epochs)
    dt = time.perf_counter() - t0
    info = {"train_s": dt, "epochs": int(npe._summary["epochs_trained"][-1]),
            "best_val_loss": float(npe._summary["best_validation_loss"][-1])}
    return npe.build_posterior(), info


@torch.no_grad()
def _draws(posterior, x, n_samples, box, chunk=50, max_tries=6):
    """Posterior draws inside the prior box, a list of ``(n_i, 3)`` per observation, and the
    fraction of the flow's draws that fell inside.

    sbi's own rejection (``reject_outside_prior=True``) loops until the worst observation has all
    its draws; instead draw unrejected (``1.25 n_samples`` / the acceptance so far), drop those
    outside the box, repeat for the observations still short of ``n_samples`` (at most
    ``max_tries`` times) and keep ``n_samples`` (N floored back to integers).
    """
    low, high = box
    kept = [[] for _ in range(len(x))]
    n_in, n_all = np.zeros(len(x)), np.zeros(len(x))
    for _ in range(max_tries):
        need = np.array([n_samples - sum(len(k) for k in ks) for ks in kept])
        todo = np.flatnonzero(need > 0)
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            acc = np.where(n_all[idx] > 0, n_in[idx] / np.maximum(n_all[idx], 1), 1.0)
            m = int(np.ceil(1.25 * np.max(need[idx] / np.maximum(acc, 0.05))))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sbi warns of the draws outside: counted here
                s = posterior.sample_batched((m,), x=x[idx].float(),
                                             reject_outside_prior=False,
                                             show_progress_bars=False)
            s = s.permute(1, 0, 2).double()
            inside = ((s >= low) & (s < high)).all(-1)
            for i, si, ok in zip(idx, s, inside):
                n_in[i] += int(ok.sum())
                n_all[i] += len(ok)
                kept[i].append(si[ok].numpy())
    out = []
    for k in kept:
        d = np.concatenate(k)[:n_samples]
        d[:, 0] = np.floor(d[:, 0])
        out.append(d)
    return out, n_in / n_all


def _evaluate(draws, truth):
    """Per-observation 68 % widths and hits of the central 68 % / 95 % intervals."""
    truth = truth.double().numpy()
    res = {}
    for level in LEVELS:
        q = np.stack([np.quantile(d, [0.5 - level / 2, 0.5 + level / 2], axis=0)
                      for d in draws], 1)  # (2, n_obs, 3)
        res[f"hit_{level}"] = (q[0] <= truth) & (truth <= q[1])
        if level == 0.68:
            res["width_68"] = q[1] - q[0]
    res["n_kept"] = np.array([len(d) for d in draws])
    # for recalibration: the credibility of the central interval the truth enters at (mid-rank)
    # and the central-interval widths on a grid of credibility levels
    res["entry_level"] = np.stack([np.abs(((d < t).mean(0) + (d <= t).mean(0)) - 1)
                                   for d, t in zip(draws, truth)])
    q = np.stack([np.quantile(d, np.concatenate([0.5 - GRID / 2, 0.5 + GRID / 2]), axis=0)
                  for d in draws])  # (n_obs, 2 len(GRID), 3)
    res["width_grid"] = q[:, len(GRID):] - q[:, :len(GRID)]
    return res


def _recalibrated(held, obs):
    """NPE's 68 % intervals recalibrated on the held-out maps, applied to the comparison maps.

    Per parameter, the credibility level whose central intervals hold the truth in 68 % of the
    held-out observations (the 68th percentile of the level at which each truth enters); then
    the comparison observations' median width at that level and their coverage.
    """
    out = {}
    for i, name in enumerate(NAMES):
        level = float(np.clip(np.quantile(held["entry_level"][:, i], 0.68), GRID[0], GRID[-1]))
        width = [np.interp(level, GRID, w) for w in obs["width_grid"][:, :, i]]
        out[name] = {"level": level, "median_width_68": float(np.median(width)),
                     "coverage_68": float(np.mean(obs["entry_level"][:, i] <= level))}
    print("  recalibrated on the held-out maps (68 % of their truths inside): " + "; ".join(
        f"{n} level {v['level']:.3f}, width {v['median_width_68']:.3g}, coverage "
        f"{v['coverage_68']:.2f}" for n, v in out.items()))
    return out


def _report(label, res):
    n = len(res["width_68"])
    out = {"n_obs": n, "median_width_68": {}, "coverage": {}}
    med = np.median(res["width_68"], 0)
    parts = []
    for i, name in enumerate(NAMES):
        out["median_width_68"][name] = float(med[i])
        cov = []
        for level in LEVELS:
            k = int(res[f"hit_{level}"][:, i].sum())
            lo, hi = binomial_interval(k, n)
            out["coverage"][f"{name}@{level}"] = {"k": k, "n": n, "fraction": k / n,
                                                  "jeffreys_68": [lo, hi]}
            cov.append(f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]")
        parts.append(f"    {name:>7}: 68% width {med[i]:8.3g}; coverage 68% {cov[0]}, "
                     f"95% {cov[1]}")
    print(f"  {label} ({n} observations):")
    print("\n".join(parts))
    return out


def _compare(path, runs):
    """NPE beside astrotrunc's combined posterior from ``benchmarks/inference.py end-to-end``."""
    ref = json.loads(Path(path).read_text())
    print(f"beside astrotrunc (combined posterior, {path}, {ref['n_obs']} observations, "
          f"quick={ref.get('quick')}): median 68% width and 68% coverage")
    rows = [("astrotrunc combined", ref["combined"]["median_width_68"],
             ref["combined"]["coverage_68"])]
    rows += [(f"NPE {key}", run["end_to_end_obs"]["median_width_68"],
              {n: run["end_to_end_obs"]["coverage"][f"{n}@0.68"]["fraction"] for n in NAMES})
             for key, run in runs.items()]
    for label, width, cov in rows:
        print(f"  {label:>22}: " + "; ".join(f"{n} {width[n]:.3g} ({cov[n]:.2f})" for n in NAMES))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-simulations", type=int, default=3 * 8192,
                   help="training simulations (default: PopulationInference's 3 x 8192)")
    p.add_argument("--budgets", default=None,
                   help="comma-separated budgets to run, nested subsets of the largest "
                        "(default: --n-simulations alone), e.g. 24576,6144")
    p.add_argument("--embedding", default="summary",
                   help="comma-separated: summary (MapSummaries + MLP) and/or cnn (sbi CNN)")
    p.add_argument("--cnn-pool", type=int, default=2, help="cnn: average-pool the maps by this")
    p.add_argument("--density-estimator", default="maf", help="sbi posterior_nn model")
    p.add_argument("--n-obs", type=int, default=20, help="end-to-end observations (seed 2025)")
    p.add_argument("--seed", type=int, default=2025, help="seed of the end-to-end observations")
    p.add_argument("--n-heldout", type=int, default=300, help="held-out observations (seed 777)")
    p.add_argument("--heldout-seed", type=int, default=777)
    p.add_argument("--n-samples", type=int, default=5000, help="posterior draws per observation")
    p.add_argument("--sim-seed", type=int, default=1, help="seed of the training simulations")
    p.add_argument("--chunk", type=int, default=2048, help="maps simulated and compressed at once")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--patience", type=int, default=20, help="sbi stop_after_epochs")
    p.add_argument("--max-epochs", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare", default=str(OUT / "inference_end-to-end.json"),
                   help="astrotrunc's end-to-end figures to print beside NPE's, when present")
    p.add_argument("--out", default=str(OUT / "npe_baseline.json"), help="JSON output")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import sbi
    from sbi.utils import BoxUniform

    t_all = time.perf_counter()
    model = PointSourceModel.paper()
    prior = BoxUniform(model.prior.low.float(), model.prior.high.float())
    budgets = sorted({int(b) for b in (args.budgets or str(args.n_simulations)).split(",")},
                     reverse=True)
    embeddings = [e.strip() for e in args.embedding.split(",")]
    if set(embeddings) - {"summary", "cnn"}:
        raise SystemExit(f"--embedding must be summary and/or cnn, got {args.embedding!r}")
    print(f"sbi {sbi.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"NPE ({args.density_estimator}) on full-model maps of PointSourceModel.paper(), "
          f"prior {model.prior}")
    out = {"sbi_version": sbi.__version__, "torch_version": torch.__version__,
           "threads": torch.get_num_threads(), "args": vars(args), "runs": {}}
    for emb in embeddings:
        t0 = time.perf_counter()
        theta, x = _features(model, budgets[0], args.sim_seed, emb, args.cnn_pool,
                             args.chunk)
        obs_theta, obs_x = _features(model, args.n_obs, args.seed, emb, args.cnn_pool, args.chunk)
        held_theta, held_x = _features(model, args.n_heldout, args.heldout_seed, emb,
                                       args.cnn_pool, args.chunk)
        sim_s = time.perf_counter() - t0
        print(f"[{emb}] simulated and compressed {budgets[0]} + {args.n_obs} + {args.n_heldout} "
              f"maps in {sim_s:.0f} s; x shape {tuple(x.shape[1:])}")
        gen = torch.Generator().manual_seed(args.sim_seed)
        theta_dq = _dequantise(theta, gen)
        for n in budgets:
            torch.manual_seed(args.sim_seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                posterior, info = _train(prior, theta_dq[:n], x[:n], emb, args, x.shape[1:])
            print(f"[{emb}, {n} simulations] trained in {info['train_s']:.0f} s "
                  f"({info['epochs']} epochs, best validation loss "
                  f"{info['best_val_loss']:.3f})")
            t1 = time.perf_counter()
            box = (model.prior.low, model.prior.high)
            draws, acc_obs = _draws(posterior, obs_x, args.n_samples, box)
            res_obs = _evaluate(draws, obs_theta)
            draws, acc_held = _draws(posterior, held_x, args.n_samples, box)
            res_held = _evaluate(draws, held_theta)
            del draws
            acc = np.concatenate([acc_obs, acc_held])
            kept = np.concatenate([res_obs["n_kept"], res_held["n_kept"]])
            info["sample_s"] = time.perf_counter() - t1
            info["in_prior_fraction"] = {"mean": float(acc.mean()), "min": float(acc.min())}
            info["draws_kept_min"] = int(kept.min())
            print(f"  drew {args.n_samples} samples for {args.n_obs + args.n_heldout} "
                  f"observations in {info['sample_s']:.0f} s; flow draws inside the prior box: "
                  f"mean {acc.mean():.3f}, min {acc.min():.3f} (fewest kept {kept.min()})")
            run = {"n_simulations": n, "embedding": emb, "simulate_s": sim_s, **info,
                   "end_to_end_obs": _report(f"end-to-end observations, seed {args.seed}",
                                             res_obs),
                   "heldout": _report(f"held-out observations, seed {args.heldout_seed}",
                                      res_held)}
            run["recalibrated"] = _recalibrated(res_held, res_obs)
            run["end_to_end_obs"]["per_obs"] = {
                "truth": obs_theta.tolist(), "width_68": res_obs["width_68"].tolist(),
                "hit_68": res_obs["hit_0.68"].tolist(), "hit_95": res_obs["hit_0.95"].tolist()}
            out["runs"][f"{emb}_{n}"] = run
        del theta, x, theta_dq
    if Path(args.compare).is_file():
        _compare(args.compare, out["runs"])
    out["wall_s"] = time.perf_counter() - t_all
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"total {out['wall_s']:.0f} s, peak RSS {out['peak_rss_mib']:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
