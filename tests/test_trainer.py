"""The engine core: safe model files, trainer input checks, checkpoint resume after SIGKILL."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from astrotrunc import CompletenessFunction
from astrotrunc.nre import Trainer

_TOY = """
import sys, time, numpy as np, torch
from astrotrunc import CompletenessFunction
from astrotrunc.nre import Trainer
rng = np.random.default_rng(0)
n = 6000
f = np.exp(rng.normal(1, 2, n)); lon = rng.normal(0, 20, n); lat = rng.normal(0, 8, n)
d = rng.random(n) < 1 / (1 + (3 / f) ** 3)
data = {k: torch.as_tensor(v, dtype=torch.float32)
        for k, v in dict(flux=f, l=lon, b=lat, d=d).items()}
torch.manual_seed(0)
S = CompletenessFunction(detector_id="toy", hidden=16)
slow = float(sys.argv[2])
loss = S.loss
S.loss = lambda b: (time.sleep(slow), loss(b))[1]
hist = Trainer(max_epochs=8, batch_size=256, learning_rate=5e-3, progress=False, seed=3,
               patience=100, checkpoint_dir=sys.argv[1] if sys.argv[1] != "-" else None
               ).fit(S, data, resume=True)
print("FINAL", float(hist["val_loss"].min()))
"""


def _run(ckpt, slow):
    return subprocess.run(
        [sys.executable, "-c", _TOY, ckpt, str(slow)], capture_output=True, text=True, timeout=300
    )


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref = _run("-", 0.0)
    assert ref.returncode == 0, ref.stderr
    ref_loss = float(ref.stdout.split("FINAL")[1])
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _TOY, str(ckpt), "0.01"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        meta = ckpt / "checkpoint.json"
        if meta.exists() and json.loads(meta.read_text())["epoch"] >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = json.loads((ckpt / "checkpoint.json").read_text())["epoch"]
    assert 2 <= epoch_at_kill < 8, "the run was not interrupted mid-training"
    resumed = _run(str(ckpt), 0.0)
    assert resumed.returncode == 0, resumed.stderr
    res_loss = float(resumed.stdout.split("FINAL")[1])
    assert abs(res_loss - ref_loss) / ref_loss < 0.05
    assert json.loads((ckpt / "checkpoint.json").read_text())["epoch"] == 8


def test_model_files_are_safe(tmp_path):
    S = CompletenessFunction(detector_id="x", hidden=8)
    good = tmp_path / "S.safetensors"
    S.save(good)
    assert CompletenessFunction.load(good).detector_id == "x"
    # a pickle, whatever its name, is refused without being unpickled
    evil = tmp_path / "evil.safetensors"
    torch.save({"weights": torch.zeros(3)}, evil)
    with pytest.raises(ValueError, match="pickled files are refused"):
        CompletenessFunction.load(evil)
    # a safetensors file that is not ours
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an astrotrunc model file"):
        CompletenessFunction.load(other)
    # our format, wrong architecture
    state = {k: v for k, v in S.state_dict().items()}
    meta = {"format": "astrotrunc-ratio-estimator", "class": "CompletenessFunction",
            "config": json.dumps(dict(S.config, hidden=32)), "metadata": "{}"}
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, wrong, metadata=meta)
    with pytest.raises(ValueError, match="do not fit"):
        CompletenessFunction.load(wrong)
    with pytest.raises(OSError, match="no such model file"):
        CompletenessFunction.load(tmp_path / "missing.safetensors")


def test_trainer_rejects_bad_input(tmp_path):
    S = CompletenessFunction(hidden=8)
    t = Trainer(max_epochs=1, progress=False)
    ok = {"flux": torch.ones(10), "l": torch.zeros(10), "b": torch.zeros(10), "d": torch.ones(10)}
    with pytest.raises(ValueError, match="same length"):
        t.fit(S, dict(ok, b=torch.zeros(9)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        t.fit(S, dict(ok, flux=torch.tensor([np.nan] + [1.0] * 9)))
    with pytest.raises(ValueError, match="at least 2"):
        t.fit(S, {k: v[:1] for k, v in ok.items()})
    with pytest.raises(ValueError, match="scheduler"):
        Trainer(scheduler="linear")
    # a checkpoint of another architecture is refused on resume
    Trainer(max_epochs=1, progress=False, checkpoint_dir=tmp_path).fit(S, ok)
    from astrotrunc import SourceDetector

    det = SourceDetector(flux_thresholds=[1.0], base_channels=2, depth=1)
    with pytest.raises(ValueError, match="checkpoint"):
        Trainer(max_epochs=2, progress=False, checkpoint_dir=tmp_path).fit(det, ok, resume=True)
