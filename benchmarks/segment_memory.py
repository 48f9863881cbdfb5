"""Memory of the pipelined segment stage vs the slide's area.

Renders procedural H&E-like pyramidal slides (benchmarks/large_slide.py's renderer) of growing
size at the model's resolution (0.5 µm/px, 10% tissue), then runs the segment stage on each in
a child process, with reading workers and post-processing workers, and samples the summed
memory of the stage and all its workers (PSS: the ring of window outputs they share is counted
once) every 0.1 s. A small untrained U-Net with the nuclei model's instance post-processing
keeps the network's time down; the CPU side (reading, watershed, hand-over, writes) is the
real one.

    python benchmarks/segment_memory.py [--sides 8192 16384 32768] [--post-workers 2] [--workdir DIR]
        [--streams N]

``--streams N`` runs the stage as N network streams (the CPU default, wsiseg.segment.run_streams:
N processes that each read and post-process their own tiles, no workers) instead.

``--repeat 1 5`` also runs each slide's tile plan 1 and 5 times over (the same windows, each
tile written again): the number of tiles grows without rendering a larger slide, which
tells a per-tile leak (peak grows with tiles) from a warm-up that levels off; ``--every 200``
prints each process's PSS every 200 tiles (the timeline of one run).
"""

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)


def tree(pid):
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def pss_mb_one(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def pss_mb(pid):
    return sum(pss_mb_one(p) for p in tree(pid))


def stage(slide, workdir, read_workers, post_workers, batch, repeat=1, every=0, streams=1):
    import torch

    from wsiseg.geometry import Geometry
    from wsiseg.models.checkpoint import UNetSpec, unet_same_halo
    from wsiseg.segment import StoreMerger, run_segmentation, run_streams
    from wsiseg.slide import open_slide
    from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for
    from wsiseg.unet import UNet

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = UNet(n_classes=3, depth=4, base_width=2).eval()
    post = dict(fg_threshold=0.7, seed_threshold=0.8, min_seed_um2=2.0, min_object_um2=6.0)
    spec = UNetSpec(net, ["bg", "nucleus", "boundary"], 0.5, "m", "", "unet", 16, 0, unet_same_halo(4), post)
    tiles = tile_spec_for(spec, 512, plan_margin(spec, "auto", False))
    with open_slide(slide) as s:
        geom = Geometry.for_slide(s, 0.5)
        thumb, ds = s.thumbnail(16)
    tissue = thumb.mean(axis=2) < 230  # the renderer's glass is 242
    plan = plan_tiles(geom, tiles, tissue, ds)
    if repeat > 1:  # the same tiles again, written again: more tiles, same slide
        import pandas as pd

        plan = pd.concat([plan] * repeat, ignore_index=True)
    merger = StoreMerger(
        os.path.join(workdir, "store"),
        geom,
        tiles,
        labels=spec.labeler(),
        workers=0 if streams > 1 else post_workers,
        channels=3,
        tissue=tissue,
        tissue_downsample=ds,
    )
    if every:  # a timeline: each process's PSS every `every` tiles handed to the merger
        aggregate, done = merger.aggregate, [0]

        def counted(tile, out, keep):
            aggregate(tile, out, keep)
            done[0] += 1
            if done[0] % every == 0:
                mb = [round(pss_mb_one(p)) for p in tree(os.getpid())]
                print(f"  tile {done[0]:>6}: PSS MB per process (stage, workers...) {mb}, sum {sum(mb)}", flush=True)

        merger.aggregate = counted
    if streams > 1:  # each stream a process of one torch thread, as a CPU job's 'auto'
        run_streams(streams, 1, slide, "s", None, geom, tiles, plan, net, merger, log_fn=lambda m: None)
    else:
        run_segmentation(
            slide,
            "s",
            None,
            geom,
            tiles,
            plan,
            net,
            merger,
            torch.device("cpu"),
            batch_size=batch,
            workers=read_workers,
        )
    print(f"  {len(plan)} tiles", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--read-workers", type=int, default=1)
    ap.add_argument("--post-workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, nargs="+", default=[1], help="run each plan this many times over")
    ap.add_argument("--every", type=int, default=0, help="print each process's PSS every this many tiles")
    ap.add_argument("--streams", type=int, default=1, help="the stage as N network streams (no workers)")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    from large_slide import write_slide

    wd = args.workdir or tempfile.mkdtemp(prefix="wsiseg-segmem-")
    os.makedirs(wd, exist_ok=True)
    rows = []
    for side in args.sides:
        slide = os.path.join(wd, f"slide{side}.tif")
        if not os.path.exists(slide):
            write_slide(slide, side, side, 0.5)
        for repeat in args.repeat:
            run_dir = tempfile.mkdtemp(dir=wd)
            proc = mp.get_context("spawn").Process(  # a fresh process: nothing inherited from writing the slides
                target=stage,
                args=(
                    slide,
                    run_dir,
                    args.read_workers,
                    args.post_workers,
                    args.batch,
                    repeat,
                    args.every,
                    args.streams,
                ),
            )
            t0 = time.monotonic()
            proc.start()
            peak = 0.0
            while proc.is_alive():
                peak = max(peak, pss_mb(proc.pid))
                time.sleep(0.1)
            proc.join()
            assert proc.exitcode == 0, proc.exitcode
            rows.append((side, side * side / 1e6, repeat, time.monotonic() - t0, peak))
    print(f"command: python {' '.join(sys.argv)}")
    how = (
        f"{args.streams} network streams of 1 thread, batch 1"
        if args.streams > 1
        else f"{args.read_workers} reading worker(s), {args.post_workers} post-processing workers, batch {args.batch}"
    )
    print(f"segment stage, {how}; tiles of 512 px (window 736); peak PSS summed over the stage and its workers")
    print(f"{'side px':>8} {'Mpx':>6} {'plan x':>6} {'seconds':>8} {'peak MB':>8}")
    for side, mpx, repeat, dt, peak in rows:
        print(f"{side:>8} {mpx:>6.0f} {repeat:>6} {dt:>8.1f} {peak:>8.0f}")


if __name__ == "__main__":
    main()
