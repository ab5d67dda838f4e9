"""Data-parallel training: two CPU processes (gloo), shards, rank agreement, crash and resume."""

import functools
import hashlib
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from astrotrunc import PointSourceModel, SourceDetector
from astrotrunc.cli import main
from astrotrunc.detection import DetectionSimulations, StoredDetectionSimulations
from astrotrunc.exceptions import AstrotruncWarning
from astrotrunc.nre import Trainer, _ddp
from astrotrunc.nre.trainer import _as_source
from astrotrunc.store import SimulationStore

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available())
    or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed with gloo and fork")

@pytest.fixture(autouse=True)
def _one_thread_per_rank(monkeypatch):
    """One thread per rank: the ranks are then forked (see `_ddp._start_method`)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


_SETTINGS = dict(max_epochs=2, batch_size=2, progress=False, seed=0, nproc=2)


@functools.lru_cache(maxsize=1)
def _paper():
    return PointSourceModel.paper()


def _tiny():
    model = _paper()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        det = SourceDetector.from_model(model, [10.0], base_channels=2, depth=1)
    return model, det


def _digest(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class _Simulations(DetectionSimulations):
    """Detector training data whose rank 1 can be made to fail at the start of an epoch."""

    crash_epoch = None

    def train_batches(self, batch_size, epoch, rank=0, world_size=1):
        if epoch == self.crash_epoch and rank == 1:
            raise ValueError("injected failure of rank 1")
        return super().train_batches(batch_size, epoch, rank, world_size)


def _data(model, det):
    return _Simulations(model, det.flux_thresholds, n_train=8, n_val=2, seed=0)


def _rank(rank, port, outdir):
    """One rank launched the way torchrun does: environment variables, then Trainer.fit."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, det = _tiny()
    history = Trainer(**_SETTINGS).fit(det, _data(model, det))
    report = {"digest": _digest(det), "world_size": history.meta["trainer"]["world_size"],
              "epochs": len(history)}
    (outdir / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """What each of two torchrun-style ranks holds after 2 uninterrupted epochs."""
    outdir = tmp_path_factory.mktemp("ddp")
    _paper()  # made once, inherited by the forked ranks
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo once
    # forked with one thread per rank, as Trainer(nproc=K) does then (see _ddp._start_method)
    mp.start_processes(_rank, args=(_ddp.free_port(), outdir), nprocs=2, start_method="fork")
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ranks_hold_the_same_weights(uninterrupted):
    r0, r1 = uninterrupted
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["epochs"] == r1["epochs"] == 2
    assert r0["digest"] == r1["digest"]  # gradients averaged: every rank takes the same steps
    _, det = _tiny()
    assert r0["digest"] != _digest(det)  # and they did train


def test_crashed_rank_fails_the_run_and_the_checkpoint_resumes(tmp_path, uninterrupted):
    model, det = _tiny()
    data = _data(model, det)
    data.crash_epoch = 1
    trainer = Trainer(checkpoint_dir=tmp_path, timeout=60, **_SETTINGS)
    with pytest.raises(ValueError, match="process 1 of 2 failed: injected failure"):
        trainer.fit(det, data)
    summary = json.loads((tmp_path / "checkpoint.json").read_text())
    assert summary["epoch"] == 1 and summary["world_size"] == 2

    data.crash_epoch = 0  # resuming must not train epoch 1 again (rank 1 would fail)
    model, det = _tiny()  # untrained weights: resuming must load the checkpoint's
    history = trainer.fit(det, data, resume=True)
    assert list(history["epoch"]) == [1, 2]
    assert history.meta["trainer"]["world_size"] == 2
    # epoch 2 continued from epoch 1: the same weights as the uninterrupted run
    assert _digest(det) == uninterrupted[0]["digest"]

    det.history = history
    det.save(tmp_path / "r1.safetensors")
    assert SourceDetector.load(tmp_path / "r1.safetensors").metadata["training"]["world_size"] == 2


def test_store_filled_once_then_trained_by_two_processes(tmp_path):
    model, _ = _tiny()
    kw = dict(n_train=8, n_val=4, base_channels=2, depth=1, domain_maps=0, max_epochs=1,
              batch_size=2, progress=False, store=tmp_path / "sims", client="sync")
    det = SourceDetector.fit_to(model, [10.0], nproc=2, **kw)
    store = SimulationStore(tmp_path / "sims", mode="r")
    assert len(store) == 12 and store.n_chunks == 3  # 2 training chunks, 1 validation chunk
    assert det.history.meta["trainer"]["world_size"] == 2
    assert det.history.meta["trainer"]["val_fraction"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="lacks"):
        StoredDetectionSimulations(SimulationStore(), [10.0])


def _maps(batches):
    return {hashlib.sha256(m.numpy().tobytes()).hexdigest() for b in batches for m in b["x"]}


def test_shards_are_disjoint_and_cover_the_epoch():
    model, det = _tiny()
    data = DetectionSimulations(model, det.flux_thresholds, n_train=10, n_val=6, seed=0)
    alone = _maps(data.train_batches(2, 0))
    shards = [_ddp.shard(data, r, 2) for r in (0, 1)]
    mine = [list(s.train_batches(2, 0)) for s in shards]
    assert len(mine[0]) == len(mine[1]) == shards[0].n_batches(2) == 3  # 5 batches, padded
    assert _maps(mine[0]) | _maps(mine[1]) == alone
    assert len(_maps(mine[0]) & _maps(mine[1])) == 2  # only the wrapped-around batch repeats
    val = [_maps(s.val_batches(2)) for s in shards]
    assert not val[0] & val[1] and val[0] | val[1] == _maps(data.val_batches(2))

    arrays = {"x": torch.arange(21.0)[:, None]}
    # each rank has its own copy of the source, seeded alike
    sources = [_as_source(arrays, 0.1, torch.Generator().manual_seed(0)) for _ in (0, 1)]
    parts = [_ddp.shard(s, r, 2) for r, s in enumerate(sources)]
    rows = [torch.cat([b["x"] for b in p.train_batches(4, 0)]).flatten().tolist() for p in parts]
    source = sources[0]
    assert len(rows[0]) == len(rows[1]) == 10  # 19 training rows, padded to 20
    assert set(rows[0]) | set(rows[1]) == set(source.tensors["x"][source.train_idx, 0].tolist())


def test_bad_process_counts_and_busy_port(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="nproc must be a positive integer"):
        Trainer(nproc=0)
    with pytest.raises(ValueError, match="nproc must be a positive integer"):
        Trainer(nproc=1.5)
    with pytest.warns(AstrotruncWarning, match="more than the .* CPU cores"):
        Trainer(nproc=(os.cpu_count() or 1) + 1, device="cpu")
    with pytest.raises(ValueError, match="backend must be"):
        Trainer(backend="mpi")
    model, det = _tiny()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        with pytest.raises(ValueError, match="MASTER_PORT .* is in use"):
            Trainer(**_SETTINGS).fit(det, _data(model, det))
    assert main(["train", "detector", "--out", str(tmp_path / "d.safetensors"),
                 "--nproc", "0"]) == 2


def test_cli_nproc_writes_one_file_that_records_the_world_size(tmp_path):
    out = tmp_path / "r1.safetensors"
    assert main(["train", "detector", "--out", str(out), "--n-train", "4", "--n-val", "2",
                 "--epochs", "1", "--batch-size", "2", "--channels", "2", "--depth", "1",
                 "--domain-maps", "2", "--nproc", "2", "--quiet"]) == 0
    training = SourceDetector.load(out).metadata["training"]
    assert training["world_size"] == 2 and training["backend"] == "gloo"


class _Plain:
    """A batch source with no ``shard`` method: ranks take every other batch."""

    def train_batches(self, batch_size, epoch):
        return ({"x": torch.full((batch_size, 1), float(i))} for i in range(5))

    def val_batches(self, batch_size):
        return ({"x": torch.full((batch_size, 1), float(i))} for i in range(3))


def test_sources_without_shard_and_stores_give_equal_disjoint_shares():
    parts = [_ddp.shard(_Plain(), r, 2) for r in (0, 1)]
    train = [[int(b["x"][0]) for b in p.train_batches(2, 0)] for p in parts]
    assert train == [[0, 2], [1, 3]]  # the odd last batch is dropped: equal step counts
    assert [[int(b["x"][0]) for b in p.val_batches(2)] for p in parts] == [[0, 2], [1]]

    store = SimulationStore()
    store.fill(lambda n, seed: {"x": torch.arange(n, dtype=torch.float32)[:, None] + seed % 997},
               50, chunk_size=8, seed=0, client="sync", progress=False)  # 6 full chunks + 2 rows
    sources = [store.batch_source(0.2, torch.Generator().manual_seed(0)) for _ in (0, 1)]
    shares = [_ddp.shard(s, r, 2) for r, s in enumerate(sources)]
    rows = [[tuple(b["x"][:, 0].tolist()) for b in s.train_batches(4, 0)] for s in shares]
    assert len(rows[0]) == len(rows[1]) == shares[0].n_batches(4) == shares[1].n_batches(4)
    val = [{v for b in s.val_batches(4) for v in b["x"][:, 0].tolist()} for s in shares]
    assert not val[0] & val[1]
