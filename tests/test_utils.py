"""The private helpers shared by the subpackages, and the curated public API."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import astrotrunc
from astrotrunc._utils import (check_writable, evaluating, nearest_pixel, pixel_scale_deg,
                               spawn_seed, validate_map)


def test_evaluating_restores_the_mode_even_on_errors():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with evaluating(net):
        assert not net.training and not torch.is_grad_enabled()
    assert net.training
    with pytest.raises(RuntimeError, match="boom"):
        with evaluating(net):
            raise RuntimeError("boom")
    assert net.training and torch.is_grad_enabled()
    net.eval()
    with evaluating(net):
        pass
    assert not net.training  # the previous mode, not "training"


def test_nearest_pixel_rule_is_the_same_for_numpy_and_torch():
    x = np.array([-0.6, -0.5, -0.49, 0.49, 0.5, 1.5, 9.7, 12.0])
    expected = [0, 0, 0, 0, 1, 2, 9, 9]
    assert nearest_pixel(x, 10).tolist() == expected
    assert nearest_pixel(torch.as_tensor(x), 10).tolist() == expected


def test_spawn_seed_and_check_writable(tmp_path):
    from astrotrunc.store import chunk_seed

    assert spawn_seed(3, 1) == chunk_seed(3, 1) != spawn_seed(3, 2)
    path = tmp_path / "f.txt"
    assert check_writable(path, False) == path
    path.write_text("x")
    with pytest.raises(OSError, match="already exists; pass --overwrite"):
        check_writable(path, False, option="--overwrite")
    with pytest.raises(OSError, match="does not exist"):
        check_writable(tmp_path / "no" / "f.txt", True)
    with pytest.raises(OSError, match="is a directory"):
        check_writable(tmp_path, True)


def test_validate_map_units_and_masks():
    import astropy.units as u
    from astropy.nddata import NDData

    data, bad, unit = validate_map(np.ones((3, 4), dtype=np.uint8) * u.Jy)
    assert data.dtype == np.float64 and unit == u.Jy and not bad.any()
    nd = NDData(np.zeros((3, 4)), mask=np.eye(3, 4, dtype=bool), unit="mJy")
    data, bad, unit = validate_map(nd)
    assert bad.sum() == 3 and unit == u.mJy
    with pytest.raises(ValueError, match="HEALPix"):
        validate_map(np.zeros(768))
    with pytest.raises(ValueError, match="mask shape"):
        validate_map(np.zeros((3, 4)), np.zeros((4, 3), bool))


def test_public_api_is_curated_and_lazy():
    public = set(astrotrunc.__all__)
    assert {"BoxPrior", "Uniform", "NeuralSourceFinder", "OutOfDomainWarning", "find_sources",
            "SourceDetector", "CompletenessFunction", "Trainer"} <= public
    assert not {"UNet", "chunk_seed", "detection", "io", "nre"} & public
    for name in public:
        assert getattr(astrotrunc, name) is not None
    with pytest.raises(AttributeError):
        astrotrunc.UNet  # noqa: B018
    code = "import sys, astrotrunc, astrotrunc.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pixel_scale_deg_is_in_degrees_whatever_the_cunit():
    from astropy import units as u
    from astropy.wcs import WCS

    for cunit, cdelt in (("deg", 0.01), ("arcsec", 36.0), ("arcmin", 0.6)):
        w = WCS(naxis=2)
        w.wcs.ctype = ["GLON-TAN", "GLAT-TAN"]
        w.wcs.cunit = [cunit, cunit]
        w.wcs.cdelt = [-cdelt, 2 * cdelt]
        expected = np.mean([abs(s.to_value(u.deg)) for s in w.proj_plane_pixel_scales()])
        assert math.isclose(pixel_scale_deg(w), expected, rel_tol=1e-12)
        assert math.isclose(pixel_scale_deg(w), 0.015, rel_tol=1e-12)
