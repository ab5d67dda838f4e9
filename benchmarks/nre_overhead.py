"""Engine overhead: `Trainer.fit` against a bare PyTorch loop on the same model and data (issue 3).

Both train the same `MarginalRatioEstimator` (same initial weights) on the same training and
validation split, with AdamW, the same cosine schedule, the same batch order generator and a
validation pass per epoch. The bare loop does nothing else; the engine adds its input checks,
loss bookkeeping, early-stopping state and history (and optionally an atomic checkpoint every
epoch). Prints the median wall time of several repeats and the overhead (target <= 10 %).

Run: ``python benchmarks/nre_overhead.py [--n 20000] [--epochs 5] [--repeats 5] [--threads 1]``
"""

import argparse
import copy
import statistics
import tempfile
import time

import torch

from astrotrunc.nre import MarginalRatioEstimator, Trainer


def bare_loop(model, train, val, epochs, batch_size, lr, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(train["x"])
    steps = epochs * -(-n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, lr * 0.02)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            j = perm[i:i + batch_size]
            loss = model.loss({k: v[j] for k, v in train.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(val["x"]), batch_size):
                model.loss({k: v[i:i + batch_size] for k, v in val.items()})


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    theta = torch.rand(args.n, 3, generator=g) * 6 - 3
    data = {"theta": theta, "x": theta + 0.5 * torch.randn(args.n, 3, generator=g)}
    # the engine's split, reproduced for the bare loop
    perm = torch.randperm(args.n, generator=torch.Generator().manual_seed(1))
    n_val = round(0.1 * args.n)
    train = {k: v[perm[n_val:]] for k, v in data.items()}
    val = {k: v[perm[:n_val]] for k, v in data.items()}
    torch.manual_seed(0)
    init = MarginalRatioEstimator(3, ["a", "b", "c"], hidden=64)

    def engine(checkpoints):
        model = copy.deepcopy(init)
        with tempfile.TemporaryDirectory() as tmp:
            Trainer(max_epochs=args.epochs, batch_size=args.batch_size, learning_rate=1e-3,
                    patience=10**6, progress=False, seed=1,
                    checkpoint_dir=tmp if checkpoints else None).fit(model, data)

    def bare():
        bare_loop(copy.deepcopy(init), train, val, args.epochs, args.batch_size, 1e-3, 1)

    runs = {"bare PyTorch loop": bare, "Trainer.fit": lambda: engine(False),
            "Trainer.fit + checkpoints": lambda: engine(True)}
    times = {k: [] for k in runs}
    bare()  # warm-up (imports, allocator)
    for _ in range(args.repeats):  # interleaved, so that machine load hits all alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    steps = args.epochs * -(-(args.n - n_val) // args.batch_size)
    print(f"{args.n} samples, {args.epochs} epochs, batch {args.batch_size}, {steps} steps, "
          f"{args.threads} thread(s), median of {args.repeats}")
    ref = statistics.median(times["bare PyTorch loop"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<28} {med:7.3f} s  ({1e3 * med / steps:.3f} ms/step)  overhead "
              f"{100 * (med / ref - 1):+6.1f} %")
    over = statistics.median(times["Trainer.fit"]) / ref - 1
    print(
        f"engine overhead {100 * over:+.1f} % (target <= 10 %): "
        f"{'PASS' if over <= 0.10 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
