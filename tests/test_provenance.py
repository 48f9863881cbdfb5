"""Provenance: the git commit read from real clones (plain, worktree, packed refs, detached),
package versions as the installed packages report them, the run block a real stage writes
(times, host, config, the slide's size and mtime), and provenance.json gathered from the
records. The workflow's provenance.json per slide: tests/test_workflow.py (archive run)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import openslide
import pytest
import tifffile
from conftest import BAD, CMU, REPO, needs_data

import wsiseg
from wsiseg import provenance, tissue, triage
from wsiseg.errors import SlideError
from wsiseg.runner import read_json, stage

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(cwd, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def clone(tmp_path):
    repo = tmp_path / "clone"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("a\n")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "first")
    return repo


@needs_git
def test_git_commit_of_a_clone_worktree_packed_and_detached(clone, tmp_path):
    head = git(clone, "rev-parse", "HEAD")
    assert provenance.git_commit(clone) == head  # loose ref refs/heads/main
    assert provenance.git_dirty(clone) is False
    (clone / "a.txt").write_text("changed\n")
    assert provenance.git_dirty(clone) is True  # a tracked file differs from the commit
    git(clone, "commit", "-q", "-am", "second")
    second = git(clone, "rev-parse", "HEAD")
    git(clone, "pack-refs", "--all")  # the branch now lives in packed-refs only
    assert not (clone / ".git" / "refs" / "heads" / "main").exists()
    assert provenance.git_commit(clone) == second != head
    wt = tmp_path / "worktree"  # .git is a file naming the worktree's folder in the clone
    git(clone, "worktree", "add", "-q", "-b", "other", str(wt), head)
    assert (wt / ".git").is_file() and provenance.git_commit(wt) == head
    git(wt, "commit", "-q", "--allow-empty", "-m", "on the worktree's branch")
    assert provenance.git_commit(wt) == git(wt, "rev-parse", "HEAD") != head
    git(clone, "checkout", "-q", "--detach", head)
    assert provenance.git_commit(clone) == head
    (tmp_path / "not a clone").mkdir()
    assert provenance.git_commit(tmp_path / "not a clone") is None
    assert provenance.git_dirty(tmp_path / "not a clone") is None
    fresh = tmp_path / "no commit yet"
    fresh.mkdir()
    git(fresh, "init", "-q")
    assert provenance.git_commit(fresh) is None


def test_software_of_this_process():
    sw = provenance.software()
    assert sw["wsiseg_version"] == wsiseg.__version__
    if shutil.which("git") and (REPO / ".git").exists():  # the tests run from a clone (CI: a fresh one)
        assert sw["git_commit"] == git(REPO, "rev-parse", "HEAD")
        status = git(REPO, "status", "--porcelain", "--untracked-files=no")
        assert sw["git_dirty"] is bool(status)
    import torch

    p = sw["packages"]
    assert p["numpy"] == np.__version__ and p["tifffile"] == tifffile.__version__
    assert p["torch"] == torch.__version__ and p["openslide-python"] == openslide.__version__
    assert p["openslide"] == openslide.__library_version__
    from wsiseg.segment import device_facts

    assert device_facts(torch.device("cpu")) == dict(device_name=provenance.cpu_name(), cuda_version=None)
    assert provenance.cpu_name()  # /proc/cpuinfo's model name on Linux
    assert provenance.device_label({"device": "cpu"}) == "cpu"
    assert provenance.device_label({"device": "cpu", "settings": {"cpu_bf16": False}}) == "cpu"
    assert provenance.device_label({"device": "cpu", "settings": {"cpu_bf16": True}}) == "cpu, bfloat16"
    assert provenance.device_label({"device": "cpu", "precision": "bfloat16"}) == "cpu, bfloat16"
    assert provenance.device_label({"device": "cpu", "precision": "float32"}) == "cpu"
    gpu = {"device": "cuda", "device_name": "NVIDIA H100", "cuda_version": "12.8"}
    assert provenance.device_label(gpu) == "cuda: NVIDIA H100, CUDA 12.8"  # before precision was recorded
    assert provenance.device_label(dict(gpu, precision="bfloat16")) == "cuda: NVIDIA H100, CUDA 12.8, bfloat16"
    assert provenance.device_label(dict(gpu, precision="float32")) == "cuda: NVIDIA H100, CUDA 12.8, float32"
    from wsiseg.segment import network_precision

    cpu = torch.device("cpu")
    assert network_precision(cpu, True, False) == "float32" and network_precision(cpu, False, True) == "bfloat16"


def _iso(s):
    return datetime.fromisoformat(s).timestamp()


@needs_data
def test_stage_records_its_run_and_provenance_gathers_them(tmp_path):
    """inspect and tissue of a real slide through runner.stage: each record gets a run block
    (times, host, software, config, the slide's size and mtime) beside what the stage wrote;
    provenance.json is a function of those records."""
    slide_json, tissue_json = str(tmp_path / "slide.json"), str(tmp_path / "work" / "tissue.json")
    cfg = dict(path=str(CMU), mpp=None)
    with stage("inspect", "cmu", str(tmp_path / "inspect.log"), record=slide_json, params=cfg, inputs=[CMU]) as log:
        triage.inspect(path=str(CMU), slide_id="cmu", mpp=None, out_json=slide_json, log=log)
    tcfg = dict(mpp=None, cfg=dict(method="auto", mpp=4.0, min_area_um2=10000))
    with stage(
        "tissue", "cmu", None, record=tissue_json, params=tcfg, threads=1, inputs=[CMU]
    ) as log:  # what scripts/tissue.py gets from its job (runner.rule_job)
        tissue.run(
            slide_path=str(CMU),
            slide_id="cmu",
            mpp=None,
            out_png=str(tmp_path / "tissue.png"),
            out_thumb=str(tmp_path / "thumb.png"),
            out_json=tissue_json,
            log=log.info,
        )
    rec = read_json(tissue_json)
    assert rec["method"] == "saturation" and rec["tissue_area_mm2"] > 0  # the stage's own record is kept
    run = rec["run"]
    st = os.stat(CMU)
    assert run["inputs"] == [
        dict(
            path=str(CMU),
            exists=True,
            size_bytes=st.st_size,
            mtime=datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="milliseconds"),
        )
    ]
    assert run["params"] == tcfg and run["threads"] == 1 and run["host"] == socket.gethostname()
    assert run["stage"] == "tissue" and _iso(run["started"]) <= _iso(run["finished"])
    assert abs(_iso(run["finished"]) - _iso(run["started"]) - run["seconds"]) < 0.01
    assert _iso(read_json(slide_json)["run"]["finished"]) <= _iso(run["started"])  # inspect ran first
    assert run["wsiseg_version"] == wsiseg.__version__ and run["packages"] == provenance.package_versions()
    # a stage with no record of its own gets one; a failing stage records nothing
    made = str(tmp_path / "work" / "stats.json")
    with stage("stats", "cmu", None, record=made, params={"classes": ["background", "nucleus"]}):
        pass
    assert read_json(made)["slide_id"] == "cmu" and read_json(made)["run"]["params"]["classes"][1] == "nucleus"
    failed = str(tmp_path / "failed.json")
    with pytest.raises(SystemExit), stage("stitch", "cmu", None, record=failed):
        raise SlideError("cmu", "a test failure", "none")
    assert not os.path.exists(failed)
    # provenance.json from the records: the slide, its file, the agreed software, each stage
    records = {"inspect": slide_json, "tissue": tissue_json, "stats": made}
    prov = provenance.build(records)
    # the slide file as the tissue stage saw it, and its content fingerprint from slide.json
    want = dict(run["inputs"][0], fingerprint=read_json(slide_json)["fingerprint"])
    assert prov["slide_id"] == "cmu" and prov["input"] == want and want["fingerprint"].startswith("fp1:")
    assert list(prov["stages"]) == ["inspect", "tissue", "stats"] and prov["stages"]["tissue"] == run
    assert prov["git_commit"] == provenance.software()["git_commit"] and prov["host"] == socket.gethostname()
    assert prov["packages"]["openslide"] == openslide.__library_version__ and prov["device"] is None
    assert (
        prov["started"] == read_json(slide_json)["run"]["started"]
        and prov["finished"] == read_json(made)["run"]["finished"]
    )
    assert json.dumps(provenance.build(records)) == json.dumps(prov)  # the same records, the same bytes
    # a stage rerun by other code: its commit is listed per stage; a record from before provenance existed
    old = read_json(made)
    old["run"]["git_commit"] = "0" * 40
    del old["run"]["packages"]["numpy"]
    with open(made, "w") as fh:
        json.dump(old, fh)
    plain = tmp_path / "plan.json"
    plain.write_text(json.dumps({"slide_id": "cmu", "n_tiles": 3}))
    prov = provenance.build(dict(records, plan=str(plain)))
    if run["git_commit"]:
        assert prov["git_commit"] == {"inspect": run["git_commit"], "tissue": run["git_commit"], "stats": "0" * 40}
    assert prov["packages"]["numpy"] == np.__version__  # the stages that recorded it agree
    assert prov["stages"]["plan"] == {"stage": "plan", "recorded": False}


@needs_data
def test_a_missing_slide_is_recorded_as_missing(tmp_path):
    out = str(tmp_path / "slide.json")
    path = str(BAD["broken"].parent / "no-such-slide.svs")
    with stage("inspect", "typo", None, record=out, params={"path": path}, inputs=[path]) as log:
        triage.inspect(path=path, slide_id="typo", mpp=None, out_json=out, log=log)
    rec = read_json(out)
    assert rec["status"] == "failed" and rec["run"]["inputs"] == [dict(path=path, exists=False)]
    assert provenance.build({"inspect": out})["input"] == dict(path=path, exists=False)


def test_rule_job_is_only_a_rule_scripts_snakemake_object(monkeypatch):
    """runner.stage takes a record's facts from the rule script's `snakemake` object; a
    __main__ that merely imported the snakemake package gives none (no run block)."""
    import sys

    import snakemake as package

    from wsiseg.runner import rule_job

    monkeypatch.setattr(sys.modules["__main__"], "snakemake", package, raising=False)
    assert rule_job() is None


RULE_SCRIPT = """
import atexit, sys, threading, time
folder, mode = sys.argv[1:3]
from wsiseg.runner import stage


class Job:  # what Snakemake puts into a rule script's globals, as much as runner.rule_job reads
    output = {"json": f"{folder}/record.json"}
    params = {"cfg": 1}
    threads = 1


snakemake = Job()
atexit.register(lambda: open(f"{folder}/teardown", "w").close())
if mode == "thread":  # work that is still running when the stage is done
    late = threading.Thread(target=lambda: (time.sleep(0.5), open(f"{folder}/late", "w").write("done")))
    late.start()
with stage("demo", "s1", f"{folder}/demo.log") as log:
    log.info("working")
    print("inside the stage")  # stdout is a pipe: buffered
print("after the stage")
"""


@pytest.mark.parametrize("mode", ["done", "thread"])
def test_a_rule_script_leaves_without_teardown_once_its_stage_is_done(tmp_path, mode):
    """A rule script's stage, once done, ends its process without Python's teardown
    (runner.leave_now: torch's takes 0.4-0.7 s per segment job): exit status 0, the rule's log,
    stdout and the run block written; nothing after the stage runs, atexit handlers included.
    With a thread still working it does not: Python's exit waits for the thread, as before."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run(
        [sys.executable, "-c", RULE_SCRIPT, str(tmp_path), mode], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "demo s1: done" in (tmp_path / "demo.log").read_text()
    assert read_json(str(tmp_path / "record.json"))["run"]["params"] == {"cfg": 1}
    assert "inside the stage" in res.stdout
    if mode == "done":
        assert "after the stage" not in res.stdout and not (tmp_path / "teardown").exists()
    else:
        assert (tmp_path / "late").read_text() == "done"
        assert "after the stage" in res.stdout and (tmp_path / "teardown").exists()


def test_snakemakes_rescheduling_timer_is_cancelled_when_the_run_is_over():
    """The installed Snakemake still ends a scheduling round with a non-daemon timer that
    re-runs its scheduler a timespan later (its exit waited up to a second for the last one);
    runner.end_rescheduling_timers, which the workflow's onsuccess and onerror call, cancels
    exactly those timers before they fire."""
    import threading
    from types import SimpleNamespace

    from snakemake.scheduling.job_scheduler import JobScheduler

    from wsiseg.runner import end_rescheduling_timers

    other = threading.Timer(60, lambda: None)
    other.start()
    fired = threading.Semaphore(0)
    JobScheduler._schedule_reevalutation(SimpleNamespace(_open_jobs=fired), 60)  # as the scheduler calls it
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t is not other]
    assert len(timers) == 1 and not timers[0].daemon
    try:
        assert end_rescheduling_timers() == 1
        timers[0].join(10)
        assert not timers[0].is_alive() and not fired.acquire(blocking=False)  # ended, never fired
        assert other.is_alive()  # another timer is left alone
    finally:
        other.cancel()
        timers[0].cancel()


def test_stain_normalisation_in_provenance(tmp_path):
    """A plan made with model.stain_normalise: provenance.json says what the slide's tissue colour
    was (the plan's measurement), what it was moved to (the plan's params) and by what factors
    (the plan's, clamped to the bound the plan applied, model.stain_max_scale)."""
    ref = {"mean": [54.0, 31.7, -11.0], "std": [18.0, 10.2, 8.8]}
    src = {"mean": [60.0, 25.0, -15.0], "std": [15.0, 8.0, 7.0], "pixels": 123456}
    model = {"name": "m", "weights": "w.pt", "mpp": 0.5, "stain_normalise": "reinhard", "stain_reference": ref}
    plan = str(tmp_path / "plan.json")
    with stage("plan", "s", None, record=plan, params={"model": model}):
        with open(plan, "w") as fh:
            plan_json = {"slide_id": "s", "stain_source": src, "stain_scale": [1.2, 1.275, 1.257]}
            json.dump({**plan_json, "stain_max_scale": 2.0}, fh)  # as the plan stage writes them
    prov = provenance.build({"plan": plan})
    assert prov["stain_normalisation"] == {
        "method": "reinhard",
        "source": src,
        "reference": ref,
        "max_scale": 2.0,  # the bound the plan applied (the default: model.stain_max_scale was not set)
        "scale": [1.2, 1.275, 1.257],
    }
    with stage("plan", "s", None, record=plan, params={"model": {"name": "m"}}):  # off: nothing said
        with open(plan, "w") as fh:
            json.dump({"slide_id": "s"}, fh)
    assert "stain_normalisation" not in provenance.build({"plan": plan})


def test_instance_postprocess_in_provenance(tmp_path):
    """The thresholds that separated an instance model's objects, as the plan applied them (a
    checkpoint's, with model.postprocess over them), are in provenance.json; a model without
    instance post-processing has none."""
    post = {"fg_threshold": 0.7, "seed_threshold": 0.85, "min_seed_um2": 2.0, "min_object_um2": 3.0}
    model = {"name": "m", "weights": "w.pt", "postprocess": {"seed_threshold": 0.85}}
    plan = str(tmp_path / "plan.json")
    with stage("plan", "s", None, record=plan, params={"model": model}):
        with open(plan, "w") as fh:
            json.dump({"slide_id": "s", "postprocess": post}, fh)
    assert provenance.build({"plan": plan})["postprocess"] == post
    with stage("plan", "s", None, record=plan, params={"model": {"name": "m"}}):
        with open(plan, "w") as fh:
            json.dump({"slide_id": "s", "postprocess": None}, fh)
    assert "postprocess" not in provenance.build({"plan": plan})
