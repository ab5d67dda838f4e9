"""The ``astrotrunc`` command line: simulate, train, detect; outputs checked first, all or none."""

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import QTable

from astrotrunc import HealpixMap, read_map, write_map
from astrotrunc.cli import main


@pytest.fixture(scope="module")
def obs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    path, truth = tmp / "obs.fits", tmp / "truth.ecsv"
    assert main(["simulate", "--seed", "3", "--out", str(path), "--truth", str(truth)]) == 0
    return path, truth


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time; t = time.perf_counter(); import astrotrunc.cli as c; "
            "p = c._parser(); print('torch' in sys.modules, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, seconds = out.stdout.split()
    assert loaded == "False" and float(seconds) < 2.0
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "astrotrunc.cli", "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "detect" in res.stdout
    assert time.perf_counter() - t0 < 5.0  # interpreter start included; ~0.2 s unloaded


def test_simulate_then_detect(obs, tmp_path):
    from regions import Regions

    path, truth = obs
    assert main(["simulate", "--seed", "3", "--out", str(path)]) == 2  # no clobber
    hdr = fits.getheader(path)
    assert hdr["CTYPE1"] == "GLON-CAR" and hdr["SEED"] == 3 and hdr["BUNIT"] == ""
    t = QTable.read(truth)
    assert t["l"].unit == u.deg and len(t) == int(hdr["HIERARCH TRUTH N"])
    cat, reg = tmp_path / "cat.ecsv", tmp_path / "cat.reg"
    assert main(["detect", str(path), "--out", str(cat), "--regions", str(reg)]) == 0
    c = QTable.read(cat)
    assert len(c) > 0 and "sky_centroid" in c.colnames and c.meta["threshold"] == 5.0
    assert c.meta["n_pixels"] == 1 and "detector_id" in c.meta
    assert len(Regions.read(reg, format="ds9")) == len(c)
    for runtime in ("onnxruntime", "openvino", "torch"):  # the same catalog through each
        if runtime != "torch" and importlib.util.find_spec(runtime) is None:
            continue
        out = tmp_path / f"cat_{runtime}.ecsv"
        assert main(["detect", str(path), "--out", str(out), "--backend", runtime]) == 0
        o = QTable.read(out)
        assert len(o) == len(c)
        np.testing.assert_allclose(o["flux"].value, c["flux"].value, rtol=1e-3)


def test_several_maps_and_truth_are_written_together(tmp_path):
    out, truth = tmp_path / "m.fits", tmp_path / "t.ecsv"
    truth.write_text("old\n")
    # the truth file exists: nothing is simulated, nothing written
    assert main(["simulate", "--n-maps", "2", "--out", str(out), "--truth", str(truth)]) == 2
    assert not out.exists() and truth.read_text() == "old\n"
    assert main(["simulate", "--n-maps", "2", "--out", str(out), "--truth", str(truth),
                 "--overwrite"]) == 0
    with fits.open(out) as h:
        assert len(h) == 2 and h[1].name == "MAP1" and h[1].header["MAP_ID"] == 1
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_outputs_are_checked_before_any_work(obs, tmp_path):
    path, _ = obs
    new, existing = tmp_path / "new.ecsv", tmp_path / "existing.reg"
    existing.write_text("# old\n")
    assert main(["detect", str(path), "--out", str(new), "--regions", str(existing)]) == 2
    assert not new.exists() and existing.read_text() == "# old\n"  # never a partial set
    assert main(["detect", str(path), "--out", str(tmp_path / "nodir" / "c.ecsv")]) == 2
    same = tmp_path / "same.ecsv"
    assert main(["detect", str(path), "--out", str(same), "--regions", str(same)]) == 2
    # the input map as output: refused even with --overwrite, the map survives
    size = path.stat().st_size
    assert main(["detect", str(path), "--out", str(path), "--overwrite"]) == 2
    assert path.stat().st_size == size and read_map(path).data.shape == (128, 128)


def test_empty_result_with_overwrite_replaces_the_old_catalog(obs, tmp_path, capsys):
    path, _ = obs
    cat = tmp_path / "cat.ecsv"
    assert main(["detect", str(path), "--out", str(cat)]) == 0
    assert len(QTable.read(cat)) > 0
    assert main(["detect", str(path), "--out", str(cat), "--overwrite",
                 "--threshold", "1e30"]) == 0
    empty = QTable.read(cat)
    assert len(empty) == 0 and "flux" in empty.colnames and empty.meta["threshold"] == 1e30
    assert "no sources detected" in capsys.readouterr().out


def test_bad_settings_and_files_are_clear_errors(obs, tmp_path, capsys):
    path, _ = obs
    out = str(tmp_path / "c.ecsv")
    assert main(["detect", str(path), "--out", out, "--threshold", "0"]) == 2
    assert "threshold must be positive" in capsys.readouterr().err
    assert main(["detect", str(path), "--out", out, "--flux-threshold", "7"]) == 2
    assert "not one of the detector's thresholds" in capsys.readouterr().err
    trunc = tmp_path / "trunc.fits"
    trunc.write_bytes(path.read_bytes()[:20000])
    assert main(["detect", str(trunc), "--out", out]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_healpix_input_is_searched_all_sky_or_projected(tmp_path, capsys):
    hpx = tmp_path / "sky.fits"
    write_map(hpx, HealpixMap(np.random.default_rng(0).poisson(1.0, 12 * 16**2) / 100.0,
                              frame="galactic"))
    out = tmp_path / "c.ecsv"
    assert main(["detect", str(hpx), "--out", str(out)]) == 0  # the whole sky, in patches
    assert out.exists() and "sources to" in capsys.readouterr().out
    patch = tmp_path / "p.ecsv"
    assert main(["detect", str(hpx), "--out", str(patch), "--center", "0", "0", "--shape", "24",
                 "24", "--resolution", "0.625"]) == 0
    assert patch.exists()
    assert main(["detect", str(hpx), "--out", str(patch), "--center", "0", "0"]) == 2


def test_train_detector_and_completeness(tmp_path):
    det, comp = tmp_path / "det.safetensors", tmp_path / "S.safetensors"
    assert main(["train", "detector", "--out", str(det), "--n-train", "8", "--n-val", "4",
                 "--epochs", "1", "--batch-size", "4", "--channels", "2", "--depth", "1",
                 "--domain-maps", "8", "--quiet"]) == 0
    assert main(["train", "completeness", "--detector", str(det), "--out", str(comp),
                 "--n-maps", "4", "--n-val", "2", "--epochs", "1", "--batch-size", "256",
                 "--flux-threshold", "10", "--quiet"]) == 0
    from astrotrunc import CompletenessFunction, SourceDetector

    d, s = SourceDetector.load(det), CompletenessFunction.load(comp)
    assert s.detector_id == d.identity and d.domain["statistics"]["n_maps"] == 8
    # fine-tuning from that detector, recorded in the new file
    tuned = tmp_path / "tuned.safetensors"
    assert main(["train", "detector", "--out", str(tuned), "--init", str(det), "--n-train", "4",
                 "--n-val", "4", "--epochs", "1", "--batch-size", "4", "--channels", "2",
                 "--depth", "1", "--domain-maps", "0", "--quiet"]) == 0
    assert SourceDetector.load(tuned).metadata["training"]["init"] == d.identity
    assert main(["train", "detector", "--out", str(tuned), "--overwrite", "--init", str(det),
                 "--channels", "4", "--depth", "1", "--n-train", "4", "--quiet"]) == 2
    # the U-Net's channels per level
    narrow = tmp_path / "narrow.safetensors"
    assert main(["train", "detector", "--out", str(narrow), "--n-train", "4", "--n-val", "4",
                 "--epochs", "1", "--batch-size", "4", "--widths", "2", "2", "4",
                 "--domain-maps", "0", "--quiet"]) == 0
    assert SourceDetector.load(narrow).widths == (2, 2, 4)
    # distilled from it into a narrower one, started from its strongest channels
    student = tmp_path / "student.safetensors"
    assert main(["train", "detector", "--out", str(student), "--n-train", "4", "--n-val", "4",
                 "--epochs", "1", "--batch-size", "4", "--widths", "2", "1", "2", "--init",
                 str(narrow), "--teacher", str(narrow), "--domain-maps", "0", "--quiet"]) == 0
    training = SourceDetector.load(student).metadata["training"]
    assert training["teacher"] == training["init"] == SourceDetector.load(narrow).identity
    # a model file is never an output over its own input
    assert main(["train", "completeness", "--detector", str(det), "--out", str(det),
                 "--overwrite", "--n-maps", "4", "--quiet"]) == 2
    assert SourceDetector.load(det).identity == d.identity


def test_train_photometry_calibrated(tmp_path, one_thread):
    out = tmp_path / "phot.safetensors"
    assert main(["train", "photometry", "--out", str(out), "--n-maps", "2", "--n-val", "1",
                 "--epochs", "1", "--batch-size", "256", "--channels", "2", "--hidden", "4",
                 "--half-size", "3", "--activation", "relu", "--calibration-maps", "4",
                 "--architecture", "strided", "--crowding-bins", "2", "--latitude-bins", "2",
                 "1", "--quiet"]) == 0
    from astrotrunc.detection import FluxEstimator

    est = FluxEstimator.load(out)
    assert est.activation == "relu" and est.calibration["n_maps"] == 4
    assert est.architecture == "strided" and len(est.calibration["crowding_edges"]) == 1
    assert est.calibration["seed"] == 1  # not the training maps (seed 0)
    lat = est.calibration["latitude"]
    assert len(lat["latitude_edges"]) == 1 and lat["crowding_edges"] == []
