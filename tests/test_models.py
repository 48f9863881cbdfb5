import json
import re

import pytest
import torch
import yaml
from conftest import CMU, REPO, needs_data
from helpers import all_tissue, pickle_payload

from wsiseg.errors import ConfigError
from wsiseg.models import check_weights, load_model
from wsiseg.models.checkpoint import save_checkpoint, unet_same_halo
from wsiseg.models.probe import measure_halo
from wsiseg.tiling import legal_input, plan_margin
from wsiseg.unet import UNet


def test_valid_unet_matches_paper_geometry():
    m = UNet(n_classes=2, depth=4, base_width=2, padding="valid", batch_norm=False).eval()
    assert m.output_size(572) == 388  # Ronneberger et al., Fig. 1
    with torch.no_grad():
        assert m(torch.rand(1, 3, 572, 572)).shape == (1, 2, 388, 388)
    assert m.output_size(573) is None


def test_same_unet_keeps_size_and_channels_double():
    m = UNet(n_classes=3, depth=3, base_width=4, padding="same").eval()
    with torch.no_grad():
        assert m(torch.rand(2, 3, 64, 64)).shape == (2, 3, 64, 64)
    widths = [blk[0].out_channels for blk in m.down]
    assert widths == [4, 8, 16] and m.bottleneck[0].out_channels == 32


def test_halo_measured_matches_structure():
    # 2 convs (radius 1 each) per level and pooling: 5*(2**d - 1) + 2**(d+1) for d levels
    for d in (2, 3):
        assert unet_same_halo(d) == 5 * (2**d - 1) + 2 ** (d + 1)


def _ckpt(tmp_path, **arch):
    torch.manual_seed(0)
    m = UNet(n_classes=2, **arch).eval()
    p = tmp_path / "m.pt"
    save_checkpoint(str(p), m, ["background", "nucleus"], mpp=0.5, name="t")
    return p, m


def test_checkpoint_roundtrip_weights_only(tmp_path):
    p, m = _ckpt(tmp_path, depth=2, base_width=4, padding="valid", batch_norm=False)
    spec = load_model(dict(name="t", weights=str(p), classes=["background", "nucleus"], mpp=0.5))
    assert spec.kind == "unet" and spec.border == (m.output_size(60) and (60 - m.output_size(60)) // 2)
    assert spec.halo == spec.border and len(spec.checksum) == 64
    x = torch.rand(1, 3, 60, 60)
    with torch.no_grad():
        assert torch.equal(spec.module(x), m(x))


def test_config_conflicting_with_checkpoint_is_refused(tmp_path):
    p, _ = _ckpt(tmp_path, depth=2, base_width=4, padding="same")
    with pytest.raises(ConfigError, match="depth"):
        load_model(dict(name="t", weights=str(p), classes=["background", "nucleus"], mpp=0.5, depth=3))
    with pytest.raises(ConfigError, match="classes"):
        load_model(dict(name="t", weights=str(p), classes=["a", "b", "c"], mpp=0.5))


def test_torchscript_accepted_and_halo_measured(tmp_path):
    torch.manual_seed(0)
    m = UNet(n_classes=2, depth=2, base_width=4, padding="same", batch_norm=False).eval()
    p = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(m), str(p))
    spec = load_model(dict(name="ts", weights=str(p), classes=["bg", "fg"], mpp=0.5, depth=2))
    assert spec.kind == "torchscript" and spec.border == 0
    assert spec.halo == unet_same_halo(2)
    assert legal_input(spec, 61) == 64


def test_torchscript_geometry_is_measured_once_per_weights_file(tmp_path, monkeypatch):
    """The plan stage of every slide loads the model; the gradient probe runs only for a file
    not seen before (cache keyed by the weights' sha256)."""
    from wsiseg.models import torchscript

    monkeypatch.setenv("WSISEG_CACHE", str(tmp_path / "cache"))
    m = UNet(n_classes=2, depth=2, base_width=4, padding="same", batch_norm=False).eval()
    p = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(m), str(p))
    cfg = dict(name="ts", weights=str(p), classes=["bg", "fg"], mpp=0.5, depth=2)
    first = load_model(cfg)
    (entry,) = (tmp_path / "cache").iterdir()
    assert json.loads(entry.read_text()) == dict(sha256=first.checksum, align=4, border=0, halo=first.halo)
    calls = []
    monkeypatch.setattr(torchscript, "measure_halo", lambda *a, **k: calls.append(a) or 0)
    again = load_model(cfg)
    assert calls == [] and again.halo == first.halo  # read, not measured again
    torch.jit.save(torch.jit.script(UNet(n_classes=2, depth=2, base_width=5, padding="same")), str(p))
    load_model(cfg)  # other bytes under the same name: measured anew
    assert len(calls) == 1


class _GreedyAt96(torch.nn.Module):
    """A 'same' network that takes sides that are multiples of 16 and, at 96 px, asks for more
    memory than any address space holds (4 EiB, refused whatever the kernel's overcommit
    setting): a real allocation failure."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] % 16 != 0:
            raise RuntimeError("input side must be a multiple of 16")  # the traceback quotes the next line too
        if x.shape[-1] == 96:
            return self.conv(x) + torch.empty(1 << 62, dtype=torch.uint8)[0]  # "can't allocate memory"
        return self.conv(x)


def test_torchscript_size_probe_out_of_memory_is_raised_not_cached(tmp_path, monkeypatch):
    """The window sizes a TorchScript file takes are probed once and cached per file; a size it
    refuses is cached as illegal. Running out of memory on a size is not the file refusing it: it
    is raised as MemoryError (the slide's failure record says 'memory' and the fix) and nothing is
    cached, so the size is probed again next time, not kept from the tiler for good."""
    from wsiseg.failure import explain

    monkeypatch.setenv("WSISEG_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "greedy.ts"
    torch.jit.save(torch.jit.script(_GreedyAt96()), str(p))
    spec = load_model(dict(name="ts", weights=str(p), classes=["bg", "fg"], mpp=0.5, depth=4))
    assert spec.border == 0 and spec.halo == 1
    assert spec.output_size(64) == 64 and spec.output_size(72) is None  # taken; refused by the file
    with pytest.raises(MemoryError, match="ran out of memory on a 96 x 96 px test input") as err:
        spec.output_size(96)
    cached = {f.name for f in (tmp_path / "cache").iterdir()}
    assert cached - {f"torchscript-{spec.checksum}-align16.json"} == {
        f"torchscript-{spec.checksum}-input{n}.json" for n in (64, 72)
    }
    assert explain(err.value, slide="s1", stage="plan").kind == "memory"
    with pytest.raises(MemoryError):  # probed again, not read from the cache
        spec.output_size(96)


def test_unet_halo_is_measured_once_per_depth_and_code(tmp_path, monkeypatch):
    """A checkpoint's 'same' U-Net halo comes from the architecture by a gradient probe that
    every plan job would repeat; it is measured once per depth and version of the U-Net code
    and read from the cache after that (the same value)."""
    from wsiseg.models import checkpoint

    monkeypatch.setenv("WSISEG_CACHE", str(tmp_path / "cache"))
    checkpoint.unet_same_halo.cache_clear()
    halo = checkpoint.unet_same_halo(2)
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name.startswith("unet-same-halo-depth2-")
    calls = []
    monkeypatch.setattr(checkpoint, "measure_halo", lambda *a, **k: calls.append(a) or -1)
    checkpoint.unet_same_halo.cache_clear()
    assert checkpoint.unet_same_halo(2) == halo and calls == []  # read, not measured again
    checkpoint.unet_same_halo.cache_clear()
    monkeypatch.setenv("WSISEG_CACHE", str(tmp_path / "other"))
    assert checkpoint.unet_same_halo(2) == -1 and len(calls) == 1  # an empty cache: measured
    checkpoint.unet_same_halo.cache_clear()


def test_margin_below_halo_refused_unless_opted_in(tmp_path):
    p, _ = _ckpt(tmp_path, depth=2, base_width=4, padding="same")
    spec = load_model(dict(name="t", weights=str(p), classes=["background", "nucleus"], mpp=0.5))
    assert plan_margin(spec, "auto", False) >= spec.halo
    with pytest.raises(ConfigError, match="halo"):
        plan_margin(spec, 8, False)
    said = []
    assert plan_margin(spec, 8, True, log=said.append) == 8
    assert "WARNING" in said[0] and "halo" in said[0]


def test_valid_margin_below_border_is_impossible(tmp_path):
    p, _ = _ckpt(tmp_path, depth=2, base_width=4, padding="valid", batch_norm=False)
    spec = load_model(dict(name="t", weights=str(p), classes=["background", "nucleus"], mpp=0.5))
    with pytest.raises(ConfigError, match="at least"):
        plan_margin(spec, spec.border - 1, True)


def test_measure_halo_on_plain_conv_stack():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3, padding=1))
    assert measure_halo(net, 1, 0) == 3


def test_config_mpp_must_match_checkpoint(tmp_path):
    p, _ = _ckpt(tmp_path, depth=2, base_width=4, padding="same")
    with pytest.raises(ConfigError, match="trained at 0.5"):
        load_model(dict(name="t", weights=str(p), classes=["background", "nucleus"], mpp=2.0))


def test_pickle_payload_refused_in_our_words_and_not_run(tmp_path):
    evil = tmp_path / "nuclei-unet.pt"
    marker = tmp_path / "ran"
    pickle_payload(evil, marker)
    cfg = dict(name="m", weights=str(evil), mpp=0.5)
    with pytest.raises(ConfigError) as e:
        check_weights(cfg)
    msg = str(e.value)
    assert msg.startswith(f"model.weights {evil} is refused") and "calls posix.system" in msg
    assert "Fix: point model.weights at a checkpoint written by this workflow" in msg
    assert "weights_only" not in msg and not marker.exists()
    with pytest.raises(ConfigError, match="is refused"):  # the plan stage says the same
        load_model(cfg)
    assert not marker.exists()


def test_empty_truncated_and_missing_weights_named_as_such(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(str(good), UNet(n_classes=2, depth=2, base_width=4), ["background", "x"], 0.5, "m")
    check_weights(dict(name="m", weights=str(good), mpp=0.5))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty\.pt is empty \(0 bytes\).*Fix: copy it again"):
        check_weights(dict(name="m", weights=str(empty), mpp=0.5))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"cut\.pt is not a PyTorch checkpoint, or it is damaged or truncated"):
        check_weights(dict(name="m", weights=str(cut), mpp=0.5))
    with pytest.raises(ConfigError, match="file not found. Fix: correct model.weights"):
        check_weights(dict(name="m", weights=str(tmp_path / "nope.pt"), mpp=0.5))
    with pytest.raises(ConfigError, match="trained at 0.5"):  # a config the checkpoint contradicts
        check_weights(dict(name="m", weights=str(good), mpp=0.25))
    check_weights(dict(name="c", format="classical", mpp=0.5))  # no weights, nothing to check


def test_weights_checked_where_snakemake_runs_without_torch(tmp_path):
    """With --use-conda, Snakemake's own environment may have no torch (and importing it costs
    seconds at every start): the startup check reads the pickle's opcodes, refuses the payload
    by name, then reads the metadata without the tensors and checks the config against it."""
    import subprocess
    import sys

    from conftest import REPO

    evil, marker = tmp_path / "evil.pt", tmp_path / "ran"
    pickle_payload(evil, marker)
    p4 = tmp_path / "p4.pt"  # a checkpoint of ours in pickle protocol 4 (STACK_GLOBAL): accepted
    m = UNet(n_classes=2, depth=2, base_width=4)
    ckpt = dict(format="wsiseg-unet/1", state_dict=m.state_dict(), config=m.config, classes=["bg", "x"], mpp=0.5)
    torch.save(ckpt, p4, pickle_protocol=4)
    code = (
        "import sys; sys.modules['torch'] = None\n"  # import torch now fails, as without it
        "from wsiseg.models import check_weights\n"
        "from wsiseg.errors import ConfigError\n"
        "for w in sys.argv[1:]:\n"
        "    for mpp in (0.5, 0.25):\n"
        "        try:\n"
        "            check_weights(dict(name='m', weights=w, mpp=mpp)); print('accepted', w)\n"
        "        except ConfigError as e:\n"
        "            print('refused', e)\n"
    )
    weights = [str(evil), str(p4), str(REPO / "models" / "nuclei-unet.pt")]
    res = subprocess.run([sys.executable, "-c", code, *weights], capture_output=True, text=True, check=True)
    said = res.stdout.splitlines()
    assert said[0].startswith(f"refused model.weights {evil} is refused") and "calls posix.system" in said[0]
    assert said[2:5:2] == [f"accepted {p4}", f"accepted {weights[2]}"] and not marker.exists()
    for line, w in zip(said[3::2], weights[1:]):  # mpp 0.25 against a model trained at 0.5: refused, no torch
        assert line.startswith("refused model.mpp=0.25") and f"checkpoint {w} was trained at 0.5" in line


def test_stain_normalise_needs_a_reference_and_a_network():
    """model.stain_normalise: reinhard without model.stain_reference, or on the classical model,
    is refused with the fix; off (absent or none) loads as before."""
    from wsiseg.models import check_stain

    base = {"name": "m", "weights": "models/nuclei-unet.pt", "mpp": 0.5}
    assert check_stain(base) is None and check_stain({**base, "stain_normalise": "none"}) is None
    with pytest.raises(ConfigError, match="stain_reference.*python -m wsiseg.stain"):
        check_stain({**base, "stain_normalise": "reinhard"})
    ref = {"mean": [54.0, 31.7, -11.0], "std": [18.0, 10.2, 8.8]}
    assert check_stain({**base, "stain_normalise": "reinhard", "stain_reference": ref})["reference"] == ref
    with pytest.raises(ConfigError, match="classical model"):
        check_stain(
            {"name": "c", "format": "classical", "mpp": 0.5, "stain_normalise": "reinhard", "stain_reference": ref}
        )


def test_postprocess_config_over_the_stored_thresholds_and_refused_in_words():
    """model.postprocess: absent, a checkpoint's stored thresholds; a mapping overrides some of them;
    none turns the separation off (boundary is then a mask class); on a model without a boundary
    class, on the classical model, or with a bad key or value, refused with the fix, where Snakemake
    starts (classes from the config or the checkpoint's metadata, no torch) and when loading."""
    from wsiseg.models import check_postprocess, load_model

    ck = {"name": "m", "weights": str(REPO / "models" / "nuclei-unet.pt")}
    stored = load_model(ck, geometry=False, network=False).postprocess
    assert stored == {"fg_threshold": 0.7, "seed_threshold": 0.8, "min_seed_um2": 2.0, "min_object_um2": 3.0}
    spec = load_model(
        {**ck, "postprocess": {"seed_threshold": 0.85, "min_object_um2": 4}}, geometry=False, network=False
    )
    assert spec.postprocess == {**stored, "seed_threshold": 0.85, "min_object_um2": 4.0}
    assert spec.mask_classes == ["background", "nucleus"]
    off = load_model({**ck, "postprocess": "none"}, geometry=False, network=False)
    assert off.postprocess is None and off.mask_classes == ["background", "nucleus", "boundary"]
    check_postprocess({**ck, "postprocess": {"fg_threshold": 0.5}})  # taken
    fix = "Fix: set model.postprocess to none, or to a mapping of some of"
    for bad, said in (
        ({"fg_threshold": 1.0}, "fg_threshold must be a probability between 0 and 1"),
        ({"seed_threshold": True}, "seed_threshold must be a probability"),
        ({"min_object_um2": -1}, r"min_object_um2 must be an area in µm² \(>= 0\)"),
        ({"thresh": 0.5}, r"unknown keys \['thresh'\]"),
        ("off", "must be none or a mapping"),
    ):
        for check in (check_postprocess, lambda c: load_model(c, geometry=False, network=False)):
            with pytest.raises(ConfigError, match=f"model.postprocess.*{said}.*{fix}"):
                check({**ck, "postprocess": bad})
    two = {"name": "t", "weights": "m.ts", "format": "torchscript", "classes": ["background", "tumour"], "mpp": 0.5}
    with pytest.raises(ConfigError, match=r"classes are \['background', 'tumour'\]. Fix: remove model.postprocess"):
        check_postprocess({**two, "postprocess": {"fg_threshold": 0.5}})
    check_postprocess({**two, "postprocess": "none"})  # what it gets anyway
    classical = {"name": "c", "format": "classical", "mpp": 0.5}
    assert load_model(classical).postprocess is None
    for value in ({"fg_threshold": 0.5}, "none"):
        for check in (check_postprocess, load_model):
            with pytest.raises(ConfigError, match="classical model has its own settings.*remove model.postprocess"):
                check({**classical, "postprocess": value})


def test_stain_max_scale_at_least_one():
    """model.stain_max_scale bounds each channel's stretch to [1/it, it]: 2 when absent, any number
    from 1 (a shift of the mean, no stretch) taken; below 1 (inverted), or not a number, refused
    with the fix."""
    from wsiseg.models import check_stain

    ref = {"mean": [54.0, 31.7, -11.0], "std": [18.0, 10.2, 8.8]}
    base = {"name": "m", "weights": "models/nuclei-unet.pt", "mpp": 0.5, "stain_normalise": "reinhard"}
    assert check_stain({**base, "stain_reference": ref})["max_scale"] == 2.0
    assert check_stain({**base, "stain_reference": ref, "stain_max_scale": 3})["max_scale"] == 3.0
    assert check_stain({**base, "stain_reference": ref, "stain_max_scale": 1})["max_scale"] == 1.0
    for bad in (0.99, 0.5, 0, -2, "2", True, None):
        with pytest.raises(ConfigError, match="stain_max_scale must be a number of at least 1.*Fix: set it to 2"):
            check_stain({**base, "stain_reference": ref, "stain_max_scale": bad})
    # off: the key is not looked at (the rules drop it, so nothing reruns)
    assert check_stain({**base, "stain_normalise": "none", "stain_max_scale": 0.5}) is None


def test_stain_max_scale_default_agrees():
    """The config check (wsiseg.models, no torch) and the transform (wsiseg.stain, torch) each hold
    model.stain_max_scale's default: one number."""
    from wsiseg.models import STAIN_MAX_SCALE, stain_max_scale
    from wsiseg.stain import MAX_SCALE

    assert STAIN_MAX_SCALE == MAX_SCALE == stain_max_scale({"name": "m"})


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_unet_sizes_are_the_networks(padding):
    """The U-Net's sizes without torch (wsiseg.unet_sizes, what the plan stage uses) are
    UNet.output_size's, and the network's own output where they call an input legal."""
    from wsiseg import unet_sizes
    from wsiseg.models.probe import probe

    for depth in range(1, 6):
        m = UNet(n_classes=1, depth=depth, base_width=1, padding=padding, batch_norm=False).eval()
        sizes = range(1, 12 * 2**depth + 200)
        assert [unet_sizes.output_size(n, depth, padding) for n in sizes] == [m.output_size(n) for n in sizes]
        legal = [n for n in sizes if m.output_size(n)][:3]
        assert legal and [probe(m, n) for n in legal] == [m.output_size(n) for n in legal]
        assert unet_sizes.border(depth, padding) == (legal[0] - probe(m, legal[0])) // 2
        assert unet_sizes.first_legal(depth, padding) == legal[0]


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_checkpoint_geometry_without_the_network(tmp_path, padding):
    """load_model(network=False), the plan stage's: no module, the rest as the full load says it
    (its output sizes included), from the checkpoint's metadata."""
    p, _ = _ckpt(tmp_path, depth=2, base_width=4, padding=padding, batch_norm=False)
    cfg = dict(name="t", weights=str(p), classes=["background", "nucleus"], mpp=0.5)
    full, light = load_model(cfg), load_model(cfg, network=False)
    assert light.module is None and full.module is not None
    fields = ("classes", "mpp", "name", "checksum", "kind", "align", "border", "halo", "postprocess", "stain")
    assert [getattr(light, f) for f in fields] == [getattr(full, f) for f in fields]
    assert [light.output_size(n) for n in range(1, 200)] == [full.module.output_size(n) for n in range(1, 200)]
    with pytest.raises(ConfigError, match="depth"):  # a config that contradicts it: refused as before
        load_model(dict(cfg, depth=3), network=False)


def test_unet_code_key_is_the_hash_of_inspect_getsource(tmp_path):
    """The halo cache's key for the U-Net's code, read off the file without importing it, is
    the value it had when it hashed inspect.getsource(wsiseg.unet): caches stay valid. Also for
    files with a coding cookie, CRLF line ends and no newline at the end."""
    import hashlib
    import importlib.util
    import inspect

    from wsiseg import unet
    from wsiseg.models.checkpoint import source_key, unet_code_key

    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    assert unet_code_key() == key(inspect.getsource(unet))
    files = {
        "plain": b"x = 1\n",
        "crlf_no_end": b"x = 1\r\ny = 'two'\r\nz = 3",
        "latin1": "# -*- coding: latin-1 -*-\ns = 'caf\xe9'\n".encode("latin-1"),
    }
    for name, data in files.items():
        path = tmp_path / f"{name}.py"
        path.write_bytes(data)
        spec = importlib.util.spec_from_file_location(f"srckey_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert source_key(str(path)) == key(inspect.getsource(mod)), name
    assert source_key(str(tmp_path / "missing.py")) is None and source_key(None) is None


@needs_data
@pytest.mark.parametrize("weights", ["shipped", "valid", "torchscript"])
def test_plan_stage_imports_no_torch_once_the_geometry_is_cached(tmp_path, monkeypatch, weights):
    """The plan stage of a checkpoint or a TorchScript file, in a process of its own, imports
    neither torch, scikit-image, SciPy nor pandas (1.5-3 s, 0.3 s, 0.2-0.3 s and 0.3 s of every
    plan job) once the halo (and for TorchScript the window sizes it probed) are in the cache,
    and writes the plan that the full
    model gives, byte for byte but its elapsed time. The shipped weights run with the shipped
    config's stain normalisation: the plan measures the slide's stain (numpy), still without
    torch."""
    import subprocess
    import sys

    from wsiseg import models, plan
    from wsiseg.models import checkpoint

    extra = {}  # the model block beyond name and weights
    if weights == "shipped":  # 'same', depth 4, its own post-processing settings, the shipped stain block
        path = REPO / "models" / "nuclei-unet.pt"
        shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["model"]
        extra = {k: v for k, v in shipped.items() if k.startswith("stain_")}
        assert extra["stain_normalise"] == "reinhard"
    elif weights == "torchscript":  # any network saved by torch.jit: geometry by probing it, then cached
        torch.manual_seed(0)
        m = UNet(n_classes=3, depth=2, base_width=4, padding="same", batch_norm=False).eval()
        path = tmp_path / "m.ts"
        torch.jit.save(torch.jit.script(m), str(path))
        extra = dict(format="torchscript", classes=["background", "nucleus", "boundary"], mpp=0.5, depth=2)
    else:  # 'valid', depth 2, the default post-processing settings
        torch.manual_seed(0)
        m = UNet(n_classes=3, depth=2, base_width=4, padding="valid", batch_norm=False)
        path = tmp_path / "valid.pt"
        save_checkpoint(str(path), m, ["background", "nucleus", "boundary"], mpp=0.5, name="v")
    monkeypatch.setenv("WSISEG_CACHE", str(tmp_path / "cache"))
    checkpoint.unet_same_halo.cache_clear()
    kw = dict(
        slide_path=str(CMU),
        slide_id="cmu",
        mpp=None,
        **all_tissue(tmp_path, CMU),
        model_cfg=dict(name="m", weights=str(path), **extra),
        tiling_cfg=dict(tile_size=512, margin="auto"),
    )
    # the full model first (as every plan job loaded it before): it measures the halo into the cache
    monkeypatch.setattr(plan, "load_model", lambda cfg, **_: models.load_model(cfg))
    full = plan.run(**kw, out_tsv=str(tmp_path / "full.tsv"), out_json=str(tmp_path / "full.json"))
    checkpoint.unet_same_halo.cache_clear()
    assert (full.spec.out_offset > 0) == (weights == "valid")
    code = (
        "import json, sys\n"
        "from wsiseg import plan\n"
        "plan.run(**json.loads(sys.argv[1]), log=lambda s: None)\n"
        "print(json.dumps([m for m in ('torch', 'skimage', 'scipy', 'pandas') if m in sys.modules]))\n"
    )
    light = dict(kw, out_tsv=str(tmp_path / "plan.tsv"), out_json=str(tmp_path / "plan.json"))
    res = subprocess.run([sys.executable, "-c", code, json.dumps(light)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1]) == []
    assert (tmp_path / "plan.tsv").read_bytes() == (tmp_path / "full.tsv").read_bytes()
    light_json, full_json = (
        re.sub(r'"elapsed_s": [^,\n]+', '"elapsed_s": 0', (tmp_path / f).read_text())
        for f in ("plan.json", "full.json")
    )
    assert light_json == full_json and json.loads(full_json)["n_tiles"] > 0
    assert ("stain_source" in json.loads(full_json)) == (weights == "shipped")


def test_weights_that_do_not_fit_their_architecture_are_refused_in_words(tmp_path):
    """A checkpoint whose tensors belong to another U-Net than the one it names (edited, or
    stitched together by hand): the stage that builds the network refuses it as a config error
    (a failure record that names the file and the fix), not with torch's size-mismatch trace."""
    path = tmp_path / "edited.pt"
    save_checkpoint(str(path), UNet(n_classes=3, depth=3, base_width=4), ["bg", "nucleus", "boundary"], 0.5, "m")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["base_width"] = 8
    torch.save(ckpt, path)
    cfg = {"name": "m", "weights": str(path)}
    assert load_model(cfg, network=False).halo > 0  # the plan needs only its geometry
    with pytest.raises(ConfigError, match=r"edited\.pt: its weights do not fit the U-Net it names.*size mismatch"):
        load_model(cfg)
