"""Simulation store: Dask fill throughput and training-loop busy fraction when streaming (issue 3).

A toy map simulator (Gaussian blobs on 64 x 64 maps, theta = (N, sigma, h)) fills an on-disk
zarr `SimulationStore` through a `distributed.LocalCluster`; then a CNN
`MarginalRatioEstimator` is trained by `Trainer.fit` streaming from the store (chunks read and
decompressed by a background thread). Prints:

* fill throughput (simulations/s) and store size on disk;
* busy fraction of the training loop: 1 - (time spent waiting for chunks) / (epoch time)
  (target >= 90 %), and the epoch time against the same training on in-memory tensors.

Run: ``python benchmarks/store_streaming.py [--n 8192] [--chunk-size 256] [--threads 1]``
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from astrotrunc.nre import MarginalRatioEstimator, Trainer
from astrotrunc.store import SimulationStore


def blob_simulator(n, seed, size=64, max_sources=20):
    """``n`` maps of up to ``max_sources`` Gaussian blobs plus noise (numpy, vectorised)."""
    rng = np.random.default_rng(seed)
    theta = np.stack([rng.integers(1, max_sources + 1, n), rng.uniform(1, 3, n),
                      rng.uniform(2, 12, n)], axis=1).astype("f4")
    yy, xx = np.mgrid[0:size, 0:size].astype("f4")
    cx = rng.uniform(0, size, (n, max_sources)).astype("f4")
    cy = (size / 2 + theta[:, 2:3] * rng.standard_normal((n, max_sources))).astype("f4")
    flux = rng.lognormal(0, theta[:, 1:2], (n, max_sources)).astype("f4")
    flux *= np.arange(max_sources)[None, :] < theta[:, :1]
    r2 = (xx[None, None] - cx[..., None, None]) ** 2 + (yy[None, None] - cy[..., None, None]) ** 2
    maps = np.einsum("ns,nsyx->nyx", flux, np.exp(-r2 / (2 * 1.5**2)))
    maps += 0.1 * rng.standard_normal(maps.shape).astype("f4")
    return {"theta": theta, "x": maps.astype("f4")}


class _Counting:
    """Batch source wrapper keeping the streaming datasets, to read their wait times."""

    def __init__(self, source):
        self.source, self.datasets = source, []

    def train_batches(self, batch_size, epoch):
        it = self.source.train_batches(batch_size, epoch)
        self.datasets.append(self.source.last)
        return it

    def val_batches(self, batch_size):
        return self.source.val_batches(batch_size)

    def n_batches(self, batch_size):
        return self.source.n_batches(batch_size)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sims.zarr")
        store = SimulationStore(path)
        t0 = time.perf_counter()
        store.fill(blob_simulator, args.n, chunk_size=args.chunk_size, seed=0, progress=False)
        t_fill = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        print(f"fill: {args.n} simulations (64x64 maps) in {t_fill:.1f} s through a LocalCluster "
              f"= {args.n / t_fill:.0f} sims/s; {store.n_chunks} chunks, "
              f"{size / 2**20:.1f} MiB on disk ({args.n * 64 * 64 * 4 / 2**20:.1f} MiB raw)")

        def estimator():
            torch.manual_seed(0)
            return MarginalRatioEstimator(
                [64, 64],
                ["N", "sigma", "h"],
                embedding="cnn",
                embedding_kwargs={"n_features": 32, "channels": [8, 16, 16]},
                hidden=32,
                standardize=True,
            )

        trainer = Trainer(max_epochs=args.epochs, batch_size=args.batch_size, progress=False,
                          seed=0, patience=100)
        counting = _Counting(
            store.batch_source(val_fraction=0.1, generator=torch.Generator().manual_seed(0))
        )
        hist = trainer.fit(estimator(), counting)
        wait = [d.wait_time for d in counting.datasets]
        epoch_time = list(hist["time"].value)
        print(f"streaming from the store: {args.epochs} epochs, batch {args.batch_size}, "
              f"{args.threads} torch thread(s)")
        for e, (w, t) in enumerate(zip(wait, epoch_time)):
            print(
                f"  epoch {e + 1}: {t:6.2f} s, waiting for data {w:5.2f} s, "
                f"busy {100 * (1 - w / t):5.1f} %"
            )
        busy = 1 - sum(wait) / sum(epoch_time)
        data = store.load()
        mem = {"theta": torch.as_tensor(data["theta"]), "x": torch.as_tensor(data["x"])}
        hist_mem = trainer.fit(estimator(), mem)
        t_mem = float(np.sum(hist_mem["time"].value))
        print(
            f"in-memory tensors, same model: {t_mem / args.epochs:6.2f} s/epoch; "
            f"store: {sum(epoch_time) / args.epochs:6.2f} s/epoch "
            f"(ratio {t_mem / sum(epoch_time):.2f})"
        )
        print(
            f"busy fraction {100 * busy:.1f} % (target >= 90 %): "
            f"{'PASS' if busy >= 0.9 else 'FAIL'}"
        )


if __name__ == "__main__":
    main()
