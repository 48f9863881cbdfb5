"""Rule 'train': thin entry point; logic in wsiseg.train."""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import train  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
cfg = dict(sm.params.cfg)
cfg.pop("resume", None)
cfg.update(sheet=sm.input.sheet, out_dir=sm.params.work_dir, threads=int(cfg.get("threads") or sm.threads))
with stage("train", cfg.get("name", "unet"), sm.log[0]) as log:
    summary = train.run(cfg, resume=bool(sm.params.resume), log=log.info)
    shutil.copyfile(summary["best"], sm.output.best)
    shutil.copyfile(summary["metrics"], sm.output.metrics)
    shutil.copyfile(summary["validation"], sm.output.validation)
