"""The segment stage's CPU side, off the loop that drives the network.

Each tile's labels (the model's per-tile post-processing, e.g. the instance watershed),
the tissue clipping and the store write run in a pool of worker processes fed through a
bounded queue, so the network never waits for them. The result does not depend on the
number of workers: every tile is computed by the same function from the same float32
output and written to its own chunk of the store (:class:`wsiseg.store.TileStore`, one
``pwrite`` per chunk). With 0 workers the same function runs in the calling process.

Hand-over: each window's output (classes x window² float32, 6.5 MB for the shipped model's
736 px windows) is copied once into a slot of a ring of shared memory that the workers see
(:class:`OutputRing`); only the tile's place and the slot's number travel through the
queue. Pickling the output through a pipe instead cost the network's loop more than the
post-processing itself.

Memory: at most ``depth`` window outputs in flight: the ring is ``depth`` slots of one output.
A worker that fails names the tile; a worker that dies (killed, out of memory) fails the
slide with a clear message; workers never outlive the stage (they are terminated when it
ends for any reason, and on Linux the kernel signals them if the stage's process dies).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import mmap
import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from .store import TileStore


@dataclass(frozen=True)
class TileJob:
    """One tile's CPU work: where it goes and the network's output over its read window
    (in a worker process: the :class:`OutputRing` slot that holds it)."""

    row: int
    col: int
    tx: int  # write region, target px
    ty: int
    tw: int
    th: int
    output: np.ndarray | None  # (K, n, n) float32 (array or tensor), the network's output over the read window
    slot: int = -1  # where the output is in the ring (then ``output`` is None), with its shape
    shape: tuple = ()


class OutputRing:
    """``slots`` buffers of ``slot_bytes`` in one anonymous shared mapping (``mmap(-1, ...)``:
    MAP_SHARED | MAP_ANONYMOUS), made before the workers are forked, so that the workers
    read the outputs the stage writes there without a copy through a pipe. It has no name
    in /dev/shm: nothing is left behind however the stage ends (the kernel frees the memory
    with the last process that maps it). A slot is busy from :meth:`put` until the tile's
    result has been collected (:meth:`release`).
    """

    def __init__(self, slots: int, slot_bytes: int):
        self.slot_bytes = int(slot_bytes)
        self._map = mmap.mmap(-1, max(1, slots * self.slot_bytes))
        self.free = list(range(slots))[::-1]

    def view(self, slot: int, shape: tuple) -> np.ndarray:
        """The float32 array of ``shape`` in ``slot`` (shared: no copy)."""
        n = math.prod(shape)
        return np.frombuffer(self._map, np.float32, count=n, offset=slot * self.slot_bytes).reshape(shape)

    def put(self, output) -> tuple[int, tuple]:
        """Copy ``output`` (a float32 array or tensor, on any device) into a free slot: (slot, shape)."""
        shape = tuple(int(d) for d in output.shape)
        if math.prod(shape) * 4 > self.slot_bytes:
            raise ValueError(
                f"a window output of shape {shape} does not fit the ring's slots of {self.slot_bytes} bytes"
            )
        slot = self.free.pop()
        view = self.view(slot, shape)
        if isinstance(output, np.ndarray):
            np.copyto(view, output, casting="same_kind")
        else:  # a tensor: one copy from the device (or host) memory into the slot
            import torch

            torch.from_numpy(view).copy_(output)
        return slot, shape

    def release(self, slot: int) -> None:
        self.free.append(slot)


class TileWriter:
    """labels -> tissue clip -> store, for one tile; the same in every process.

    ``labeler(out, keep, th, tw)`` is the model's per-tile post-processing
    (:meth:`wsiseg.models.ModelSpec.labeler`); each forked worker opens the store itself;
    ``tissue`` a boolean mask with one px per
    ``tissue_downsample`` level-0 px (None: no clipping); ``scale0`` level-0 px per target px.
    """

    def __init__(
        self, store_path: str, labeler, keep: slice, scale0: float, tissue=None, tissue_downsample: float = 1.0
    ):
        self.store_path, self.labeler, self.keep = store_path, labeler, keep
        self.scale0, self.tissue, self.tissue_downsample = scale0, tissue, tissue_downsample
        self._store = None

    def _tissue_in(self, job: TileJob) -> np.ndarray:
        """Tissue mask (nearest) over the write region, in target px."""
        s = self.scale0 / self.tissue_downsample  # tissue px per target px
        ys = np.minimum(((np.arange(job.ty, job.ty + job.th) + 0.5) * s).astype(np.int64), self.tissue.shape[0] - 1)
        xs = np.minimum(((np.arange(job.tx, job.tx + job.tw) + 0.5) * s).astype(np.int64), self.tissue.shape[1] - 1)
        return self.tissue[np.ix_(ys, xs)].astype(np.uint8)

    def __call__(self, job: TileJob, output=None) -> tuple[float, float]:
        """Write one tile (its output: ``output``, else ``job.output``); returns the CPU seconds of
        its post-processing and of its write."""
        import torch

        t0 = time.thread_time()  # this thread's: in the network's process another one may read meanwhile
        out = job.output if output is None else output
        out = torch.from_numpy(out) if isinstance(out, np.ndarray) else out
        labels = self.labeler(out, self.keep, job.th, job.tw)
        if self.tissue is not None:
            labels = labels * self._tissue_in(job)
        t1 = time.thread_time()
        if self._store is None:
            self._store = TileStore(self.store_path, "r+")
        self._store.write_chunk(job.row, job.col, labels)
        return t1 - t0, time.thread_time() - t1

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


_WRITER: TileWriter | None = None
_RING: OutputRing | None = None


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the process that started it dies (even by kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(writer: TileWriter, ring: OutputRing, parent: int) -> None:
    global _WRITER, _RING
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the stage, which ends the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the stage's handler, if it was inherited
    import torch

    torch.set_num_threads(1)  # one tile per process; the pool is the parallelism
    _WRITER, _RING = writer, ring  # forked: the parent's objects, the ring's shared memory included


def _run_job(job: TileJob) -> tuple[float, float]:
    return _WRITER(job, _RING.view(job.slot, job.shape))


class PostprocessError(RuntimeError):
    """A tile's post-processing failed, or a worker died: the slide fails with this message."""


class PostprocessPool:
    """Run :class:`TileWriter` on tiles, in ``workers`` processes (0: in this process), with at
    most ``depth`` tiles in flight; ``submit`` blocks while the queue is full.

    Use as a context manager: leaving it (normally, by an error, Ctrl-C or SIGTERM turned into
    an exception) waits for or cancels the tiles in flight and ends every worker.
    """

    def __init__(
        self,
        writer: TileWriter,
        workers: int,
        slide_name: str,
        depth: int | None = None,
        output_shape: tuple | None = None,
    ):
        self.writer, self.workers, self.slide_name = writer, int(workers), slide_name
        self.depth = depth or max(2, 2 * self.workers)
        self.post_cpu_s = 0.0  # CPU seconds of post-processing (labels, tissue clipping), all workers
        self.write_cpu_s = 0.0  # CPU seconds of store writes
        self._pending = []  # (future, job) in submission order
        self._pool = self.ring = None
        if self.workers > 0:
            if output_shape is None:
                raise ValueError("post-processing workers need the window output's shape (classes, n, n)")
            # the ring first: the workers are forked with it mapped
            self.ring = OutputRing(self.depth, math.prod(output_shape) * 4)
            # fork, all workers at once, now: before the DataLoader starts and before the network runs
            # (a stage script's __main__ cannot be re-imported, as 'spawn' would)
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("fork"),
                initializer=_init_worker,
                initargs=(writer, self.ring, os.getpid()),
            )
            self._pool.submit(int).result()  # launches every worker (fork: all at the first submit)

    def submit(self, job: TileJob) -> None:
        """Post-process and write one tile (its ``output`` is copied: the caller may reuse it)."""
        if self._pool is None:
            self._account(self._guard(lambda: self.writer(job), job))
            return
        while len(self._pending) >= self.depth or not self.ring.free:
            self._collect_oldest()
        slot, shape = self.ring.put(job.output)
        job = dataclasses.replace(job, output=None, slot=slot, shape=shape)
        try:
            self._pending.append((self._pool.submit(_run_job, job), job))
        except BrokenProcessPool as exc:
            self.ring.release(slot)
            raise self._died(job) from exc

    def _guard(self, fn, job: TileJob):
        try:
            return fn()
        except BrokenProcessPool as exc:
            raise self._died(job) from exc
        except Exception as exc:
            raise PostprocessError(
                f"{self.slide_name}: post-processing tile row {job.row} col {job.col} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _died(self, job: TileJob) -> PostprocessError:
        return PostprocessError(
            f"{self.slide_name}: a post-processing worker died (killed, or out of memory) while tile row "
            f"{job.row} col {job.col} was in flight; rerun the slide, with fewer tiling.postprocess_workers "
            "or more memory (mem_mb) if it recurs"
        )

    def _collect_oldest(self) -> None:
        fut, job = self._pending.pop(0)
        try:
            self._account(self._guard(fut.result, job))
        finally:
            self.ring.release(job.slot)

    def _account(self, cpu_s: tuple[float, float]) -> None:
        self.post_cpu_s += cpu_s[0]
        self.write_cpu_s += cpu_s[1]

    def drain(self) -> None:
        while self._pending:
            self._collect_oldest()

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            if cancel:
                for fut, _ in self._pending:
                    fut.cancel()
                procs = list(getattr(self._pool, "_processes", {}).values())
                self._pool.shutdown(wait=False, cancel_futures=True)
                for p in procs:  # do not wait for tiles nobody will read
                    if p.is_alive():
                        p.terminate()
                for p in procs:
                    p.join(timeout=10)
            else:
                self._pool.shutdown(wait=True)
            self._pool = None
        self._pending = []
        self.ring = None  # its memory goes with the last view of it
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.drain()
            except BaseException:
                self.close(cancel=True)
                raise
            self.close()
        else:
            self.close(cancel=True)
        return False
