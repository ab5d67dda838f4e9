"""astrotrunc: point-source catalogs and source populations from sky maps.

An implementation of "Detection is truncation" (truncated marginal neural ratio estimation):

* ``r1`` -- :class:`SourceDetector` / :class:`NeuralSourceFinder` / :func:`find_sources`:
  per-pixel detection odds and the catalog;
* ``r2`` -- :class:`CompletenessFunction`: the probability that r1 detects a source (F, l, b);
* ``r3`` / ``r4`` -- population posteriors from the sub-threshold map and the detected catalog.

Everything is trained on simulations of a :class:`PointSourceModel`.

The names below are the public API. They are imported on first use, so that ``import
astrotrunc`` (and ``astrotrunc --help``) does not pay for torch until a name needs it.
"""

import importlib

try:
    from ._version import version as __version__
except ImportError:  # pragma: no cover - running from a source tree without a build
    __version__ = "0.0.0"

# public name -> module that defines it
_PUBLIC = {
    # warnings
    "AstrotruncWarning": "exceptions", "OutOfDomainWarning": "exceptions",
    "NoWCSWarning": "exceptions", "LowEffectiveSampleSizeWarning": "exceptions",
    # maps
    "read_map": "io", "write_map": "io", "make_wcs": "io", "HealpixMap": "io",
    "healpix_to_patch": "io",
    # the simulator and its priors
    "PointSourceModel": "simulation", "Instrument": "simulation", "SkyGeometry": "simulation",
    "SimulationBatch": "simulation", "BoxPrior": "priors", "Uniform": "priors",
    "SimulationStore": "store",
    # r1: detection
    "SourceDetector": "detection", "NeuralSourceFinder": "detection",
    "find_sources": "detection", "DetectionSimulations": "detection",
    "StoredDetectionSimulations": "detection",
    "catalog_to_regions": "detection", "default_detector": "detection",
    "FluxEstimator": "detection",
    # r2: completeness
    "CompletenessFunction": "completeness", "CompletenessLabels": "completeness",
    "ConditionalCompleteness": "completeness",
    "injection_recovery": "completeness", "default_completeness": "completeness",
    # the engine
    "RatioEstimator": "nre", "MarginalRatioEstimator": "nre", "Trainer": "nre",
    "WeightedSamples": "nre",
    # truncation and diagnostics
    "truncation_bounds": "truncation", "run_rounds": "truncation", "coverage": "diagnostics",
    "plot_coverage": "diagnostics", "TruncatedModel": "truncation",
    "DetectedRegions": "truncation",
    # survey scale: all-sky HEALPix maps and many maps
    "find_sources_healpix": "survey", "find_sources_many": "survey",
    "healpix_patches": "survey", "healpix_point_sources": "survey",
    # r3, r4 and the population posterior
    "PopulationInference": "inference", "PopulationPosterior": "inference",
    "InferenceSettings": "inference",
}

__all__ = sorted(_PUBLIC)

_SUBMODULES = {"cli", "completeness", "demo", "detection", "diagnostics", "exceptions",
               "inference", "io", "nre", "priors", "simulation", "store", "survey",
               "truncation", "visualization"}


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
