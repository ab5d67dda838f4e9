"""`PopulationPosterior`: the three posteriors of a map's population (the paper's fig. 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import QTable, Table

from ..nre import WeightedSamples

__all__ = ["PopulationPosterior", "BRANCHES"]

#: The posteriors of a `PopulationPosterior`, in the paper's order (fig. 3).
BRANCHES = ("sub-threshold", "detected", "combined")
_ATTR = {"sub-threshold": "sub_threshold", "detected": "detected", "combined": "combined"}
_SUMMARY_COLUMNS = ("posterior", "parameter", "median", "low_68", "high_68", "low_95", "high_95",
                    "ess")


class PopulationPosterior:
    """Weighted samples of the population posterior of one map, by branch.

    Attributes
    ----------
    sub_threshold : `~astrotrunc.nre.WeightedSamples` or `None`
        ∝ p(θ) r3(θ; x_o): what the map says beyond the catalog (sub-threshold sources).
    detected : `~astrotrunc.nre.WeightedSamples` or `None`
        ∝ p(θ) p(I=1 | θ): what the catalog of detections says, completeness included.
    combined : `~astrotrunc.nre.WeightedSamples`
        ∝ p(θ) r3(θ; x_o) p(I=1 | θ): the posterior of θ given the map.
    truncation : `~astropy.table.QTable` or `None`
        The TMNRE rounds of r3 (one row per round: box, volume, shrink factor).
    meta : dict
        How it was made: settings, catalog size, detector and completeness identities, stage
        times (s), truth (when known).

    Notes
    -----
    Files hold the weighted samples (ECSV or FITS binary table, no pickle): `read` restores
    everything but the example maps of `plot_truncated_samples`, which live in memory only.
    """

    def __init__(self, sub_threshold=None, detected=None, combined=None, truncation=None,
                 meta=None, maps=None):
        if combined is None:
            raise ValueError("a PopulationPosterior needs at least the combined posterior")
        self.sub_threshold, self.detected, self.combined = sub_threshold, detected, combined
        self.truncation = truncation
        self.meta = dict(meta or {})
        self.maps = maps

    @property
    def names(self) -> tuple:
        return self.combined.names

    def posteriors(self) -> dict:
        """``{branch: WeightedSamples}`` of the branches that were computed."""
        return {b: getattr(self, _ATTR[b]) for b in BRANCHES if getattr(self, _ATTR[b]) is not None}

    def summary(self) -> QTable:
        """One row per (posterior, parameter): median, 68 % and 95 % equal-tailed intervals, ESS.

        Returns
        -------
        `~astropy.table.QTable`
            Columns ``posterior, parameter, median, low_68, high_68, low_95, high_95, ess``.
        """
        rows = []
        for branch, post in self.posteriors().items():
            q = post.quantile([0.5, 0.16, 0.84, 0.025, 0.975])
            for i, name in enumerate(post.names):
                rows.append((branch, name, *q[:, i], float(post.ess[post._column(i)])))
        table = QTable(rows=rows, names=_SUMMARY_COLUMNS)
        table.meta.update({k: v for k, v in self.meta.items() if k in ("truth", "n_detected")})
        return table

    def widths(self, level=0.68) -> QTable:
        """Width of the central ``level`` interval of every parameter, per posterior."""
        lo, hi = 0.5 - level / 2, 0.5 + level / 2
        t = QTable()
        t["posterior"] = list(self.posteriors())
        for i, name in enumerate(self.names):
            t[name] = [float(np.diff(p.quantile([lo, hi])[:, i])[0])
                       for p in self.posteriors().values()]
        return t

    def __repr__(self):
        parts = ", ".join(f"{b} (ESS {min(p.ess):.0f})" for b, p in self.posteriors().items())
        return f"<PopulationPosterior {parts}; N_det={self.meta.get('n_detected')}>"

    # -- plots -----------------------------------------------------------------------------
    def plot_corner(self, truth=None, fig=None):
        """Corner plot of the three posteriors (fig. 3): 1-D marginals, 68/95 % contours."""
        from ..visualization import plot_corner

        truth = self.meta.get("truth") if truth is None else truth
        return plot_corner(self.posteriors(), truth=truth, fig=fig)

    def plot_truncated_samples(self, n=2, fig=None):
        """The observation beside full-model and truncated-model samples (fig. 2) on WCSAxes."""
        from ..visualization import plot_truncated_samples

        if self.maps is None:
            raise ValueError("this posterior holds no example maps (they are not written to "
                             "files): run PopulationInference.run to make them")
        return plot_truncated_samples(self.maps, n=n, fig=fig)

    # -- files -----------------------------------------------------------------------------
    def _sample_table(self) -> Table:
        cols = {"posterior": [], **{n: [] for n in self.names}, "log_weight": [],
                **{f"log_weight_{n}": [] for n in self.names}}
        for branch, post in self.posteriors().items():
            k = len(post)
            cols["posterior"] += [branch] * k
            for i, n in enumerate(self.names):
                cols[n].append(post.theta[:, i])
                cols[f"log_weight_{n}"].append(post.log_weights[:, post._column(i)])
            joint = [c for c, m in enumerate(post.marginals) if len(m) == len(self.names)]
            cols["log_weight"].append(post.log_weights[:, joint[0] if joint else 0])
        out = Table()
        out["posterior"] = cols.pop("posterior")
        for k, v in cols.items():
            out[k] = np.concatenate(v)
        return out

    def _file_meta(self) -> dict:
        meta = dict(self.meta)
        if self.truncation is not None:
            meta["truncation"] = {c: np.asarray(self.truncation[c]).tolist()
                                  for c in self.truncation.colnames}
        return json.loads(json.dumps(meta, default=_jsonable))

    def write(self, path, *, overwrite=False):
        """Write the weighted samples and metadata to ECSV (``.ecsv``) or FITS (``.fits``).

        The file is written atomically and never replaces an existing one without ``overwrite``.
        """
        from .._utils import atomic_write as _atomic
        from .._utils import check_writable

        path = check_writable(path, overwrite)
        table = self._sample_table()
        meta = self._file_meta()
        suffix = "".join(path.suffixes[-2:]).lower()
        if suffix.endswith(".ecsv"):
            table.meta["astrotrunc_posterior"] = meta
            _atomic(path, lambda tmp: table.write(tmp, format="ascii.ecsv", overwrite=True))
        elif suffix.endswith((".fits", ".fits.gz", ".fit")):
            hdu = fits.BinTableHDU(table, name="SAMPLES")
            hdu.header["ATMETA"] = json.dumps(meta)
            _atomic(path, lambda tmp: fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp))
        else:
            raise ValueError(f"write the posterior as .ecsv or .fits, not {path.name!r}")

    @classmethod
    def read(cls, path) -> "PopulationPosterior":
        """Read a posterior written by `write`."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no posterior file at {path}")
        try:
            if path.suffix.lower() == ".ecsv":
                table = Table.read(path, format="ascii.ecsv")
                meta = table.meta.get("astrotrunc_posterior")
            else:
                with fits.open(path) as hdul:
                    table = Table.read(hdul["SAMPLES"])
                    meta = json.loads(hdul["SAMPLES"].header.get("ATMETA", "null"))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path} is not a readable posterior file: {exc}") from None
        if not isinstance(meta, dict) or "parameters" not in meta:
            raise ValueError(f"{path} is not an astrotrunc posterior file (no metadata)")
        names = tuple(meta["parameters"])
        posts = {}
        for branch in BRANCHES:
            rows = table[np.asarray(table["posterior"]) == branch]
            if not len(rows):
                continue
            theta = np.column_stack([np.asarray(rows[n], float) for n in names])
            if branch == "sub-threshold":
                lw = np.column_stack([np.asarray(rows[f"log_weight_{n}"], float) for n in names]
                                     + [np.asarray(rows["log_weight"], float)])
                marg = [(i,) for i in range(len(names))] + [tuple(range(len(names)))]
            else:
                lw, marg = np.asarray(rows["log_weight"], float), None
            posts[branch] = WeightedSamples(theta, lw, names=names, marginals=marg,
                                            units=meta.get("units"))
        trunc = meta.pop("truncation", None)
        return cls(posts.get("sub-threshold"), posts.get("detected"), posts.get("combined"),
                   truncation=QTable(trunc) if trunc else None, meta=meta)


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
