"""The segment stage's post-processing pool (wsiseg.postpool): the masks do not depend on the
number of workers nor on the batch size (shipped model, real slide, unreadable tiles, TTA); a failing or dying
worker fails the slide with a message naming the tile, without hanging; SIGTERM, Ctrl-C or
the death of the stage leave no worker behind. Nothing here depends on timing."""

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CMU, REPO, corrupt_slide, needs_data
from helpers import FailingLabeler, FirstChannelLabeler
from scipy import ndimage as ndi

from wsiseg.geometry import Geometry
from wsiseg.models import load_model
from wsiseg.postpool import PostprocessError, PostprocessPool, TileJob, TileWriter
from wsiseg.segment import StoreMerger, run_segmentation
from wsiseg.slide import open_slide
from wsiseg.store import TileStore
from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for

SHIPPED = dict(name="nuclei", weights=str(REPO / "models" / "nuclei-unet.pt"))


def segment_store(path, slide, spec, geom, tiles, plan, workers, batch_size=3, read_workers=0, module=None, **kw):
    """The store's bytes with ``workers`` post-processing and ``read_workers`` reading workers
    (``module``: the network, default the spec's)."""
    run_segmentation(
        str(slide),
        "s",
        None,
        geom,
        tiles,
        plan,
        spec.module if module is None else module,
        StoreMerger(
            str(path), geom, tiles, labels=spec.labeler(), workers=workers, slide_name="s", channels=len(spec.classes)
        ),
        torch.device("cpu"),
        batch_size=batch_size,
        workers=read_workers,
        **kw,
    )
    return (Path(path) / "data.bin").read_bytes()


@needs_data
@pytest.mark.parametrize("tta", [False, True])
def test_masks_do_not_depend_on_the_number_of_workers_nor_the_batch(tmp_path, tta):
    """Byte for byte, whatever the post-processing workers, the reading workers and the batch
    size ('auto' picks 1 on the CPU and 8 on a GPU, where the defaults were 4 and 2 workers)."""
    spec = load_model(SHIPPED)
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, 128, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)
    block = plan[plan.row.between(5, 6 if tta else 7) & plan.col.between(5, 7)]  # mid-region, full of nuclei
    # (post-processing workers, batch size, reading workers); TTA: 8 passes of the network a tile
    runs = [(0, 3, 0), (2, 1, 0)] if tta else [(0, 3, 0), (1, 1, 0), (2, 8, 2)]
    stores = {
        run: segment_store(
            tmp_path / "w{}-b{}-r{}".format(*run),
            CMU,
            spec,
            geom,
            tiles,
            block,
            run[0],
            batch_size=run[1],
            read_workers=run[2],
            tta=tta,
        )
        for run in runs
    }
    assert all(stores[run] == stores[runs[0]] for run in runs)
    with TileStore(str(tmp_path / "w0-b3-r0")) as st:  # real nuclei, not an empty store
        mask = st.read(5 * 128, 5 * 128, 3 * 128, 2 * 128)
    assert ndi.label(mask, structure=np.ones((3, 3)))[1] > 15  # 25 nuclei in this block


@needs_data
def test_unreadable_tiles_the_same_with_workers(tmp_path):
    path = tmp_path / "damaged.tif"
    corrupt_slide(path)
    spec = load_model(SHIPPED)
    with open_slide(str(path)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, 128, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)
    bad = {}
    for w in (0, 2):
        bad[w] = []
        stores = segment_store(
            tmp_path / f"w{w}", path, spec, geom, tiles, plan, w, max_unreadable_fraction=0.5, unreadable=bad[w]
        )
        if w == 0:
            serial = stores
    assert bad[0] and bad[0] == bad[2]
    assert serial == stores


@needs_data
def test_without_reading_workers_windows_are_read_beside_the_hand_over_not_the_network(tmp_path, monkeypatch):
    """Without reading workers the next batch is read in a helper thread while the loop hands the
    last one over (post-processing it, without post-processing workers), never while the network
    runs, where it would take cores from the network's threads; the store is the one the
    reading workers give."""
    from wsiseg import segment

    spans, lock = [], threading.Lock()  # (what, thread, start, end)

    def record(what, t0):
        with lock:
            spans.append((what, threading.current_thread().name, t0, time.perf_counter()))

    class RecordedReads(segment.TileDataset):
        def __getitem__(self, i):
            t0 = time.perf_counter()
            try:
                return super().__getitem__(i)
            finally:
                record("read", t0)

    class RecordedNetwork(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            t0 = time.perf_counter()
            try:
                return self.net(x)
            finally:
                record("network", t0)

    spec = load_model(SHIPPED)
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, 128, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)
    block = plan[plan.row.between(5, 6) & plan.col.between(5, 7)]  # 6 tiles, real nuclei
    with_readers = segment_store(tmp_path / "r2", CMU, spec, geom, tiles, block, 0, batch_size=2, read_workers=2)
    monkeypatch.setattr(segment, "TileDataset", RecordedReads)
    without = segment_store(
        tmp_path / "r0", CMU, spec, geom, tiles, block, 0, batch_size=2, module=RecordedNetwork(spec.module)
    )
    assert without == with_readers
    reads = [sp for sp in spans if sp[0] == "read"]
    calls = [sp for sp in spans if sp[0] == "network"]
    assert len(reads) == 6 and len(calls) == 3
    # the first batch is read before there is anything to hand over; every later one in the helper thread
    assert all(name.startswith("wsiseg-read") for _, name, *_ in reads[2:])
    for _, _, r0, r1 in reads:
        for _, _, n0, n1 in calls:
            assert r1 <= n0 or n1 <= r0, "a window was read while the network ran"


def writer(tmp_path, labeler):
    TileStore.create(str(tmp_path / "s"), 64, 96, 32).close()
    return TileWriter(str(tmp_path / "s"), labeler, slice(0, 32), 1.0)


def jobs(nan_at=None):
    for r in range(2):
        for c in range(3):
            out = np.zeros((2, 32, 32), np.float32)
            if (r, c) == nan_at:
                out[:] = np.nan
            yield TileJob(r, c, 32 * c, 32 * r, 32, 32, out)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_tile_names_itself(tmp_path, workers):
    with pytest.raises(PostprocessError, match=r"s1: post-processing tile row 1 col 2 failed: ValueError: NaN"):
        with PostprocessPool(writer(tmp_path, FailingLabeler()), workers, "s1", output_shape=(2, 32, 32)) as pool:
            for job in jobs(nan_at=(1, 2)):
                pool.submit(job)


def test_a_dying_worker_fails_the_slide_without_hanging(tmp_path):
    with pytest.raises(PostprocessError, match=r"s1: a post-processing worker died .* tiling.postprocess_workers"):
        with PostprocessPool(
            writer(tmp_path, FailingLabeler(exit_process=True)), 2, "s1", output_shape=(2, 32, 32)
        ) as pool:
            for job in jobs(nan_at=(0, 1)):
                pool.submit(job)


STAGE = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}, {src!r}]
    import numpy as np
    from helpers import SlowLabeler
    from wsiseg.postpool import PostprocessPool, TileJob, TileWriter
    from wsiseg.segment import _sigterm_as_exit
    from wsiseg.store import TileStore
    TileStore.create({store!r}, 320, 320, 32).close()
    writer = TileWriter({store!r}, SlowLabeler(30.0), slice(0, 32), 1.0)
    with _sigterm_as_exit(), PostprocessPool(writer, 2, "s1", output_shape=(2, 32, 32)) as pool:
        for r in range(10):
            for c in range(10):
                pool.submit(TileJob(r, c, 32 * c, 32 * r, 32, 32, np.zeros((2, 32, 32), np.float32)))
""")


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def shm_files(pid):
    """Files under /dev/shm that a process maps and that would stay there if it died (a named
    shared-memory segment would be one; multiprocessing's semaphores are unlinked at once)."""
    with open(f"/proc/{pid}/maps") as fh:
        return {line.split(None, 5)[5].strip() for line in fh if "/dev/shm/" in line and "(deleted)" not in line}


def start_stage(code):
    """A Python process running ``code``, which gets Ctrl-C as a terminal delivers it: to a
    process whose SIGINT is not ignored (a shell starting pytest in the background, `cmd &`,
    makes it ignored, and Python then has no KeyboardInterrupt)."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def started_children(proc, n):
    """The stage's ``n`` child processes, once all have started (polled: no timing assumption)."""
    pids = []
    for _ in range(600):
        pids = [p for p in children(proc.pid) if alive(p)]
        if len(pids) >= n and all(children(p) == [] for p in pids):
            break
        time.sleep(0.1)
    assert len(pids) >= n, proc.stderr.read() if proc.poll() is not None else pids
    return pids


def end_and_check(proc, sig, pids, what):
    """Send ``sig`` to the stage ``proc``: it ends without waiting for its processes ``pids``
    (which sleep 30 s a tile), and they end with it."""
    proc.send_signal(sig)
    proc.wait(timeout=120)
    for _ in range(300):
        if not any(alive(p) for p in pids):
            break
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), f"orphaned {what}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_no_worker_outlives_the_stage(tmp_path, sig):
    """Workers end with the stage, whatever ends it; the outputs they are handed live in an
    anonymous shared mapping, so no /dev/shm segment can be left behind either."""
    proc = start_stage(STAGE.format(tests=str(REPO / "tests"), src=str(REPO / "src"), store=str(tmp_path / "s")))
    try:
        workers = started_children(proc, 2)
        time.sleep(1.0)  # let them pick up tiles
        assert not shm_files(proc.pid) and not any(shm_files(p) for p in workers)
        end_and_check(proc, sig, workers, "post-processing workers")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_outputs_reach_the_workers_through_the_ring(tmp_path):
    """Each output goes through a slot of the shared ring (no pickled array), slots are reused
    once their tile is written, and the tiles land where they belong."""
    w = writer(tmp_path, FirstChannelLabeler())
    with PostprocessPool(w, 2, "s1", depth=2, output_shape=(2, 32, 32)) as pool:
        assert pool.ring is not None and len(pool.ring.free) == 2
        for job in jobs():
            out = job.output
            out[1] = 10 * job.row + job.col
            pool.submit(job)
            out[:] = -1  # the caller may reuse its buffer at once: the ring holds a copy
            assert len(pool.ring.free) <= 2
    with TileStore(str(tmp_path / "s")) as st:
        got = st.read(0, 0, 96, 64)
    want = np.kron(np.array([[0, 1, 2], [10, 11, 12]], np.uint8), np.ones((32, 32), np.uint8))
    assert np.array_equal(got, want)


def test_a_jobs_cpus_are_split_between_the_network_and_the_workers():
    """auto: on a GPU the post-processing workers take what the reading workers and the
    network's loop leave, and the loop keeps what the workers do not take; on the CPU the
    network keeps every CPU and post-processes in its own process."""
    from wsiseg.segment import network_threads, postprocess_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto, fixed = dict(workers=2, postprocess_workers="auto"), dict(workers=2, postprocess_workers=4)
    # (workers set: one process, no network streams, as tests/test_streams.py checks)
    assert postprocess_workers(auto, 16, cuda) == 13 and postprocess_workers(auto, 2, cuda) == 0
    assert postprocess_workers(auto, 16, cpu) == 0 and postprocess_workers(fixed, 16, cpu) == 4
    assert network_threads(auto, 16, cpu) == 16 and network_threads(fixed, 16, cpu) == 16
    assert network_threads(auto, 16, cuda) == 1
    assert network_threads(fixed, 16, cuda) == 10
    assert network_threads(fixed, 2, cuda) == 1


def test_auto_tiling_follows_the_device_and_the_jobs_cpus():
    """tiling.batch_size/workers 'auto': on the CPU batch 1 and no reading worker below 8 CPUs
    (the network takes them all), one with a CPU of its own from 8 up; on a GPU batch 8 and
    half the CPUs the loop leaves to reading (at most 8), the rest to post-processing. Numbers
    in the config are used as they are. On the CPU in one process (tiling.streams: 1; 'auto'
    runs one network stream per CPU: tests/test_streams.py)."""
    from wsiseg.segment import resolve_tiling

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = dict(batch_size="auto", workers="auto", postprocess_workers="auto", streams=1)

    def used(cfg, threads, dev):
        r = resolve_tiling(cfg, threads, dev)
        return r["batch_size"], r["workers"], r["postprocess_workers"], r["network_threads"]

    assert used(auto, 1, cpu) == (1, 0, 0, 1)
    assert used(auto, 2, cpu) == (1, 0, 0, 2) and used(auto, 7, cpu) == (1, 0, 0, 7)
    assert used(auto, 8, cpu) == (1, 1, 0, 7) and used(auto, 16, cpu) == (1, 1, 0, 15)
    assert used(dict(streams=1), 2, cpu) == (1, 0, 0, 2)  # absent keys are 'auto' (configs from before)
    assert used(auto, 1, cuda) == (8, 0, 0, 1) and used(auto, 2, cuda) == (8, 1, 0, 1)
    assert used(auto, 8, cuda) == (8, 4, 3, 1) and used(auto, 16, cuda) == (8, 8, 7, 1)
    assert used(auto, 40, cuda) == (8, 8, 31, 1)
    assert all(sum(used(auto, t, cuda)[1:]) == t for t in range(2, 40))  # every CPU used, none twice
    # numbers as given; the network shares its CPUs with readers set by number, as before
    old = dict(batch_size=4, workers=2, postprocess_workers="auto")
    assert used(old, 2, cpu) == (4, 2, 0, 2) and used(old, 16, cuda) == (4, 2, 13, 1)
    assert used(dict(auto, postprocess_workers=3), 16, cuda) == (8, 8, 3, 5)
    assert used(dict(auto, workers=0), 16, cpu) == (1, 0, 0, 16)


@needs_data
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine (benchmarks/gpu_device.sh)")
def test_on_cuda_the_masks_do_not_depend_on_the_workers(tmp_path):
    """The CUDA path of the network's loop (bf16/fp16 autocast, outputs copied back into pinned
    memory without waiting, a batch handed over once the next is launched): byte for byte the
    same store with the post-processing and reading in this process or in workers. Both runs
    are in one process with one batch size, so cuDNN's autotuning picks the same kernels."""
    spec = load_model(SHIPPED)
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, 128, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)
    block = plan[plan.row.between(4, 8) & plan.col.between(4, 8)]  # 25 tiles: several held batches
    stores = []
    for workers, read_workers in ((0, 0), (2, 2)):
        path = tmp_path / f"w{workers}-r{read_workers}"
        run_segmentation(
            str(CMU),
            "s",
            None,
            geom,
            tiles,
            block,
            spec.module,
            StoreMerger(
                str(path),
                geom,
                tiles,
                labels=spec.labeler(),
                workers=workers,
                slide_name="s",
                channels=len(spec.classes),
            ),
            torch.device("cuda"),
            batch_size=4,
            workers=read_workers,
        )
        stores.append((path / "data.bin").read_bytes())
    assert stores[0] == stores[1]
    with TileStore(str(tmp_path / "w0-r0")) as st:  # real nuclei, not an empty store
        mask = st.read(4 * 128, 4 * 128, 5 * 128, 5 * 128)
    assert ndi.label(mask, structure=np.ones((3, 3)))[1] > 50
