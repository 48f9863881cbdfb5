"""Seam-free by construction: the stitched tile outputs equal one pass of the same
network over the whole mirror-padded image, including the right/bottom edge tiles
where the slide is not a multiple of the tile size."""

import numpy as np
import pytest
import torch
from conftest import CMU, REPO, corrupt_slide, needs_data
from helpers import ArrayMerger, one_pass
from scipy import ndimage as ndi

from wsiseg.geometry import Geometry, read_target
from wsiseg.models.checkpoint import UNetSpec, unet_same_halo
from wsiseg.postparams import InstanceParams
from wsiseg.segment import StoreMerger, run_segmentation
from wsiseg.slide import open_slide
from wsiseg.store import TileStore
from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for
from wsiseg.unet import UNet

pytestmark = needs_data  # reads ../shared/data


def _model(padding, depth=2):
    torch.manual_seed(0)
    m = UNet(n_classes=3, depth=depth, base_width=4, padding=padding, batch_norm=padding == "same").eval()
    for mod in m.modules():  # non-trivial running statistics: BN in eval mode must not create seams
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    first = next(n for n in range(1, 400) if m.output_size(n))
    border = 0 if padding == "same" else (first - m.output_size(first)) // 2
    halo = unet_same_halo(depth) if padding == "same" else border
    return UNetSpec(m, ["bg", "a", "b"], 1.0, f"t-{padding}", "", "unet", 2**depth, border, halo)


def cmu_plan(spec, target_mpp, tile=64):
    """CMU-1 at ``target_mpp``: geometry, the whole image, margin, tile spec and the full tile plan."""
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, target_mpp)
        img = read_target(s, geom, 0, 0, geom.width, geom.height)
    margin = plan_margin(spec, "auto", False)
    tiles = tile_spec_for(spec, tile, margin)
    return geom, img, margin, tiles, plan_tiles(geom, tiles, None, 1)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("target_mpp", [0.499 * 3.3, 0.499 * 4])  # resampled, and an exact level factor
def test_stitched_equals_one_pass(padding, target_mpp, tmp_path):
    spec = _model(padding)
    geom, img, margin, tiles, plan = cmu_plan(spec, target_mpp)
    assert geom.width % 64 and geom.height % 64  # edge tiles are partial
    logits = run_segmentation(
        str(CMU), "cmu", None, geom, tiles, plan, spec.module, ArrayMerger(geom, 3), torch.device("cpu"), batch_size=4
    )
    assert not np.isnan(logits).any()  # every pixel written once
    grid_w, grid_h = -(-geom.width // 64) * 64, -(-geom.height // 64) * 64
    ref = one_pass(spec, img, margin, grid_w, grid_h)
    assert np.abs(ref - logits).max() < 1e-4
    # labels identical except at exact ties
    diff = ref.argmax(0) != logits.argmax(0)
    if diff.any():
        top2 = np.sort(ref, axis=0)[-2:]
        assert np.all(np.abs(top2[1] - top2[0])[diff] < 1e-4)

    # the workflow's own merger (labels into the chunked store) gives the same labels
    merger = StoreMerger(str(tmp_path / "s"), geom, tiles)
    run_segmentation(str(CMU), "cmu", None, geom, tiles, plan, spec.module, merger, torch.device("cpu"), batch_size=4)
    with TileStore(str(tmp_path / "s")) as st:
        labels = st.read(0, 0, geom.width, geom.height)
    assert (labels != logits.argmax(0)).sum() == 0


def test_bf16_on_the_cpu_stitched_equals_one_pass_in_bf16():
    """tiling.cpu_bf16: the shipped U-Net under bfloat16 autocast on the CPU. The stitched tile
    outputs equal one pass of the same network over the whole mirror-padded image under the same
    autocast, bit for bit (CMU-1 at 2 µm/px, 4 tiles of 512 px, edge tiles partial); the labels
    differ from float32's in a few px (230 of 0.4 M here). On a CPU without bf16 instructions
    autocast emulates it, about 10 times float32's time: 2 µm/px keeps that near 45 s (1 µm/px
    took 110 s)."""
    from wsiseg.models import load_model
    from wsiseg.segment import inference_network

    model = load_model(dict(name="nuclei", weights=str(REPO / "models" / "nuclei-unet.pt")))
    geom, img, margin, tiles, plan = cmu_plan(model, 0.499 * 4, tile=512)
    assert len(plan) == 4 and geom.width % 512 and geom.height % 512
    grid_w, grid_h = -(-geom.width // 512) * 512, -(-geom.height // 512) * 512
    net = inference_network(model.module, torch.device("cpu"))  # folded, as the stage runs it
    labels = {}
    for bf16 in (False, True):
        logits = run_segmentation(str(CMU), "cmu", None, geom, tiles, plan, model.module, ArrayMerger(geom, 3),
                                  torch.device("cpu"), batch_size=1, cpu_bf16=bf16)  # fmt: skip
        assert not np.isnan(logits).any()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ref = one_pass(model, img, margin, grid_w, grid_h, module=net)
        assert np.array_equal(ref, logits), bf16
        labels[bf16] = logits.argmax(0)
    differ = (labels[False] != labels[True]).sum()
    assert 0 < differ < 0.002 * labels[False].size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine (benchmarks/gpu_device.sh)")
def test_on_cuda_float32_stitched_labels_equal_one_pass():
    """A GPU with tiling.amp false: the shipped U-Net in IEEE float32 (the stage turns cuDNN's TF32
    off, which PyTorch allows by default: with it 78 of CMU's 6.6 M px changed class on an
    H200). The stitched labels are those of one pass over the whole mirror-padded image, px for
    px, the logits to 1e-4 (cuDNN's kernels differ with the input's shape); under bf16/fp16
    autocast, fewer than 1 px in 1,000 differs (on an H200, 0.012 %: as many as between batch
    sizes of the one pass)."""
    from wsiseg.models import load_model
    from wsiseg.segment import inference_network

    cuda = torch.device("cuda")
    model = load_model(dict(name="nuclei", weights=str(REPO / "models" / "nuclei-unet.pt")))
    geom, img, margin, tiles, plan = cmu_plan(model, 0.5, tile=512)
    grid_w, grid_h = -(-geom.width // 512) * 512, -(-geom.height // 512) * 512
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    for amp in (False, True):
        logits = run_segmentation(str(CMU), "cmu", None, geom, tiles, plan, model.module, ArrayMerger(geom, 3),
                                  cuda, batch_size=8, amp=amp)  # fmt: skip
        assert not np.isnan(logits).any()
        assert not torch.backends.cudnn.allow_tf32  # the stage turned it off: the reference runs so too
        net = inference_network(model.module, cuda)
        with torch.autocast("cuda", dtype=half, enabled=amp):
            ref = one_pass(model, img, margin, grid_w, grid_h, module=net, device=cuda)
        differ = int((ref.argmax(0) != logits.argmax(0)).sum())
        if amp:
            assert differ < 0.001 * ref[0].size, differ
        else:
            assert np.abs(ref - logits).max() < 1e-4 and differ == 0, (np.abs(ref - logits).max(), differ)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_tta_stitched_equals_tta_over_the_whole_image(padding):
    """model.tta: every tile averaged over its 8 flips/rotations is still seam-free: the
    stitched probabilities equal the same averaging over the whole mirror-padded image."""
    spec = _model(padding)
    geom, img, margin, tiles, plan = cmu_plan(spec, 0.499 * 3.3)
    logp = run_segmentation(
        str(CMU),
        "cmu",
        None,
        geom,
        tiles,
        plan,
        spec.module,
        ArrayMerger(geom, 3),
        torch.device("cpu"),
        batch_size=4,
        tta=True,
    )
    assert not np.isnan(logp).any()
    prob = np.exp(logp)
    # float32 throughout; the plain test above allows 1e-4 on logits, the same here on
    # probabilities (a seam would be far larger); one CI run saw 1.8e-5 on the sum
    assert np.abs(prob.sum(0) - 1).max() < 1e-4, np.abs(prob.sum(0) - 1).max()
    grid_w, grid_h = -(-geom.width // 64) * 64, -(-geom.height // 64) * 64
    ref = one_pass(spec, img, margin, grid_w, grid_h, tta=True)
    assert np.abs(ref - prob).max() < 1e-4, np.abs(ref - prob).max()
    # and it is not the plain prediction: the 8 views really are averaged
    plain = run_segmentation(
        str(CMU), "cmu", None, geom, tiles, plan, spec.module, ArrayMerger(geom, 3), torch.device("cpu"), batch_size=4
    )
    plain = torch.softmax(torch.from_numpy(plain), 0).numpy()
    assert np.abs(plain - prob).max() > 1e-3


REFERENCE = dict(mean=[60.0, 30.0, -20.0], std=[12.0, 10.0, 8.0])  # a stain far from CMU-1's


@pytest.mark.parametrize(("tta", "max_scale"), [(False, 2.0), (True, 2.0), (False, 1.2)])
def test_stain_normalised_stitched_equals_one_pass(tta, max_scale):
    """model.stain_normalise: the plan stage measures the slide's tissue colour once and the
    segment stage puts one pointwise transform in front of the network, so the stitched
    output still equals one pass over the whole mirror-padded, normalised image; with
    model.stain_max_scale 1.2 the stretch is clamped (L* x0.66 -> x0.83, b* x1.27 -> x1.2)
    and it still does."""
    spec = _model("same")
    spec.stain = dict(method="reinhard", reference=REFERENCE, max_scale=max_scale)
    geom, img, margin, tiles, plan = cmu_plan(spec, 0.499 * 3.3)
    cal = spec.calibrate(lambda: open_slide(str(CMU)), geom, tiles, plan, print)
    src = cal["stain_source"]
    assert src["pixels"] > 10_000 and 40 < src["mean"][0] < 88  # H&E tissue, not background
    raw = [r / s for s, r in zip(src["std"], REFERENCE["std"])]
    assert cal["stain_scale"] == [min(max(k, 1 / max_scale), max_scale) for k in raw]
    assert (cal["stain_scale"] != raw) == (max_scale < 2)  # the bound is what clamps, not the default
    plain = spec.module
    assert spec.apply_calibration(cal, print) and spec.module is not plain
    assert np.allclose(spec.module.scale.flatten().numpy(), cal["stain_scale"])
    normalised, spec.module = spec.module, plain  # the spec's geometry (output_size) is the network's
    out = run_segmentation(
        str(CMU), "cmu", None, geom, tiles, plan, normalised, ArrayMerger(geom, 3), torch.device("cpu"), tta=tta
    )
    if tta:
        out = np.exp(out)
    grid_w, grid_h = -(-geom.width // 64) * 64, -(-geom.height // 64) * 64
    ref = one_pass(spec, img, margin, grid_w, grid_h, tta=tta, module=normalised)
    assert np.abs(ref - out).max() < 1e-4, np.abs(ref - out).max()
    # the transform is real: without it the network says something else
    assert np.abs(one_pass(spec, img, margin, grid_w, grid_h, tta=tta) - ref).max() > 1e-2


def test_stain_transform_equals_the_textbook_formula_bit_for_bit():
    """The Lab conversions run in place (for speed); on a real CMU-1 window, in float32 in both
    memory layouts and in float64 (what the plan's numpy statistics are checked against), they
    equal the textbook formula exactly, leave their input alone, and so does the whole per-slide
    transform."""
    from wsiseg.stain_transform import StainNormalised, lab_to_rgb, lab_to_rgb_textbook, rgb_to_lab, rgb_to_lab_textbook

    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.5)
        img = read_target(s, geom, 300, 300, 400, 300)
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None] / 255.0
    for t in (x, x.contiguous(memory_format=torch.channels_last), x.double()):
        before = t.clone()
        lab = rgb_to_lab(t)
        assert torch.equal(lab, rgb_to_lab_textbook(t)) and torch.equal(t, before)
        moved = lab * torch.tensor([1.0, 1.4, 0.6]).to(lab).view(1, 3, 1, 1) + 3  # some out of gamut
        kept = moved.clone()
        assert torch.equal(lab_to_rgb(moved), lab_to_rgb_textbook(moved)) and torch.equal(moved, kept)
    src = dict(mean=[48.5, 28.4, -12.3], std=[19.3, 12.1, 8.8])
    norm = StainNormalised(torch.nn.Identity(), src, REFERENCE, 2.0)
    textbook = lab_to_rgb_textbook(rgb_to_lab_textbook(x) * norm.scale + norm.shift)
    assert torch.equal(norm(x), textbook) and not torch.equal(textbook, x)


def test_stain_statistics_in_numpy_are_those_of_the_transforms_lab():
    """The plan stage measures each slide's tissue statistics in numpy (LabStats: no torch in that
    job); they are the statistics of the segment stage's own Lab conversion (rgb_to_lab, torch,
    float64) of the same pixels: on real CMU-1 windows (one mirrored at the slide's corner), the
    same tissue pixels and the same means and stds to rounding."""
    from wsiseg.geometry import read_window
    from wsiseg.stain import LabStats
    from wsiseg.stain_transform import rgb_to_lab

    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.5)
        windows = [read_window(s, geom, x, y, 736) for x, y in ((-112, -112), (700, 900), (1500, 2300))]
    ours, n, total, squares = LabStats(), 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for img in windows:  # resampled (0.499 -> 0.5 µm/px): float32 in [0, 255], as the plan reads them
        ours.add_rgb(img)
        lab = rgb_to_lab(torch.from_numpy(img.transpose(2, 0, 1).copy())[None].double() / 255)[0].reshape(3, -1)
        px = lab[:, lab[0] < 88]
        n, total, squares = n + px.shape[1], total + px.sum(1), squares + (px * px).sum(1)
    mean = (total / n).numpy()
    std = np.sqrt((squares / n).numpy() - mean**2)
    m = ours.moments()
    assert m["pixels"] == n and 0.2 < n / sum(w.shape[0] * w.shape[1] for w in windows) < 0.95
    assert np.allclose(m["mean"], mean, rtol=1e-12, atol=0) and np.allclose(m["std"], std, rtol=1e-10, atol=0)
    as_bytes = np.round(windows[1]).astype(np.uint8)  # bytes: as their float values
    assert LabStats().add_rgb(as_bytes) == LabStats().add_rgb(as_bytes.astype(np.float32))


def test_stain_statistics_add_up_and_move_tissue_to_the_reference():
    """The per-slide statistics are sums (tiles add up in any order) and the transform gives the
    tissue the reference's Lab mean and std (to the clipping of out-of-gamut colours)."""
    from wsiseg.stain import LabStats
    from wsiseg.stain_transform import StainNormalised, rgb_to_lab

    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 2.0)
        img = read_target(s, geom, 0, 0, geom.width, geom.height)
    whole = LabStats().add_rgb(img).moments()
    halves = LabStats().add_rgb(img[:, geom.width // 2 :]).add_rgb(img[:, : geom.width // 2]).moments()
    assert whole["pixels"] == halves["pixels"]
    assert np.allclose(whole["mean"], halves["mean"]) and np.allclose(whole["std"], halves["std"])
    ref = dict(mean=[70.0, 20.0, -10.0], std=[10.0, 6.0, 5.0])
    norm = StainNormalised(torch.nn.Identity(), whole, ref)
    x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None] / 255.0
    lab = rgb_to_lab(x)[0].reshape(3, -1)
    tissue = lab[0] < 88
    moved = rgb_to_lab(norm(x))[0].reshape(3, -1)[:, tissue].double()
    assert np.allclose(moved.mean(1).numpy(), ref["mean"], atol=1.5)
    assert np.allclose(moved.std(1).numpy(), ref["std"], rtol=0.15)


def test_stain_stretch_clamped_to_the_bound():
    """model.stain_max_scale on real statistics: CMU-1's tissue to the within-tile reference of
    four MICCAI training tiles (their per-tile means and stds averaged: a narrower spread than
    all their pixels pooled). A bound between the channels' factors clamps the far ones only;
    the tissue still goes to the reference mean, its spread by the clamped factors, and the
    plan's warning says what was clamped."""
    from wsiseg import labels as L
    from wsiseg.stain import LabStats, far_from_reference, reference_of, scales
    from wsiseg.stain_transform import StainNormalised, rgb_to_lab

    rows = L.read_sheet(str(REPO / "config" / "labeled" / "miccai2015-train.tsv")).iloc[:4]
    images = [s.image for _, r in rows.iterrows() for s in L.load_samples(r, 0.5)]
    within, pooled = reference_of(images, within_tile=True), reference_of(images)
    per_tile = [LabStats().add_rgb(img).moments() for img in images]
    assert np.allclose(within["mean"], np.mean([m["mean"] for m in per_tile], 0), atol=1e-4)
    assert np.allclose(within["std"], np.mean([m["std"] for m in per_tile], 0), atol=1e-4)
    assert all(w < p for w, p in zip(within["std"], pooled["std"]))  # no spread between tiles
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 2.0)
        img = read_target(s, geom, 0, 0, geom.width, geom.height)
    src = LabStats().add_rgb(img).moments()
    raw = scales(src, within)
    far = max(max(k, 1 / k) for k in raw)
    bound = (1 + far) / 2  # clamps the channel furthest from x1, not every one
    used = scales(src, within, bound)
    assert used == [min(max(k, 1 / bound), bound) for k in raw] and 0 < sum(u != k for u, k in zip(used, raw)) < 3
    assert scales(src, within, far + 1) == raw  # a bound beyond every factor changes nothing
    norm = StainNormalised(torch.nn.Identity(), src, within, bound)
    assert np.allclose(norm.scale.flatten().numpy(), used)
    x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None] / 255.0
    tissue = rgb_to_lab(x)[0].reshape(3, -1)[0] < 88
    moved = rgb_to_lab(norm(x))[0].reshape(3, -1)[:, tissue].double()
    assert np.allclose(moved.mean(1).numpy(), within["mean"], atol=1.5)
    assert np.allclose(moved.std(1).numpy(), np.array(src["std"]) * used, rtol=0.15)
    warning = far_from_reference(src, within, bound)
    assert "clamped to" in warning and f"model.stain_max_scale {bound:g}" in warning
    # model.stain_max_scale 1: a shift only. The tissue's mean goes to the reference's, its spread
    # stays the slide's own, and the plan warns only where the unbounded stretch would pass 2x
    shift = StainNormalised(torch.nn.Identity(), src, within, 1)
    assert scales(src, within, 1) == [1.0, 1.0, 1.0] and np.all(shift.scale.numpy() == 1)
    moved = rgb_to_lab(shift(x))[0].reshape(3, -1)[:, tissue].double()
    assert np.allclose(moved.mean(1).numpy(), within["mean"], atol=1.5)
    assert np.allclose(moved.std(1).numpy(), src["std"], rtol=0.15)
    narrow = dict(src, std=[src["std"][0], within["std"][1] / 2.5, src["std"][2]])  # a* would go x2.5
    warning = far_from_reference(narrow, within, 1)
    assert "by a* x2.50 (more than 2x), clamped to a* x1.00 (model.stain_max_scale 1)" in warning, warning
    assert "only its mean is moved" in warning and "amplifies" not in warning


def test_small_margin_shows_seams():
    """Sanity check of the test itself: with margin 0 the 'same' network does show seams."""
    spec = _model("same")
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.499 * 4)
        img = read_target(s, geom, 0, 0, geom.width, geom.height)
    tiles = tile_spec_for(spec, 64, 0)
    plan = plan_tiles(geom, tiles, None, 1)
    logits = run_segmentation(
        str(CMU), "cmu", None, geom, tiles, plan, spec.module, ArrayMerger(geom, 3), torch.device("cpu"), batch_size=8
    )
    ref = one_pass(spec, img, 0, -(-geom.width // 64) * 64, -(-geom.height // 64) * 64)
    assert np.abs(ref - logits).max() > 1e-2


def test_slide_smaller_than_margin_is_mirrored_repeatedly(tmp_path):
    """A 16 x 16 px slide with a 24 px margin: windows reflect more than once; all pixels written."""
    from conftest import SLIDES

    small = SLIDES / "openslide-python-fixtures" / "small.svs"
    spec = _model("same")
    with open_slide(str(small)) as s:
        geom = Geometry.for_slide(s, s.mpp)
        img = read_target(s, geom, 0, 0, geom.width, geom.height)
    assert (geom.width, geom.height) == (16, 16)
    margin = plan_margin(spec, "auto", False)
    assert margin > 16
    tiles = tile_spec_for(spec, 16, margin)
    plan = plan_tiles(geom, tiles, None, 1)
    logits = run_segmentation(
        str(small), "small", None, geom, tiles, plan, spec.module, ArrayMerger(geom, 3), torch.device("cpu")
    )
    ref = one_pass(spec, img, margin, 16, 16)
    assert np.abs(ref - logits).max() < 1e-4


def test_no_tissue_gives_an_empty_store(tmp_path):
    spec = _model("same")
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 4.0)
    tiles = tile_spec_for(spec, 64, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, np.zeros((10, 10), bool), geom.width0 / 10)
    assert len(plan) == 0
    store = run_segmentation(
        str(CMU),
        "cmu",
        None,
        geom,
        tiles,
        plan,
        spec.module,
        StoreMerger(str(tmp_path / "s"), geom, tiles),
        torch.device("cpu"),
    )
    assert store.shape == (geom.height, geom.width) and not store.read(0, 0, geom.width, geom.height).any()


def test_torchscript_model_is_seam_free_with_measured_halo(tmp_path):
    from wsiseg.models import load_model

    spec0 = _model("same")
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(spec0.module), str(path))
    spec = load_model(dict(name="ts", weights=str(path), classes=["bg", "a", "b"], mpp=1.0, depth=2))
    assert spec.kind == "torchscript" and spec.halo == spec0.halo
    geom, img, margin, tiles, plan = cmu_plan(spec, 0.499 * 3.3)
    logits = run_segmentation(
        str(CMU), "cmu", None, geom, tiles, plan, spec.module, ArrayMerger(geom, 3), torch.device("cpu"), batch_size=4
    )
    ref = one_pass(spec, img, margin, -(-geom.width // 64) * 64, -(-geom.height // 64) * 64)
    assert np.abs(ref - logits).max() < 1e-4


def test_shipped_model_as_torchscript_gives_the_checkpoints_masks(tmp_path):
    """Our U-Net exported to TorchScript is an instance model too (classes [background, nucleus,
    boundary]): with the checkpoint's thresholds in model.postprocess its label store equals the
    checkpoint's byte for byte; without them it separates with the defaults; with none the boundary
    is a class of the mask."""
    from wsiseg.models import load_model

    ck = load_model(dict(name="nuclei", weights=str(REPO / "models" / "nuclei-unet.pt")))
    path = tmp_path / "nuclei.ts"
    torch.jit.save(torch.jit.script(ck.module), str(path))
    ts_cfg = dict(name="nuclei", weights=str(path), classes=ck.classes, mpp=ck.mpp, depth=4)
    ts = load_model({**ts_cfg, "postprocess": dict(ck.postprocess)}, geometry=False)
    assert ts.kind == "torchscript" and ts.postprocess == ck.postprocess and ts.mask_classes == ck.mask_classes
    assert load_model(ts_cfg, geometry=False, network=False).postprocess == InstanceParams().as_dict()
    off = load_model({**ts_cfg, "postprocess": "none"}, geometry=False, network=False)
    assert off.postprocess is None and off.mask_classes == ck.classes
    ts.border, ts.halo = ck.border, ck.halo  # geometry=False: the halo probe of a depth-4 network takes 14 s

    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(ck, 128, plan_margin(ck, "auto", False))
    block = plan_tiles(geom, tiles, None, 1).query("row.between(6, 8) and col.between(6, 8)")
    side, y0, x0 = 3 * 128, 6 * 128, 6 * 128
    masks = {}
    for name, spec in (("checkpoint", ck), ("torchscript", ts), ("torchscript none", off)):
        spec.module = spec.module or ts.module
        merger = StoreMerger(str(tmp_path / name), geom, tiles, labels=spec.labeler())
        run_segmentation(str(CMU), "cmu", None, geom, tiles, block, spec.module, merger, torch.device("cpu"))
        with TileStore(str(tmp_path / name)) as st:
            masks[name] = st.read(x0, y0, side, side)
    assert masks["checkpoint"].max() == 1 and masks["checkpoint"].sum() > 0.05 * side**2
    np.testing.assert_array_equal(masks["torchscript"], masks["checkpoint"])
    assert 2 in masks["torchscript none"]  # the boundary rims as a class


def test_batchnorm_folded_for_inference_gives_the_same_labels():
    """The segment stage runs the network with its BatchNorms folded into its convolutions: a
    copy (the caller's network keeps them), none left, the shipped model's logits on a real CMU
    window the same to 1e-4 and its instance labels equal; nothing to fold (no BatchNorm, or a
    TorchScript file) gives the network itself."""
    from wsiseg.models import load_model
    from wsiseg.unet import fold_batchnorm

    spec = load_model(dict(name="nuclei", weights=str(REPO / "models" / "nuclei-unet.pt")))
    net = spec.module.eval()
    folded = fold_batchnorm(net)
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert folded is not net and len(bn) == 18
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, spec.mpp)
        window = read_target(s, geom, 900, 900, 736, 736)
    x = torch.from_numpy(window.transpose(2, 0, 1).copy())[None] / 255.0
    with torch.inference_mode():
        a, b = net(x)[0], folded(x)[0]
    assert float((a - b).abs().max()) < 1e-4
    labels = spec.labeler()
    keep = slice(112, 112 + 512)
    assert (labels(a, keep, 512, 512) == labels(b, keep, 512, 512)).all()
    assert labels(a, keep, 512, 512).sum() > 1000  # nuclei in the window
    plain = UNet(n_classes=2, depth=2, base_width=4, batch_norm=False).eval()
    assert fold_batchnorm(plain) is plain
    # TorchScript, alone or behind an eager wrapper: frozen, which folds alike (to the bit here)
    scripted = torch.jit.script(net)
    for model in (scripted, torch.nn.Sequential(torch.nn.Identity(), scripted)):
        frozen = fold_batchnorm(model)
        assert frozen is not model and "batch_norm" not in str((frozen if model is scripted else frozen[1]).graph)
        with torch.inference_mode():
            assert torch.equal(frozen(x)[0], b)
    assert "batch_norm" in str(scripted.inlined_graph)  # the file's module as it was


NETWORK_HEAP_CHILD = """
import hashlib, json, os, resource, sys
import torch
from wsiseg import segment
from wsiseg.geometry import Geometry
from wsiseg.models import load_model
from wsiseg.slide import open_slide
from wsiseg.store import TileStore
from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for

slide, weights, out = sys.argv[1:4]
torch.set_num_threads(2)
importers = []  # the thread that imports the post-processing (scipy, scikit-image)


def audit(event, args):
    if event == "import" and args[0] == "wsiseg.postprocess":
        importers.append(__import__("threading").current_thread().name)


sys.addaudithook(audit)
spec = load_model(dict(name="nuclei", weights=weights))
with open_slide(slide) as s:
    geom = Geometry.for_slide(s, spec.mpp)
tiles = tile_spec_for(spec, 512, plan_margin(spec, "auto", False))
block = plan_tiles(geom, tiles, None, 1).query("row == 2 and col.between(1, 2)")


def stage(name):
    store = os.path.join(out, name)
    merger = segment.StoreMerger(store, geom, tiles, labels=spec.labeler())
    segment.run_segmentation(slide, "cmu", None, geom, tiles, block, spec.module, merger, torch.device("cpu"))
    with TileStore(store) as st:
        nuclei = int((st.read(512, 1024, 1024, 512) > 0).sum())  # the two tiles
    files = {f: hashlib.sha256(open(os.path.join(store, f), "rb").read()).hexdigest() for f in os.listdir(store)}
    return dict(files=files, nuclei=nuclei)


real = segment.network_heap
segment.network_heap = lambda: False  # the stage as before it: glibc's defaults
default = stage("default")
segment.network_heap = real
heap = stage("heap")
net = segment.inference_network(spec.module, torch.device("cpu"))  # as the stage runs it
x = torch.rand(1, 3, tiles.window, tiles.window).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(3):  # the heap settles into the network's pattern of allocations
        net(x)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(2):
        segment.trim_heap()  # as the stage does every TRIM_EVERY tiles: this heap stays
        net(x)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
called = segment.network_heap.cache_info().misses  # by the second stage; the first had it replaced
faults = (r1.ru_minflt - r0.ru_minflt) / 2
got = dict(default=default, heap=heap, called=called, set=segment.network_heap(), faults=faults, importers=importers)
print(json.dumps(got))
"""


def test_network_heap_gives_the_same_store_without_page_faulting_activations(tmp_path):
    """On the CPU the segment stage serves the network's activations from the heap
    (:func:`wsiseg.segment.network_heap`, glibc's mallopt): in a fresh process, the shipped
    model's label store over two real CMU tiles is the same byte for byte as with glibc's
    defaults; the stage has switched the heap on, after which a forward pass over a 736-px window
    (activations of 69 MB, each a fresh mapping under glibc's defaults: 60,000-90,000 page faults
    a call) faults in under 8 MB of pages, even after the stage's periodic heap trim. The
    post-processing's imports were loaded once, by the stage's warm-up thread (beside the first
    batch's network call), not by the first tile's hand-over."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run(
        [sys.executable, "-c", NETWORK_HEAP_CHILD, str(CMU), str(REPO / "models" / "nuclei-unet.pt"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.splitlines()[-1])
    assert "data.bin" in got["default"]["files"] and got["heap"] == got["default"]  # the store's files, byte for byte
    assert got["default"]["nuclei"] > 0.05 * 512 * 1024  # nuclei in the two tiles
    assert got["called"] == 1 and got["set"] is True
    assert got["faults"] < 2000, got["faults"]  # pages of 4 KiB
    assert got["importers"] == ["wsiseg-warm-up"]


JOBS_CHILD = """
import json, sys
from wsiseg import segment, stitch
kw = json.loads(sys.argv[1])
segment.run(**kw["segment"], log=lambda m: None)
stitch.run(**kw["stitch"], log=lambda m: None)
print(json.dumps(sorted(m for m in ("pandas", "wsiseg.sheet") if m in sys.modules)))
"""


def test_segment_and_stitch_jobs_read_the_plan_without_pandas(tmp_path, monkeypatch):
    """The segment and stitch jobs import no pandas (0.3-0.4 s of each job's start): in a fresh
    process, segment.run reads plan.tsv's rows with the csv module and stitch reads plan.json
    alone. The label store of two real CMU tiles is the same byte for byte as segment.run's
    with the plan read as a DataFrame, and the stitched mask has the nuclei of those tiles."""
    import json
    import os
    import subprocess
    import sys

    import tifffile
    from helpers import all_tissue

    from wsiseg import plan, segment
    from wsiseg.tiling import Plan

    weights = str(REPO / "models" / "nuclei-unet.pt")
    tissue = all_tissue(tmp_path, CMU)
    tsv, pjson = str(tmp_path / "plan.tsv"), str(tmp_path / "plan.json")
    model = dict(name="nuclei", weights=weights)
    tiling = dict(tile_size=512, margin="auto")
    plan.run(slide_path=str(CMU), slide_id="cmu", mpp=None, **tissue, model_cfg=model, tiling_cfg=tiling,
             out_tsv=tsv, out_json=pjson, log=lambda m: None)  # fmt: skip
    table = Plan.read(tsv, pjson).tiles
    table.query("row == 2 and col.between(1, 2)").to_csv(tsv, sep="\t", index=False)  # two tiles
    meta = json.load(open(pjson))
    json.dump(dict(meta, n_tiles=2), open(pjson, "w"))

    def job(name):
        out = tmp_path / name
        out.mkdir()
        seg = dict(slide_path=str(CMU), slide_id="cmu", mpp=None, plan_tsv=tsv, plan_json=pjson,
                   tissue_png=tissue["tissue_png"], model_cfg=model, tiling_cfg=dict(tiling, batch_size="auto"),
                   device="cpu", clip_to_tissue=True, out_store=str(out / "labels.store"),
                   out_json=str(out / "segment.json"), threads=2)  # fmt: skip
        sti = dict(store_path=seg["out_store"], plan_json=pjson, thumb_png=tissue["tissue_png"],
                   tissue_png=tissue["tissue_png"], slide_id="cmu", out_mask=str(out / "mask.ome.tif"),
                   out_overlay=str(out / "overlay.png"), out_json=str(out / "stitch.json"))  # fmt: skip
        return out, dict(segment=seg, stitch=sti)

    out, kw = job("fresh")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, "-c", JOBS_CHILD, json.dumps(kw)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1]) == []  # neither pandas nor the sheets' reader
    ref, kw = job("frame")
    read = Plan.read.__func__
    monkeypatch.setattr(Plan, "read", classmethod(lambda cls, t, j, frame=True: read(cls, t, j, True)))
    segment.run(**kw["segment"], log=lambda m: None)
    for f in ("data.bin", "meta.json"):
        assert (out / "labels.store" / f).read_bytes() == (ref / "labels.store" / f).read_bytes()
    mask = tifffile.imread(out / "mask.ome.tif")
    assert mask.shape == (2961, 2216) and (mask[1024:1536, 512:1536] > 0).mean() > 0.05
    assert not mask[:1024].any() and not mask[1536:].any()  # only the two planned tiles were segmented

    # tiling.cpu_bf16: bfloat16 where this CPU has it (segment.json says whether it ran so), the
    # same nuclei but for a few px at their edges
    bf16, kw = job("bf16")
    kw["segment"]["tiling_cfg"]["cpu_bf16"] = True
    logged = []
    segment.run(**kw["segment"], log=logged.append)
    info = json.load(open(bf16 / "segment.json"))
    assert info["settings"]["cpu_bf16"] is segment.cpu_bf16_native()
    assert info["settings"]["amp"] is False  # amp is CUDA's
    assert info["precision"] == ("bfloat16" if segment.cpu_bf16_native() else "float32")
    with TileStore(str(ref / "labels.store")) as a, TileStore(str(bf16 / "labels.store")) as b:
        a, b = a.read(512, 1024, 1024, 512), b.read(512, 1024, 1024, 512)
    if segment.cpu_bf16_native():
        assert any("bfloat16 on the CPU" in m for m in logged)
        assert 0 < (a != b).sum() < 0.01 * ((a > 0) | (b > 0)).sum()
    else:
        assert any("no bfloat16 instructions" in m for m in logged)
        assert np.array_equal(a, b)


def test_corrupt_tile_is_background_and_reported(tmp_path):
    from wsiseg.errors import SlideError
    from wsiseg.slide import inspect_slide

    path = tmp_path / "corrupt.tif"
    tx, ty = corrupt_slide(path)
    inspect_slide(str(path), "corrupt")  # inspection does not reach the damaged tile
    spec = _model("same")
    with open_slide(str(path)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, 128, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)
    bad, said = [], []
    logits = run_segmentation(
        str(path),
        "corrupt",
        None,
        geom,
        tiles,
        plan,
        spec.module,
        ArrayMerger(geom, 3),
        torch.device("cpu"),
        batch_size=4,
        max_unreadable_fraction=0.5,
        unreadable=bad,
        log_fn=said.append,
    )
    # exactly the windows that overlap the damaged 256 px JPEG tile (level 1 = target px here)
    assert geom.level == 1 and not geom.needs_resampling
    expected = {
        (t.row, t.col)
        for t in plan.itertuples()
        if t.wx < tx + 256 and tx < t.wx + t.n and t.wy < ty + 256 and ty < t.wy + t.n
    }
    assert {(r, c) for r, c, _ in bad} == expected
    for r, c in expected:  # left unwritten (background in the workflow's store)
        assert np.isnan(logits[:, r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128]).all()
    written = ~np.isnan(logits[0])
    assert written.sum() == geom.width * geom.height - sum(
        min(128, geom.width - c * 128) * min(128, geom.height - r * 128) for r, c in expected
    )
    assert any("could not be read" in m and "Corrupt JPEG" in m for m in said)
    with pytest.raises(SlideError, match="tiles could not be decoded"):
        run_segmentation(
            str(path),
            "corrupt",
            None,
            geom,
            tiles,
            plan,
            spec.module,
            ArrayMerger(geom, 3),
            torch.device("cpu"),
            batch_size=4,
            max_unreadable_fraction=0.0,
        )


def test_instances_agree_across_tile_borders(tmp_path):
    """The shipped nuclei model's instance post-processing runs on each tile's whole window:
    stitched, the separated nuclei equal the same post-processing run once over the stitched
    probabilities (ties in the watershed aside), so nuclei on a tile border are split alike
    from both sides and counted once."""
    from wsiseg.models import load_model
    from wsiseg.postprocess import InstanceParams, instances_from_probs, separated_mask

    spec = load_model(dict(name="nuclei", weights=str(REPO / "models" / "nuclei-unet.pt")))
    assert spec.postprocess
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, 128, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)
    block = plan[plan.row.between(6, 9) & plan.col.between(6, 9)]  # 4 x 4 tiles of 128 px, mid-region
    logits = run_segmentation(
        str(CMU), "cmu", None, geom, tiles, block, spec.module, ArrayMerger(geom, 3), torch.device("cpu"), batch_size=4
    )
    run_segmentation(
        str(CMU),
        "cmu",
        None,
        geom,
        tiles,
        block,
        spec.module,
        StoreMerger(str(tmp_path / "s"), geom, tiles, labels=spec.labeler()),
        torch.device("cpu"),
        batch_size=4,
    )
    y0, x0, side = 6 * 128, 6 * 128, 4 * 128
    prob = torch.softmax(torch.from_numpy(logits[:, y0 : y0 + side, x0 : x0 + side]), 0).numpy()
    ref = separated_mask(instances_from_probs(prob, 0.5, InstanceParams(**spec.postprocess)))
    with TileStore(str(tmp_path / "s")) as st:
        tiled = st.read(x0, y0, side, side)
    inner = (slice(40, -40), slice(40, -40))  # the reference lacks context at the block's own edge
    n = ndi.label(ref[inner], structure=np.ones((3, 3)))[1]
    assert n > 100
    diff = (tiled != ref)[inner]
    assert diff.sum() < 0.005 * ref[inner].sum(), (diff.sum(), ref[inner].sum())
    assert abs(ndi.label(tiled[inner], structure=np.ones((3, 3)))[1] - n) <= 0.01 * n
