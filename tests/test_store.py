"""SimulationStore: Dask fills, resumable after SIGKILL, streaming to the trainer, bad input."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from astrotrunc.nre import MarginalRatioEstimator, Trainer
from astrotrunc.store import SimulationStore, chunk_seed

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_simulator(n, seed):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(size=(n, 2)).astype("f4")
    return {"theta": theta, "x": (theta + rng.normal(0, 0.1, (n, 2))).astype("f4"),
            "n_src": rng.integers(0, 5, n)}


_KILLED_FILL = """
import sys, time
from astrotrunc.store import SimulationStore
from test_store import toy_simulator

def slow(n, seed):
    time.sleep(0.15)
    return toy_simulator(n, seed)

SimulationStore(sys.argv[1]).fill(slow, 2000, chunk_size=50, seed=7, progress=False)
"""


def _reference(n=2000, chunk_size=50, seed=7):
    ref = SimulationStore()
    ref.fill(toy_simulator, n, chunk_size=chunk_size, seed=seed, client="sync", progress=False)
    return ref.load()


def test_dask_fill_matches_serial_and_extends():
    a = SimulationStore()
    a.fill(toy_simulator, 230, chunk_size=50, seed=3, progress=False)  # LocalCluster
    b = SimulationStore()
    b.fill(toy_simulator, 230, chunk_size=50, seed=3, client="sync", progress=False)
    da, db = a.load(), b.load()
    assert set(da) == {"theta", "x", "n_src"} and len(da["x"]) == 230
    for k in da:
        np.testing.assert_array_equal(da[k], db[k])
    np.testing.assert_array_equal(da["theta"][50:100], toy_simulator(50, chunk_seed(3, 1))["theta"])
    # extending: the partial last chunk is redone at full size, earlier chunks are kept
    b.fill(toy_simulator, 320, chunk_size=50, seed=3, client="sync", progress=False)
    assert len(b) == 320 and b.n_chunks == 7
    np.testing.assert_array_equal(b.load()["x"][:200], da["x"][:200])
    np.testing.assert_array_equal(b["theta"][200:250], toy_simulator(50, chunk_seed(3, 4))["theta"])
    with pytest.raises(ValueError, match="same values"):
        b.fill(toy_simulator, 400, chunk_size=50, seed=4, client="sync")


def test_killed_fill_is_completed_by_rerun(tmp_path):
    path = tmp_path / "sims.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_FILL, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=str(Path(__file__).parent))
    deadline = time.time() + 90
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = len(SimulationStore(path, mode="r").complete_chunks)
        except (OSError, KeyError, ValueError, zarr.errors.BaseZarrError):
            done = 0
        if done >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    store = SimulationStore(path)
    partial = store.complete_chunks
    assert 4 <= len(partial) < 40, err.decode()[-2000:]
    ref = _reference()
    for i in partial:  # every completed chunk is readable and right
        rows = store.read_chunk(int(i))
        for k in ref:
            np.testing.assert_array_equal(rows[k], ref[k][i * 50:(i + 1) * 50])
    # a torn write (data without its completion mark) is redone
    missing = int(np.setdiff1d(np.arange(40), partial)[0])
    store["x"][missing * 50:missing * 50 + 10] = -1.0
    store.fill(toy_simulator, 2000, chunk_size=50, seed=7, client="sync", progress=False)
    assert len(store) == 2000 and len(store.complete_chunks) == 40
    got = SimulationStore(path, mode="r").load()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    assert len(np.unique(got["theta"], axis=0)) == 2000  # no duplicated rows


def test_failing_simulator_keeps_completed_chunks():
    calls = []

    def flaky(n, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise RuntimeError("simulator crashed")
        return toy_simulator(n, seed)

    store = SimulationStore()
    with pytest.raises(RuntimeError, match="crashed"):
        store.fill(flaky, 250, chunk_size=50, seed=1, client="sync", progress=False)
    assert list(store.complete_chunks) == [0, 1] and len(store) == 100
    store.fill(flaky, 250, chunk_size=50, seed=1, client="sync", progress=False)
    assert len(store) == 250 and len(calls) == 6  # only the 3 missing chunks were re-simulated


def test_streaming_and_training_from_store():
    store = SimulationStore()
    store.fill(toy_simulator, 1000, chunk_size=100, seed=0, client="sync", progress=False)
    ds = store.dataset(batch_size=64, seed=1)
    batches = list(ds)
    assert sum(len(b["x"]) for b in batches) == 1000 and len(batches) == len(ds) == 16
    assert all(len(b["x"]) == 64 for b in batches[:-1])
    seen = np.sort(np.concatenate([b["theta"][:, 0].numpy() for b in batches]))
    np.testing.assert_array_equal(seen, np.sort(store.load()["theta"][:, 0]))  # each row once
    # stopping early leaves no reader thread behind
    it = iter(store.dataset(batch_size=10, seed=2, prefetch=1))
    next(it)
    it.close()
    est = MarginalRatioEstimator(2, ["a", "b"], hidden=8)
    hist = Trainer(max_epochs=2, batch_size=64, progress=False, seed=0).fit(
        est, _Renamed(store))
    assert len(hist) == 2 and np.isfinite(hist["val_loss"]).all()


class _Renamed:
    """The store's batches without the integer column (the estimator only needs theta and x)."""

    def __init__(self, store):
        self.source = store.batch_source(keys=["theta", "x"])

    def __getattr__(self, name):
        return getattr(self.source, name)


def test_store_bad_input(tmp_path):
    empty = SimulationStore()
    with pytest.raises(ValueError, match="empty"):
        Trainer(max_epochs=1, progress=False).fit(MarginalRatioEstimator(2, 2), empty)
    with pytest.raises(ValueError, match="empty"):
        empty.load()
    one = SimulationStore()
    one.fill(toy_simulator, 10, chunk_size=10, client="sync", progress=False)
    with pytest.raises(ValueError, match="single complete chunk"):
        one.batch_source()
    with pytest.raises(ValueError, match="rows"):
        SimulationStore().fill(lambda n, seed: {"x": np.zeros((n + 1, 2))}, 10, chunk_size=5,
                               client="sync", progress=False)
    with pytest.raises(TypeError, match="dict of arrays"):
        SimulationStore().fill(lambda n, seed: np.zeros(n), 10, chunk_size=5, client="sync",
                               progress=False)
    with pytest.raises(OSError, match="no simulation store"):
        SimulationStore(tmp_path / "missing", mode="r")
    zarr.open_group(str(tmp_path / "other"), mode="w").attrs["hello"] = 1
    with pytest.raises(OSError, match="not an astrotrunc simulation store"):
        SimulationStore(tmp_path / "other")
    nan = SimulationStore()
    nan.fill(lambda n, seed: {"theta": np.full((n, 2), np.nan, "f4"), "x": np.zeros((n, 2), "f4")},
             40, chunk_size=10, client="sync", progress=False)
    with pytest.raises(ValueError, match="'theta' holds NaN"):
        Trainer(max_epochs=1, progress=False).fit(MarginalRatioEstimator(2, 2), nan)
    with pytest.raises(KeyError, match="no array"):
        nan["maps"]
