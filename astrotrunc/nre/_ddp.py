"""Data-parallel training for `~astrotrunc.nre.Trainer`: process groups, shards and launching.

`Trainer.fit` trains in one of three ways:

* one process (the default);
* as one rank of a group launched the way ``torchrun`` does (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment, or a process group already
  initialised by the caller): this process joins the group and trains its shard;
* ``Trainer(nproc=K)`` with no such environment: `spawn_fit` starts K local processes that each
  set that environment and call `Trainer.fit`, and hands rank 0's result back to the caller.

Each rank draws a disjoint shard of the batch source (`shard`), DistributedDataParallel averages
the gradients, and the validation loss is summed over the ranks, so that every rank takes the same
steps and stops at the same epoch.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import socket
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..exceptions import AstrotruncWarning

_ENV = ("RANK", "WORLD_SIZE")


def launched() -> bool:
    """True when this process is one rank of a group (torchrun environment or initialised group)."""
    return (dist.is_available() and dist.is_initialized()) or all(k in os.environ for k in _ENV)


def env_rank() -> int:
    """This process's global rank (0 when not launched as a group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def local_world_size() -> int:
    """Processes of the group on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))


def check_nproc(nproc, device) -> int:
    """``nproc`` as an int, validated: at least 1; more than the cores (CPU) warns."""
    try:
        n = int(nproc)
    except (TypeError, ValueError):
        msg = f"nproc must be a positive integer, got {nproc!r}"
        raise ValueError(msg) from None
    if n != nproc or n < 1:
        msg = f"nproc must be a positive integer (processes to train with), got {nproc!r}"
        raise ValueError(msg)
    if n > 1 and device.type == "cuda":
        gpus = torch.cuda.device_count()
        if n > gpus:
            msg = f"nproc={n} processes need one GPU each with nccl, but {gpus} are visible"
            raise ValueError(msg)
    elif n > (os.cpu_count() or 1):
        warnings.warn(f"nproc={n} is more than the {os.cpu_count()} CPU cores of this machine: "
                      "the processes will compete for them", AstrotruncWarning, stacklevel=3)
    return n


class Group:
    """This process's place in the training group (``world_size`` 1 when training alone)."""

    def __init__(self, device, backend=None, timeout=1800.0):
        self.owned = False
        self.rank, self.world_size, self.backend = 0, 1, None
        self.device = device
        if not launched():
            return
        if not dist.is_initialized():
            if device.type == "cuda":
                local = int(os.environ.get("LOCAL_RANK", 0))
                self.device = torch.device("cuda", local)
                torch.cuda.set_device(self.device)
            backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
            try:
                dist.init_process_group(backend, init_method="env://",
                                        timeout=datetime.timedelta(seconds=float(timeout)))
            except (RuntimeError, ValueError) as exc:  # DistNetworkError is a RuntimeError
                addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                msg = (f"rank {os.environ.get('RANK')} could not join the training group at "
                       f"{addr} ({backend}): {exc}")
                raise RuntimeError(msg) from None
            self.owned = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.backend = str(dist.get_backend())
        # nccl needs its tensors on the GPU, gloo on the CPU
        self.comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum(self, *values) -> list:
        """The sums over the ranks of a few floats."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_int(self, value) -> int:
        """Rank 0's integer on every rank."""
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(t, 0)
        return int(t.item())

    def gather_rng(self) -> list:
        """The CPU RNG state of every rank (on rank 0; ``[]`` elsewhere)."""
        state = torch.get_rng_state()
        if not self.active:
            return [state]
        parts = [torch.empty_like(state) for _ in range(self.world_size)]
        if self.comm_device.type == "cuda":
            parts = [p.to(self.comm_device) for p in parts]
            dist.all_gather(parts, state.to(self.comm_device))
        else:
            dist.all_gather(parts, state)
        return [p.cpu() for p in parts] if self.rank == 0 else []

    def sync_buffers(self, module):
        """Rank 0's buffers (batch-norm statistics...) on every rank.

        DDP broadcasts them before each forward pass, so after the last one of an epoch each
        rank holds statistics of its own last batch: validation and checkpoints need one state.
        """
        if not self.active:
            return
        for buf in module.buffers():
            if self.comm_device.type == buf.device.type:
                dist.broadcast(buf, 0)
            else:
                t = buf.to(self.comm_device)
                dist.broadcast(t, 0)
                buf.copy_(t)

    def barrier(self):
        if self.active:
            dist.barrier()

    def close(self):
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


class _LossModule(torch.nn.Module):
    """``forward(batch) = estimator.loss(batch)``: the loss runs inside DDP's forward."""

    def __init__(self, estimator):
        super().__init__()
        self.estimator = estimator

    def forward(self, batch):
        return self.estimator.loss(batch)


def wrap(estimator, group):
    """A callable ``loss(batch)``: DDP-wrapped when the group has several ranks."""
    if not group.active:
        return estimator.loss
    from torch.nn.parallel import DistributedDataParallel

    ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(_LossModule(estimator), device_ids=ids)


# ----------------------------------------------------------------------------------------------
# Shards: each rank draws a disjoint part of the batch source
# ----------------------------------------------------------------------------------------------
def shard_indices(index, rank, world_size, pad=True):
    """Rank ``rank``'s part of ``index`` (`torch.utils.data.DistributedSampler` semantics).

    With ``pad`` the index is first extended by wrapping around to a multiple of
    ``world_size``, so every rank gets the same count (and takes the same number of steps).
    """
    index = torch.as_tensor(index)
    if world_size == 1:
        return index
    n = len(index)
    if pad and n and n % world_size:
        extra = world_size - n % world_size
        index = index.repeat(-(-extra // n) + 1)[:n + extra]
    return index[rank::world_size]


def shard(source, rank, world_size):
    """The rank's view of a batch source: its own ``shard`` method, else every k-th batch."""
    if world_size == 1:
        return source
    if hasattr(source, "shard"):
        return source.shard(rank, world_size)
    return _StridedSource(source, rank, world_size)


class RankView:
    """A batch source whose methods take ``rank`` and ``world_size``, seen by one rank."""

    def __init__(self, source, rank, world_size):
        self.source, self.kw = source, dict(rank=int(rank), world_size=int(world_size))
        self.checked = getattr(source, "checked", False)

    def train_batches(self, batch_size, epoch):
        return self.source.train_batches(batch_size, epoch, **self.kw)

    def val_batches(self, batch_size):
        return self.source.val_batches(batch_size, **self.kw)

    def n_batches(self, batch_size):
        return self.source.n_batches(batch_size, **self.kw)


class _StridedSource:
    """Any batch source: rank r takes batches r, r + k, ... (each rank iterates all of them).

    Training batches come in groups of ``world_size`` and an incomplete last group is dropped, so
    that every rank takes the same number of steps.
    """

    def __init__(self, source, rank, world_size):
        self.source, self.rank, self.world_size = source, rank, world_size
        self.checked = getattr(source, "checked", False)

    def train_batches(self, batch_size, epoch):
        it = iter(self.source.train_batches(batch_size, epoch))
        while True:
            group = list(itertools.islice(it, self.world_size))
            if len(group) < self.world_size:
                return
            yield group[self.rank]

    def val_batches(self, batch_size):
        return itertools.islice(self.source.val_batches(batch_size), self.rank, None,
                                self.world_size)

    def n_batches(self, batch_size):
        if not hasattr(self.source, "n_batches"):
            return None
        return self.source.n_batches(batch_size) // self.world_size


# ----------------------------------------------------------------------------------------------
# Launching K local processes (what torchrun does on one node)
# ----------------------------------------------------------------------------------------------
def free_port(addr="127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _check_port(addr, port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as exc:
            msg = (f"MASTER_PORT {port} on {addr} is in use ({exc.strerror}): unset MASTER_PORT "
                   "to pick a free port, or choose another one")
            raise ValueError(msg) from None


_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "OSError": OSError,
           "FloatingPointError": FloatingPointError}


def _worker(local_rank, nproc, addr, port, threads, trainer, estimator, data, resume, outdir):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR=addr, MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        history = trainer.fit(estimator, data, resume=resume)
    except BaseException as exc:
        Path(outdir, f"error-{local_rank}.json").write_text(json.dumps(
            {"type": type(exc).__name__, "message": str(exc), "time": time.time(),
             "traceback": traceback.format_exc()}))
        raise
    if local_rank == 0:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in estimator.state_dict().items()}
        meta = {"history": json.dumps([list(r) for r in history.as_array().tolist()]),
                "trainer": json.dumps(history.meta.get("trainer", {}))}
        save_file(state, str(Path(outdir, "result.safetensors")), metadata=meta)


def _start_method(threads) -> str:
    """'fork' where it is safe, else 'spawn'.

    Forking needs no re-import and no pickling, but a forked child of a process that has run a
    parallel torch operation inherits OpenMP's thread-pool state without its threads and hangs
    in its first parallel operation when it uses more than one thread (seen in the test suite);
    CUDA cannot be forked at all. So: fork for one thread per process on the CPU only.
    """
    import multiprocessing

    if (threads == 1 and "fork" in multiprocessing.get_all_start_methods()
            and not torch.cuda.is_initialized()):
        return "fork"
    return "spawn"


def spawn_fit(trainer, estimator, data, resume, nproc):
    """Train in ``nproc`` new local processes; the estimator gets rank 0's weights.

    Returns the history rows and the trainer settings recorded by rank 0. The processes are
    forked where that is safe (`_start_method`: the estimator and data are then inherited),
    spawned otherwise (they are pickled).
    """
    import torch.multiprocessing as mp
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.multiprocessing.spawn import ProcessException

    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in os.environ:
        port = int(os.environ["MASTER_PORT"])
        _check_port(addr, port)
    else:
        port = free_port(addr)
    threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // nproc)
    method = _start_method(threads)
    if method == "fork":
        # the first optimiser imports torch._dynamo (seconds): once here, not in every child
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    with tempfile.TemporaryDirectory(prefix="astrotrunc-ddp-") as outdir:
        try:
            mp.start_processes(_worker, args=(nproc, addr, port, threads, trainer, estimator,
                                              data, resume, outdir),
                               nprocs=nproc, join=True, start_method=method)
        except ProcessException as exc:
            raise _rank_error(outdir, nproc, exc) from None
        path = str(Path(outdir, "result.safetensors"))
        state = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
    estimator.load_state_dict(state)
    return json.loads(meta["history"]), json.loads(meta["trainer"])


def _rank_error(outdir, nproc, exc):
    """The first failing rank's exception, re-raised in the caller with its type when it is ours."""
    reports = {int(p.stem.split("-")[1]): json.loads(p.read_text())
               for p in Path(outdir).glob("error-*.json")}
    if not reports:
        return RuntimeError(f"a training process of {nproc} died: {exc}")
    # the first to fail is the cause; the others then lose their connections to it
    rank, err = min(reports.items(), key=lambda item: item[1]["time"])
    text = f"training process {rank} of {nproc} failed: {err['message']}"
    if "timed out" in err["message"].lower():
        text += " (another process stopped answering for longer than the timeout)"
    kind = _ERRORS.get(err["type"], RuntimeError)
    return kind(text if kind is not RuntimeError else f"{text} ({err['type']})")
