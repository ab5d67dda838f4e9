"""r1 -- the neural source detector and the catalogs it makes (photutils style).

One concern per module:

* `~astrotrunc.detection.unet` -- the network (a small U-Net);
* `~astrotrunc.detection.labels` -- training labels and the `DetectionSimulations` batch source;
* `~astrotrunc.detection.estimator` -- `SourceDetector` (r1) and the shipped default;
* `~astrotrunc.detection.domain` -- the instrument and map statistics a detector was trained on;
* `~astrotrunc.detection.tiling` -- large maps in overlapping tiles;
* `~astrotrunc.detection.finder` -- `NeuralSourceFinder`, `find_sources`, `detection_regions`;
* `~astrotrunc.detection.catalog` -- the catalog columns;
* `~astrotrunc.detection.photometry` -- learned fluxes with honest errors (`FluxEstimator`);
* `~astrotrunc.detection.regions` -- DS9 region files.
"""

from .catalog import CATALOG_COLUMNS, RegionCatalog, empty_catalog, peak_centroids
from .domain import instrument_domain, map_statistics
from .estimator import PAPER_FLUX_THRESHOLDS, SourceDetector, default_detector
from .finder import NeuralSourceFinder, detection_regions, find_sources
from .labels import (
    DetectionSimulations,
    StoredDetectionSimulations,
    detection_labels,
    teacher_labels,
)
from .photometry import FluxEstimator, PhotometrySimulations, default_photometry, psf_photometry
from .regions import catalog_to_regions
from .tiling import tiled as _tiled  # noqa: F401 - the name used before 0.2
from .unet import UNet, narrowed_weights

__all__ = ["SourceDetector", "NeuralSourceFinder", "find_sources", "DetectionSimulations",
           "StoredDetectionSimulations", "detection_labels", "teacher_labels",
           "detection_regions", "default_detector", "catalog_to_regions", "peak_centroids",
           "RegionCatalog", "empty_catalog", "instrument_domain", "map_statistics", "UNet",
           "narrowed_weights", "PAPER_FLUX_THRESHOLDS", "CATALOG_COLUMNS", "FluxEstimator",
           "PhotometrySimulations", "default_photometry", "psf_photometry"]
