"""Plots of the population inference: the corner plot of fig. 3 and the maps of fig. 2."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["plot_corner", "plot_truncated_samples", "BRANCH_COLORS"]

#: Colours of the paper's fig. 3: sub-threshold (violet), detected (orange), combined (yellow).
BRANCH_COLORS = {"sub-threshold": "#7b3294", "detected": "#e66101", "combined": "#d9b300"}


def _weights(post, columns):
    """Normalised weights of the marginal over ``columns`` (its own head, else the joint)."""
    for c, m in enumerate(post.marginals):
        if tuple(m) == tuple(columns):
            return post.weights[:, c]
    joint = [c for c, m in enumerate(post.marginals) if set(columns) <= set(m)]
    return post.weights[:, joint[-1]]


def _hpd_levels(hist, levels):
    flat = np.sort(hist.ravel())[::-1]
    cum = np.cumsum(flat)
    cum /= cum[-1]
    return [flat[min(np.searchsorted(cum, lv), len(flat) - 1)] for lv in levels]


def plot_corner(posteriors, truth=None, fig=None, bins=40, colors=None):
    """Corner plot of several weighted posteriors: 1-D marginals and 68/95 % HPD contours.

    Parameters
    ----------
    posteriors : dict
        ``{label: WeightedSamples}`` over the same parameters.
    truth : sequence of float, optional
        True parameters (lines).
    fig : `~matplotlib.figure.Figure`, optional
        Figure to draw into.
    bins : int
        Histogram bins per parameter.
    colors : dict, optional
        ``{label: colour}``; `BRANCH_COLORS` by default.

    Returns
    -------
    `~matplotlib.figure.Figure`
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = {**BRANCH_COLORS, **(colors or {})}
    first = next(iter(posteriors.values()))
    names, n = first.names, len(first.names)
    fig = fig or plt.figure(figsize=(2.6 * n + 0.6, 2.6 * n))
    axes = fig.subplots(n, n, squeeze=False)
    ranges = []
    for i in range(n):  # the range covering every posterior's 99.8 % interval
        lo = min(p.quantile(0.001)[i] for p in posteriors.values())
        hi = max(p.quantile(0.999)[i] for p in posteriors.values())
        pad = 0.05 * (hi - lo) or 0.5
        ranges.append((lo - pad, hi + pad))
    for label, post in posteriors.items():
        col = colors.get(label)
        for i in range(n):
            ax = axes[i, i]
            h, e = np.histogram(post.theta[:, i], bins=bins, range=ranges[i],
                                weights=_weights(post, (i,)), density=True)
            ax.stairs(gaussian_filter(h, 0.7), e, color=col, lw=1.6)
            for j in range(i):
                ax2 = axes[i, j]
                w = _weights(post, (j, i))
                h2, ex, ey = np.histogram2d(post.theta[:, j], post.theta[:, i], bins=bins,
                                            range=[ranges[j], ranges[i]], weights=w)
                h2 = gaussian_filter(h2, 1.0)
                if h2.max() <= 0:
                    continue
                lv = sorted(set(_hpd_levels(h2, [0.95, 0.68])))
                if len(lv) == 2 and lv[0] < lv[1]:
                    xc, yc = 0.5 * (ex[1:] + ex[:-1]), 0.5 * (ey[1:] + ey[:-1])
                    ax2.contour(xc, yc, h2.T, levels=lv, colors=[col], linestyles=["--", "-"],
                                linewidths=1.3)
    for i in range(n):
        for j in range(n):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            ax.set_xlim(ranges[j])
            if j < i:
                ax.set_ylim(ranges[i])
            else:
                ax.set_yticks([])
            if truth is not None:
                ax.axvline(truth[j], color="k", lw=0.8, ls=":")
                if j < i:
                    ax.axhline(truth[i], color="k", lw=0.8, ls=":")
                    ax.plot(truth[j], truth[i], "k+", ms=8)
            unit = first.units[j] if first.units else ""
            ax.set_xlabel(f"{names[j]}" + (f" [{unit}]" if unit else "") if i == n - 1 else "")
            if j == 0 and i > 0:
                ulab = first.units[i] if first.units else ""
                ax.set_ylabel(f"{names[i]}" + (f" [{ulab}]" if ulab else ""))
            if i < n - 1:
                ax.set_xticklabels([])
            if j > 0 and j < i:
                ax.set_yticklabels([])
    handles = [Line2D([], [], color=colors.get(k), lw=2, label=k) for k in posteriors]
    if truth is not None:
        handles.append(Line2D([], [], color="k", ls=":", label="truth"))
    fig.legend(handles=handles, loc="upper right", frameon=False,
               title="68 % (solid), 95 % (dashed)")
    fig.subplots_adjust(hspace=0.06, wspace=0.06)
    return fig


def plot_truncated_samples(maps, n=2, fig=None):
    """The observation, full-model samples and truncated-model samples (the paper's fig. 2).

    Parameters
    ----------
    maps : dict
        ``observation`` (2-D), ``full`` and ``truncated`` (``(k, H, W)``), ``wcs``, optionally
        ``regions`` (label image of the detections, outlined on every panel).
    n : int
        Samples of each model shown.

    Returns
    -------
    `~matplotlib.figure.Figure`
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import AsinhNorm

    n = int(min(n, len(maps["full"]), len(maps["truncated"])))
    panels = [("observation $x_o$", maps["observation"])]
    panels += [(f"full model #{k + 1}", maps["full"][k]) for k in range(n)]
    panels += [(f"truncated model #{k + 1}", maps["truncated"][k]) for k in range(n)]
    fig = fig or plt.figure(figsize=(3.3 * len(panels), 3.6))
    vmax = float(np.nanpercentile(maps["observation"], 99.9))
    norm = AsinhNorm(linear_width=max(vmax / 30, 1e-3), vmin=0, vmax=vmax)
    regions = maps.get("regions")
    for k, (title, img) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1, projection=maps.get("wcs"))
        ax.imshow(np.nan_to_num(img), origin="lower", cmap="magma", norm=norm)
        if regions is not None and (regions > 0).any():
            ax.contour(regions > 0, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(title, fontsize=10)
        if hasattr(ax, "coords"):
            ax.coords[0].set_axislabel("l")
            ax.coords[1].set_axislabel("b" if k == 0 else " ")
            if k:
                ax.coords[1].set_ticklabel_visible(False)
    return fig
