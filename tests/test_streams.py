"""The segment stage on the CPU as network streams (wsiseg.segment.run_streams, wsiseg.streams):
the store is the one process's, byte for byte, whatever the number of streams (shipped model,
real slide, TTA, unreadable tiles); the limit on unreadable tiles is the slide's; a stream that
fails or dies fails the slide with a message naming it, without hanging; SIGTERM, Ctrl-C or the
death of the stage leave no stream behind. Nothing here depends on timing."""

import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CMU, REPO, corrupt_slide, needs_data
from helpers import FailingLabeler
from scipy import ndimage as ndi
from test_postpool import end_and_check, start_stage, started_children

from wsiseg.errors import SlideError
from wsiseg.geometry import Geometry
from wsiseg.models import load_model
from wsiseg.postpool import PostprocessError
from wsiseg.segment import StoreMerger, resolve_tiling, run_segmentation, run_streams
from wsiseg.slide import open_slide
from wsiseg.store import TileStore
from wsiseg.streams import StreamError
from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for

SHIPPED = dict(name="nuclei", weights=str(REPO / "models" / "nuclei-unet.pt"))


@pytest.fixture
def one_thread():
    """The network on one thread in this process too (the streams' default): the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stage(path, slide, spec, geom, tiles, plan, streams, labels=None, module=None, **kw):
    """The store's bytes: ``streams`` network streams, or 0: :func:`run_segmentation` in this process."""
    merger = StoreMerger(str(path), geom, tiles, labels=labels or spec.labeler(), slide_name="s", channels=2)
    module = spec.module if module is None else module
    if streams:
        run_streams(streams, 1, str(slide), "s", None, geom, tiles, plan, module, merger, log_fn=lambda m: None, **kw)
    else:
        run_segmentation(str(slide), "s", None, geom, tiles, plan, module, merger, torch.device("cpu"), **kw)
    return (Path(path) / "data.bin").read_bytes()


def cmu_block(tile=128, rows=(5, 7), cols=(5, 7)):
    spec = load_model(SHIPPED)
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, tile, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)
    return spec, geom, tiles, plan[plan.row.between(*rows) & plan.col.between(*cols)]


@needs_data
@pytest.mark.parametrize("tta", [False, True])
def test_streams_give_the_store_of_one_process(tmp_path, one_thread, tta):
    """Byte for byte, 1, 2 or 3 streams against the stage in one process (the network on one
    thread in each); the block is full of nuclei, so the store is not trivially equal."""
    spec, geom, tiles, block = cmu_block(rows=(5, 5 if tta else 7))  # TTA: 8 passes a tile, 3 tiles
    counts = (0, 2) if tta else (0, 1, 2, 3)
    stores = {n: stage(tmp_path / f"s{n}", CMU, spec, geom, tiles, block, n, tta=tta) for n in counts}
    assert all(stores[n] == stores[0] for n in counts)
    with TileStore(str(tmp_path / "s0")) as st:
        mask = st.read(5 * 128, 5 * 128, 3 * 128, 128)
    assert ndi.label(mask, structure=np.ones((3, 3)))[1] > 4  # 7-8 nuclei in the first row


@needs_data
def test_unreadable_tiles_the_same_in_streams_and_the_limit_is_the_slides(tmp_path, one_thread):
    path = tmp_path / "damaged.tif"
    corrupt_slide(path)
    spec = load_model(SHIPPED)
    with open_slide(str(path)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, 256, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)  # 12 tiles, 6 of them unreadable
    bad = {0: [], 2: []}
    stores = {
        n: stage(tmp_path / f"s{n}", path, spec, geom, tiles, plan, n, unreadable=bad[n], max_unreadable_fraction=0.5)
        for n in bad
    }
    assert len(bad[0]) >= 2 and bad[2] == bad[0]  # in plan order, whichever stream met them
    assert stores[2] == stores[0]
    # a limit one below the slide's count fails it, however the unreadable tiles fell between the streams
    limit = (len(bad[0]) - 0.5) / len(plan)
    with pytest.raises(SlideError, match=rf"{len(bad[0])} of {len(plan)} tiles could not be decoded"):
        stage(tmp_path / "limit", path, spec, geom, tiles, plan, 2, max_unreadable_fraction=limit)


class NaNNet(torch.nn.Module):
    """A network whose every output is NaN (a diverged one)."""

    def forward(self, x):
        return x[:, :2] * float("nan")


@needs_data
def test_a_failing_stream_fails_the_slide_with_its_error(tmp_path):
    spec, geom, tiles, block = cmu_block(rows=(5, 6), cols=(5, 6))
    with pytest.raises(PostprocessError, match=r"s: post-processing tile row \d+ col \d+ failed: ValueError: NaN"):
        stage(tmp_path / "s", CMU, spec, geom, tiles, block, 2, labels=FailingLabeler(), module=NaNNet())


@needs_data
def test_a_dying_stream_fails_the_slide_without_hanging(tmp_path):
    spec, geom, tiles, block = cmu_block(rows=(5, 6), cols=(5, 6))
    with pytest.raises(StreamError, match=r"s: network stream \d of 2 died \(exit code 3\).*tiling.streams"):
        stage(
            tmp_path / "s", CMU, spec, geom, tiles, block, 2, labels=FailingLabeler(exit_process=True), module=NaNNet()
        )


STAGE = textwrap.dedent("""
    import sys
    sys.path[:0] = [{tests!r}, {src!r}]
    import torch
    from helpers import SlowLabeler
    from test_streams import NaNNet
    from wsiseg.geometry import Geometry
    from wsiseg.models import load_model
    from wsiseg.segment import StoreMerger, _sigterm_as_exit, run_streams
    from wsiseg.slide import open_slide
    from wsiseg.synthetic import make_example_slide
    from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for
    make_example_slide({slide!r}, width=1024, height=1024, mpp=0.25, seed=3)
    spec = load_model(dict(name="nuclei", weights={weights!r}))
    with open_slide({slide!r}) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, 128, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)
    merger = StoreMerger({store!r}, geom, tiles, labels=SlowLabeler(30.0), slide_name="s", channels=2)
    with _sigterm_as_exit():
        run_streams(2, 1, {slide!r}, "s", None, geom, tiles, plan, NaNNet(), merger, log_fn=print)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_no_stream_outlives_the_stage(tmp_path, sig):
    code = STAGE.format(
        tests=str(REPO / "tests"),
        src=str(REPO / "src"),
        slide=str(tmp_path / "slide.tif"),
        weights=SHIPPED["weights"],
        store=str(tmp_path / "s"),
    )
    proc = start_stage(code)
    try:
        streams = started_children(proc, 2)
        time.sleep(1.0)  # let them take tiles
        end_and_check(proc, sig, streams, "network streams")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_auto_streams_follow_the_jobs_cpus_on_the_cpu_only():
    """tiling.streams 'auto': one stream per CPU on the CPU, each network on one thread, no
    reading or post-processing workers; one stream where the config sets workers (as before
    streams) and on a GPU; a number shares the CPUs out."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = dict(batch_size="auto", workers="auto", postprocess_workers="auto")

    def used(cfg, threads, dev):
        r = resolve_tiling(cfg, threads, dev)
        return r["streams"], r["batch_size"], r["workers"], r["postprocess_workers"], r["network_threads"]

    assert used(auto, 1, cpu) == (1, 1, 0, 0, 1)
    assert used(auto, 2, cpu) == (2, 1, 0, 0, 1) and used(auto, 16, cpu) == (16, 1, 0, 0, 1)
    assert used({}, 8, cpu) == (8, 1, 0, 0, 1)  # absent keys are 'auto' (configs from before)
    assert used(dict(auto, streams=4), 16, cpu) == (4, 1, 0, 0, 4)
    assert used(dict(auto, streams=1), 8, cpu) == (1, 1, 1, 0, 7)  # one process, as before streams
    assert used(dict(auto, workers=2), 8, cpu) == (1, 1, 2, 0, 8)
    assert used(dict(auto, postprocess_workers=1), 8, cpu)[0] == 1
    assert used(auto, 16, cuda) == (1, 8, 8, 7, 1) and used(dict(auto, streams=4), 16, cuda)[0] == 1
