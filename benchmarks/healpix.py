"""All-sky HEALPix detection: time of `find_sources_healpix` at nside 512 and 1024, 1 vs 2 workers.

A paper-instrument sky (`healpix_point_sources`: 1000 sources, F ~ U(3, 100), PSF 0.94 deg,
exposure 100) is searched with the shipped detector on the default patch layout (CAR,
128 px of 0.625 deg, overlap 32 px, max_stretch 1.05). Each configuration runs ``--repeat``
times and reports the best wall time (and the CPU time of that run: on a machine shared with
other jobs, wall time is CPU time over the share of the cores this process gets); the
speed-up is t(1 worker) / t(2 workers). Workers
are threads of Dask's local pool (``client=None``); torch runs one intra-op thread, so one
worker uses one core. A first, untimed run warms up the detector and the patch layout.

Run: ``python benchmarks/healpix.py [--nside 512 1024] [--workers 1 2] [--repeat 1]``;
writes ``benchmarks/output/healpix.json``.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one worker = one core (numpy's BLAS too)

import argparse
import json
import platform
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from astrotrunc import (
    HealpixMap,
    find_sources,
    find_sources_healpix,
    healpix_patches,
    healpix_point_sources,
)
from astrotrunc.detection import default_detector
from astrotrunc.survey import (
    PAPER_PIXEL_SCALE,
    _healpix_patch,
    _target_nside,
    _working_map,
)


def control_speedup(seconds=2.0):
    """Speed-up of 2 threads over 1 on GIL-free work (numpy matmuls): what the machine allows.

    On a 2-core machine to itself this is about 2; on one shared with other jobs it says how
    much of a second core this process can get right now.
    """
    a = np.random.default_rng(0).random((400, 400))
    n = 1
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds / 4:
        a @ a
        n += 1

    def work():
        for _ in range(n):
            a @ a

    walls = {}
    for k in (1, 2):
        t0 = time.perf_counter()
        threads = [threading.Thread(target=work) for _ in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        walls[k] = time.perf_counter() - t0
    return 2 * walls[1] / walls[2]


def stages(sky):
    """Serial seconds of (summing the map down, filling all patches, detecting in them)."""
    res = PAPER_PIXEL_SCALE.to_value("deg")
    t0 = time.perf_counter()
    values, bad, nside, nest = _working_map(sky, res)
    t1 = time.perf_counter()
    patches = [_healpix_patch(values, bad, nside, nest, w, max(nside, _target_nside(res)))
               for w in healpix_patches()]
    t2 = time.perf_counter()
    for w, (data, mask) in zip(healpix_patches(), patches):
        find_sources(data, wcs=w, mask=mask)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nside", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--n-sources", type=int, default=1000)
    p.add_argument("--out", default=str(Path(__file__).parent / "output" / "healpix.json"))
    args = p.parse_args()

    rng = np.random.default_rng(0)
    lon = rng.uniform(0, 360, args.n_sources)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, args.n_sources)))
    flux = rng.uniform(3, 100, args.n_sources)
    torch.set_num_threads(1)
    default_detector()
    healpix_patches()  # layout planning is cached; not part of the timing
    warm = HealpixMap(healpix_point_sources(64, lon[:10], lat[:10], flux[:10], seed=0))
    find_sources_healpix(warm, workers=max(args.workers), progress=False)
    n_patches = len(healpix_patches())
    results = []
    for nside in args.nside:
        sky = HealpixMap(healpix_point_sources(nside, lon, lat, flux, seed=1))
        times = {w: np.inf for w in args.workers}
        cpu, n_det = {}, {}
        for _ in range(args.repeat):  # interleaved: a load change hits every setting alike
            for workers in args.workers:
                t0, c0 = time.perf_counter(), time.process_time()
                cat = find_sources_healpix(sky, workers=workers, progress=False)
                wall = time.perf_counter() - t0
                if wall < times[workers]:
                    times[workers], cpu[workers] = wall, time.process_time() - c0
                n_det[workers] = 0 if cat is None else len(cat)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            down, fill, detect = stages(sky)
        print(f"nside {nside:5d}: serial stages: sum down {down:.1f} s, fill 42 patches "
              f"{fill:.1f} s, detect in them {detect:.1f} s", flush=True)
        for workers in args.workers:
            best = times[workers]
            print(f"nside {nside:5d} ({sky.values.size / 1e6:5.1f} Mpix), {n_patches} patches, "
                  f"{workers} worker(s): {best:7.1f} s wall, {cpu[workers]:5.1f} s CPU  "
                  f"({n_det[workers]} sources)", flush=True)
            results.append({"nside": nside, "workers": workers, "seconds": best,
                            "cpu_seconds": cpu[workers],
                            "n_sources": n_det[workers], "n_patches": n_patches,
                            "serial_stages_s": {"sum_down": down, "fill": fill,
                                                "detect": detect}})
        if 1 in times and 2 in times:
            print(f"nside {nside:5d}: speed-up 1 -> 2 workers = {times[1] / times[2]:.2f}x",
                  flush=True)
    control = control_speedup()
    print(f"control: 2 threads of GIL-free numpy work run {control:.2f}x faster than 1 "
          "(2.0 on two free cores)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    speedups = {str(n): next(r["seconds"] for r in results if r["nside"] == n and r["workers"] == 1)
                / next(r["seconds"] for r in results if r["nside"] == n and r["workers"] == 2)
                for n in args.nside if {1, 2} <= set(args.workers)}
    out.write_text(json.dumps({
        "benchmark": "find_sources_healpix", "results": results, "speedup_1_to_2": speedups,
        "control_speedup_2_threads_gil_free": control, "n_injected": args.n_sources,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(),
        "machine": platform.machine(), "python": platform.python_version()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
