"""
The paper, end to end
=====================

This tutorial reproduces the pipeline of "Detection is truncation" (Anau Montel & Weniger 2022)
on one simulated observation, with the models shipped in astrotrunc:

1. simulate an observation from the paper's model;
2. detect its sources with the shipped r1 (`~astrotrunc.find_sources`);
3. look at the completeness r2 of that detector;
4. infer the population θ = (N, σ\\ :sub:`F`, h) with `~astrotrunc.PopulationInference`: r3 on
   the truncated model, the catalog likelihood p(I=1 | θ), and their product;
5. plot the truncated-model samples (the paper's fig. 2) and the three posteriors (fig. 3).

It runs while the documentation is built, at the quick size (``quick=True``), so the numbers
and figures below are those of a quick look made by that build; :doc:`/method` explains the
equations behind each step.
"""

# %%
# The observation
# ---------------
# `PointSourceModel.paper() <astrotrunc.PointSourceModel.paper>` is the paper's simulator: N point
# sources with log-normal fluxes, Gaussian in Galactic longitude (20°) and latitude (h), a Gaussian
# PSF and Poisson noise on a 128 × 128 plate carrée map of l, b ∈ [−40°, 40°]. We simulate one map
# at the population of the paper's own observation, θ = (147, 1.52, 16.4°).

import time
import warnings

import matplotlib.pyplot as plt
import numpy as np

from astrotrunc import PointSourceModel, find_sources

model = PointSourceModel.paper()
theta_true = [147.0, 1.52, 16.4]
obs = model.simulate(1, seed=2022, theta=[theta_true])
data = obs.maps[0].numpy()
truth = obs.sources(0)
print(f"{len(truth)} sources, {int(truth['in_map'].sum())} of them in the map")
print(f"brightest: F = {truth['flux'].max():.1f}")

# %%
# Detecting the sources (r1)
# --------------------------
# The shipped detector gives, for every pixel, the odds that a source brighter than a flux
# threshold F\ :sub:`th` sits there; a source is detected where a connected region has odds above
# 5. We use the thresholds the shipped completeness was learned with, so that "detected" means the
# same thing in the catalog and in the inference.

from astrotrunc import ConditionalCompleteness, default_completeness

S = default_completeness()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # NoDetectionsWarning, if any
    catalog = find_sources(data, wcs=model.wcs, threshold=S.threshold,
                           flux_threshold=S.flux_threshold)
print(f"{len(catalog)} detections: odds > {S.threshold:g}, "
      f"F_th = {S.flux_threshold:g}")
first = catalog["id", "l", "b", "flux", "flux_err", "peak_odds"][:8]
first.round(2)
first

# %%
# The map on its WCS axes, the true sources (dots) and the detections (circles):

from matplotlib.colors import AsinhNorm

fig = plt.figure(figsize=(6.5, 5.6))
ax = fig.add_subplot(projection=model.wcs)
vmax = float(np.percentile(data, 99.9))
im = ax.imshow(data, origin="lower", cmap="magma",
               norm=AsinhNorm(linear_width=vmax / 30, vmin=0, vmax=vmax))
fig.colorbar(im, ax=ax, shrink=0.8, label="data [flux units]")
inside = truth[truth["in_map"]]
ax.scatter(inside["x"].value, inside["y"].value, s=5, color="deepskyblue",
           alpha=0.6, label=f"true sources ({len(inside)})")
ax.scatter(catalog["x_centroid"].value, catalog["y_centroid"].value, s=70,
           facecolors="none", edgecolors="lime",
           label=f"detected ({len(catalog)})")
ax.coords[0].set_axislabel("Galactic longitude")
ax.coords[1].set_axislabel("Galactic latitude")
ax.legend(loc="upper right", fontsize=8)

# %%
# Completeness (r2)
# -----------------
# S(F, l, b) is the probability that r1 detects a source of flux F at (l, b). Left: S against
# flux at three positions; right: the flux at which S = 50 % across the map (the θ-averaged
# completeness shipped with the detector).

axes = S.plot()

# %%
# Near the Galactic plane the detection probability also depends on the population (crowding).
# `~astrotrunc.PopulationInference` therefore uses the θ-conditional completeness
# S(F, l, b | θ) by default; at the true θ of this map:

S_theta = ConditionalCompleteness.load_default()
flux = np.geomspace(0.3, 300, 120)
fig, ax = plt.subplots(figsize=(5.5, 3.6))
for b in (0.0, 5.0, 20.0):
    ax.plot(flux, S(flux, 0.0, b), color="0.6", lw=1)
    ax.plot(flux, S_theta(flux, 0.0, b, theta=theta_true),
            label=f"l = 0°, b = {b:g}°")
ax.set(xscale="log", xlabel="flux F", ylabel="S(F, l, b | θ)",
       ylim=(0, 1.02),
       title="conditional (colour) and θ-averaged (grey) S")
ax.legend()

# %%
# The population posterior (r3 × the catalog likelihood)
# ------------------------------------------------------
# `PopulationInference.run <astrotrunc.PopulationInference.run>` detects the sources again with the
# same settings, builds the truncated model of this catalog (detected sources pinned in their
# regions, sub-threshold sources weighted by 1 − S), trains r3 over TMNRE rounds on its
# simulations, and weights prior draws by r3 (sub-threshold), by p(I=1 | θ) (detected) and by both
# (combined).
#
# ``quick=True`` selects `InferenceSettings.quick() <astrotrunc.InferenceSettings.quick>`: 2 TMNRE
# rounds of 2048 simulations, a few minutes on a laptop CPU, which is what the documentation build
# runs. At this budget r3 is somewhat over-confident; the defaults (3 rounds of 8192 simulations,
# ``quick=False``) are calibrated. ``client="sync"`` fills the simulation stores in this process
# (the default starts a local Dask cluster).

from astrotrunc import PopulationInference

inference = PopulationInference(model)
t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    post = inference.run(data, quick=True, truth=theta_true, seed=0,
                         client="sync", progress=False)
print(f"inference: {time.perf_counter() - t0:.0f} s")

# %%
# The summary: medians, 68 % and 95 % equal-tailed intervals and effective sample sizes of each
# posterior (a `~astropy.table.QTable`).

summary = post.summary()
summary.round(3)
summary["ess"].info.format = ".0f"
summary

# %%
# TMNRE shrank the prior box of θ round by round (r3's rounds):

rounds = post.truncation["round", "n_simulations", "N_low", "N_high",
                         "sigma_F_low", "sigma_F_high", "h_low", "h_high"]
rounds.round(2)
rounds

# %%
# The truncated model (fig. 2)
# ----------------------------
# A map of the full model looks nothing like the observation; a map of the truncated model, at θ
# drawn from the combined posterior, has a source in each detection region (cyan outlines, a few
# pixels each: visible where no bright source covers them) and differs from the observation in
# the fluxes it draws there and below the detection threshold.

fig = post.plot_truncated_samples(n=1)

# %%
# The three posteriors (fig. 3)
# -----------------------------
# Sub-threshold (r3 on the map), detected (the catalog with its completeness) and combined
# posteriors, with the true θ (dotted).

fig = post.plot_corner()

# %%
# The narrowing from each branch to the combined posterior, as widths of the 68 % intervals:

widths = post.widths()
widths.round(3)
widths

# %%
# The samples and how they were made (settings, detector identity, stage times) go to ECSV or
# FITS, and read back without pickle:
#
# .. code-block:: python
#
#     post.write("posterior.ecsv")
#     PopulationPosterior.read("posterior.ecsv").summary()
#
# The same pipeline is one command, ``astrotrunc demo --out demo --quick``, which writes the
# files and plots of this page and a self-contained ``report.html``.
