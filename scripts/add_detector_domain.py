"""Record the domain of validity in the shipped detector file, without retraining.

The weights are copied unchanged (checked bit for bit) and the detector's identity -- which pairs
it with ``completeness_paper.safetensors`` -- stays the same; only the ``domain`` entry of the
configuration is added: the instrument of ``PointSourceModel.paper()`` and the ranges of the map
statistics over 1000 of its simulations (`astrotrunc.detection.domain.instrument_domain`).

Run: ``python scripts/add_detector_domain.py [--n-maps 1000]``
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from astrotrunc import CompletenessFunction, PointSourceModel, SourceDetector
from astrotrunc.detection.domain import instrument_domain

PATH = Path(__file__).resolve().parent.parent / "astrotrunc" / "data" / "detector_paper.safetensors"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-maps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args()
    torch.set_num_threads(1)

    det = SourceDetector.load(PATH)
    identity = det.identity
    before = load_file(str(PATH))
    det.domain = instrument_domain(PointSourceModel.paper(), n_maps=args.n_maps, seed=args.seed)
    assert det.identity == identity, "the domain must not change the identity"
    det.save(PATH, overwrite=True, metadata=det.metadata)

    after = load_file(str(PATH))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed"
    back = SourceDetector.load(PATH)
    assert back.identity == identity == CompletenessFunction.load_default().detector_id
    print(f"domain added to {PATH}; identity {identity} unchanged")
    print(back.domain)


if __name__ == "__main__":
    main()
