"""A tiny training run on real annotated crops: the loop, checkpoints, resume, loss going down."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, needs_data

from wsiseg import train
from wsiseg.errors import ConfigError
from wsiseg.models import load_model

pytestmark = needs_data  # reads ../shared/data

SHEET = str(REPO / "config/labeled/miccai2015-train.tsv")


def tiny(out_dir, **kw):
    cfg = dict(
        sheet=SHEET,
        out_dir=str(out_dir),
        depth=2,
        base_width=8,
        crop=64,
        batch_size=4,
        steps_per_epoch=8,
        max_epochs=4,
        patience=10,
        lr=3e-3,
        threads=2,
        seed=3,
        dropout=0.1,
    )
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    return out, train.run(tiny(out))


def test_loss_goes_down_and_metrics_are_logged(full_run):
    out, summary = full_run
    m = pd.read_csv(out / "metrics.csv")
    assert m["epoch"].tolist() == [1, 2, 3, 4]
    assert list(m.columns) == ["epoch", "steps", "train_loss", "val_loss", "val_dice", "lr", "seconds", "best"]
    assert m["val_dice"].between(0, 1).all() and m["val_dice"].max() > m["val_dice"].iloc[0]
    assert m["train_loss"].iloc[-1] < 0.8 * m["train_loss"].iloc[0]
    assert m["val_loss"].min() < m["val_loss"].iloc[0]
    assert summary["best_val_loss"] == pytest.approx(m["val_loss"].min())


def test_best_checkpoint_is_ready_for_inference(full_run):
    out, summary = full_run
    spec = load_model({"name": "trained", "weights": str(out / "best.pt")})  # no classes/mpp in the config
    assert spec.classes == ["background", "nucleus", "boundary"]
    assert spec.mask_classes == ["background", "nucleus"]
    assert spec.mpp == 0.5 and spec.postprocess == {k: summary["postprocess"][k] for k in spec.postprocess}
    ck = torch.load(out / "best.pt", weights_only=True)
    info = ck["extra"]["train"]
    assert info["val_images"] == ["image03", "image10", "image14"]  # the sheet's split column
    assert "image03" not in info["train_images"]
    # the training tissue's stain, ready for model.stain_reference, and usable as such
    ref = info["stain_reference"]
    assert 30 < ref["mean"][0] < 88 and ref["mean"][1] > 0 and min(ref["std"]) > 1  # H&E tissue in CIE-Lab
    cfg = {"name": "trained", "weights": str(out / "best.pt"), "stain_normalise": "reinhard", "stain_reference": ref}
    assert load_model(cfg).stain["reference"] == ref
    with pytest.raises(ConfigError, match="mpp"):
        load_model({"name": "trained", "weights": str(out / "best.pt"), "mpp": 0.25})


def test_validation_scores_are_the_evaluate_targets_on_the_validation_images(full_run, tmp_path):
    """validation.csv: the same per-image metrics the evaluate target gives for those images."""
    from wsiseg import labels as L
    from wsiseg.evaluate import evaluate_set

    out, summary = full_run
    got = pd.read_csv(summary["validation"])
    assert got["image"].tolist() == ["image03", "image10", "image14", "mean"]
    # the nuclei counted are the annotated ones, at each image's own resolution
    val = {s.name: s for s in L.load_set(SHEET, 0.5, keep_native=True) if s.split == "val"}
    for _, r in got.iloc[:3].iterrows():
        s = val[r["image"]]
        assert r["mpp"] == s.mpp and r["n_true"] == len(np.unique(s.native_instances)) - 1
    assert np.allclose(got.iloc[3, 1:].astype(float), got.iloc[:3, 1:].astype(float).mean(), atol=1e-4)
    assert ((got["dice"] > 0) & (got["dice"] <= 1) & (got["aji"] >= 0) & (got["aji"] <= got["dice"])).all()
    # the evaluate target, given a sheet of the validation rows and no TTA, agrees to the 4th decimal
    lines = [ln for ln in open(SHEET) if not ln.startswith("#")]
    rows = lines[0] + "".join(ln for ln in lines[1:] if ln.rstrip("\n").endswith("\tval"))
    sheet = tmp_path / "val.tsv"  # paths in the sheet are relative to its folder: make them absolute
    sheet.write_text(rows.replace("../../../", str(REPO.resolve().parent) + "/"))
    want = evaluate_set(
        str(sheet), {"weights": str(out / "best.pt"), "name": "best"}, str(tmp_path / "m.csv"), tta=False
    )
    cols = ["dice", "iou", "aji", "object_f1", "precision", "recall", "n_pred"]
    assert np.allclose(got[cols].to_numpy(float), want[cols].to_numpy(float), atol=1e-4)


def test_resume_continues_exactly_where_it_stopped(full_run, tmp_path):
    """2 epochs, stop, resume to 4: same weights and metrics as the uninterrupted run."""
    out, _ = full_run
    train.run(tiny(tmp_path, max_epochs=2))
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 2
    train.run(tiny(tmp_path), resume=True)
    a = pd.read_csv(out / "metrics.csv")
    b = pd.read_csv(tmp_path / "metrics.csv")
    assert np.allclose(a[["train_loss", "val_loss"]], b[["train_loss", "val_loss"]], rtol=1e-5)
    wa = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "last.pt", weights_only=True)["state_dict"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5), k


# ------------------------------------------------------------------ both sources, DataLoader workers
BOTH = str(REPO / "config/labeled/nuclei-train.tsv")  # MICCAI 2015 + MoNuSeg 2018 train, mixed mpp


def both(out_dir, **kw):
    """A tiny run on both sets: crops from the 37 training tiles, validation on the 8 tiles of 4 sites."""
    return tiny(out_dir, **{**dict(sheet=BOTH, steps_per_epoch=3, tune_postprocess=False), **kw})


def test_crops_do_not_depend_on_workers_or_the_resume_point():
    """Crop k is the same whether made here or by one of 2 DataLoader workers, and whether the run
    started at step 0 or resumed at step 3; different seeds make different crops."""
    from wsiseg import labels as L

    cfg = train.TrainConfig.from_dict(both("", crop=48))
    tiles = [s for s in L.load_set(BOTH, cfg.mpp) if s.split != "val"]
    crops = train.CropDataset(tiles, cfg)
    here = list(crops.batches(0, 6, workers=0))
    forked = list(crops.batches(0, 6, workers=2))
    resumed = list(crops.batches(3, 6, workers=2))
    assert len(here) == len(forked) == 6 and len(resumed) == 3
    for a, b in zip(here, forked):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    for a, b in zip(here[3:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, y, w = here[0]
    assert x.shape == (4, 3, 48, 48) and x.dtype == torch.float32 and 0 <= x.min() < x.max() <= 1
    assert set(torch.unique(y).tolist()) <= {0, 1, 2} and torch.all(w == 1)
    other = train.CropDataset(tiles, train.TrainConfig.from_dict(both("", crop=48, seed=4)))
    assert not torch.equal(next(other.batches(0, 1))[0], here[0][0])
    # crops come from both sources: over 200 crops, MICCAI and MoNuSeg tiles are both drawn
    names = [tiles[np.random.default_rng((cfg.seed, k)).choice(len(tiles), p=crops.p)].name for k in range(200)]
    assert any(n.startswith("image") for n in names) and any(n.startswith("TCGA") for n in names)


def both_sheet(tmp_path, names) -> str:
    """The rows ``names`` of the two-source sheet, as they are there (mpp, split), in a sheet of their own."""
    lines = [ln for ln in open(BOTH) if not ln.startswith("#")]
    rows = lines[0] + "".join(ln for ln in lines[1:] if ln.split("\t")[0] in names)
    sheet = tmp_path / "both.tsv"  # paths in the sheet are relative to its folder: make them absolute
    sheet.write_text(rows.replace("../../../", str(REPO.resolve().parent) + "/"))
    return str(sheet)


def test_training_on_both_sets_with_workers_resumes_exactly(tmp_path):
    """MICCAI + MoNuSeg train (20x and 40x tiles of each, and a validation tile of an unseen site),
    2 DataLoader workers, cosine schedule, dropout: 4 epochs straight in this process (0 workers)
    give bit for bit the weights, losses and learning rates of 2 epochs with 2 workers, a stop,
    and a resume to 4 epochs with 2 workers."""
    names = ["image01", "image08", "TCGA-18-5592-01Z-00-DX1", "TCGA-HE-7128-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1"]
    sheet = both_sheet(tmp_path, names)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    s = train.run(both(straight, sheet=sheet, workers=0, lr_schedule="cosine"))
    train.run(both(parts, sheet=sheet, workers=2, lr_schedule="cosine", max_steps=6))  # stopped after epoch 2
    assert pd.read_csv(parts / "metrics.csv")["epoch"].tolist() == [1, 2]
    r = train.run(both(parts, sheet=sheet, workers=2, lr_schedule="cosine"), resume=True)
    assert s["steps"] == r["steps"] == 12 and r["epochs"] == 4
    a, b = pd.read_csv(straight / "metrics.csv"), pd.read_csv(parts / "metrics.csv")
    cols = ["epoch", "steps", "train_loss", "val_loss", "val_dice", "lr", "best"]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
    # the cosine schedule: lr of each epoch's last step, falling from lr towards 0
    assert a["lr"].tolist() == [train.cosine_lr(3e-3, 3 * e - 1, 12) for e in (1, 2, 3, 4)]
    assert a["train_loss"].iloc[-1] < a["train_loss"].iloc[0]
    wa = torch.load(straight / "last.pt", weights_only=True)
    wb = torch.load(parts / "last.pt", weights_only=True)
    for k in wa["state_dict"]:
        assert torch.equal(wa["state_dict"][k], wb["state_dict"][k]), k
    info = wa["extra"]["train"]
    assert info["val_images"] == ["TCGA-B0-5698-01Z-00-DX1"] and info["train_images"] == names[:4]
    # validation.csv: the validation tile scored at its own 0.252 µm/px, its annotated nuclei counted
    v = pd.read_csv(s["validation"]).set_index("image").loc["TCGA-B0-5698-01Z-00-DX1"]
    assert v["mpp"] == 0.252 and v["n_true"] == 357 and 0 < v["dice"] <= 1  # 357 nuclei (data README)


def test_resuming_a_run_from_before_val_dice_keeps_its_columns(tmp_path):
    """A metrics.csv written before the val_dice column existed goes on with its own header."""
    train.run(tiny(tmp_path, max_epochs=1, steps_per_epoch=2, tune_postprocess=False))
    old = pd.read_csv(tmp_path / "metrics.csv").drop(columns="val_dice")
    old.to_csv(tmp_path / "metrics.csv", index=False)
    train.run(tiny(tmp_path, max_epochs=2, steps_per_epoch=2, tune_postprocess=False), resume=True)
    m = pd.read_csv(tmp_path / "metrics.csv")
    assert list(m.columns) == list(old.columns) and m["epoch"].tolist() == [1, 2]


def test_weight_map_target_trains_two_classes(tmp_path):
    s = train.run(tiny(tmp_path, target="weight_map", max_epochs=1, steps_per_epoch=2))
    spec = load_model({"name": "wm", "weights": s["best"]})
    assert spec.classes == ["background", "nucleus"] and spec.postprocess is None
    assert len(pd.read_csv(s["validation"])) == 4  # scored with the default post-processing


def test_object_class_names_the_models_objects(tmp_path):
    """A gland (or any) model: its class name is in the checkpoint, so slides' stats are named by it."""
    s = train.run(tiny(tmp_path, object_class="gland", max_epochs=1, steps_per_epoch=2, tune_postprocess=False))
    spec = load_model({"name": "glands", "weights": s["best"]})
    assert spec.classes == ["background", "gland", "boundary"] and spec.mask_classes == ["background", "gland"]
    assert spec.postprocess is not None  # still an instance model: touching glands come apart
    for bad in ("boundary", "gland cells"):
        with pytest.raises(ConfigError, match="object_class"):
            train.run(tiny(tmp_path / "bad", object_class=bad))


def test_unknown_setting_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown train setting"):
        train.run(tiny(tmp_path, learning_rate=0.1))


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    s = train.run(tiny(tmp_path, max_epochs=2, patience=1, lr=0.5))  # diverges: stops early
    rows = len(pd.read_csv(tmp_path / "metrics.csv"))
    again = train.run(tiny(tmp_path, max_epochs=2, patience=1, lr=0.5), resume=True)
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == rows and again["epochs"] == s["epochs"]


# ------------------------------------------------------------------ fine-tuning
SHIPPED = str(REPO / "models/nuclei-unet.pt")


def finetune(out_dir, **kw):
    """One step from the shipped nuclei model, at its architecture; dropout 0 where it had 0.1."""
    return tiny(
        out_dir,
        **{
            **dict(
                init=SHIPPED,
                depth=4,
                base_width=16,
                dropout=0.0,
                max_epochs=1,
                steps_per_epoch=1,
                lr=1e-5,
                tune_postprocess=False,
            ),
            **kw,
        },
    )


def test_fine_tuning_starts_from_the_checkpoints_weights(full_run, tmp_path):
    from wsiseg import labels as L
    from wsiseg.models.checkpoint import sha256

    s = train.run(finetune(tmp_path))
    m = pd.read_csv(s["metrics"])
    # the shipped model's own validation loss on these images, computed directly
    cfg = train.TrainConfig.from_dict(finetune(tmp_path))
    val = [x for x in L.load_set(SHEET, 0.5, keep_native=True) if x.split == "val"]
    shipped = load_model({"name": "shipped", "weights": SHIPPED}, geometry=False).module
    shipped_loss, shipped_dice = train.validate(shipped, train.val_batches(val, cfg, 16), cfg, "cpu")
    assert m["val_loss"].iloc[0] == pytest.approx(shipped_loss, abs=0.02)  # one tiny step away from it
    assert m["val_dice"].iloc[0] == pytest.approx(shipped_dice, abs=0.01)
    # the per-epoch Dice is the evaluate target's pixel Dice of the unprocessed argmax, image by image
    # (padded as validation pads: a 'same' U-Net's edge pixels depend on the padding)
    from wsiseg.metrics import pixel_metrics
    from wsiseg.predict import predict_probs

    dice = [
        pixel_metrics(x.instances > 0, predict_probs(shipped, x.image, 16, margin=16, tta=False).argmax(0) > 0)["dice"]
        for x in val
    ]
    assert shipped_dice == pytest.approx(np.mean(dice), abs=1e-3) and shipped_dice > 0.85
    scratch = pd.read_csv(full_run[0] / "metrics.csv")["val_loss"].iloc[0]
    assert m["val_loss"].iloc[0] < 0.6 * scratch
    # and it still segments nuclei as the shipped model does, measured on the validation images
    got = pd.read_csv(s["validation"]).set_index("image")
    assert got.loc["mean", "dice"] > 0.85 and got.loc["mean", "aji"] > 0.6
    info = torch.load(s["best"], weights_only=True)["extra"]["train"]
    assert info["init_sha256"] == sha256(SHIPPED) and info["config"]["init"] == SHIPPED


def test_fine_tuning_resumes_only_from_the_same_starting_weights(tmp_path):
    from wsiseg.models.checkpoint import save_checkpoint

    first = pd.read_csv(train.run(finetune(tmp_path))["metrics"])
    again = pd.read_csv(train.run(finetune(tmp_path, max_epochs=2), resume=True)["metrics"])
    assert again["epoch"].tolist() == [1, 2] and again["val_loss"].iloc[0] == first["val_loss"].iloc[0]
    # other starting weights (the shipped model with its head zeroed): last.pt is not resumed
    other = tmp_path / "other.pt"
    model = load_model({"name": "shipped", "weights": SHIPPED}, geometry=False).module
    with torch.no_grad():
        model.head.weight.zero_()
    save_checkpoint(str(other), model, ["background", "nucleus", "boundary"], 0.5, "other")
    cfg = finetune(tmp_path, max_epochs=2)
    cfg["init"] = str(other)
    restarted = pd.read_csv(train.run(cfg, resume=True)["metrics"])
    assert restarted["epoch"].tolist() == [1, 2]
    assert restarted["val_loss"].iloc[0] > first["val_loss"].iloc[0] + 0.1  # a zeroed head predicts nothing


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(depth=3), "depth=4, but train.depth is 3: set train.depth: 4"),
        (dict(base_width=32), "set train.base_width: 16"),
        (dict(target="weight_map"), "set train.target"),
        (dict(object_class="gland"), "set train.target and train.object_class"),
        (dict(mpp=0.25), "set train.mpp: 0.5"),
        (dict(init="models/no-such.pt"), "no such file"),
    ],
)
def test_fine_tuning_a_mismatched_checkpoint_is_a_clear_error(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        train.run(finetune(tmp_path, **change))
    assert not (tmp_path / "metrics.csv").exists()


def test_train_defaults_are_the_schemas():
    """Defaults live in the schema; TrainConfig's must not diverge from it."""
    import dataclasses

    import yaml

    schema = yaml.safe_load(open(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    props = schema["properties"]["train"]["properties"]
    fields = {f.name: f for f in dataclasses.fields(train.TrainConfig)}
    checked = 0
    for key, spec in props.items():
        if "default" in spec and key in fields:
            assert fields[key].default == spec["default"], (key, fields[key].default, spec["default"])
            checked += 1
    assert checked >= 20
