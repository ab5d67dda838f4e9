"""Data-parallel r1 training: throughput of 1 and K processes and the speed-up (issue 10, item 5).

Trains the same detector (same initial weights, same simulations) on `DetectionSimulations` with
``Trainer(nproc=1)`` and ``Trainer(nproc=K)`` (DistributedDataParallel, gloo, one thread per
process), and prints for each the training throughput in maps per second -- counted over the
epochs after the first (``history["time"]``: simulation, forward, backward, all-reduce and
validation; process start-up and the first, warm-up epoch left out) -- and the wall time of the
whole ``fit`` call (start-up included), then the speed-up of K processes over 1. ``batch_size`` is
per process, so K processes take K times fewer steps of a K times larger global batch.

The load average of the machine is printed before and after: on a shared machine the figures
are upper bounds of the time (lower bounds of the speed-up). Results go to
``benchmarks/output/distributed.json``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/distributed.py [--nproc 2] [--n-train 128]
[--epochs 3] [--batch-size 8] [--channels 8] [--depth 2] [--repeats 1]``
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from astrotrunc import PointSourceModel, SourceDetector
from astrotrunc.detection import DetectionSimulations
from astrotrunc.nre import Trainer


def run(model, args, nproc):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        det = SourceDetector.from_model(model, [1.0, 10.0], base_channels=args.channels,
                                        depth=args.depth)
    data = DetectionSimulations(model, det.flux_thresholds, args.n_train, args.n_val, seed=0)
    trainer = Trainer(max_epochs=args.epochs, batch_size=args.batch_size, progress=False,
                      seed=0, nproc=nproc, patience=args.epochs)
    t0 = time.perf_counter()
    history = trainer.fit(det, data)
    wall = time.perf_counter() - t0
    epoch_s = history["time"].value[1:]  # the first epoch warms up (allocations, thread pools)
    return dict(nproc=nproc, throughput=args.n_train * len(epoch_s) / float(epoch_s.sum()),
                epoch_s=[float(t) for t in history["time"].value], wall_s=wall,
                val_loss=float(history["val_loss"][-1]),
                world_size=history.meta["trainer"]["world_size"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--n-train", type=int, default=128, help="maps per epoch")
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first one is a warm-up)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    load_before = os.getloadavg()
    print(f"CPU cores {os.cpu_count()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    model = PointSourceModel.paper()
    results = {1: [], args.nproc: []}
    for _ in range(args.repeats):
        for nproc in (1, args.nproc):  # interleaved: both see the same load drift
            r = run(model, args, nproc)
            results[nproc].append(r)
            print(f"nproc={nproc}: {r['throughput']:.1f} maps/s (epochs {r['epoch_s']} s), "
                  f"fit wall {r['wall_s']:.1f} s, final val loss {r['val_loss']:.4f}")
    load_after = os.getloadavg()
    best = {k: statistics.median(r["throughput"] for r in v) for k, v in results.items()}
    speedup = best[args.nproc] / best[1]
    wall = {k: statistics.median(r["wall_s"] for r in v) for k, v in results.items()}
    print(f"throughput (median of {args.repeats}): 1 process {best[1]:.1f} maps/s, "
          f"{args.nproc} processes {best[args.nproc]:.1f} maps/s")
    print(f"speed-up of {args.nproc} processes over 1: {speedup:.2f}x in training throughput, "
          f"{wall[1] / wall[args.nproc]:.2f}x in fit wall time (start-up included)")
    print(f"load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} "
          "(shared machine: times are upper bounds)")
    out = Path(__file__).parent / "output"
    out.mkdir(exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(dict(
        settings=vars(args), load_before=load_before, load_after=load_after,
        runs={str(k): v for k, v in results.items()}, throughput=best, speedup=speedup),
        indent=1))


if __name__ == "__main__":
    main()
