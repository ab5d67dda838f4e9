"""Forward-model speed and memory (issue: package foundation).

Prints:
* paper-model simulation throughput (maps/s, 128x128, N up to 500), in chunks;
* the speed ratio against photutils.datasets.make_model_image + CircularGaussianPRF rendering the
  same source lists (noiseless, same PSF);
* peak memory (RSS high-water mark) while simulating 10,000 maps in chunks.

Run: ``python benchmarks/simulation.py [--threads 2]``
"""

import argparse
import resource
import time

import numpy as np
import torch
from astropy.table import QTable

from astrotrunc import PointSourceModel


def throughput(model, n, chunk_size):
    t0 = time.perf_counter()
    done = 0
    for batch in model.iter_simulate(n, seed=123, chunk_size=chunk_size):
        done += len(batch)
    return done / (time.perf_counter() - t0)


def photutils_ratio(model, n_maps):
    from photutils.datasets import make_model_image
    from photutils.psf import CircularGaussianPRF

    sims = model.simulate(n_maps, seed=7, noise=False)
    fwhm = 1.5 * 2 * np.sqrt(2 * np.log(2))
    prf = CircularGaussianPRF(fwhm=fwhm)
    t0 = time.perf_counter()
    for i in range(n_maps):
        keep = sims.in_map[i].numpy()
        params = QTable()
        params["x_0"] = np.floor(sims.x[i].numpy()[keep] + 0.5)
        params["y_0"] = np.floor(sims.y[i].numpy()[keep] + 0.5)
        params["flux"] = 4 * sims.flux[i].numpy()[keep]
        make_model_image(model.shape, prf, params)
    t_phot = (time.perf_counter() - t0) / n_maps
    t0 = time.perf_counter()
    model.simulate(256, seed=8, noise=False)
    t_ours = (time.perf_counter() - t0) / 256
    return t_phot, t_ours


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=10000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = PointSourceModel.paper()
    throughput(model, 512, 256)  # warm-up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for cs in (128, 256, 512):
        print(f"paper-model simulation, chunk {cs:4d}: {throughput(model, 4096, cs):8.0f} maps/s")
    t_phot, t_ours = photutils_ratio(model, 20)
    print(f"photutils make_model_image: {1e3 * t_phot:.1f} ms/map (noiseless), "
          f"astrotrunc: {1e3 * t_ours:.3f} ms/map (noiseless) -> {t_phot / t_ours:.0f}x faster")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rate = throughput(model, args.n, 256)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.n} maps in chunks of 256: {rate:.0f} maps/s, peak RSS {rss1:.0f} MiB "
          f"(before: {rss0:.0f} MiB)")


if __name__ == "__main__":
    main()
