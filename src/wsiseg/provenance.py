"""Provenance (rule 'provenance'): what made a slide's results, in one provenance.json.

Each stage adds a ``run`` block to the record it writes (slide.json, work/tissue.json,
plan.json, work/segment.json, work/stitch.json, work/stats.json,
work/object_histograms.json): start and end time,
host, the project's version and git commit, package versions, the stage's effective
config (its rule's params) and the size and mtime of the slide it read. The writer is
:func:`wsiseg.runner.stage`; this module says what goes into the block
(:func:`run_info`) and gathers the blocks of one slide into provenance.json
(:func:`build`), a function of the records alone: the rule reruns only when a record
changed, and then writes the same bytes for the same records.

Nothing here runs a shell: the git commit is read from ``.git`` (HEAD, loose refs,
packed-refs; worktrees included), and only whether the clone has uncommitted changes
asks ``git`` (an argument list, no shell; None where git is missing).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path

#: the stages of one slide, in the order they run, as provenance.json lists them
STAGES = ("inspect", "tissue", "plan", "segment", "stitch", "stats", "report_histograms")
#: distributions whose versions every stage records (None: not installed in its environment)
PACKAGES = (
    "torch",
    "numpy",
    "tifffile",
    "openslide-python",
    "openslide-bin",
    "imagecodecs",
    "simplejpeg",  # decodes the JPEG tiles of SVS and generic TIFFs (wsiseg.jpeg_tiles)
    "scipy",
    "scikit-image",
    "pandas",
    "pillow",
    "snakemake",
)
#: the project's root, when this file is src/wsiseg/provenance.py of a clone
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ facts of one process
def git_commit(root: Path = ROOT) -> str | None:
    """The commit checked out in the clone at ``root`` (None: not a clone, or no commit yet),
    read from the files: ``.git`` may be a folder or, in a worktree, a file naming one."""
    gitdir = root / ".git"
    try:
        if gitdir.is_file():
            text = gitdir.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            gitdir = (root / text[len("gitdir:") :].strip()).resolve()
        head = (gitdir / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return head if _is_sha(head) else None  # detached HEAD
    ref = head[len("ref:") :].strip()
    common = gitdir
    if (gitdir / "commondir").is_file():  # a worktree: branches live in the main clone
        common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
    for base in (gitdir, common):
        try:
            sha = (base / ref).read_text().strip()
        except OSError:
            continue
        if _is_sha(sha):
            return sha
    try:
        lines = (common / "packed-refs").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        sha, _, name = line.partition(" ")
        if name == ref and _is_sha(sha):
            return sha
    return None


def _is_sha(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)


def git_dirty(root: Path = ROOT) -> bool | None:
    """Whether tracked files of the clone differ from its commit (None: unknown)."""
    if not (root / ".git").exists():
        return None
    try:
        res = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(res.stdout.strip()) if res.returncode == 0 else None


def package_versions() -> dict:
    """{distribution: version} of :data:`PACKAGES` (None where not installed), plus the
    OpenSlide library the binding loaded (``openslide``)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import openslide

        out["openslide"] = openslide.__library_version__
    except Exception:  # no binding or no library in this environment: nothing to record
        out["openslide"] = None
    return out


@lru_cache(maxsize=1)
def software() -> dict:
    """The code and environment this process runs: version, commit, Python, packages."""
    from . import __version__

    return dict(
        wsiseg_version=__version__,
        git_commit=git_commit(),
        git_dirty=git_dirty(),
        python=platform.python_version(),
        packages=package_versions(),
    )


def cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo (Linux); None where there is none."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(key):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def device_label(segment_info: dict) -> str:
    """One line for a table: 'cpu' ('cpu, bfloat16' with tiling.cpu_bf16 in effect), or
    'cuda: <GPU name>, CUDA <version>, <precision>' ('bfloat16' or 'float16' under autocast,
    'float32'); a segment.json written before ``precision`` was recorded gives none on a GPU."""
    dev = str(segment_info.get("device", ""))
    precision = segment_info.get("precision")
    if dev.startswith("cuda"):
        name = segment_info.get("device_name") or "GPU"
        cuda = segment_info.get("cuda_version")
        return f"cuda: {name}" + (f", CUDA {cuda}" if cuda else "") + (f", {precision}" if precision else "")
    if precision is None:  # written before precision was recorded
        precision = "bfloat16" if (segment_info.get("settings") or {}).get("cpu_bf16") else "float32"
    return dev + (f", {precision}" if precision != "float32" else "")


def file_facts(path) -> dict:
    """Absolute path, size and modification time of a file the stage read."""
    p = os.path.abspath(path)
    try:
        st = os.stat(p)
    except OSError:
        return dict(path=p, exists=False)
    return dict(path=p, exists=True, size_bytes=st.st_size, mtime=_iso(st.st_mtime))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def run_info(stage: str, started: float, finished: float, params=None, threads=None, inputs=()) -> dict:
    """The ``run`` block of a stage's record: times (epoch seconds in, ISO 8601 UTC out),
    host, software, threads, effective config (``params``: a dict or Snakemake's named
    params, made JSON-plain) and inputs."""
    return dict(
        stage=stage,
        started=_iso(started),
        finished=_iso(finished),
        seconds=round(finished - started, 3),
        host=socket.gethostname(),
        **software(),
        threads=threads,
        params=json.loads(json.dumps(dict(params.items()) if params is not None else {}, default=str)),
        inputs=[file_facts(p) for p in inputs],
    )


# --------------------------------------------------------------- provenance.json of a slide
def _agreed(values: dict):
    """One value when every stage that recorded it agrees, else {stage: value}."""
    known = {k: v for k, v in values.items() if v is not None}
    distinct = {json.dumps(v, sort_keys=True) for v in known.values()}
    if len(distinct) <= 1:
        return next(iter(known.values()), None)
    return known


def build(records: dict) -> dict:
    """provenance.json of one slide from its stage records ``{stage: path}`` (stages of
    :data:`STAGES`). A record without a run block (written before this version) is listed
    as such."""
    data = {}
    for name in STAGES:
        if name in records:
            with open(records[name]) as fh:
                data[name] = json.load(fh)
    runs = {name: d.get("run") for name, d in data.items()}
    slide = data.get("inspect", {})
    seg = data.get("segment", {})
    ran = {k: r for k, r in runs.items() if r}
    inputs = (ran.get("inspect") or {}).get("inputs") or [dict(path=slide.get("path"))]
    packages = {}
    for r in ran.values():
        packages.update({k: None for k in r.get("packages", {})})
    out = dict(
        slide_id=next((d["slide_id"] for d in data.values() if d.get("slide_id")), None),
        input=dict(inputs[0], **({"fingerprint": slide["fingerprint"]} if slide.get("fingerprint") else {})),
        wsiseg_version=_agreed({k: r.get("wsiseg_version") for k, r in ran.items()}),
        git_commit=_agreed({k: r.get("git_commit") for k, r in ran.items()}),
        git_dirty=_agreed({k: r.get("git_dirty") for k, r in ran.items()}),
        host=_agreed({k: r.get("host") for k, r in ran.items()}),
        python=_agreed({k: r.get("python") for k, r in ran.items()}),
        packages={p: _agreed({k: r.get("packages", {}).get(p) for k, r in ran.items()}) for p in packages},
        device=dict(
            used=seg.get("device"),
            name=seg.get("device_name"),
            cuda_version=seg.get("cuda_version"),
            precision=seg.get("precision"),
            asked=seg.get("device_asked", ((runs.get("segment") or {}).get("params") or {}).get("device")),
        )
        if seg
        else None,
        started=min((r["started"] for r in ran.values()), default=None),
        finished=max((r["finished"] for r in ran.values()), default=None),
        stages={k: runs[k] or dict(stage=k, recorded=False) for k in data},
    )
    plan = data.get("plan", {})
    if plan.get("stain_source") is not None:  # model.stain_normalise: what the slide's colours were moved from/to
        model = ((runs.get("plan") or {}).get("params") or {}).get("model") or {}
        out["stain_normalisation"] = dict(
            method=model.get("stain_normalise"),
            source=plan["stain_source"],
            reference=model.get("stain_reference"),
            max_scale=plan.get("stain_max_scale"),  # the bound the plan applied
            scale=plan.get("stain_scale"),  # per Lab channel, as applied (clamped to the bound)
        )
    if plan.get("postprocess"):  # an instance model: the thresholds that separated its objects, as applied
        out["postprocess"] = plan["postprocess"]
    if seg.get("settings") and runs.get("segment"):  # how segment ran: settings that change no mask
        out["stages"]["segment"] = dict(runs["segment"], settings=seg["settings"])
    return out
