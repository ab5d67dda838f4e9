"""A chunked simulation store on zarr, filled in parallel with Dask and streamed to the trainer.

Simulations are written chunk by chunk; each chunk is marked complete only after all its arrays
are written, so a fill that is killed leaves every completed chunk readable and a re-run of the
same `SimulationStore.fill` simulates only the missing chunks.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from ._utils import spawn_seed
from .nre._ddp import RankView, shard_indices

__all__ = ["SimulationStore", "StoreDataset", "chunk_seed"]

_MARKER = "_complete_rows"
_FORMAT = "astrotrunc-simulation-store"


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk ``index`` of a fill seeded with ``seed`` (independent streams).

    Parameters
    ----------
    seed : int
        The fill's seed.
    index : int
        The chunk.

    Returns
    -------
    int

    Examples
    --------
    >>> from astrotrunc.store import chunk_seed
    >>> chunk_seed(0, 1) == chunk_seed(0, 1) != chunk_seed(0, 2)
    True
    """
    return spawn_seed(seed, index)


def _simulate_chunk(simulator, size, seed):
    """Run on a Dask worker: one chunk of simulations as a dict of numpy arrays."""
    out = simulator(size, seed)
    if not isinstance(out, dict) or not out:
        raise TypeError(
            f"the simulator must return a non-empty dict of arrays, got {type(out).__name__}"
        )
    return {k: np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in out.items()}


class SimulationStore:
    """Named arrays of simulations (θ, maps, padded truth...) in a chunked zarr group.

    Every array has the samples along its first axis, chunked by ``chunk_size`` samples. A
    per-chunk completion record (a zarr array of row counts written after the data) says which
    chunks are readable.

    Parameters
    ----------
    path : str or path-like, optional
        Directory of the zarr store on disk; in memory when `None`.
    mode : {'a', 'r', 'w'}
        Open for appending (create if missing), read only, or overwrite.

    Examples
    --------
    >>> import numpy as np
    >>> from astrotrunc.store import SimulationStore
    >>> def simulator(n, seed):
    ...     rng = np.random.default_rng(seed)
    ...     theta = rng.uniform(size=(n, 2)).astype("f4")
    ...     return {"theta": theta, "x": theta + rng.normal(0, 0.1, (n, 2)).astype("f4")}
    >>> store = SimulationStore()
    >>> store.fill(simulator, 100, chunk_size=32, seed=0, client="sync", progress=False)
    >>> len(store), store.n_chunks, sorted(store.keys())
    (100, 4, ['theta', 'x'])
    """

    def __init__(self, path=None, mode="a"):
        if mode not in ("a", "r", "w"):
            raise ValueError(f"mode must be 'a', 'r' or 'w', got {mode!r}")
        self.path = None if path is None else Path(path).expanduser()
        if self.path is None:
            if mode == "r":
                raise ValueError("an in-memory store cannot be opened read-only")
            store = zarr.storage.MemoryStore()
        else:
            if mode == "r" and not self.path.exists():
                raise OSError(f"no simulation store at {self.path}")
            store = str(self.path)
        try:
            self._group = zarr.open_group(store, mode=mode)
        except (zarr.errors.ContainsArrayError, ValueError, FileNotFoundError) as exc:
            raise OSError(f"{self.path} is not a zarr simulation store: {exc}") from None
        attrs = self._group.attrs.asdict()
        if attrs and attrs.get("format") != _FORMAT:
            raise OSError(f"{self.path} is a zarr group but not an astrotrunc simulation store")

    # -- description -----------------------------------------------------------------------
    @property
    def _attrs(self) -> dict:
        return self._group.attrs.asdict()

    @property
    def chunk_size(self) -> int | None:
        """Samples per chunk (`None` before the first fill)."""
        return self._attrs.get("chunk_size")

    @property
    def seed(self) -> int | None:
        """Seed of the fill (`None` before the first fill)."""
        return self._attrs.get("seed")

    @property
    def capacity(self) -> int:
        """Number of rows requested so far (complete or not)."""
        return int(self._attrs.get("n", 0))

    @property
    def n_chunks(self) -> int:
        """Number of chunks of the requested rows."""
        return -(-self.capacity // self.chunk_size) if self.chunk_size else 0

    def keys(self) -> list:
        """Names of the stored arrays.

        Returns
        -------
        list of str
        """
        return [k for k in self._group.array_keys() if k != _MARKER]

    def __getitem__(self, key):
        """The zarr array ``key`` (rows of incomplete chunks hold fill values)."""
        if key == _MARKER or key not in self.keys():
            raise KeyError(f"no array {key!r} in the store; it holds {self.keys()}")
        return self._group[key]

    def _expected_rows(self, i: int, n=None) -> int:
        n = self.capacity if n is None else n
        return min(self.chunk_size, n - i * self.chunk_size)

    @property
    def complete_chunks(self) -> np.ndarray:
        """Indices of the chunks whose every row is written."""
        if not self.n_chunks:
            return np.zeros(0, dtype=int)
        rows = self._group[_MARKER][:]
        expected = np.array([self._expected_rows(i) for i in range(self.n_chunks)])
        return np.flatnonzero(rows == expected)

    def __len__(self) -> int:
        """Number of readable rows (in complete chunks)."""
        return int(sum(self._expected_rows(i) for i in self.complete_chunks))

    def __repr__(self) -> str:
        where = "memory" if self.path is None else str(self.path)
        return (f"<SimulationStore {where}: {len(self)}/{self.capacity} rows, "
                f"{len(self.complete_chunks)}/{self.n_chunks} chunks of {self.chunk_size}, "
                f"arrays {self.keys()}>")

    def read_chunk(self, index: int, keys=None) -> dict:
        """The rows of complete chunk ``index``.

        Parameters
        ----------
        index : int
            A complete chunk.
        keys : list of str, optional
            Arrays to read (all by default).

        Returns
        -------
        dict of `numpy.ndarray`
        """
        if not (0 <= index < self.n_chunks
                and int(self._group[_MARKER][index]) == self._expected_rows(index)):
            raise ValueError(f"chunk {index} of the store is not complete")
        start = index * self.chunk_size
        stop = start + self._expected_rows(index)
        return {k: self._group[k][start:stop] for k in (keys or self.keys())}

    def load(self, keys=None) -> dict:
        """All complete rows (for stores that fit in memory).

        Parameters
        ----------
        keys : list of str, optional
            Arrays to read (all by default).

        Returns
        -------
        dict of `numpy.ndarray`
        """
        chunks = self.complete_chunks
        if not len(chunks):
            raise ValueError("the simulation store is empty (no complete chunks)")
        parts = [self.read_chunk(int(i), keys) for i in chunks]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # -- filling -----------------------------------------------------------------------------
    def fill(self, simulator, n, *, chunk_size=1024, seed=0, client=None, max_pending=None,
             progress=True):
        """Simulate until the store holds ``n`` rows; only missing chunks are simulated.

        Parameters
        ----------
        simulator : callable
            ``simulator(n, seed) -> dict[str, numpy.ndarray]``: ``n`` simulations, each array
            with ``n`` rows (e.g. `PointSourceModel.simulate_arrays`). It must be picklable to
            run on separate processes or machines.
        n : int
            Total number of rows wanted (a store may be extended with a larger ``n``).
        chunk_size : int
            Rows per chunk (per simulator call); fixed when the store is first filled.
        seed : int
            Chunk ``i`` is simulated with seed ``chunk_seed(seed, i)``; fixed at the first fill.
        client : `distributed.Client`, str or None
            Dask client, or the address of a scheduler; `None` starts a small
            `~distributed.LocalCluster` (threads of this process) for the fill; ``"sync"``
            simulates in this thread without Dask.
        max_pending : int, optional
            Chunks in flight at once (bounds memory); twice the cluster's threads by default.
        progress : bool
            Show a progress bar.

        Returns
        -------
        None
            The store is filled in place; a killed fill loses only the chunks in flight.
        """
        n = int(n)
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self._configure(int(chunk_size), int(seed), n)
        done = set(self.complete_chunks.tolist())
        todo = [i for i in range(self.n_chunks) if i not in done]
        if not todo:
            return
        bar = tqdm(total=len(todo), desc="simulating", unit="chunk", disable=not progress)
        try:
            if isinstance(client, str) and client == "sync":
                for i in todo:
                    self._write_chunk(i, _simulate_chunk(simulator, self._expected_rows(i),
                                                         chunk_seed(seed, i)))
                    bar.update()
            else:
                self._fill_dask(simulator, todo, client, max_pending, bar)
        finally:
            bar.close()

    def _configure(self, chunk_size, seed, n):
        attrs = self._attrs
        if not attrs:
            if chunk_size < 1:
                raise ValueError(f"chunk_size must be positive, got {chunk_size}")
            self._group.attrs.update(
                {"format": _FORMAT, "chunk_size": chunk_size, "seed": seed, "n": 0}
            )
            self._group.create_array(_MARKER, shape=(0,), chunks=(1,), dtype="int64", fill_value=0)
            attrs = self._attrs
        if attrs["chunk_size"] != chunk_size or attrs["seed"] != seed:
            raise ValueError(f"this store was filled with chunk_size={attrs['chunk_size']} and "
                             f"seed={attrs['seed']}; a fill must use the same values (got "
                             f"chunk_size={chunk_size}, seed={seed})")
        if n > attrs["n"]:
            n_chunks = -(-n // chunk_size)
            self._group[_MARKER].resize((n_chunks,))
            if attrs["n"] % chunk_size:  # the old last chunk was partial: it is now incomplete
                self._group[_MARKER][attrs["n"] // chunk_size] = 0
            for k in self.keys():
                arr = self._group[k]
                arr.resize((n,) + arr.shape[1:])
            self._group.attrs["n"] = n

    def _write_chunk(self, i, arrays):
        rows = self._expected_rows(i)
        keys = self.keys()
        if keys and set(arrays) != set(keys):
            raise ValueError(
                f"the simulator returned arrays {sorted(arrays)}, the store holds {sorted(keys)}"
            )
        for k, v in arrays.items():
            if v.ndim == 0 or len(v) != rows:
                raise ValueError(f"the simulator returned {len(v) if v.ndim else 0} rows of {k!r} "
                                 f"for a chunk of {rows}")
            if k not in keys:
                self._group.create_array(k, shape=(self.capacity,) + v.shape[1:], dtype=v.dtype,
                                         chunks=(self.chunk_size,) + v.shape[1:])
            elif self._group[k].shape[1:] != v.shape[1:]:
                raise ValueError(
                    f"the simulator returned {k!r} of item shape {v.shape[1:]}, the store "
                    f"holds {self._group[k].shape[1:]}"
                )
        start = i * self.chunk_size
        for k, v in arrays.items():
            self._group[k][start:start + rows] = v
        self._group[_MARKER][i] = rows  # written last: the chunk is complete

    def _fill_dask(self, simulator, todo, client, max_pending, bar):
        from distributed import Client, LocalCluster, as_completed

        own_cluster = own_client = None
        if client is None:
            own_cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                       dashboard_address=None)
            client = own_client = Client(own_cluster)
        elif isinstance(client, str):
            client = own_client = Client(client)
        try:
            threads = sum(client.nthreads().values()) or 1
            window = int(max_pending or 2 * threads)
            seed = self.seed
            pending = iter(todo)

            def submit(i):
                return client.submit(
                    _simulate_chunk,
                    simulator,
                    self._expected_rows(i),
                    chunk_seed(seed, i),
                    pure=False,
                    key=f"astrotrunc-chunk-{i}-{seed}-{id(self)}",
                )

            futures = {}
            for i in pending:
                futures[submit(i)] = i
                if len(futures) >= window:
                    break
            done = as_completed(list(futures))
            for fut in done:
                i = futures.pop(fut)
                self._write_chunk(i, fut.result())
                fut.release()
                bar.update()
                nxt = next(pending, None)
                if nxt is not None:
                    new = submit(nxt)
                    futures[new] = nxt
                    done.add(new)
        finally:
            if own_client is not None:
                own_client.close()
            if own_cluster is not None:
                own_cluster.close()

    # -- streaming ---------------------------------------------------------------------------
    def dataset(
        self, batch_size=128, *, chunks=None, keys=None, shuffle=True, seed=None, prefetch=2
    ):
        """A `StoreDataset` of batches over complete chunks (all of them by default).

        Parameters
        ----------
        batch_size : int
            Rows per batch.
        chunks : sequence of int, optional
            Chunks to read (all complete ones by default).
        keys : list of str, optional
            Arrays to read.
        shuffle : bool
            Shuffle chunk order and rows within chunks.
        seed : int, optional
            Seed of the shuffling.
        prefetch : int
            Chunks read ahead in a background thread.

        Returns
        -------
        `StoreDataset`
        """
        chunks = self.complete_chunks if chunks is None else np.asarray(chunks, dtype=int)
        return StoreDataset(self, chunks, batch_size, keys=keys, shuffle=shuffle, seed=seed,
                            prefetch=prefetch)

    def batch_source(self, val_fraction=0.1, generator=None, keys=None, prefetch=2):
        """The trainer's view: a chunk-level validation split, shuffled prefetched batches.

        Parameters
        ----------
        val_fraction : float
            Fraction of the complete chunks held out for validation.
        generator : `torch.Generator`, optional
            Random source of the split.
        keys : list of str, optional
            Arrays to read.
        prefetch : int
            Chunks read ahead.

        Returns
        -------
        batch source
            An object with ``train_batches``, ``val_batches`` and ``n_batches`` (see
            `~astrotrunc.nre.Trainer`).
        """
        chunks = self.complete_chunks
        if len(chunks) == 0:
            raise ValueError("the simulation store is empty (no complete chunks): fill it first")
        if len(chunks) < 2:
            raise ValueError(
                "the simulation store has a single complete chunk; at least 2 are needed "
                "to hold out validation chunks (use a smaller chunk_size)"
            )
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        perm = chunks[torch.randperm(len(chunks), generator=gen).numpy()]
        n_val = min(max(1, int(round(val_fraction * len(chunks)))), len(chunks) - 1)
        return _StoreSource(self, np.sort(perm[n_val:]), np.sort(perm[:n_val]), gen, keys, prefetch)


class StoreDataset(torch.utils.data.IterableDataset):
    """Batches (dicts of tensors) streamed from complete chunks of a `SimulationStore`.

    Chunks are visited in a random order and rows shuffled across a buffer of two chunks; a
    background thread reads (and decompresses) the next chunks while batches are consumed. With a
    `torch.utils.data.DataLoader` (``batch_size=None``) and several workers, each worker streams
    its own share of the chunks.

    Parameters
    ----------
    store : `SimulationStore`
    chunks : sequence of int
        Chunks to stream.
    batch_size : int
    keys : sequence of str, optional
        Arrays to read (all by default).
    shuffle : bool
        Shuffle chunk order and rows.
    seed : int or `torch.Generator`, optional
        Shuffling seed; each pass (``iter``) draws a new order from it.
    prefetch : int
        Chunks read ahead.
    """

    def __init__(
        self, store, chunks, batch_size=128, *, keys=None, shuffle=True, seed=None, prefetch=2
    ):
        super().__init__()
        self.store, self.chunks = store, np.asarray(chunks, dtype=int)
        self.batch_size, self.keys, self.shuffle = int(batch_size), keys, bool(shuffle)
        self.prefetch = max(1, int(prefetch))
        self.generator = (
            seed
            if isinstance(seed, torch.Generator)
            else torch.Generator().manual_seed(
                int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)))
            )
        )
        self.wait_time = (
            0.0  # seconds spent waiting for chunks (the starvation the benchmark measures)
        )

    def __len__(self):
        rows = sum(self.store._expected_rows(int(i)) for i in self.chunks)
        return -(-rows // self.batch_size)

    def __iter__(self):
        chunks = self.chunks
        if self.shuffle:
            chunks = chunks[torch.randperm(len(chunks), generator=self.generator).numpy()]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            chunks = chunks[info.id::info.num_workers]
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(chunks, q, stop), daemon=True)
        reader.start()
        try:
            yield from self._batches(q)
        finally:
            stop.set()
            while reader.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    reader.join(0.05)

    def _read(self, chunks, q, stop):
        try:
            # open the arrays once per pass: zarr parses metadata on every open
            arrays = {k: self.store._group[k] for k in (self.keys or self.store.keys())}
            size, n = self.store.chunk_size, self.store.capacity
            for i in chunks:
                if stop.is_set():
                    return
                start = int(i) * size
                item = {k: a[start:min(start + size, n)] for k, a in arrays.items()}
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
            q.put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    def _batches(self, q):
        import time

        leftover = None
        while True:
            t0 = time.perf_counter()
            item = q.get()
            self.wait_time += time.perf_counter() - t0
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            chunk = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in item.items()}
            if leftover is not None:
                chunk = {k: torch.cat([leftover[k], v]) for k, v in chunk.items()}
            n = len(next(iter(chunk.values())))
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            n_full = n // self.batch_size * self.batch_size
            for s in range(0, n_full, self.batch_size):
                idx = order[s:s + self.batch_size]
                yield {k: v[idx] for k, v in chunk.items()}
            rest = order[n_full:]
            leftover = {k: v[rest] for k, v in chunk.items()} if len(rest) else None
        if leftover is not None:
            yield leftover


class _StoreSource:
    """`Trainer` batch source over a store: training chunks shuffled, validation chunks fixed."""

    checked = False

    def __init__(self, store, train_chunks, val_chunks, generator, keys, prefetch):
        self.store, self.train_chunks, self.val_chunks = store, train_chunks, val_chunks
        self.generator, self.keys, self.prefetch = generator, keys, prefetch
        self.last = None

    def train_batches(self, batch_size, epoch, rank=0, world_size=1):
        if world_size == 1:
            self.last = StoreDataset(self.store, self.train_chunks, batch_size, keys=self.keys,
                                     shuffle=True, seed=self.generator, prefetch=self.prefetch)
            return iter(self.last)
        # every rank draws the same chunk order from the shared generator, takes its share and
        # shuffles it with a generator of its own; all ranks stop after the same number of steps
        order = torch.as_tensor(self.train_chunks)[
            torch.randperm(len(self.train_chunks), generator=self.generator)]
        base = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        mine = shard_indices(order, rank, world_size).numpy()
        self.last = StoreDataset(self.store, mine, batch_size, keys=self.keys, shuffle=True,
                                 seed=torch.Generator().manual_seed(spawn_seed(base, rank)),
                                 prefetch=self.prefetch)
        return itertools.islice(iter(self.last), self.n_batches(batch_size, rank, world_size))

    def val_batches(self, batch_size, rank=0, world_size=1):
        mine = shard_indices(torch.as_tensor(self.val_chunks), rank, world_size, pad=False)
        return iter(StoreDataset(self.store, mine.numpy(), batch_size, keys=self.keys,
                                 shuffle=False, prefetch=self.prefetch))

    def n_batches(self, batch_size, rank=0, world_size=1):
        """Training batches per epoch: with several ranks, the fewest any rank has."""
        chunks = torch.as_tensor(self.train_chunks)
        return min(max(1, math.ceil(sum(self.store._expected_rows(int(i)) for i in
                                        shard_indices(chunks, r, world_size)) / batch_size))
                   for r in range(world_size))

    def shard(self, rank, world_size):
        return RankView(self, rank, world_size)
