"""Train a U-Net on annotated images (the ``train`` target).

* Data: a labeled-set sheet (see ``labels``); everything brought to the model's mpp.
* Target: 3 classes, background / interior / boundary, so that touching objects come
  apart (``target: three_class``); or 2 classes with the paper's border weight map
  (``target: weight_map``, w0 = 10, sigma = 5 px at the training resolution).
* Augmentation: ``augment`` (flips, 90° rotations, elastic, scale, HED jitter;
  optionally blur and noise).
* Crops: ``CropDataset`` cuts them from the tiles resampled once at the start of the
  run, in ``workers`` DataLoader processes; crop ``k`` has a generator of its own
  seeded by ``(seed, k)``, so the crop sequence, and with it ``work/last.pt``'s
  resume, is exact whatever the number of workers.
* Loss: pixel-wise (weighted) cross-entropy, plus soft Dice on the object classes
  (``dice_weight``). Adam, the learning rate halved on a validation-loss plateau or
  annealed along a cosine (``lr_schedule``). Optional dropout at the bottleneck.
* Initialisation: He (``unet.UNet``), or the weights of a trained checkpoint
  (``init``, e.g. the shipped nuclei model) to fine-tune it on the user's own images.
* Validation: images of the sheet's ``split`` = val, or a seeded fraction of the
  images; early stopping on the validation loss. ``best.pt`` (lowest validation loss)
  and ``last.pt`` (with optimizer and RNG state, for ``resume``) are written
  atomically and embed architecture, classes and mpp, so inference reads them as they
  are. ``metrics.csv`` gets one row per epoch.
* After training, the post-processing thresholds (foreground, seeds, smallest object)
  are chosen on the validation images (AJI at their own resolution, predicted without
  flip/rotation averaging, as the workflow segments slides by default) and stored in
  ``best.pt``.
"""

from __future__ import annotations

import csv
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import labels as L
from .augment import AugmentConfig, augment
from .errors import ConfigError
from .models import is_torchscript, load_model
from .models.checkpoint import save_checkpoint
from .predict import predict_probs, resize_probs
from .segment import network_heap, pick_device
from .unet import UNet


@dataclass
class TrainConfig:
    """The ``train:`` block. Its defaults are the config schema's (the workflow fills them from
    there; tests/test_train.py checks that these agree), so a direct call trains what the
    workflow would."""

    sheet: str
    out_dir: str
    name: str = "unet"
    mpp: float = 0.5
    target: str = "three_class"  # or weight_map
    object_class: str = "nucleus"  # name of the annotated objects' class (stats.csv column prefix)
    depth: int = 4
    base_width: int = 16
    batch_norm: bool = True
    dropout: float = 0.0
    crop: int = 256
    batch_size: int = 8
    steps_per_epoch: int = 50
    max_epochs: int = 100
    patience: int = 12
    lr: float = 1e-3
    lr_patience: int = 3  # plateau: halve the learning rate after this many epochs without a better validation loss
    lr_schedule: str = "plateau"  # or cosine: from lr to 0 over max_epochs x steps_per_epoch steps
    weight_decay: float = 1e-5
    class_weights: list = field(default_factory=lambda: [1.0, 1.0, 2.0])
    dice_weight: float = 0.5
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: all cores
    workers: int = 2  # DataLoader worker processes making the augmented crops (0: the training process)
    augment: dict = field(default_factory=dict)
    tune_postprocess: bool = True
    init: str = ""  # start from this wsiseg checkpoint's weights (fine-tuning); "" = He initialisation
    max_steps: int = 0  # stop after this many optimizer steps in total (0: no limit); for tests

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown train setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def classes_for(target: str, object_class: str = "nucleus") -> list:
    """Class names of the model: background, the objects, and the boundary of the 3-class target."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", object_class or "") or object_class in ("background", "boundary"):
        raise ConfigError(
            f"train.object_class={object_class!r}: name the annotated objects with letters, digits "
            "and _ (e.g. nucleus, gland), other than 'background' and 'boundary'"
        )
    if target == "three_class":
        return ["background", object_class, "boundary"]
    if target == "weight_map":
        return ["background", object_class]
    raise ConfigError(f"train.target must be 'three_class' or 'weight_map', not {target!r}")


def split_samples(samples, val_fraction: float, seed: int):
    """Validation images from the sheet's split column, else a seeded fraction (>= 1 image)."""
    if any(s.split for s in samples):
        tr = [s for s in samples if s.split != "val"]
        va = [s for s in samples if s.split == "val"]
    else:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(samples))
        n_val = max(1, int(round(val_fraction * len(samples)))) if len(samples) > 1 else 0
        va = [samples[i] for i in sorted(order[:n_val])]
        tr = [samples[i] for i in sorted(order[n_val:])]
    if not tr or not va:
        raise ConfigError("training needs at least one training and one validation image")
    return tr, va


def make_target(ids: np.ndarray, target: str):
    if target == "three_class":
        return L.three_class_target(ids).astype(np.int64), None
    return (ids > 0).astype(np.int64), L.border_weight_map(ids)


class CropDataset(torch.utils.data.Dataset):
    """Augmented training crops, numbered through the run: crop ``k`` (the ``k % batch_size``-th
    crop of optimizer step ``k // batch_size + 1``) is drawn with a generator of its own, seeded
    by ``(seed, k)``. Its tile (chosen in proportion to area), position and augmentation do not
    depend on which DataLoader worker makes it, how many there are, or where a run was resumed,
    so ``work/last.pt`` resumes exactly with any ``train.workers``.

    The tiles are resampled to the model's mpp once, when the run starts
    (``labels.load_set``); forked workers share them with the training process, and each
    crop is cut and warped from them (``augment``)."""

    def __init__(self, samples, cfg: TrainConfig):
        self.samples, self.cfg = samples, cfg
        area = np.array([s.image.shape[0] * s.image.shape[1] for s in samples], float)
        self.p = area / area.sum()
        self.aug = AugmentConfig(**cfg.augment)

    def __getitem__(self, k: int):
        """Crop ``k``: image (3, crop, crop) uint8, target (crop, crop) int64, pixel weights float32."""
        rng = np.random.default_rng((self.cfg.seed, int(k)))
        s = self.samples[rng.choice(len(self.samples), p=self.p)]
        img, (ids,), _ = augment(s.image, [s.instances], self.cfg.crop, self.aug, rng)
        y, w = make_target(ids, self.cfg.target)
        w = w if w is not None else np.ones(y.shape, np.float32)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(y), torch.from_numpy(w)

    def batches(self, first_step: int, last_step: int, workers: int = 0):
        """Batches (x float 0-1, y, w) of optimizer steps ``first_step + 1`` .. ``last_step``, in
        order, made by ``workers`` DataLoader worker processes (0: in this process)."""
        b = self.cfg.batch_size
        loader = torch.utils.data.DataLoader(
            self,
            batch_size=b,
            sampler=range(first_step * b, last_step * b),
            num_workers=workers,
            prefetch_factor=2 if workers else None,
            # its own generator: making the iterator draws worker seeds from it, not from the
            # training process's RNG (dropout), which must not depend on the number of workers
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        for x, y, w in loader:
            yield x.float().div(255), y, w


def loss_fn(logits, y, w, class_weights, dice_weight: float):
    """Weighted pixel-wise cross-entropy (+ soft Dice over the object classes)."""
    cw = torch.tensor(class_weights[: logits.shape[1]], dtype=logits.dtype, device=logits.device)
    ce = F.cross_entropy(logits, y, weight=cw, reduction="none")
    ce = (ce * w).sum() / (w * cw[y]).sum()
    if dice_weight <= 0:
        return ce
    p = torch.softmax(logits, 1)
    onehot = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter = (p * onehot).sum((0, 2, 3))[1:]
    denom = (p + onehot).sum((0, 2, 3))[1:]
    dice = 1 - ((2 * inter + 1) / (denom + 1)).mean()
    return ce + dice_weight * dice


def val_batches(samples, cfg: TrainConfig, align: int):
    """Whole validation images, mirror-padded to legal sizes (no augmentation)."""
    from .predict import pad_to

    out = []
    for s in samples:
        x = torch.from_numpy(np.ascontiguousarray(s.image.transpose(2, 0, 1))).float().div(255)[None]
        x, (top, left) = pad_to(x, align, 16)
        y, w = make_target(s.instances, cfg.target)
        w = np.ones(y.shape, np.float32) if w is None else w
        h, wd = y.shape
        out.append((x, torch.from_numpy(y)[None], torch.from_numpy(w)[None], (top, left, h, wd)))
    return out


def train_step(model, opt, batch, cfg: TrainConfig, device) -> float:
    """One optimizer step on a batch (x, y, w) of augmented crops; returns its loss."""
    x, y, w = batch
    x = x.to(device, memory_format=torch.channels_last)  # the model's layout (run): NHWC convolutions
    loss = loss_fn(model(x), y.to(device), w.to(device), cfg.class_weights, cfg.dice_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def validate(model, batches, cfg: TrainConfig, device) -> tuple[float, float]:
    """Mean validation loss and mean object Dice over the validation images.

    The Dice compares the pixels whose most likely class is not background with the
    annotated objects, before any post-processing: a per-epoch figure that reads
    like Dice, where the loss does not.
    """
    was_training = model.training
    model.eval()
    tot, dice = 0.0, 0.0
    for x, y, w, (top, left, h, wd) in batches:
        logits = model(x.to(device, memory_format=torch.channels_last))[:, :, top : top + h, left : left + wd]
        y = y.to(device)
        tot += float(loss_fn(logits, y, w.to(device), cfg.class_weights, cfg.dice_weight))
        pred, true = logits.argmax(1) > 0, y > 0
        denom = int(pred.sum() + true.sum())
        dice += 2 * int((pred & true).sum()) / denom if denom else 1.0
    model.train(was_training)
    return tot / len(batches), dice / len(batches)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: half a cosine from ``lr`` to 0."""
    return 0.5 * lr * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def run(cfg: TrainConfig | dict, resume: bool = False, log=print) -> dict:
    """Train; returns a summary dict (paths, epochs, best validation loss)."""
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
    classes = classes_for(cfg.target, cfg.object_class)
    os.makedirs(cfg.out_dir, exist_ok=True)
    best_path = os.path.join(cfg.out_dir, "best.pt")
    last_path = os.path.join(cfg.out_dir, "last.pt")
    csv_path = os.path.join(cfg.out_dir, "metrics.csv")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.lr_schedule not in ("plateau", "cosine"):
        raise ConfigError(f"train.lr_schedule must be 'plateau' or 'cosine', not {cfg.lr_schedule!r}")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, log)
    init = read_init(cfg, classes) if cfg.init else None  # checked before any image is read

    samples = L.load_set(cfg.sheet, cfg.mpp, keep_native=True)
    train_s, val_s = split_samples(samples, cfg.val_fraction, cfg.seed)
    log(
        f"training on {len(train_s)} images ({', '.join(s.name for s in train_s)}); "
        f"validating on {len(val_s)} ({', '.join(s.name for s in val_s)}); mpp {cfg.mpp}; device {device}"
    )
    stain_ref = _stain_reference(train_s, log)

    model = UNet(
        n_classes=len(classes),
        depth=cfg.depth,
        base_width=cfg.base_width,
        padding="same",
        batch_norm=cfg.batch_norm,
        dropout=cfg.dropout,
        **(init["norm"] if init else {}),
    ).to(device, memory_format=torch.channels_last)  # NHWC: 1.4x a training step on 2 CPU cores; tensor cores
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=cfg.lr_patience)
    start_epoch, best_loss, bad_epochs, steps = 0, float("inf"), 0, 0
    init_sha = init["sha256"] if init else None
    ck = torch.load(last_path, map_location=device, weights_only=True) if resume and os.path.exists(last_path) else None
    if ck is not None and ck["extra"]["train"].get("init_sha256") != init_sha:
        log(
            f"not resuming from {last_path}: it was started from other weights than train.init now names; "
            "training starts over"
        )
        ck = None
    if ck is not None:
        model.load_state_dict(ck["state_dict"])
        st = ck["extra"]["resume"]
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch, best_loss, bad_epochs, steps = st["epoch"], st["best_loss"], st["bad_epochs"], st["steps"]
        torch.set_rng_state(st["torch_rng"])  # dropout; the crops depend on the step count only
        log(f"resumed from {last_path} after epoch {start_epoch} (best validation loss {best_loss:.4f})")
    else:
        if os.path.exists(csv_path):
            os.remove(csv_path)
        if init:
            load_in_order(model, init["state_dict"], cfg.init)
            log(f"starting from the weights of {cfg.init} (sha256 {init['sha256'][:12]}…), not from He initialisation")

    crops = CropDataset(train_s, cfg)
    total_steps = cfg.max_epochs * cfg.steps_per_epoch  # the cosine schedule's length (max_steps does not change it)
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    vb = val_batches(val_s, cfg, 2**cfg.depth)
    fields = ["epoch", "steps", "train_loss", "val_loss", "val_dice", "lr", "seconds", "best"]
    if os.path.exists(csv_path):  # resuming a run whose metrics.csv has other columns: keep them
        with open(csv_path, newline="") as fh:
            fields = next(csv.reader(fh), fields) or fields
    model.train()
    stop_reason = "max_epochs"
    epoch = start_epoch
    last_epoch = cfg.max_epochs
    if bad_epochs >= cfg.patience:  # a resumed run that had already stopped early: nothing to train
        stop_reason, last_epoch = "early stopping (reached before resuming)", start_epoch
    elif steps >= last_step:  # a resumed run that has made all its steps: nothing to train
        stop_reason, last_epoch = "max_steps (reached before resuming)", start_epoch
    batches = crops.batches(steps, max(steps, last_step), cfg.workers)
    try:
        for epoch in range(start_epoch + 1, last_epoch + 1):
            t0 = time.monotonic()
            losses = []
            for _ in range(cfg.steps_per_epoch):
                if cfg.lr_schedule == "cosine":
                    for g in opt.param_groups:
                        g["lr"] = cosine_lr(cfg.lr, steps, total_steps)
                batch = next(batches)  # the first forks the crop workers
                if device.type == "cpu":  # then this process's heap (theirs keep glibc's defaults)
                    network_heap()  # activations from the heap, not fresh page-faulted mappings
                losses.append(train_step(model, opt, batch, cfg, device))
                steps += 1
                if steps >= last_step:
                    break
            vloss, vdice = validate(model, vb, cfg, device)
            lr_used = opt.param_groups[0]["lr"]
            if cfg.lr_schedule == "plateau":
                sched.step(vloss)
            improved = vloss < best_loss
            if improved:
                best_loss, bad_epochs = vloss, 0
                save_checkpoint(
                    best_path,
                    model,
                    classes,
                    cfg.mpp,
                    cfg.name,
                    extra=dict(train=_train_info(cfg, epoch, steps, vloss, train_s, val_s, init_sha, stain_ref)),
                )
            else:
                bad_epochs += 1
            row = dict(
                epoch=epoch,
                steps=steps,
                train_loss=float(np.mean(losses)),
                val_loss=vloss,
                val_dice=round(vdice, 4),
                lr=lr_used,
                seconds=round(time.monotonic() - t0, 1),
                best=int(improved),
            )
            new = not os.path.exists(csv_path)
            with open(csv_path, "a", newline="") as fh:
                wr = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
                if new:
                    wr.writeheader()
                wr.writerow(row)
            log(
                f"epoch {epoch}: train loss {row['train_loss']:.4f}, validation loss {vloss:.4f}"
                f"{' (best)' if improved else ''}, validation Dice {vdice:.3f}, {row['seconds']} s"
            )
            resume_state = dict(
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                epoch=epoch,
                best_loss=best_loss,
                bad_epochs=bad_epochs,
                steps=steps,
                torch_rng=torch.get_rng_state(),
            )
            save_checkpoint(
                last_path,
                model,
                classes,
                cfg.mpp,
                cfg.name,
                extra=dict(
                    resume=resume_state,
                    train=_train_info(cfg, epoch, steps, vloss, train_s, val_s, init_sha, stain_ref),
                ),
            )
            if bad_epochs >= cfg.patience:
                stop_reason = f"early stopping: no better validation loss for {cfg.patience} epochs"
                break
            if cfg.max_steps and steps >= cfg.max_steps:
                stop_reason = "max_steps"
                break
    finally:
        batches.close()  # ends the DataLoader workers, also when training stops early or fails
    log(f"stopped after epoch {epoch} ({stop_reason}); best validation loss {best_loss:.4f}")
    summary = dict(
        best=best_path,
        last=last_path,
        metrics=csv_path,
        epochs=epoch,
        steps=steps,
        best_val_loss=best_loss,
        stop=stop_reason,
    )
    if cfg.tune_postprocess and cfg.target == "three_class" and os.path.exists(best_path):
        summary["postprocess"] = tune_postprocess(best_path, val_s, device, log)
    if os.path.exists(best_path):
        summary["validation"] = score_validation(
            best_path, val_s, device, os.path.join(cfg.out_dir, "validation.csv"), log
        )
    return summary


def _stain_reference(train_s, log) -> dict | None:
    """The training tissue's CIE-Lab statistics: what ``model.stain_reference`` should hold to
    use this model with ``model.stain_normalise: reinhard`` (logged; kept in the checkpoint)."""
    from .stain import reference_of

    ref = reference_of(s.image for s in train_s)
    if ref is None:
        return None
    log(f"stain reference of the training tiles (model.stain_reference): mean {ref['mean']}, std {ref['std']}")
    return ref


def _train_info(cfg, epoch, steps, vloss, train_s, val_s, init_sha: str | None, stain_ref: dict | None = None) -> dict:
    info = dict(
        config=asdict(cfg),
        epoch=epoch,
        steps=steps,
        val_loss=vloss,
        train_images=[s.name for s in train_s],
        val_images=[s.name for s in val_s],
        torch=str(torch.__version__),
    )
    if init_sha:
        info["init_sha256"] = init_sha  # the weights training started from (train.init)
    if stain_ref:
        info["stain_reference"] = stain_ref  # model.stain_reference for model.stain_normalise: reinhard
    return info


# ------------------------------------------------------------------ fine-tuning
def read_init(cfg: TrainConfig, classes: list) -> dict:
    """The checkpoint named by ``train.init``, read as inference reads it (``wsiseg.models.load_model``)
    and checked against the training settings.

    Its architecture, classes and mpp must be those being trained: a mismatch is an
    error that names the setting to change. Dropout may differ (it has no weights).
    """
    path = cfg.init
    if not os.path.isfile(path):
        raise ConfigError(
            f"train.init={path!r}: no such file; name a checkpoint written by `snakemake train` "
            "(e.g. models/nuclei-unet.pt) or remove train.init to train from scratch"
        )
    if is_torchscript(path):
        raise ConfigError(
            f"train.init={path!r} is TorchScript; fine-tuning needs a wsiseg checkpoint "
            "(written by `snakemake train` or wsiseg.models.checkpoint.save_checkpoint)"
        )
    spec = load_model({"weights": path, "name": "init"}, geometry=False)
    arch = spec.module.config
    wanted = dict(depth=cfg.depth, base_width=cfg.base_width, batch_norm=cfg.batch_norm, padding="same")
    for key, val in wanted.items():
        if arch[key] != val:
            fix = (
                f"set train.{key}: {arch[key]!r}"
                if key != "padding"
                else "train makes 'same' U-Nets only; train from scratch"
            )
            raise ConfigError(
                f"train.init={path!r} is a U-Net with {key}={arch[key]!r}, but train.{key} is {val!r}: {fix}"
            )
    if spec.classes != list(classes):
        raise ConfigError(
            f"train.init={path!r} has classes {spec.classes}, but train.target={cfg.target!r} "
            f"trains {classes}: set train.target and train.object_class to the checkpoint's"
        )
    if abs(spec.mpp / cfg.mpp - 1) > 0.01:
        raise ConfigError(
            f"train.init={path!r} was trained at {spec.mpp} µm/px, but train.mpp is {cfg.mpp}: "
            f"set train.mpp: {spec.mpp}"
        )
    return dict(
        state_dict=spec.module.state_dict(), sha256=spec.checksum, norm=dict(mean=arch["mean"], std=arch["std"])
    )


def load_in_order(model: UNet, state_dict: dict, source: str) -> None:
    """Copy ``state_dict`` into ``model`` tensor by tensor, in order.

    The order of a U-Net's tensors does not depend on dropout (which has none), but
    the names do (the bottleneck's layer indices shift), so a checkpoint trained with
    or without dropout loads into a model with the other setting.
    """
    own = model.state_dict()
    theirs = list(state_dict.values())
    if len(own) != len(theirs) or any(a.shape != b.shape for a, b in zip(own.values(), theirs)):
        raise ConfigError(
            f"train.init={source!r}: its tensors do not fit the U-Net being trained "
            "(depth, base_width, batch_norm or classes differ); use a matching checkpoint"
        )
    model.load_state_dict(dict(zip(own.keys(), theirs)))


FG_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8)
SEED_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MIN_OBJECT_UM2 = (3.0, 6.0, 10.0)


def tune_postprocess(best_path: str, val_s, device, log=print) -> dict:
    """Pick the instance thresholds (foreground, seeds, smallest object) with the best mean AJI on
    the validation images, predicted as the workflow predicts slides by default: without
    flip/rotation averaging (``model.tta: false``), at each image's own resolution."""
    from .metrics import aji
    from .postprocess import InstanceParams, instances_from_probs, remove_small

    ck = torch.load(best_path, map_location="cpu", weights_only=True)
    model = load_model({"weights": best_path, "name": ck["name"]}, device=str(device), geometry=False).module
    probs = [
        resize_probs(predict_probs(model, s.image, 2**model.depth, tta=False, device=device), s.native_shape)
        for s in val_s
    ]
    best, best_aji = InstanceParams(), -1.0
    for fg in FG_THRESHOLDS:
        for seed in SEED_THRESHOLDS:
            # the smallest-object filter is the last step of instances_from_probs: apply it to one result
            p0 = InstanceParams(fg_threshold=fg, seed_threshold=seed, min_object_um2=0.0)
            ids = [instances_from_probs(pr, s.mpp, p0) for s, pr in zip(val_s, probs)]
            for min_um2 in MIN_OBJECT_UM2:
                a = float(
                    np.mean(
                        [
                            aji(s.native_instances, remove_small(i, int(round(min_um2 * (1.0 / (s.mpp * s.mpp))))))
                            for s, i in zip(val_s, ids)
                        ]
                    )
                )
                if a > best_aji:
                    best, best_aji = InstanceParams(fg_threshold=fg, seed_threshold=seed, min_object_um2=min_um2), a
    log(
        f"post-processing chosen on the validation images without TTA: {best.as_dict()} (validation AJI {best_aji:.4f})"
    )
    extra = dict(ck.get("extra", {}))
    extra["postprocess"] = best.as_dict()
    extra["val_aji"] = best_aji
    save_checkpoint(best_path, model.cpu(), ck["classes"], ck["mpp"], ck["name"], extra=extra)
    return dict(best.as_dict(), val_aji=best_aji)


def score_validation(best_path: str, val_s, device, out_csv: str, log=print) -> str:
    """The evaluate target's metrics for ``best.pt`` on the validation images, to ``out_csv``.

    Per image and mean: pixel accuracy, precision, recall, Dice, IoU, AJI, object F1,
    with the post-processing stored in ``best.pt``, at each image's own resolution,
    predicted as the workflow predicts slides (no flip/rotation averaging). This is
    how good the model is on the user's own held-out images; scoring other labeled
    sets is the evaluate target's job.
    """
    from .metrics import all_metrics, write_metrics
    from .postprocess import InstanceParams, instances_from_probs

    spec = load_model({"weights": best_path, "name": "validation"}, device=str(device), geometry=False)
    params = InstanceParams(**(spec.postprocess or {}))
    rows = []
    for s in val_s:
        prob = resize_probs(predict_probs(spec.module, s.image, spec.align, tta=False, device=device), s.native_shape)
        rows.append(
            dict(image=s.name, mpp=s.mpp, **all_metrics(s.native_instances, instances_from_probs(prob, s.mpp, params)))
        )
    write_metrics(rows, out_csv, log=lambda m: log(f"validation images ({params.as_dict()}): {m}"))
    return out_csv
