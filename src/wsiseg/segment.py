"""Segment stage (rule 'segment'): stream the tile plan through the network, keep each
tile's write region.

A pipeline in which the network's loop does nothing but feed the network:

    DataLoader workers      read, decode and resample each read window (:class:`TileDataset`);
                            without workers a helper thread of this process reads the next
                            batch while the loop hands the last one over (:class:`ReadAhead`)
    this process            the network, its BatchNorms folded into its convolutions, on the job's
                            device in channels_last (CUDA: bf16/fp16 autocast, cuDNN autotuning,
                            pinned memory, non-blocking copies; without autocast IEEE float32, no
                            TF32)
    post-processing workers the model's per-tile labels (e.g. the instance watershed), tissue
                            clipping and the store write (:mod:`wsiseg.postpool`), fed through a
                            bounded queue

On the CPU the stage runs as network streams by default (:func:`run_streams`,
:mod:`wsiseg.streams`): one process per CPU of the job, each taking the plan's next tile,
reading it, running the network on one thread and post-processing and writing it, so that one
stream's reading and post-processing overlap the others' networks. ``tiling.streams: 1`` runs
the pipeline above in one process on the CPU too.

Splitter/merger split as in MONAI: :class:`TileDataset` yields (window, tile index); a
merger has ``aggregate(tile, output, keep)`` and ``finalize()``, where ``output`` is the
network's output over the whole read window and ``keep`` the slice of it that is the
tile's write region. :class:`StoreMerger` hands each tile to the post-processing pool,
which writes it into a :class:`TileStore`, the workflow's intermediate. The store does
not depend on the number of workers of either kind.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .errors import SlideError
from .geometry import Geometry, read_window
from .postpool import PostprocessPool, TileJob, TileWriter
from .slide import open_slide
from .store import TileStore
from .tiling import TileSpec, plan_rows
from .unet import fold_batchnorm, softmax_tta

log = logging.getLogger("wsiseg.segment")


TRIM_EVERY = 16  # windows read (or tiles through the network) between two trim_heap() calls


def trim_heap() -> None:
    """Give the heap's free pages back to the operating system (glibc's ``malloc_trim``; nothing
    where there is no glibc).

    Each window allocates a few big, short-lived arrays (the region read, the resampled window,
    its float copy, the batch). glibc serves them from the heap once its dynamic mmap threshold
    has risen to their size, and the heap then grows with every window read: a DataLoader
    reading worker went from 390 to 890 MB over 200 windows of CMU-1-Small-Region, and about
    7 MB per tile on a large slide (benchmarks/segment_memory.py). Trimming every
    :data:`TRIM_EVERY` windows keeps it flat (280-320 MB) for about 2 ms of system time per
    window; a fixed mmap threshold (``mallopt``) keeps it flat too, at about 9 ms per window.

    Nothing in a process whose heap :func:`network_heap` keeps: a trim there gave the network's
    activations back, and the next window faulted them in again (about 90,000 page faults per
    trim, the network 2-11 % slower inside the stage than alone: benchmarks/README.md).
    """
    if _LIBC is not None and not _heap_kept():
        _LIBC.malloc_trim(0)


def _heap_kept() -> bool:
    """Whether :func:`network_heap` has set this process's heap (its cached answer; False before
    the first call, and where a caller has put another function in its place)."""
    info = getattr(network_heap, "cache_info", None)
    return bool(info is not None and info().currsize and network_heap())


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _libc()

#: glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: :func:`network_heap`: up to this much free memory stays at the heap's top between two
#: :func:`trim_heap` calls (more than the network's working set at any window size in use)
NETWORK_HEAP_KEEP = 1 << 30


@functools.cache
def network_heap() -> bool:
    """Serve the network's activations on the CPU from the heap instead of fresh mappings
    (glibc's ``mallopt``; nothing where there is no glibc). True when set.

    An activation of the shipped U-Net over a 736-px window is 69 MB (32 channels, float32),
    above the largest size glibc's dynamic mmap threshold reaches (32 MB), so each one was a
    fresh ``mmap`` whose pages the kernel faulted in and zeroed, and unmapped on release: about
    80,000 page faults per window, a quarter of the network's time on 2 CPUs spent in the kernel
    (benchmarks/network_heap.py). Here glibc maps nothing (``M_MMAP_MAX`` 0, which every glibc
    accepts; older ones, 2.34 for one, refuse an ``M_MMAP_THRESHOLD`` above 32 MB) and keeps up to
    :data:`NETWORK_HEAP_KEEP` free at the heap's top, so each window reuses the pages the one
    before freed. The process keeps about the network's peak working set, which it reached
    anyway, and :func:`trim_heap` leaves that heap alone from then on (with no mapping left to
    glibc, the windows read and post-processed in this process reuse it too: flat in tiles,
    benchmarks/segment_memory.py). The arithmetic is the same, and so is every output, bit for
    bit (tests/test_segment.py).

    Process-wide and for the rest of the process (glibc then stops moving its thresholds by
    itself; later calls only return the first one's answer), so called by the process that runs
    the network on the CPU (segment, train, evaluate), once its reading or crop workers are
    forked: they keep glibc's defaults.
    """
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, NETWORK_HEAP_KEEP) and _LIBC.mallopt(_M_MMAP_MAX, 0))


class TileDataset(Dataset):
    """Read windows of the plan. Each DataLoader worker opens its own slide handle once."""

    def __init__(self, slide_path: str, slide_name: str, mpp: float | None, geom: Geometry, plan):
        """``plan``: the tile plan, a DataFrame or its rows (:func:`wsiseg.tiling.plan_rows`)."""
        self.slide_path, self.slide_name, self.mpp = slide_path, slide_name, mpp
        self.geom = geom
        self.windows = np.array([(r.wx, r.wy, r.n) for r in plan_rows(plan)], np.int64).reshape(-1, 3)
        self._slide = None
        self._owner = None
        self._reads = 0

    def __len__(self) -> int:
        return len(self.windows)

    def _handle(self):
        info = get_worker_info()
        owner = info.id if info is not None else -1
        if self._slide is None or self._owner != owner:
            self._slide = open_slide(self.slide_path, self.slide_name, self.mpp)
            self._owner = owner
        return self._slide

    def __getitem__(self, i: int):
        """(window as n x n x 3 uint8, plan row, error message or '', CPU seconds); zeros for a
        window that could not be read. :func:`collate_windows` makes the batch."""
        t0 = time.thread_time()  # this read's: another thread of the process may post-process meanwhile
        self._reads += 1
        if self._reads % TRIM_EVERY == 0:
            trim_heap()
        wx, wy, n = self.windows[i]
        try:
            img = read_window(self._handle(), self.geom, int(wx), int(wy), int(n))
        except SlideError as exc:
            # a corrupt tile: OpenSlide's handle stays in an error state, so reopen it
            if self._slide is not None:
                self._slide.close()
            self._slide = None
            return np.zeros((int(n), int(n), 3), np.uint8), i, exc.problem, time.thread_time() - t0
        return img, i, "", time.thread_time() - t0


def collate_windows(items):
    """A batch of :class:`TileDataset` items: (windows as N x n x n x 3 float in [0, 1], plan rows,
    error messages, CPU seconds of reading them, the division included).

    Channels last, as read: permuted to N x 3 x n x n, the batch is already in the channels_last
    layout the network runs in (:func:`_loop`), so nothing transposes a window. The division is
    numpy's, in float32, into the batch: the same values as torch's (each uint8 exactly in
    float32, divided by 255 with IEEE rounding), and no torch kernel runs here, so the thread that
    reads for the network's process without workers (:class:`ReadAhead`) starts no OpenMP team
    of its own, whose threads took CPU from the network's: with torch's division there, the
    network's calls took 4-6 % longer on a 2-CPU job (benchmarks/README.md). In a DataLoader
    worker the batch is made in shared memory, as torch's default collate does, and reaches the
    loop without a copy; each window is divided into it once (torch's collate copied a float
    window into the batch)."""
    t0 = time.thread_time()
    imgs, idx, errors, read_s = zip(*items)
    batch = torch.empty((len(imgs), *imgs[0].shape), dtype=torch.float32)
    if get_worker_info() is not None:
        batch.share_memory_()
    out = batch.numpy()
    for j, img in enumerate(imgs):
        np.divide(img, np.float32(255.0), out=out[j], dtype=np.float32)
    read_s = np.array(read_s, np.float64)
    read_s[0] += time.thread_time() - t0
    return batch, torch.tensor(idx, dtype=torch.int64), list(errors), torch.from_numpy(read_s)


class ReadAhead:
    """The loader's batches, each read beside the hand-over of the one before last when the
    windows are read in the network's process (a loader without workers).

    Without reading workers, reading a batch, the network's call and the hand-over (with the
    per-tile post-processing, without post-processing workers) took turns in one thread, and
    while that thread read or post-processed, the job's other CPUs idled. :meth:`start` is
    called once the network is done with a batch: a helper thread reads the next batch while
    the loop hands the last one over, so the two share the job's CPUs; :meth:`get` waits for
    it. No read runs beside the network's call (on the CPU it would take cores from the
    network's threads). The batches and their order are the loader's; with reading workers
    the loader reads ahead itself, and this only iterates it.

    On a 2-CPU job it hides about half of the reading (the loop waited 0.13-0.19 s for windows
    per 10-15 tiles instead of 0.24-0.34 s); the stage was 1 % slower to 2 % faster, within the
    machine's noise (benchmarks/README.md, ``gpu_feed.py --read-ahead``). Jobs of 3-7 CPUs,
    whose network is faster while reading and post-processing are not, should gain more; not
    measured (2-core machines).
    """

    def __init__(self, loader: DataLoader):
        self._batches = iter(loader)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wsiseg-read") if loader.num_workers == 0 else None
        self._next = None

    def start(self) -> None:
        """Start reading the next batch (a no-op with reading workers, or if already started)."""
        if self._pool is not None and self._next is None:
            self._next = self._pool.submit(next, self._batches, None)

    def get(self):
        """The next batch; None at the end. A reading error is raised here."""
        if self._next is None:
            return next(self._batches, None)
        pending, self._next = self._next, None
        return pending.result()

    def close(self) -> None:
        """Wait for a read in flight (one batch at most) and end the helper thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class StoreMerger:
    """MONAI-style merger (``aggregate``/``finalize``; ``abort`` on failure): the labels of each
    write region into a chunked store (chunk = tile), off the network's loop.

    ``labels(out, keep, th, tw)`` turns a window's output into the write region's uint8
    labels: the model's per-tile post-processing, a small callable without the network
    (:meth:`~wsiseg.models.ModelSpec.labeler`; default: argmax). ``tissue`` (a boolean mask,
    one px per ``tissue_downsample`` level-0 px) clips them. With ``workers`` > 0 that work and
    the store writes run in worker processes (:mod:`wsiseg.postpool`), which get each output
    through shared memory sized for ``channels`` (the network's output classes) x the window;
    the store is the same whatever the number.
    """

    def __init__(
        self,
        path: str,
        geom: Geometry,
        spec: TileSpec,
        tissue=None,
        tissue_downsample: float = 1.0,
        labels=None,
        workers: int = 0,
        slide_name: str = "",
        depth: int | None = None,
        channels: int | None = None,
    ):
        from .models.spec import TileLabeler

        self.store = TileStore.create(path, geom.height, geom.width, spec.tile_size)
        self.geom, self.spec = geom, spec
        writer = TileWriter(
            path, labels or TileLabeler(None, geom.target_mpp), spec.keep, geom.scale0, tissue, tissue_downsample
        )
        side = spec.window - 2 * spec.out_offset  # the network's output over a read window
        self.pool = PostprocessPool(
            writer,
            workers,
            slide_name or os.path.basename(path),
            depth=depth,
            output_shape=None if channels is None else (int(channels), side, side),
        )

    def aggregate(self, tile, out: torch.Tensor, keep: slice) -> None:
        assert keep == self.spec.keep
        self.pool.submit(
            TileJob(
                int(tile.row),
                int(tile.col),
                int(tile.tx),
                int(tile.ty),
                int(tile.tw),
                int(tile.th),
                out,
            )
        )

    def warm_up(self) -> None:
        """Load what the first tile's post-processing in this process needs (the labeler's
        imports); nothing when worker processes post-process. :func:`run_segmentation` calls it
        in a thread beside the first batch's network call."""
        warm = getattr(self.pool.writer.labeler, "warm_up", None)
        if self.pool.workers == 0 and warm is not None:
            warm()

    def finalize(self) -> TileStore:
        self.pool.drain()
        self.pool.close()
        return self.store

    def abort(self) -> None:
        """End the workers now, without waiting for the tiles in flight (errors, Ctrl-C, SIGTERM)."""
        self.pool.close(cancel=True)


def device_facts(device: torch.device) -> dict:
    """The device the network ran on, for provenance: its name and, for a GPU, the CUDA version."""
    from .provenance import cpu_name

    if device.type == "cuda":
        return dict(device_name=torch.cuda.get_device_name(device), cuda_version=torch.version.cuda)
    return dict(device_name=cpu_name(), cuda_version=None)


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16: AMD Zen 4 and
    later, Intel Cooper Lake, Sapphire Rapids and later), where oneDNN's bf16 convolutions run
    the shipped U-Net about twice as fast as float32 (benchmarks/cpu_bf16.py); elsewhere they
    are emulated and slower. From Linux's /proc/cpuinfo; False where it cannot tell."""
    from .provenance import cpuinfo

    return bool({"avx512_bf16", "amx_bf16"} & set((cpuinfo("flags") or "").split()))


def network_precision(device: torch.device, amp: bool, cpu_bf16: bool) -> str:
    """The network's arithmetic in :func:`run_segmentation` with these settings: 'float32' (on a
    GPU IEEE float32: no TF32), or the autocast dtype, 'bfloat16' or 'float16' (a GPU without bf16)."""
    if device.type == "cuda":
        return ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if amp else "float32"
    return "bfloat16" if cpu_bf16 else "float32"


def pick_device(requested: str, log_fn=log.info) -> torch.device:
    """'auto' -> CUDA when available; 'cuda' without CUDA falls back to CPU with a warning.

    A job that sees several GPUs (a multi-GPU workstation; a cluster job sees the one it was
    given) takes one that no other job holds (:func:`wsiseg.gpus.claim`), and makes it the
    process's current device."""
    if requested in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if n < 2:
            return torch.device("cuda")
        from . import gpus

        try:
            i, alone = gpus.claim(gpus.device_keys(torch))
        except OSError as e:  # the lock folder cannot be written: run as a job that sees one GPU does
            log_fn(f"WARNING: {n} GPUs visible, but none could be claimed ({e}); running on cuda:0")
            return torch.device("cuda")
        torch.cuda.set_device(i)
        log_fn(
            f"{n} GPUs visible: running on cuda:{i}, "
            + (
                "which no other wsiseg job holds"
                if alone
                else f"shared: all {n} are held by other wsiseg jobs of this user (device: cuda with "
                f"--resources gpu={n} runs one job per GPU)"
            )
        )
        return torch.device("cuda", i)
    # a scheduler that gave this job a GPU says so (SLURM sets CUDA_VISIBLE_DEVICES for --gpus)
    granted = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    granted = f" (the job was given GPU {granted})" if granted not in ("", "-1", "NoDevFiles") else ""
    if requested in ("cuda", "gpu") or (requested == "auto" and granted):
        log_fn(f"WARNING: a GPU was requested{granted} but CUDA is not available here; running the model on the CPU")
    return torch.device("cpu")


def inference_network(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` as the segment stage runs it on ``device`` (benchmarks time it so too): in eval
    mode, its BatchNorms folded into its convolutions (:func:`wsiseg.unet.fold_batchnorm`, a copy;
    10-17 % of the shipped U-Net's CPU time), with NHWC activations on every device: tensor cores
    on CUDA, and oneDNN's NHWC convolutions on the CPU (1.7x the shipped U-Net's contiguous speed
    on 2 cores: benchmarks/README.md, net_layout.py). In channels_last before the fold as well: a
    TorchScript network is frozen in the layout it has. ``model`` itself is moved to ``device``
    and channels_last, in place, as ``nn.Module.to`` does."""
    nhwc = torch.channels_last
    return fold_batchnorm(model.to(device).eval().to(memory_format=nhwc)).to(memory_format=nhwc)


def run_segmentation(
    slide_path: str,
    slide_name: str,
    mpp: float | None,
    geom: Geometry,
    spec: TileSpec,
    plan,
    model: torch.nn.Module,
    merger,
    device: torch.device,
    batch_size: int = 8,
    workers: int = 0,
    amp: bool = True,
    cpu_bf16: bool = False,
    log_fn=log.info,
    log_every_s: float = 10.0,
    max_unreadable_fraction: float = 0.0,
    unreadable: list | None = None,
    tta: bool = False,
    timings: dict | None = None,
    stream=None,
):
    """Run ``model`` over every tile of ``plan``; hand each tile's kept output to ``merger``.

    With ``tta`` each window goes through the model in its 8 flips/rotations and the
    merger gets the log of the averaged probabilities (argmax and softmax as for
    logits), 8 times the work for smoother, more accurate masks.

    ``amp``: on CUDA the network runs under autocast (bfloat16 where the GPU has it, else
    float16); ``cpu_bf16``: on the CPU under bfloat16 autocast (:func:`cpu_bf16_native` says
    where that pays). On the CPU, in either precision, each output px is the one of a single
    pass of the network over the whole mirror-padded image in that precision, bit for bit
    (tests/test_segment.py). On a GPU without ``amp`` the convolutions run in IEEE float32 (this
    turns off cuDNN's TF32, which PyTorch allows by default and which rounds their inputs to
    10 bits of mantissa): the labels are then those of one pass, px for px, the logits to about
    1e-5 (cuDNN's kernels differ with the input's shape); under autocast a few px in 10,000 at
    class boundaries differ, as much as between batch sizes of one pass (benchmarks/exactness.py
    on an H200; tests/test_segment.py on a GPU machine).

    A tile whose pixels cannot be decoded is left as background (0), logged and
    appended to ``unreadable`` as (row, col, message); if more than
    ``max_unreadable_fraction`` of the tiles are unreadable the slide fails.

    ``timings`` (a dict) receives ``read_cpu_s``, the CPU seconds of reading the windows
    (in the DataLoader workers), ``network_s``, the wall time of the network's calls and of
    waiting for their outputs on the CPU, and ``wait_s``, the wall time the loop waited for
    the next batch of windows: on a GPU, at most the time the network waited for data (the
    GPU may still be busy with the batch before, which this process hands to the merger only
    once the next one is launched).

    The merger gets each batch's tiles after the next batch has gone to the network (on the
    last batch, at the end), in plan order; a merger keeps what it needs of ``output``.

    ``stream``: (:class:`wsiseg.streams.SharedTiles`, :class:`wsiseg.streams.Tally`, i) when this
    process is network stream i of several (:func:`run_streams`): it takes its tiles of ``plan``
    from the shared counter, counts its unreadable tiles into the slide's (the limit is the
    slide's) and its progress into the tally, and logs no progress of its own.
    """
    unreadable = [] if unreadable is None else unreadable
    cuda = device.type == "cuda"
    model = inference_network(model, device)
    if cuda:  # cuDNN picks its fastest kernels for the one window size; float32 is float32
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False  # autocast's bf16/fp16 convolutions are not affected
    rows = plan_rows(plan)  # a DataFrame (tests, benchmarks) or the job's rows, once
    ds = TileDataset(slide_path, slide_name, mpp, geom, rows)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        collate_fn=collate_windows,
        num_workers=workers,
        shuffle=False,
        sampler=None if stream is None else stream[0],
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )
    keep = spec.keep
    use_amp = amp if cuda else cpu_bf16
    amp_dtype = getattr(torch, network_precision(device, True, True))  # the autocast dtype, when used
    t0 = time.monotonic()
    timings = {} if timings is None else timings
    timings.update(read_cpu_s=0.0, network_s=0.0, wait_s=0.0)
    try:
        _loop(
            loader,
            model,
            merger,
            device,
            keep,
            use_amp,
            amp_dtype,
            tta,
            rows,
            unreadable,
            slide_name,
            len(ds),
            max_unreadable_fraction,
            log_fn,
            log_every_s,
            t0,
            timings,
            stream,
        )
    except BaseException:
        abort = getattr(merger, "abort", None)
        if abort is not None:
            abort()
        raise
    return merger.finalize()


def progress_line(slide_name: str, done: int, n_tiles: int, seconds: float) -> str:
    """The stage's progress log line: tiles done of the slide's, tiles/s, seconds to go."""
    rate = done / max(seconds, 1e-9)
    return (
        f"{slide_name}: {done}/{n_tiles} tiles ({100 * done / max(n_tiles, 1):.0f}%), {rate:.2f} tiles/s, "
        f"eta {math.ceil((n_tiles - done) / max(rate, 1e-9))} s"
    )


def run_streams(
    streams: int,
    threads: int,
    slide_path: str,
    slide_name: str,
    mpp: float | None,
    geom: Geometry,
    spec: TileSpec,
    plan,
    model: torch.nn.Module,
    merger: StoreMerger,
    log_fn=log.info,
    log_every_s: float = 10.0,
    unreadable: list | None = None,
    timings: dict | None = None,
    **kw,
):
    """:func:`run_segmentation` on the CPU as ``streams`` network streams (:mod:`wsiseg.streams`):
    forked processes of ``threads`` torch threads each, every one reading, running the network
    on, post-processing and writing the tiles of ``plan`` it takes from a shared counter, into
    ``merger``'s store (a :class:`StoreMerger` without post-processing workers: each stream
    post-processes its own tiles). The store is the one :func:`run_segmentation` writes with the
    network on ``threads`` threads, byte for byte, whatever the number of streams. ``kw``
    (batch_size, cpu_bf16, max_unreadable_fraction, tta) go to each stream's
    :func:`run_segmentation` as they are.

    Fork-safe only if this process has run torch on one thread alone so far (see
    :mod:`wsiseg.streams`). ``unreadable`` gets the slide's unreadable tiles in plan order;
    ``timings`` the reading CPU seconds of all streams and, for ``network_s`` and ``wait_s``,
    their mean over the streams (each stream's share of the wall time is what they say)."""
    from .streams import SharedTiles, Tally, run_forked

    assert merger.pool.workers == 0, "each network stream post-processes its own tiles"
    merger.warm_up()  # the post-processing's imports once, here, not in every stream
    rows = plan_rows(plan)
    tiles, tally = SharedTiles(len(rows)), Tally(streams)
    t0 = time.monotonic()

    def work(i):
        torch.set_num_threads(threads)
        got, bad = {}, []
        run_segmentation(
            slide_path,
            slide_name,
            mpp,
            geom,
            spec,
            rows,
            model,
            merger,
            torch.device("cpu"),
            workers=0,
            log_fn=log_fn,
            unreadable=bad,
            timings=got,
            stream=(tiles, tally, i),
            **kw,
        )
        return dict(timings=got, unreadable=bad, post_cpu_s=merger.pool.post_cpu_s, write_cpu_s=merger.pool.write_cpu_s)

    def progress():
        line = progress_line(slide_name, tally.total_done(), len(rows), time.monotonic() - t0)
        log_fn(f"{line} ({streams} network streams)")

    results = run_forked(streams, work, slide_name, tick=progress, tick_s=log_every_s, log_fn=log_fn)
    progress()
    order = {(int(r.row), int(r.col)): k for k, r in enumerate(rows)}
    bad = sorted((b for r in results for b in r["unreadable"]), key=lambda b: order[(b[0], b[1])])
    if unreadable is not None:
        unreadable.extend(bad)
    if timings is not None:
        timings.update(
            read_cpu_s=sum(r["timings"]["read_cpu_s"] for r in results),
            network_s=sum(r["timings"]["network_s"] for r in results) / streams,
            wait_s=sum(r["timings"]["wait_s"] for r in results) / streams,
        )
    merger.pool.post_cpu_s += sum(r["post_cpu_s"] for r in results)
    merger.pool.write_cpu_s += sum(r["write_cpu_s"] for r in results)
    return merger.finalize()


def _loop(
    loader,
    model,
    merger,
    device,
    keep,
    use_amp,
    amp_dtype,
    tta,
    rows,
    unreadable,
    slide_name,
    n_tiles,
    max_unreadable_fraction,
    log_fn,
    log_every_s,
    t0,
    timings,
    stream=None,
):
    last, done = t0, 0
    tally = None if stream is None else stream[1]

    def hand_over(out, ready, idx, errors):
        """The per-tile work of one batch the network is done with: to the merger (its
        post-processing pool), unreadable tiles logged. ``ready``: the CUDA event after the
        batch's copy to the host (None on the CPU)."""
        nonlocal last, done
        if ready is not None:
            t_sync = time.monotonic()
            ready.synchronize()
            timings["network_s"] += time.monotonic() - t_sync
        for j, i in enumerate(idx.tolist()):
            tile = rows[i]
            if errors[j]:
                unreadable.append((int(tile.row), int(tile.col), errors[j]))
                log_fn(
                    f"WARNING {slide_name}: tile row {tile.row} col {tile.col} (level-0 x={tile.x0} "
                    f"y={tile.y0}) could not be read and is left as background: {errors[j]}"
                )
                bad = len(unreadable) if tally is None else tally.add_unreadable()  # the slide's so far
                if bad > max_unreadable_fraction * n_tiles:
                    raise SlideError(
                        slide_name,
                        f"{bad} of {n_tiles} tiles could not be decoded, more than "
                        f"tiling.max_unreadable_fraction={max_unreadable_fraction:g} allows (first: tile row "
                        f"{unreadable[0][0]} col {unreadable[0][1]}: {unreadable[0][2]})",
                        "the file is damaged: re-export or re-scan it, or raise tiling.max_unreadable_fraction "
                        "to accept unreadable regions as background",
                    )
                continue
            merger.aggregate(tile, out[j], keep)
        if done // TRIM_EVERY != (done + len(idx)) // TRIM_EVERY:
            trim_heap()  # the batches and outputs of the network's process: as the reading workers
        done += len(idx)
        if tally is not None:  # the stage's process logs the slide's progress
            tally.done[stream[2]] = done
            return
        now = time.monotonic()
        if now - last >= log_every_s or done == n_tiles:
            log_fn(progress_line(slide_name, done, n_tiles, now - t0))
            last = now

    batches = ReadAhead(loader)  # the reading workers are forked here: no fork follows
    warming = _warm_up(merger)
    try:
        _batches(batches, model, device, keep, use_amp, amp_dtype, tta, timings, hand_over)
    finally:
        batches.close()
        if warming is not None:
            warming.join()


def _warm_up(merger) -> threading.Thread | None:
    """The merger's ``warm_up`` (its post-processing's imports), started in a thread now, to
    run beside the first batch's read and network call rather than before the first tile's
    hand-over; None when it has none. Started once every worker process is forked: a fork
    while another thread imports can leave the child an import lock that nobody releases.
    The first tile waits for the import if it is not done (Python's per-module import lock);
    an import that fails here fails again there, with its error."""
    warm = getattr(merger, "warm_up", None)
    if warm is None:
        return None

    def run():
        with contextlib.suppress(Exception):
            warm()

    thread = threading.Thread(target=run, name="wsiseg-warm-up", daemon=True)
    thread.start()
    return thread


def _batches(batches, model, device, keep, use_amp, amp_dtype, tta, timings, hand_over):
    """The network over each batch of ``batches`` (:class:`ReadAhead`); ``hand_over`` gets each
    output once the next batch has been launched and the one after that is being read.

    One batch stays in hand: batch k goes to the merger after batch k + 1 has been launched,
    so that on a GPU the network computes k + 1 (and copies it back) while this process hands
    k's tiles to the post-processing pool; the GPU does not wait for that work. On the CPU the
    network's call returns when it is done, and the order changes nothing."""
    cuda = device.type == "cuda"
    if not cuda:  # the reading workers are forked by now: only this process's heap changes
        network_heap()  # activations from the heap, not fresh page-faulted mappings: same output, faster
    held = None
    with torch.inference_mode():
        while True:
            t_wait = time.monotonic()  # the loop waits for the next batch of windows
            batch = batches.get()
            if batch is None:
                break
            x, idx, errors, read_s = batch
            timings["wait_s"] += time.monotonic() - t_wait
            timings["read_cpu_s"] += float(read_s.sum())
            t_net = time.monotonic()
            # N x n x n x 3 from the readers: permuted, it is N x 3 x n x n in channels_last already
            # (no copy here; the transpose took half of this loop's CPU time: benchmarks/README.md)
            x = x.permute(0, 3, 1, 2).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                out = torch.log(softmax_tta(model, x).clamp_min(1e-12)) if tta else model(x)
            assert out.shape[-1] >= keep.stop and out.shape[-2] >= keep.stop, (
                f"model output {tuple(out.shape[-2:])} does not cover the write region {keep}"
            )
            # back to NCHW for the per-tile work, on the device (a GPU transposes for free)
            out = out.float().contiguous()
            ready = None
            if cuda:  # into pinned memory without waiting: the copy runs behind the network's kernels
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                out = host
            timings["network_s"] += time.monotonic() - t_net
            batches.start()  # the next batch's windows read beside this hand-over, not beside the network
            if held is not None:
                hand_over(*held)
            held = (out, ready, idx, errors)
        if held is not None:
            hand_over(*held)


#: tiling.batch_size 'auto' on a GPU: windows per forward pass (8 windows of 736 px in bf16
#: keep a GPU's kernels large and need a few hundred MB of activations and pinned batches; on an
#: H200 with 16 CPUs batches of 2, 4 and 8 made 26.7-28.8 Mpx/s, within one run's spread, and 16
#: 19 Mpx/s: benchmarks/README.md, "On a GPU")
GPU_BATCH = 8
#: tiling.workers 'auto' on the CPU in one process (tiling.streams: 1; network streams read for
#: themselves): a job of this many CPUs or more gets one reading worker, one with fewer none.
#: Reading costs about 0.12 CPU s per output Mpx through OpenSlide (0.06-0.07 for the JPEG tiles
#: of an SVS or generic TIFF, which wsiseg.jpeg_tiles decodes), the network on
#: the CPU about 5.6 (one thread), so read in the network's process it idles the job's other
#: T - 1 threads for 0.12 s per Mpx: a loss of 0.12 / (5.6 / S + 0.12) with S the network's
#: speed-up on T threads (T at best; 0.6 T assumed, not measured: 2-core machines here),
#: 2-4 % on 2 CPUs, 9-15 % on 8, 17-26 % on 16 (about half that for an SVS). A reading worker
#: with a CPU of its own costs the network 1 / T instead (12 % on 8, 6 % on 16); next to all T
#: network threads it takes CPU from them at every one of their barriers (2 readers beside a
#: 2-CPU job's network: efficiency 0.79-0.89 against 0.90-1.00 without, benchmarks/README.md).
#: The two break even near 8 CPUs (near 11 for an SVS's tiles, by the same arithmetic; kept at 8
#: for every format: not measured, 2-core machines here). One worker reads about 8 Mpx/s (15 an
#: SVS), far more than a CPU network segments, so 'auto' never gives more than one.
CPU_READER_FROM = 8
#: tiling.workers 'auto' on a GPU: at most this many reading workers. The network's loop
#: (about 0.03 CPU s per output Mpx, one process) bounds the stage near 30 Mpx/s, which about
#: 4 readers keep up with (0.12 CPU s per Mpx each; 2-3 for an SVS); more only add memory (a few
#: hundred MB of process and 2 pinned batches each). On an H200 with 16 CPUs, 8 readers and 7
#: post-processing workers made 27 Mpx/s, 4 and 4 18 Mpx/s (benchmarks/README.md, "On a GPU").
GPU_READERS_MAX = 8


def _auto(value) -> bool:
    return value in (None, "auto")


def batch_size(tiling_cfg: dict, device: torch.device) -> int:
    """Windows per forward pass: ``tiling.batch_size``, or for 'auto' 1 on the CPU (batches of
    4 made a 2-CPU job slower, efficiency 0.75-0.80 against 0.90-1.00, with 4 times the
    activations: benchmarks/README.md) and :data:`GPU_BATCH` on a GPU. The masks do not depend on it, byte
    for byte (tests/test_postpool.py)."""
    b = tiling_cfg.get("batch_size", "auto")
    if _auto(b):
        return 1 if device.type == "cpu" else GPU_BATCH
    return int(b)


def network_streams(tiling_cfg: dict, threads: int, device: torch.device | None = None) -> int:
    """Network streams of a segment job (:func:`run_streams`, :mod:`wsiseg.streams`): processes
    that each read, run the network on, post-process and write tiles of the plan.
    ``tiling.streams``, or for 'auto' on the CPU one per CPU of the job (each network on one
    thread: on a 2-CPU job the stage made 1.1x the output of one process running the network on
    both, 0.92-0.93 of the network's own speed against 0.86-0.89: benchmarks/README.md, "Network
    streams"), where the reading and post-processing workers are 'auto' too
    (a config that sets either keeps one process, as before streams). Always 1 on a GPU (or
    ``device`` None), where one process feeds the device and the workers do the CPU's share."""
    if device is None or device.type != "cpu":
        return 1
    n = tiling_cfg.get("streams", "auto")
    if not _auto(n):
        return max(1, int(n))
    if _auto(tiling_cfg.get("workers", "auto")) and _auto(tiling_cfg.get("postprocess_workers", "auto")):
        return max(1, int(threads))
    return 1


def reading_workers(tiling_cfg: dict, threads: int, device: torch.device | None = None) -> int:
    """DataLoader worker processes reading the windows: ``tiling.workers``, or for 'auto' from
    the device and the job's CPUs (Snakemake threads, SLURM cpus_per_task). On the CPU none
    below :data:`CPU_READER_FROM` CPUs (the network's process reads, between its forward
    passes), one from there on (with a CPU of its own: :func:`network_threads`). On a GPU
    (or ``device`` None) half of the CPUs the network's loop leaves, rounded up: reading
    (0.12 CPU s per output Mpx through OpenSlide, 0.06-0.07 for an SVS's JPEG tiles) and the
    post-processing workers that get the rest (0.09-0.11) cost about the same, and reading
    cannot be skipped where a model has no instance post-processing; at most
    :data:`GPU_READERS_MAX`. 16 CPUs: 8 reading, 7 post-processing workers and the loop. None
    with several network streams (:func:`network_streams`)."""
    if network_streams(tiling_cfg, threads, device) > 1:
        return 0  # each network stream reads its own windows
    n = tiling_cfg.get("workers", "auto")
    if not _auto(n):
        return int(n)
    threads = max(1, int(threads))
    if device is not None and device.type == "cpu":
        return 1 if threads >= CPU_READER_FROM else 0
    return min(GPU_READERS_MAX, threads // 2)


def postprocess_workers(tiling_cfg: dict, threads: int, device: torch.device | None = None) -> int:
    """Post-processing worker processes of a segment job: ``tiling.postprocess_workers``, or for
    'auto' the job's CPUs (Snakemake threads, SLURM cpus_per_task) less one for the network's
    loop and one per reading worker; 0 runs the post-processing in the network's process, as
    'auto' does on the CPU, where the network needs the cores (post-processing is about a
    tenth of its time there: benchmarks/README.md). None with several network streams."""
    if network_streams(tiling_cfg, threads, device) > 1:
        return 0  # each network stream post-processes its own tiles
    n = tiling_cfg.get("postprocess_workers", "auto")
    if _auto(n):
        if device is not None and device.type == "cpu":
            return 0
        return max(0, int(threads) - 1 - reading_workers(tiling_cfg, threads, device))
    return int(n)


def network_threads(tiling_cfg: dict, threads: int, device: torch.device) -> int:
    """Torch threads of the network's process in a job of ``threads`` CPUs. On a GPU the
    process only drives the device: it keeps the CPUs that the reading and post-processing
    workers do not take, so that none of them competes for a core. On the CPU the network
    is most of the work and keeps them all (as before the pipeline existed), less the one
    reading worker that ``tiling.workers: auto`` gives a job of :data:`CPU_READER_FROM` CPUs
    or more (a number of workers set in the config shares the network's CPUs, as before).
    With several network streams (:func:`network_streams`): each stream's, the job's CPUs
    shared out between them (1 with 'auto')."""
    streams = network_streams(tiling_cfg, threads, device)
    if streams > 1:
        return max(1, int(threads) // streams)
    if device.type == "cpu":
        readers = reading_workers(tiling_cfg, threads, device) if _auto(tiling_cfg.get("workers", "auto")) else 0
        return max(1, int(threads) - readers)
    workers = reading_workers(tiling_cfg, threads, device) + postprocess_workers(tiling_cfg, threads, device)
    return max(1, int(threads) - workers)


def resolve_tiling(tiling_cfg: dict, threads: int, device: torch.device) -> dict:
    """How a segment job of ``threads`` CPUs on ``device`` runs: batch size, network streams,
    reading and post-processing workers and the network's torch threads (a stream's), 'auto'
    resolved to integers (what segment.json's ``settings`` records)."""
    return dict(
        batch_size=batch_size(tiling_cfg, device),
        streams=network_streams(tiling_cfg, threads, device),
        workers=reading_workers(tiling_cfg, threads, device),
        postprocess_workers=postprocess_workers(tiling_cfg, threads, device),
        network_threads=network_threads(tiling_cfg, threads, device),
    )


@contextlib.contextmanager
def _sigterm_as_exit():
    """Turn SIGTERM into SystemExit while the stage runs, so that its clean-up (ending the
    worker processes) runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(
    *,
    slide_path: str,
    slide_id: str,
    mpp,
    plan_tsv: str,
    plan_json: str,
    tissue_png: str,
    model_cfg: dict,
    tiling_cfg: dict,
    device: str,
    clip_to_tissue: bool,
    out_store: str,
    out_json: str,
    threads: int = 1,
    log=log.info,
) -> dict:
    """Segment stage: labels of every planned tile into a chunked store."""
    from .models import load_model
    from .runner import write_json
    from .tiling import Plan
    from .tissue import load_mask

    t0 = time.monotonic()
    # one thread until the network streams are forked (if any): a fork after torch has started an
    # OpenMP team leaves the child a runtime that hangs (wsiseg.streams)
    torch.set_num_threads(1)
    model = load_model(model_cfg, device="cpu", geometry=False)  # geometry comes from the plan
    dev = pick_device(device, log) if model.wants_gpu else torch.device("cpu")
    plan = Plan.read(plan_tsv, plan_json, frame=False)  # rows: no pandas in the job (0.3 s of its start)
    if plan.model_checksum != model.checksum:
        raise RuntimeError("the tile plan was made for other model weights; rerun the plan rule")
    tiles = plan_rows(plan.tiles) if model.apply_calibration(plan.calibration, log) else []
    used = resolve_tiling(tiling_cfg, threads, dev)  # 'auto' follows the device and the job's CPUs
    # no more streams than tiles; each keeps its threads (with 'auto' one: the same masks on any job)
    used["streams"] = streams = min(used["streams"], max(1, len(tiles)))
    if streams == 1:
        torch.set_num_threads(used["network_threads"])
    tissue = load_mask(tissue_png) if clip_to_tissue else None
    geom, spec = plan.geometry, plan.spec
    post_workers = used["postprocess_workers"]
    merger = StoreMerger(
        out_store,
        geom,
        spec,
        tissue,
        plan.tissue_downsample,
        labels=model.labeler(),
        workers=post_workers,
        slide_name=slide_id,
        channels=len(model.classes),
    )
    if model.postprocess:
        log(f"instance post-processing per tile: {model.postprocess} (mask classes {model.mask_classes})")
    tta = bool(model_cfg.get("tta", False)) and model.supports_tta
    amp = bool(tiling_cfg.get("amp", True)) and dev.type == "cuda"
    cpu_bf16 = bool(tiling_cfg.get("cpu_bf16", False)) and dev.type == "cpu" and model.wants_gpu
    if cpu_bf16 and not cpu_bf16_native():
        log(
            "tiling.cpu_bf16 is set, but this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16), "
            "where bf16 would be slower than float32: the network runs in float32"
        )
        cpu_bf16 = False
    how = (
        f"{streams} network streams of {used['network_threads']} thread{'s' if used['network_threads'] > 1 else ''} "
        f"each, each reading and post-processing its own tiles"
        if streams > 1
        else f"{used['workers']} reading workers, {post_workers} post-processing workers, "
        f"{used['network_threads']} network threads"
    )
    log(
        f"{slide_id}: {len(tiles)} tiles of {spec.window} px on {dev} (batch {used['batch_size']}, {how}, "
        f"amp={amp}{', bfloat16 on the CPU' if cpu_bf16 else ''}, tta={'8 flips/rotations' if tta else 'off'})"
    )
    unreadable, timings = [], {}
    common = dict(
        batch_size=used["batch_size"],
        cpu_bf16=cpu_bf16,
        log_fn=log,
        max_unreadable_fraction=float(tiling_cfg.get("max_unreadable_fraction", 0.01)),
        unreadable=unreadable,
        tta=tta,
        timings=timings,
    )
    args = (slide_path, slide_id, mpp, geom, spec, tiles, model.module, merger)
    with _sigterm_as_exit():  # SIGTERM (scancel, a killed job) ends the workers and streams too
        if streams > 1:
            run_streams(streams, used["network_threads"], *args, **common)
        else:
            run_segmentation(*args, dev, workers=used["workers"], amp=amp, **common)
    merger.store.close()
    elapsed = time.monotonic() - t0
    mpx = sum(t.tw * t.th for t in tiles) / 1e6
    where = (
        f"in the {streams} streams"
        if streams > 1
        else f"{post_workers or 'no'} post-processing worker{'s' if post_workers != 1 else ''}"
    )
    log(
        f"{mpx:.1f} output Mpx; CPU s per Mpx: reading {timings['read_cpu_s'] / max(mpx, 1e-9):.3f}, "
        f"post-processing {merger.pool.post_cpu_s / max(mpx, 1e-9):.3f}, "
        f"writes {merger.pool.write_cpu_s / max(mpx, 1e-9):.4f} "
        f"({where}); "
        f"network {timings['network_s']:.1f} s"
    )
    loop = dict(
        network_s=round(timings["network_s"], 3),
        wait_s=round(timings["wait_s"], 3),  # the network's loop waiting for windows
        other_s=round(max(elapsed - timings["network_s"] - timings["wait_s"], 0.0), 3),  # start, hand-over, end
    )
    if elapsed > 0:
        log(
            f"the network's loop{f' (the mean of {streams} streams)' if streams > 1 else ''}: network "
            f"{100 * loop['network_s'] / elapsed:.0f} %, waiting for windows "
            f"{100 * loop['wait_s'] / elapsed:.0f} %, the rest (start-up, per-tile hand-over"
            f"{', post-processing' if not post_workers else ''}, the end) {100 * loop['other_s'] / elapsed:.0f} % "
            f"of {elapsed:.1f} s"
        )
    info = dict(
        slide_id=slide_id,
        device=str(dev),
        **device_facts(dev),  # the CPU's or GPU's name, the CUDA version
        device_asked=device,  # the config's `device` (not a param: it cannot change a mask)
        # how the stage ran (the config's tiling settings that change no mask, as used: 'auto' resolved)
        settings=dict(
            batch_size=used["batch_size"],
            streams=streams,
            workers=used["workers"],
            postprocess_workers=post_workers,
            network_threads=used["network_threads"],  # a stream's
            amp=amp,
            cpu_bf16=cpu_bf16,
        ),
        precision=network_precision(dev, amp, cpu_bf16),  # what the network's arithmetic was
        tta=tta,
        n_tiles=len(tiles),
        elapsed_s=elapsed,
        tiles_per_s=len(tiles) / max(elapsed, 1e-9),
        loop=loop,  # where the stage's wall time went (network, waiting for windows, the rest)
        tiles_unreadable=len(unreadable),
        unreadable=[dict(row=r, col=c, error=e) for r, c, e in unreadable],
    )
    write_json(out_json, info)
    return info
