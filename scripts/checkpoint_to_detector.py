"""Write the best weights of a detector training checkpoint as a detector file.

``astrotrunc train detector --checkpoint-dir DIR`` writes, after every epoch, a checkpoint whose
``best.*`` tensors are the weights of the best validation loss so far. When a run is stopped
before its last epoch (a time limit on a lent GPU, say), this script turns that checkpoint into a
detector file of ``PointSourceModel.paper()`` (its domain recorded from ``--domain-maps`` fresh
simulations, as ``fit_to`` does), which ``astrotrunc train detector --init FILE`` can then train
further, e.g. on a short, decaying schedule.

The base-10 detector (shipped before the base-8 one) had its first stage made this way (the
base-8 one likewise, see ``astrotrunc/data/README.rst``)::

    astrotrunc train detector --out b10.safetensors --channels 10 --n-train 20000 --n-val 400 \
        --epochs 14 --batch-size 32 --learning-rate 3e-3 --default-flux-threshold 1.0 \
        --seed 0 --checkpoint-dir ck_b10     # on a GPU, stopped after epoch 5
    python scripts/checkpoint_to_detector.py ck_b10 b10.safetensors --channels 10

Run: ``python scripts/checkpoint_to_detector.py CHECKPOINT_DIR OUT [--channels 16 ...]``
"""

import argparse

from astrotrunc import PointSourceModel, SourceDetector, Trainer
from astrotrunc.detection import PAPER_FLUX_THRESHOLDS


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint_dir")
    p.add_argument("out")
    p.add_argument("--channels", type=int, default=16, help="the run's --channels")
    p.add_argument("--depth", type=int, default=3, help="the run's --depth")
    p.add_argument("--space-to-depth", type=int, default=1, help="the run's --space-to-depth")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="the run's --widths")
    p.add_argument("--default-flux-threshold", type=float, default=1.0)
    p.add_argument("--name", default="astrotrunc-paper-r1 (checkpoint)")
    p.add_argument("--domain-maps", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()

    best, summary = Trainer.best_weights(args.checkpoint_dir)
    if summary["architecture"] != "SourceDetector":
        raise SystemExit(f"{args.checkpoint_dir}: not a detector checkpoint ({summary})")
    det = SourceDetector.from_model(
        PointSourceModel.paper(), PAPER_FLUX_THRESHOLDS, domain_maps=args.domain_maps,
        base_channels=args.channels, depth=args.depth, space_to_depth=args.space_to_depth,
        widths=args.widths, name=args.name, default_flux_threshold=args.default_flux_threshold)
    det.load_state_dict(best)  # strict: the architecture must be the run's
    det.eval().save(args.out, overwrite=args.overwrite)
    print(f"{args.out}: best weights after epoch {summary['epoch']} (validation loss "
          f"{summary['best']:.5f}), identity {det.identity}")


if __name__ == "__main__":
    main()
